"""Generate ``fixtures/training.npz``: denoising-diffusion-pytorch's training loop, step by step.

For each case the reference ``Unet`` and ``GaussianDiffusion`` (denoising-diffusion-pytorch
2.3.4) train for ``steps`` steps in the loop of its ``Trainer.train`` (``loss.backward()``,
``clip_grad_norm_``, ``Adam.step()``, ``zero_grad()``, ``ema_pytorch.EMA.update()``, ema-pytorch
0.8.3), except that the timesteps and the noise of each step are drawn here and passed to
``GaussianDiffusion.p_losses(x_start, t, noise)``, so that jaxdiff's train step can be fed the same
ones. The network starts from torch's own initialisation (what a training run starts from). The
file stores the initial state_dict, every step's inputs (x_start NCHW in [-1, 1], t, noise), the
loss and the pre-clipping gradient norm of every step, and the online and EMA networks'
state_dicts after the steps in ``SNAPSHOTS``. This script never imports jaxdiff.

Regenerate (from the repository root; see PROVENANCE.md):

    /work/ref/torchenv/bin/python tests/parity/generate_training_fixtures.py
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
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

STEPS = 60
# EMA(update_after_step=20, update_every=5): copies at steps 0, 5, .., 20, then decays at 25, 30..
EMA_KWARGS = {"beta": 0.995, "update_after_step": 20, "update_every": 5}
SNAPSHOTS = (26, 60)  # after this many optimiser steps (26: one EMA decay after the copies)
UNET = {"dim": 4, "dim_mults": (1, 2), "attn_heads": 2, "attn_dim_head": 8}

# case id -> (GaussianDiffusion kwargs, lr, max_grad_norm or None, batch, channels)
CASES: dict[str, tuple[dict, float, float | None, int, int]] = {
    # the Trainer's optimiser and defaults (train_lr 1e-4, Adam (0.9, 0.99), clip at 1)
    "eps_clip": ({"objective": "pred_noise", "beta_schedule": "cosine"}, 1e-4, 1.0, 8, 1),
    # no clipping, v objective with min-SNR weights, linear schedule, RGB
    "v_min_snr_noclip": (
        {"objective": "pred_v", "beta_schedule": "linear", "min_snr_loss_weight": True},
        3e-4,
        None,
        6,
        3,
    ),
}
ADAM_BETAS = (0.9, 0.99)
IMAGE_SIZE = 8
TIMESTEPS = 1000


def training_case(store, ddp, EMA, case: str) -> None:
    diffusion_kwargs, lr, max_grad_norm, batch, channels = CASES[case]
    torch.manual_seed(gf.seed_for(f"training/{case}/init"))
    net = ddp.Unet(**UNET, channels=channels)
    diffusion = ddp.GaussianDiffusion(
        net,
        image_size=IMAGE_SIZE,
        timesteps=TIMESTEPS,
        auto_normalize=False,
        **diffusion_kwargs,
    )
    store.put_all(f"{case}/init", net.state_dict())
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=lr, betas=ADAM_BETAS)
    ema = EMA(diffusion, **EMA_KWARGS)
    draws = torch.Generator().manual_seed(gf.seed_for(f"training/{case}/inputs"))
    shape = (batch, channels, IMAGE_SIZE, IMAGE_SIZE)
    xs, ts, noises, losses, norms = [], [], [], [], []
    for step in range(STEPS):
        x = torch.rand(shape, generator=draws) * 2 - 1
        t = torch.randint(0, TIMESTEPS, (batch,), generator=draws)
        noise = torch.randn(shape, generator=draws)
        diffusion.train()
        loss = diffusion.p_losses(x, t, noise=noise)
        loss.backward()
        if max_grad_norm is None:
            grads = [p.grad for p in diffusion.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads])
            )
        else:
            norm = torch.nn.utils.clip_grad_norm_(diffusion.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        xs.append(x)
        ts.append(t)
        noises.append(noise)
        losses.append(float(loss.detach()))
        norms.append(float(norm))
        if step + 1 in SNAPSHOTS:
            store.put_all(f"{case}/online_{step + 1}", net.state_dict())
            store.put_all(f"{case}/ema_{step + 1}", ema.ema_model.model.state_dict())
    store.put(f"{case}/x_start", torch.stack(xs))
    store.put(f"{case}/t", torch.stack(ts))
    store.put(f"{case}/noise", torch.stack(noises))
    store.put(f"{case}/loss", np.asarray(losses, np.float32))
    store.put(f"{case}/grad_norm", np.asarray(norms, np.float32))
    store.case(
        case,
        unet={
            **{k: list(v) if isinstance(v, tuple) else v for k, v in UNET.items()},
            "channels": channels,
        },
        diffusion={**diffusion_kwargs, "image_size": IMAGE_SIZE, "timesteps": TIMESTEPS},
        lr=lr,
        adam_betas=list(ADAM_BETAS),
        max_grad_norm=max_grad_norm,
        ema=EMA_KWARGS,
        steps=STEPS,
        snapshots=list(SNAPSHOTS),
        batch=batch,
        num_parameters=sum(p.numel() for p in net.parameters()),
    )


def generate() -> object:
    from denoising_diffusion_pytorch import denoising_diffusion_pytorch as ddp
    from ema_pytorch import EMA

    store = gf.Store("training")
    for case in CASES:
        training_case(store, ddp, EMA, case)
    return store


def main(argv: list[str] | None = None) -> int:
    return gf.run_store_main(
        argv,
        __doc__.split("\n\n")[0],
        DEFAULT_OUT,
        generate,
        ("denoising-diffusion-pytorch", "ema-pytorch"),
    )


if __name__ == "__main__":
    sys.exit(main())
