"""Where the U-Net's training time goes, jaxdiff against denoising-diffusion-pytorch.

Times forward+backward of ``mean((net(x, t) - x)^2)`` (32x32x3 images, a config of
experiments/bench.py and its batch; ``small`` by default) with parts of the network switched off
on both sides alike, so that the differences between rows say what each part costs:

* ``full``: the whole network;
* ``no-linear-attn``: linear attention layers return zeros (their residual path remains);
* ``no-attn``: every attention layer returns zeros;
* ``no-attn-no-norm``: also every RMSNorm is the identity (convolutions, SiLU, the time
  modulation, up/down-sampling and concatenations remain).

``--trace`` also records a jax.profiler trace of the full jaxdiff step and prints the time
summed per kind of XLA operation (on CPU the summed kernel times exceed the wall time: two
kernels can run at once). On a GPU both sides run there, with bench.py's float32 math
(``--fp32-precision``) and ``--dtype``. Needs the environment of experiments/bench.py. From the
repository root:

    PYTHONPATH=. python experiments/profile_unet.py [--trace /tmp/trace] [--compiler-options none]
    PYTHONPATH=. python experiments/profile_unet.py --config large --dtype bfloat16   # a GPU
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import gzip
import json
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from _reference import load_reference
from bench import CHANNELS, CONFIGS, SIZE, add_setup_arguments, set_fp32_precision

import jaxdiff.models.unet as jaxdiff_unet
from jaxdiff import compilation
from jaxdiff.convert import torch_state_dict_to_flax

VARIANTS = ("full", "no-linear-attn", "no-attn", "no-attn-no-norm")


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def switch_off(variant: str, torch, ddp) -> None:
    """Patch both libraries' layer classes for ``variant`` (once per process: in order)."""

    def torch_zeros(self, x):
        return torch.zeros_like(x)

    def jax_zeros(self, x):
        return jnp.zeros_like(x)

    if variant in ("no-linear-attn", "no-attn", "no-attn-no-norm"):
        ddp.LinearAttention.forward = torch_zeros
        jaxdiff_unet.LinearAttention.__call__ = jax_zeros
    if variant in ("no-attn", "no-attn-no-norm"):
        ddp.Attention.forward = torch_zeros
        jaxdiff_unet.Attention.__call__ = jax_zeros
    if variant == "no-attn-no-norm":
        ddp.RMSNorm.forward = lambda self, x: x
        jaxdiff_unet.RMSNorm.__call__ = lambda self, x: x


def op_kind_table(trace_dir: str, steps: int) -> list[tuple[str, float]]:
    """Milliseconds per step summed over XLA operations of the same kind (name sans suffix)."""
    path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[-1]
    events = json.load(gzip.open(path))["traceEvents"]
    total = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith(("$", "Thunk", "Pjit", "Slinky", "Common")):
            continue
        total[re.sub(r"\.\d+$", "", name)] += e["dur"] / 1e3 / steps
    return total.most_common(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--trace", help="directory for a jax.profiler trace of the full step")
    add_setup_arguments(parser)
    args = parser.parse_args()
    options = {} if args.compiler_options == "none" else compilation.compiler_options()
    config, batch = CONFIGS[args.config]["unet"], args.batch or CONFIGS[args.config]["batch"]

    torch, ddp = load_reference()
    gpu = jax.default_backend() == "gpu"
    device = "cuda" if gpu else "cpu"
    if gpu:
        set_fp32_precision(torch, args.fp32_precision)
    bf16 = args.dtype == "bfloat16"
    autocast = torch.autocast(device, torch.bfloat16) if bf16 else contextlib.nullcontext()
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (batch, SIZE, SIZE, CHANNELS)).astype(np.float32)
    t = np.arange(batch) * 61 % 1000
    x_t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
    t_t = torch.from_numpy(t).to(device)
    x_j, t_j = jnp.asarray(x), jnp.asarray(t, jnp.int32)

    print(f"forward+backward, batch {batch} of {SIZE}x{SIZE}x{CHANNELS}, {config}, {args.dtype}")
    print(f"{jax.devices()[0].device_kind}; jaxdiff compiler options: {options}")
    print("| variant | jaxdiff (ms) | PyTorch (ms) | PyTorch / jaxdiff |")
    print("|---|---|---|---|")
    for variant in VARIANTS:
        switch_off(variant, torch, ddp)
        torch.manual_seed(0)
        net = ddp.Unet(**config)
        unet = jaxdiff_unet.unet_from_config(config, dtype=args.dtype)
        variables = torch_state_dict_to_flax(net.state_dict(), unet)
        net = net.to(device)

        def torch_step(net=net):
            net.zero_grad(set_to_none=True)
            with autocast:
                loss = torch.mean(torch.square(net(x_t, t_t).float() - x_t))
            loss.backward()
            if gpu:
                torch.cuda.synchronize()

        def loss(v, unet=unet):
            return jnp.mean(jnp.square(unet.apply(v, x_j, t_j) - x_j))

        step = jax.jit(jax.value_and_grad(loss), compiler_options=options)
        # PyTorch first: XLA's threads stay busy for a moment after each call
        torch_ms = median_ms(torch_step, args.repeats)
        jax_ms = median_ms(
            lambda step=step, v=variables: jax.block_until_ready(step(v)), args.repeats
        )
        print(f"| {variant} | {jax_ms:.0f} | {torch_ms:.0f} | {torch_ms / jax_ms:.2f} |")
        if variant == "full" and args.trace:
            steps = 5
            with jax.profiler.trace(args.trace):
                for _ in range(steps):
                    jax.block_until_ready(step(variables))
            full_trace = (args.trace, steps)
    if args.trace:
        print("\njaxdiff full step, XLA kernel time per step by kind (ms):")
        for kind, ms in op_kind_table(*full_trace):
            print(f"  {ms:7.1f}  {kind}")


if __name__ == "__main__":
    main()
