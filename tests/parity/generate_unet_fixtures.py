"""Generate ``fixtures/unet.npz``: outputs of denoising-diffusion-pytorch's ``Unet``.

For each configuration in CASES the reference ``Unet`` (denoising-diffusion-pytorch 2.3.4) is
built with a fixed torch seed, then every parameter, including the ones initialised to zeros or
ones (norm gains, biases, memory key/values, Fourier weights), is redrawn from a fixed-seed
generator so that every weight changes the output. The network runs in eval mode on fixed
inputs; the file stores its state_dict, inputs and output. This script never imports jaxdiff.

Regenerate (from the repository root; see PROVENANCE.md):

    /work/ref/torchenv/bin/python tests/parity/generate_unet_fixtures.py

The import-only stand-ins for the reference package's Trainer imports, the seed derivation and
the deterministic .npz writer are those of ``generate_fixtures.py``, loaded from this folder.
"""

from __future__ import annotations

import importlib.metadata
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

# Discrete steps at both ends and in the middle; log-SNR values for the Fourier-feature nets
# (the continuous-time classes feed log-SNR, which is negative at high noise).
DISCRETE_TIMES = (0, 417, 999)
LOG_SNR_TIMES = (-11.5, 0.37, 9.25)
SMALL_ATTN = {"attn_heads": 2, "attn_dim_head": 8}

# case id -> (Unet kwargs, (H, W), time values)
CASES: dict[str, tuple[dict, tuple[int, int], tuple]] = {
    "default": ({"dim": 8, "dim_mults": (1, 2, 4, 8)}, (32, 32), DISCRETE_TIMES),
    "learned_variance": (
        {"dim": 8, "dim_mults": (1, 2), "learned_variance": True, **SMALL_ATTN},
        (8, 8),
        DISCRETE_TIMES,
    ),
    # stores two calls: with x_self_cond, and without (the reference feeds zeros)
    "self_condition": (
        {"dim": 8, "dim_mults": (1, 2), "self_condition": True, **SMALL_ATTN},
        (8, 8),
        DISCRETE_TIMES,
    ),
    "random_fourier": (
        {"dim": 8, "dim_mults": (1, 2), "random_fourier_features": True, **SMALL_ATTN},
        (8, 8),
        LOG_SNR_TIMES,
    ),
    "learned_sinusoidal": (
        {
            "dim": 8,
            "dim_mults": (1, 2),
            "learned_sinusoidal_cond": True,
            "learned_sinusoidal_dim": 12,
            **SMALL_ATTN,
        },
        (8, 8),
        LOG_SNR_TIMES,
    ),
    "full_attn_all": (
        {"dim": 8, "dim_mults": (1, 1, 2), "full_attn": True, **SMALL_ATTN},
        (16, 16),
        DISCRETE_TIMES,
    ),
    "linear_attn_all": (
        {"dim": 8, "dim_mults": (1, 1, 2), "full_attn": (False, False, False), **SMALL_ATTN},
        (16, 16),
        DISCRETE_TIMES,
    ),
    "non_square_3_stages": (
        {"dim": 8, "dim_mults": (1, 1, 2), **SMALL_ATTN},
        (16, 32),
        DISCRETE_TIMES,
    ),
    "grayscale": (
        {"dim": 8, "dim_mults": (1, 2), "channels": 1, **SMALL_ATTN},
        (12, 20),
        DISCRETE_TIMES,
    ),
    "one_stage": ({"dim": 8, "dim_mults": (1,), **SMALL_ATTN}, (6, 10), DISCRETE_TIMES),
    "dropout_eval": (
        {"dim": 8, "dim_mults": (1, 2), "dropout": 0.3, **SMALL_ATTN},
        (8, 8),
        DISCRETE_TIMES,
    ),
    "custom_dims_tuples": (
        {
            "dim": 6,
            "init_dim": 10,
            "out_dim": 5,
            "dim_mults": (1, 2, 3),
            "attn_heads": (1, 2, 3),
            "attn_dim_head": (4, 8, 6),
            "full_attn": (True, False, True),
        },
        (16, 16),
        DISCRETE_TIMES,
    ),
    "theta_flash": (
        {
            "dim": 10,
            "dim_mults": (1, 2),
            "sinusoidal_pos_emb_theta": 500,
            "flash_attn": True,
            **SMALL_ATTN,
        },
        (8, 8),
        DISCRETE_TIMES,
    ),
}


def json_config(config: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def rerandomise(net: torch.nn.Module, generator: torch.Generator) -> None:
    """Redraw every parameter so that each one matters, at scales that keep activations O(1).

    Kernels ~ N(0, 1/fan_in); biases ~ N(0, 0.2^2); norm gains ~ 1 + N(0, 0.25^2); memory
    key/values and Fourier weights ~ N(0, 1).
    """
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "g":
                p.copy_(1.0 + 0.25 * noise)
            elif leaf in ("mem_kv", "weights"):
                p.copy_(noise)
            elif leaf == "bias":
                p.copy_(0.2 * noise)
            elif leaf == "weight":
                fan_in = math.prod(p.shape[1:])
                p.copy_(noise / math.sqrt(fan_in))
            else:
                raise ValueError(f"no redraw rule for parameter {name}")


def unet_case(store, unet_cls, case: str, config: dict, size, times) -> None:
    torch.manual_seed(gf.seed_for(f"unet/{case}/init"))
    net = unet_cls(**config).eval()
    generator = torch.Generator().manual_seed(gf.seed_for(f"unet/{case}/weights"))
    rerandomise(net, generator)

    inputs = torch.Generator().manual_seed(gf.seed_for(f"unet/{case}/inputs"))
    batch = len(times)
    x = torch.randn((batch, net.channels, *size), generator=inputs)
    discrete = all(isinstance(t, int) for t in times)
    t = torch.tensor(times, dtype=torch.int64 if discrete else torch.float32)
    self_cond = None
    if config.get("self_condition"):
        self_cond = torch.randn((batch, net.channels, *size), generator=inputs)
    with torch.no_grad():
        out = net(x, t, self_cond)
        out_no_self_cond = net(x, t) if self_cond is not None else None

    state = net.state_dict()
    store.put_all(f"{case}/state_dict", state)
    store.put(f"{case}/x", x)
    store.put(f"{case}/time", t)
    store.put(f"{case}/out", out)
    if self_cond is not None:
        store.put(f"{case}/x_self_cond", self_cond)
        store.put(f"{case}/out_no_self_cond", out_no_self_cond)
    store.case(
        case,
        config=json_config(config),
        image_size=list(size),
        batch=batch,
        x_self_cond=self_cond is not None,
        out_dim=net.out_dim,
        num_parameters=sum(p.numel() for p in net.parameters()),
        max_abs_out=float(out.abs().max()),
    )


def generate() -> object:
    from denoising_diffusion_pytorch.denoising_diffusion_pytorch import Unet

    store = gf.Store("unet")
    for case, (config, size, times) in CASES.items():
        unet_case(store, Unet, case, config, size, times)
    return store


def main(argv: list[str] | None = None) -> int:
    return gf.run_store_main(
        argv, __doc__.split("\n\n")[0], DEFAULT_OUT, generate, ("denoising-diffusion-pytorch",)
    )


if __name__ == "__main__":
    sys.exit(main())
