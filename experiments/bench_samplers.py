"""DDIM-50 and DDPM-1000 wall time: jaxdiff against denoising-diffusion-pytorch, same network.

Both samplers drive the same small convolutional network (sinusoidal time embedding, three 3x3
convolutions; torch weights copied into the JAX version), the cosine schedule at T = 1000, eps
prediction, batch 16 of 32x32x3. jaxdiff's sampler is one jitted ``lax.scan`` program; the
reference is ``GaussianDiffusion.ddim_sample`` / ``p_sample_loop`` in eager PyTorch.

Needs, in one environment: jax, torch==2.13.0, einops, tqdm and
``pip install --no-deps denoising-diffusion-pytorch==2.3.4`` (its torchvision import is served by
the parity generator's import-only stand-ins). Run from the repository root:

    python experiments/bench_samplers.py [--batch 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from _reference import load_reference

from jaxdiff import gaussian, samplers, schedules

CHANNELS, WIDTH, EMB = 3, 64, 32


def make_torch_net(torch):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.channels, self.out_dim, self.self_condition = CHANNELS, CHANNELS, False
            self.random_or_learned_sinusoidal_cond = False
            self.emb = torch.nn.Linear(EMB, WIDTH)
            self.conv1 = torch.nn.Conv2d(CHANNELS, WIDTH, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(WIDTH, WIDTH, 3, padding=1)
            self.conv3 = torch.nn.Conv2d(WIDTH, CHANNELS, 3, padding=1)

        def forward(self, x, t, x_self_cond=None):
            half = EMB // 2
            freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
            arg = t.float()[:, None] * freqs[None]
            emb = torch.nn.functional.silu(self.emb(torch.cat([arg.sin(), arg.cos()], -1)))
            h = torch.nn.functional.silu(self.conv1(x) + emb[:, :, None, None])
            h = torch.nn.functional.silu(self.conv2(h))
            return self.conv3(h)

    torch.manual_seed(0)
    return Net().eval()


def jax_net(net):
    """The same network in JAX, NHWC, with the torch weights."""
    p = {k: jnp.asarray(v.detach().numpy()) for k, v in net.state_dict().items()}

    def conv(x, w, b):
        w = jnp.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO
        y = jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y + b[None, None, None, :]

    def model_fn(x, t):
        half = EMB // 2
        freqs = jnp.exp(-math.log(10000) * jnp.arange(half, dtype=jnp.float32) / half)
        arg = t.astype(jnp.float32)[:, None] * freqs[None]
        emb = jax.nn.silu(
            jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], -1) @ p["emb.weight"].T + p["emb.bias"]
        )
        h = jax.nn.silu(conv(x, p["conv1.weight"], p["conv1.bias"]) + emb[:, None, None, :])
        h = jax.nn.silu(conv(h, p["conv2.weight"], p["conv2.bias"]))
        return conv(h, p["conv3.weight"], p["conv3.bias"])

    return model_fn


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch, ddp = load_reference()
    GaussianDiffusion = ddp.GaussianDiffusion
    net = make_torch_net(torch)
    shape = (args.batch, CHANNELS, 32, 32)

    ref_ddim = GaussianDiffusion(
        net,
        image_size=32,
        timesteps=1000,
        sampling_timesteps=50,
        objective="pred_noise",
        beta_schedule="cosine",
        auto_normalize=False,
    )
    ref_ddpm = GaussianDiffusion(
        net,
        image_size=32,
        timesteps=1000,
        objective="pred_noise",
        beta_schedule="cosine",
        auto_normalize=False,
    )

    model_fn = jax_net(net)
    c = gaussian.make_coeffs(
        schedules.get_named_beta_schedule("cosine", 1000), convention="lucidrains"
    )
    x_T = jax.random.normal(jax.random.PRNGKey(0), (args.batch, 32, 32, CHANNELS))

    @jax.jit
    def ddim(x, key, num_steps):
        grid = samplers.ddim_grid(1000, num_steps)
        return samplers.ddim_sample(model_fn, c, x, grid=grid, key=key).sample

    @jax.jit
    def ddpm(x, key):
        return samplers.ddpm_sample(model_fn, c, x, key=key).sample

    # Same network, same input: check the two agree before timing them.
    x_check = torch.randn(2, CHANNELS, 32, 32)
    t_check = torch.tensor([3, 700])
    with torch.no_grad():
        want = net(x_check, t_check).numpy()
    got = np.moveaxis(
        np.asarray(
            model_fn(jnp.asarray(np.moveaxis(x_check.numpy(), 1, -1)), jnp.asarray(t_check.numpy()))
        ),
        -1,
        1,
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    start = time.perf_counter()
    ddim(x_T, jax.random.PRNGKey(1), jnp.int32(50)).block_until_ready()
    compile_ddim = time.perf_counter() - start
    start = time.perf_counter()
    ddpm(x_T, jax.random.PRNGKey(1)).block_until_ready()
    compile_ddpm = time.perf_counter() - start

    rows = []
    with torch.inference_mode():
        ref = timed(lambda: ref_ddim.ddim_sample(shape), args.repeats)
        ours = timed(
            lambda: ddim(x_T, jax.random.PRNGKey(2), jnp.int32(50)).block_until_ready(),
            args.repeats,
        )
        rows.append(("DDIM-50", ref, ours, compile_ddim))
        ref = timed(lambda: ref_ddpm.p_sample_loop(shape), 1)
        ours = timed(lambda: ddpm(x_T, jax.random.PRNGKey(2)).block_until_ready(), 1)
        rows.append(("DDPM-1000", ref, ours, compile_ddpm))

    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, "
        f"batch {args.batch} x 32x32x3, median of {args.repeats} (DDPM: 1 run)"
    )
    print(
        "| sampler | PyTorch reference (s) | jaxdiff (s) | speed-up (reference / jaxdiff) "
        "| jaxdiff first call incl. compile (s) |"
    )
    print("|---|---|---|---|---|")
    for name, ref, ours, first in rows:
        print(f"| {name} | {ref:.2f} | {ours:.2f} | {ref / ours:.2f} | {first:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
