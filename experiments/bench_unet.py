"""Unet forward and forward+backward time: jaxdiff (Flax, jit) against denoising-diffusion-pytorch.

The same network on both sides: the reference ``Unet(dim=32, dim_mults=(1, 2, 2))`` (the
``cifar-small`` preset; default attention: 4 heads of 32, full attention innermost), its weights
converted with ``jaxdiff.convert``, batch 16 of 32x32x3, loss ``mean((net(x, t) - noise)^2)``,
gradients with respect to every parameter. jaxdiff runs one jitted ``value_and_grad`` program;
the reference runs eager PyTorch on all CPU threads. Before timing, the two outputs are checked
to agree.

Needs, in one environment: jax, flax, torch==2.13.0, einops and
``pip install --no-deps denoising-diffusion-pytorch==2.3.4`` (its torchvision import is served by
the parity generator's import-only stand-ins). Run from the repository root:

    PYTHONPATH=. /work/ref/torchenv/bin/python experiments/bench_unet.py [--batch 16] [--repeats 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from _reference import load_reference

from jaxdiff.convert import torch_state_dict_to_flax
from jaxdiff.models import PRESETS, unet_from_config

PRESET = "cifar-small"
SIZE, CHANNELS, STEPS = 32, 3, 1000


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        out.append(time.perf_counter() - tick)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    torch, ddp = load_reference()
    TorchUnet = ddp.Unet
    torch.manual_seed(0)
    config = PRESETS[PRESET]
    net = TorchUnet(**config)
    unet = unet_from_config(config)
    variables = torch_state_dict_to_flax(net.state_dict(), unet)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, CHANNELS, SIZE, SIZE)).astype(np.float32)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    t = rng.integers(0, STEPS, args.batch)
    x_t, noise_t, t_t = torch.from_numpy(x), torch.from_numpy(noise), torch.from_numpy(t)
    x_j, noise_j = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(noise.transpose(0, 2, 3, 1))
    t_j = jnp.asarray(t.astype(np.int32))

    # jaxdiff
    forward = jax.jit(unet.apply)

    def loss(params):
        return jnp.mean(jnp.square(unet.apply(params, x_j, t_j) - noise_j))

    step = jax.jit(jax.value_and_grad(loss))
    tick = time.perf_counter()
    jax.block_until_ready(forward(variables, x_j, t_j))
    compile_forward = time.perf_counter() - tick
    tick = time.perf_counter()
    jax.block_until_ready(step(variables))
    compile_step = time.perf_counter() - tick

    # the reference, and a check that both compute the same function
    with torch.no_grad():
        reference_out = net(x_t, t_t).numpy()
    jax_out = np.asarray(forward(variables, x_j, t_j)).transpose(0, 3, 1, 2)
    err = float(np.max(np.abs(jax_out - reference_out)) / np.max(np.abs(reference_out)))
    assert err < 1e-4, f"outputs differ: relative max error {err:.3g}"

    def torch_forward():
        with torch.no_grad():
            net(x_t, t_t)

    def torch_step():
        net.zero_grad(set_to_none=True)
        value = torch.mean(torch.square(net(x_t, t_t) - noise_t))
        value.backward()

    # PyTorch first, then JAX: XLA's CPU thread pool stays busy for a moment after each call
    # and would slow PyTorch's threads down if the two were interleaved.
    passes = ("forward", "forward + backward")
    torch_ms = {}
    for label, fn in zip(passes, (torch_forward, torch_step), strict=True):
        for _ in range(3):  # oneDNN builds its kernels on the first calls
            fn()
        torch_ms[label] = 1e3 * statistics.median(timed(fn, args.repeats))
    jax_ms = {}
    for label, fn in zip(
        passes,
        (
            lambda: jax.block_until_ready(forward(variables, x_j, t_j)),
            lambda: jax.block_until_ready(step(variables)),
        ),
        strict=True,
    ):
        fn()
        jax_ms[label] = 1e3 * statistics.median(timed(fn, args.repeats))
    rows = [(label, jax_ms[label], torch_ms[label]) for label in passes]

    num_params = sum(p.numel() for p in net.parameters())
    print(
        f"Unet {config} ({num_params / 1e6:.2f} M parameters), batch {args.batch} of "
        f"{SIZE}x{SIZE}x{CHANNELS}; median of {args.repeats}; {platform.processor() or 'cpu'}, "
        f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"jax {jax.__version__} ({jax.devices()[0].platform}); load average "
        f"{os.getloadavg()[0]:.2f}; relative output difference {err:.1e}"
    )
    print(f"jit compile: forward {compile_forward:.1f} s, forward+backward {compile_step:.1f} s")
    print()
    print("| pass | jaxdiff (jit) ms | PyTorch (eager) ms | PyTorch / jaxdiff |")
    print("|---|---|---|---|")
    for label, j, p in rows:
        print(f"| {label} | {j:.0f} | {p:.0f} | {p / j:.2f} |")


if __name__ == "__main__":
    main()
