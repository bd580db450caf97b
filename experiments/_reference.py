"""Import denoising-diffusion-pytorch for the benchmarks: its package imports torchvision and
other Trainer-only modules, which the parity generator's import-only stand-ins serve."""

import importlib.util
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_reference():
    """``(torch, denoising_diffusion_pytorch.denoising_diffusion_pytorch)``."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # the reference's progress bars
    spec = importlib.util.spec_from_file_location(
        "generate_fixtures", ROOT / "tests/parity/generate_fixtures.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.install_stand_ins()
    import torch
    from denoising_diffusion_pytorch import denoising_diffusion_pytorch as ddp

    return torch, ddp
