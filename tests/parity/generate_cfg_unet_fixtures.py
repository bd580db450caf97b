"""Generate ``fixtures/cfg_unet.npz``: outputs of denoising-diffusion-pytorch's
classifier-free-guidance ``Unet``.

For each configuration in CASES the reference ``classifier_free_guidance.Unet``
(denoising-diffusion-pytorch 2.3.4) is built with a fixed torch seed, then every parameter,
including the ones initialised to zeros or ones (norm gains, biases) and the class embeddings
(``classes_emb``, ``null_classes_emb``), is redrawn from a fixed-seed generator so that every
weight changes the output. The network runs in eval mode on fixed inputs with every label kept,
every label dropped, a per-example keep mask, and through ``forward_with_cond_scale`` with
several guidance settings; the file stores its state_dict, inputs and outputs. This script never
imports jaxdiff.

Regenerate (from the repository root; see PROVENANCE.md):

    /work/ref/torchenv/bin/python tests/parity/generate_cfg_unet_fixtures.py

The import-only stand-ins for the reference package's Trainer imports, the seed derivation and
the deterministic .npz writer are those of ``generate_fixtures.py``, loaded from this folder.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "fixtures"


def _load_generator_module():
    spec = importlib.util.spec_from_file_location(
        "jaxdiff_parity_generate_fixtures", HERE / "generate_fixtures.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gf = _load_generator_module()

# Discrete steps at both ends and inside; log-SNR values for the Fourier-feature nets.
DISCRETE_TIMES = (0, 250, 417, 999)
LOG_SNR_TIMES = (-11.5, -2.0, 0.37, 9.25)
SMALL_ATTN = {"attn_heads": 2, "attn_dim_head": 8}
# the per-example keep mask of the ``out_mixed`` call (the reference's ``cond_keep_mask``)
KEEP_MASK = (True, False, True, False)

# name -> forward_with_cond_scale keyword arguments (every call has cond_scale != 1)
GUIDANCE: dict[str, dict] = {
    "scale3": {"cond_scale": 3.0, "rescaled_phi": 0.0},
    "scale6_phi07": {"cond_scale": 6.0, "rescaled_phi": 0.7},
    "scale2_5_phi03_no_projection": {
        "cond_scale": 2.5,
        "rescaled_phi": 0.3,
        "remove_parallel_component": False,
    },
    "scale4_phi05_keep_parallel": {
        "cond_scale": 4.0,
        "rescaled_phi": 0.5,
        "keep_parallel_frac": 0.25,
    },
}

# case id -> (Unet kwargs, (H, W), time values). dim=4 keeps the file small: every stage's
# linear attention has the reference's fixed 4 heads of 32 whatever the width.
CASES: dict[str, tuple[dict, tuple[int, int], tuple]] = {
    "default": ({"dim": 4, "num_classes": 10, "dim_mults": (1, 2)}, (8, 8), DISCRETE_TIMES),
    "learned_variance": (
        {
            "dim": 4,
            "num_classes": 3,
            "cond_drop_prob": 0.2,
            "dim_mults": (1, 2),
            "learned_variance": True,
            **SMALL_ATTN,
        },
        (8, 8),
        DISCRETE_TIMES,
    ),
    "learned_sinusoidal_3_stages": (
        {
            "dim": 4,
            "num_classes": 5,
            "init_dim": 6,
            "out_dim": 5,
            "dim_mults": (1, 2, 2),
            "learned_sinusoidal_cond": True,
            "learned_sinusoidal_dim": 12,
            **SMALL_ATTN,
        },
        (8, 12),
        LOG_SNR_TIMES,
    ),
    "random_fourier": (
        {
            "dim": 4,
            "num_classes": 4,
            "dim_mults": (1, 2),
            "random_fourier_features": True,
            **SMALL_ATTN,
        },
        (8, 8),
        LOG_SNR_TIMES,
    ),
    "grayscale": (
        {"dim": 4, "num_classes": 2, "dim_mults": (1, 2), "channels": 1, **SMALL_ATTN},
        (12, 20),
        DISCRETE_TIMES,
    ),
    "four_stages": (
        {
            "dim": 4,
            "num_classes": 7,
            "dim_mults": (1, 1, 2, 2),
            "attn_heads": 3,
            "attn_dim_head": 4,
        },
        (16, 16),
        DISCRETE_TIMES,
    ),
}


def json_config(config: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def rerandomise(net: torch.nn.Module, generator: torch.Generator) -> None:
    """Redraw every parameter so that each one matters, at scales that keep activations O(1).

    Kernels ~ N(0, 1/fan_in); biases ~ N(0, 0.2^2); norm gains ~ 1 + N(0, 0.25^2); class
    embeddings (``classes_emb.weight``, ``null_classes_emb``) and Fourier weights ~ N(0, 1).
    """
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            leaf = name.rsplit(".", 1)[-1]
            if name in ("classes_emb.weight", "null_classes_emb") or leaf == "weights":
                p.copy_(noise)
            elif leaf == "g":
                p.copy_(1.0 + 0.25 * noise)
            elif leaf == "bias":
                p.copy_(0.2 * noise)
            elif leaf == "weight":
                fan_in = math.prod(p.shape[1:])
                p.copy_(noise / math.sqrt(fan_in))
            else:
                raise ValueError(f"no redraw rule for parameter {name}")


def cfg_unet_case(store, unet_cls, case: str, config: dict, size, times) -> None:
    torch.manual_seed(gf.seed_for(f"cfg_unet/{case}/init"))
    net = unet_cls(**config).eval()
    generator = torch.Generator().manual_seed(gf.seed_for(f"cfg_unet/{case}/weights"))
    rerandomise(net, generator)

    inputs = torch.Generator().manual_seed(gf.seed_for(f"cfg_unet/{case}/inputs"))
    batch = len(times)
    x = torch.randn((batch, net.channels, *size), generator=inputs)
    label = torch.randint(0, config["num_classes"], (batch,), generator=inputs)
    discrete = all(isinstance(t, int) for t in times)
    t = torch.tensor(times, dtype=torch.int64 if discrete else torch.float32)
    keep_mask = torch.tensor(KEEP_MASK[:batch])
    with torch.no_grad():
        out_kept = net(x, t, label, cond_drop_prob=0.0)
        out_dropped = net(x, t, label, cond_drop_prob=1.0)
        out_mixed = net(x, t, label, cond_keep_mask=keep_mask)
        guided = {}
        for name, kwargs in GUIDANCE.items():
            guided[name], null = net.forward_with_cond_scale(x, t, label, **kwargs)
            if not torch.equal(null, out_dropped):
                raise RuntimeError(f"{case}/{name}: the null output differs from cond_drop_prob=1")

    store.put_all(f"{case}/state_dict", net.state_dict())
    store.put(f"{case}/x", x)
    store.put(f"{case}/time", t)
    store.put(f"{case}/label", label)
    store.put(f"{case}/keep_mask", keep_mask)
    store.put(f"{case}/out_kept", out_kept)
    store.put(f"{case}/out_dropped", out_dropped)
    store.put(f"{case}/out_mixed", out_mixed)
    store.put_all(f"{case}/guided", guided)
    store.case(
        case,
        config=json_config(config),
        image_size=list(size),
        batch=batch,
        out_dim=net.out_dim,
        num_parameters=sum(p.numel() for p in net.parameters()),
        max_abs_out=float(out_kept.abs().max()),
        guidance=GUIDANCE,
    )


def generate() -> object:
    from denoising_diffusion_pytorch.classifier_free_guidance import Unet

    store = gf.Store("cfg_unet")
    for case, (config, size, times) in CASES.items():
        cfg_unet_case(store, Unet, case, config, size, times)
    return store


def main(argv: list[str] | None = None) -> int:
    return gf.run_store_main(
        argv, __doc__.split("\n\n")[0], DEFAULT_OUT, generate, ("denoising-diffusion-pytorch",)
    )


if __name__ == "__main__":
    sys.exit(main())
