"""Generate ``fixtures/openai_unet.npz``: outputs of openai's ``UNetModel``, ``SuperResModel``
(improved-diffusion 1bc7bbb and guided-diffusion 22e0df8) and ``EncoderUNetModel`` (the noisy
classifier, guided-diffusion) for the configurations in CASES.

For each parameter set in CASES (a case owns one, or borrows another case's when its options
leave the parameter shapes unchanged: attention order, head counts, dropout) the reference
network is built with a fixed torch seed, then every parameter, including the ones the reference
initialises to zeros (``zero_module`` output convolutions) or ones (GroupNorm gains), is redrawn
from a fixed-seed generator, so that no mapping mistake hides behind a zero weight. The drawn
values are rounded to float16-representable float32 numbers: the network computes in float32,
and the file stores them as float16 without loss (half the bytes). Each case runs in eval mode
under ``no_grad`` on fixed inputs; the file stores the state_dicts, inputs and outputs. This
script never imports jaxdiff and imports only ``unet.py`` (with ``nn.py`` and ``fp16_util.py``)
of each openai package.

Regenerate (from the repository root; see PROVENANCE.md):

    /work/ref/torchenv/bin/python tests/parity/generate_openai_unet_fixtures.py \\
        --improved-diffusion /work/ref --guided-diffusion /work/ref/guided

The seed derivation and the deterministic .npz writer are those of ``generate_fixtures.py``,
loaded from this folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
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

# One per example: step 0, step 1, inside, the last step of T = 1000.
TIMES = (0, 1, 517, 999)
# What a respaced process with rescale_timesteps feeds the network: t * 1000 / T, fractional.
RESCALED_TIMES = (0.0, 3.75, 500.5, 996.25)

U, S, E = "UNetModel", "SuperResModel", "EncoderUNetModel"

# The improved-diffusion / guided-diffusion UNetModel options shared by the first five cases:
# one parameter set, run through both repositories' classes and several attention settings.
CLASS_SCALE_SHIFT = dict(
    in_channels=3,
    model_channels=32,
    out_channels=6,
    num_res_blocks=1,
    attention_resolutions=(1, 2),
    channel_mult=(1, 1),
    num_classes=10,
    use_scale_shift_norm=True,
)
SUPERRES = dict(
    in_channels=3,
    model_channels=32,
    out_channels=6,
    num_res_blocks=1,
    attention_resolutions=(2,),
    channel_mult=(1, 1),
    use_scale_shift_norm=True,
)

# case -> (repository, model class, constructor kwargs, (H, W), times, extras). extras:
# "weights": the case whose parameters this one borrows (same shapes); "low_res": (h, w) of the
# SuperResModel's low-resolution input. guided-diffusion's constructors take image_size first.
CASES: dict[str, tuple[str, str, dict, tuple[int, int], tuple, dict]] = {
    "improved_class_scale_shift": (
        "improved", U, dict(**CLASS_SCALE_SHIFT, num_heads=2), (16, 16), TIMES, {},
    ),
    "guided_class_scale_shift": (
        "guided", U, dict(image_size=16, **CLASS_SCALE_SHIFT, num_heads=2), (16, 16), TIMES,
        {"weights": "improved_class_scale_shift"},
    ),
    "guided_new_order_head_channels": (
        "guided", U,
        dict(image_size=16, **CLASS_SCALE_SHIFT, num_head_channels=16,
             use_new_attention_order=True),
        (16, 16), TIMES, {"weights": "improved_class_scale_shift"},
    ),
    "guided_legacy_order_head_channels": (
        "guided", U, dict(image_size=16, **CLASS_SCALE_SHIFT, num_head_channels=8),
        (16, 16), TIMES, {"weights": "improved_class_scale_shift"},
    ),
    "improved_heads_upsample_dropout": (
        "improved", U,
        dict(**{**CLASS_SCALE_SHIFT, "dropout": 0.3}, num_heads=4, num_heads_upsample=2),
        (16, 16), TIMES, {"weights": "improved_class_scale_shift"},
    ),
    "improved_no_res_blocks_widening": (
        "improved", U,
        dict(in_channels=1, model_channels=32, out_channels=2, num_res_blocks=0,
             attention_resolutions=(), channel_mult=(1, 2)),
        (8, 12), RESCALED_TIMES, {},
    ),
    "guided_updown_fractional_mult": (
        "guided", U,
        dict(image_size=16, in_channels=3, model_channels=64, out_channels=6, num_res_blocks=1,
             attention_resolutions=(1, 2), channel_mult=(0.5, 0.5), num_classes=7,
             num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True,
             use_new_attention_order=True),
        (16, 24), TIMES, {},
    ),
    "improved_superres": (
        "improved", S, dict(**SUPERRES, num_heads=2), (16, 16), TIMES, {"low_res": (8, 8)},
    ),
    "guided_superres_new_order": (
        "guided", S,
        dict(image_size=16, **SUPERRES, num_head_channels=16, use_new_attention_order=True),
        (16, 16), TIMES, {"weights": "improved_superres", "low_res": (5, 7)},
    ),
    "encoder_adaptive": (
        "guided", E,
        dict(image_size=16, in_channels=3, model_channels=32, out_channels=10, num_res_blocks=1,
             attention_resolutions=(2,), channel_mult=(1, 2), num_heads=2,
             resblock_updown=True, pool="adaptive"),
        (16, 16), TIMES, {},
    ),
    "encoder_attention_avg_pool": (
        "guided", E,
        dict(image_size=16, in_channels=3, model_channels=32, out_channels=5, num_res_blocks=1,
             attention_resolutions=(1, 2), channel_mult=(1, 1), conv_resample=False,
             num_head_channels=16, use_scale_shift_norm=True, use_new_attention_order=True,
             pool="attention"),
        (16, 16), TIMES, {},
    ),
    "encoder_spatial": (
        "guided", E,
        dict(image_size=8, in_channels=3, model_channels=32, out_channels=4, num_res_blocks=1,
             attention_resolutions=(1,), channel_mult=(1,), num_heads=2,
             use_scale_shift_norm=True, pool="spatial"),
        (8, 8), TIMES, {},
    ),
    "encoder_spatial_v2": (
        "guided", E,
        dict(image_size=8, in_channels=3, model_channels=32, out_channels=4, num_res_blocks=1,
             attention_resolutions=(), channel_mult=(1,), dropout=0.2,
             use_scale_shift_norm=True, pool="spatial_v2"),
        (8, 8), RESCALED_TIMES, {},
    ),
}  # fmt: skip


def json_kwargs(kwargs: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def rerandomise(net: torch.nn.Module, generator: torch.Generator) -> None:
    """Redraw every parameter, at scales that keep activations O(1), rounded to float16 values.

    Conv / Linear weights ~ N(0, 1/fan_in); biases ~ N(0, 0.2^2); GroupNorm gains (the 1-D
    weights) ~ 1 + N(0, 0.25^2); class embeddings ~ N(0, 1); the attention pool's positional
    embedding ~ N(0, 1/C) (the reference's own scale).
    """
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            leaf = name.rsplit(".", 1)[-1]
            if name == "label_emb.weight":
                value = noise
            elif leaf == "positional_embedding":
                value = noise / math.sqrt(p.shape[0])
            elif leaf == "bias":
                value = 0.2 * noise
            elif leaf == "weight" and p.ndim == 1:
                value = 1.0 + 0.25 * noise
            elif leaf == "weight":
                value = noise / math.sqrt(math.prod(p.shape[1:]))
            else:
                raise ValueError(f"no redraw rule for parameter {name}")
            p.copy_(value.half().float())


def load_unet_modules(improved_dir: Path, guided_dir: Path):
    """improved_diffusion.unet and guided_diffusion.unet from the given folders (only these
    and their nn / fp16_util imports; the packages' other modules import blobfile, mpi4py)."""
    modules = {}
    for folder, package in ((improved_dir, "improved_diffusion"), (guided_dir, "guided_diffusion")):
        sys.path.insert(0, str(folder))
        module = importlib.import_module(f"{package}.unet")
        loaded_from = Path(module.__file__).resolve().parent.parent
        if loaded_from != folder.resolve():
            raise RuntimeError(f"{package} imported from {loaded_from}, not {folder}")
        modules[package.split("_")[0]] = module
    return modules


def build(modules, case: str) -> torch.nn.Module:
    repo, cls, kwargs, *_ = CASES[case]
    torch.manual_seed(gf.seed_for(f"openai_unet/{case}/init"))
    return getattr(modules[repo], cls)(**kwargs).eval()


def generate(modules) -> object:
    store = gf.Store("openai_unet")
    states = {}
    for case, (repo, cls, kwargs, size, times, extras) in CASES.items():
        owner = extras.get("weights", case)
        net = build(modules, case)
        if owner == case:
            weights = torch.Generator().manual_seed(gf.seed_for(f"openai_unet/{case}/weights"))
            rerandomise(net, weights)
            states[case] = {k: v.clone() for k, v in net.state_dict().items()}
            store.put_all(f"{case}/state_dict", {k: v.half() for k, v in states[case].items()})
        else:
            net.load_state_dict(states[owner], strict=True)

        inputs = torch.Generator().manual_seed(gf.seed_for(f"openai_unet/{case}/inputs"))
        batch = len(times)
        x = torch.randn((batch, kwargs["in_channels"], *size), generator=inputs)
        integer = all(isinstance(t, int) for t in times)
        t = torch.tensor(times, dtype=torch.int64 if integer else torch.float32)
        call = {}
        if kwargs.get("num_classes"):
            call["y"] = torch.randint(0, kwargs["num_classes"], (batch,), generator=inputs)
        if "low_res" in extras:
            call["low_res"] = torch.randn(
                (batch, kwargs["in_channels"], *extras["low_res"]), generator=inputs
            )
        with torch.no_grad():
            out = net(x, t, **call)

        store.put(f"{case}/x", x)
        store.put(f"{case}/t", t)
        for name, value in call.items():
            store.put(f"{case}/{name}", value)
        store.put(f"{case}/out", out)
        store.case(
            case,
            repository=repo,
            model=cls,
            kwargs=json_kwargs(kwargs),
            weights=owner,
            image_size=list(size),
            low_res_size=list(extras.get("low_res", [])),
            batch=batch,
            inputs=sorted(["x", "t", *call]),
            num_parameters=sum(p.numel() for p in net.parameters()),
            max_abs_out=float(out.abs().max()),
        )
    return store


def run_generator(
    argv, description: str, load_modules, generate, *, other_entries=0, report=None
) -> int:
    """The command line of the openai fixture generators: the two repositories' folders (flags
    or $IMPROVED_DIFFUSION_DIR / $GUIDED_DIFFUSION_DIR), torch made deterministic,
    ``generate(load_modules(improved, guided))`` written to ``--out``, a summary printed
    (``report(store)`` adds to it); 1 when a value is not finite."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    for flag, env in (
        ("--improved-diffusion", "IMPROVED_DIFFUSION_DIR"),
        ("--guided-diffusion", "GUIDED_DIFFUSION_DIR"),
    ):
        parser.add_argument(
            flag,
            type=Path,
            default=Path(os.environ[env]) if os.environ.get(env) else None,
            help=f"folder holding the package (default ${env})",
        )
    args = parser.parse_args(argv)
    if args.improved_diffusion is None or args.guided_diffusion is None:
        parser.error("needs --improved-diffusion and --guided-diffusion (or their env variables)")

    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    modules = load_modules(args.improved_diffusion, args.guided_diffusion)
    print(f"torch {torch.__version__}, numpy {np.__version__}")
    args.out.mkdir(parents=True, exist_ok=True)
    tick = time.perf_counter()
    store = generate(modules)
    path = store.write(args.out)
    print(
        f"{path.name}: {len(store.arrays)} arrays, {len(store.meta) - other_entries} cases, "
        f"{path.stat().st_size / 1e6:.2f} MB, {time.perf_counter() - tick:.1f} s"
    )
    for name, seed in sorted(gf.SEEDS.items()):
        print(f"  seed {name}: {seed}")
    if report is not None:
        report(store)
    if store.nonfinite:
        print(f"non-finite values in {store.nonfinite}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_generator(argv, __doc__.split("\n\n")[0], load_unet_modules, generate)


if __name__ == "__main__":
    sys.exit(main())
