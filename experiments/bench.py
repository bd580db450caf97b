"""jaxdiff against denoising-diffusion-pytorch 2.3.4, side by side in one process.

Both sides train and sample the same U-Net (the reference ``Unet``; its initial weights are
copied into jaxdiff's with ``jaxdiff.convert``) on the same batch of 32x32x3 images, with the
reference ``GaussianDiffusion``'s defaults: T = 1000, sigmoid schedule, v objective. Measured:

* training images/s: one step is the diffusion loss, its gradient, global-norm clipping at 1,
  Adam (lr 1e-4, betas (0.9, 0.99)) and the EMA update, as the reference ``Trainer`` does
  (``GaussianDiffusion.forward``, ``clip_grad_norm_``, ``Adam``, ``ema_pytorch.EMA`` with its
  ``update_every=10``) and as ``jaxdiff.train.make_train_step`` does (EMA every step). After a
  warm-up, ``--windows`` windows of ``--window-steps`` steps each are timed; the figure is the
  median window;
* first-call time of the train step: jaxdiff's includes tracing and XLA compilation (torch
  eager has none; with ``--torch-compile`` the reference's includes ``torch.compile``);
* peak memory of training: on CPU the process's peak resident memory over the start of the
  side's training phase (model, optimiser, compile, all steps), sampled every millisecond, after
  ``malloc_trim``; on a GPU each library's own peak-allocation counter;
* DDIM-50 (eta 0) and DDPM-1000 sampling time: ``GaussianDiffusion.ddim_sample`` /
  ``p_sample_loop`` against ``jaxdiff.samplers.ddim_sample`` / ``ddpm_sample`` in one jitted
  program (whose step count is a traced argument: the bench checks that 50 and 100 steps share
  one compile);
* on a GPU, the model FLOP utilisation of both sides: the FLOPs of one train step (XLA's count
  of jaxdiff's step before optimisation, without rematerialisation; the same model on both
  sides) times steps/s, over the GPU's dense peak for the math used.

Float32 on a GPU: by default JAX computes float32 convolutions and matrix products with TF32
tensor cores, PyTorch its convolutions only. ``--fp32-precision`` sets one mode for both:
``tf32`` (the default: JAX's default, and PyTorch's ``allow_tf32`` for matmuls and cuDNN) or
``highest`` (true float32 on both). On a CPU both always compute in float32.

The reference runs first, then jaxdiff: XLA's CPU thread pool stays busy for a moment after each
call and would slow PyTorch's threads down if the two were interleaved. Before timing, the two
networks' outputs are checked to agree.

Writes ``--out`` (JSON) and the same name with ``.md`` (a Markdown table; ratio = jaxdiff over
the reference, > 1 is better for throughput, < 1 is better for time). Needs, in one environment:
jax, flax, optax, torch==2.13.0, einops, ema-pytorch and ``pip install --no-deps
denoising-diffusion-pytorch==2.3.4``. From the repository root:

    PYTHONPATH=. python experiments/bench.py                       # CPU: the small config
    PYTHONPATH=. python experiments/bench.py --config large --dtype bfloat16   # a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import pathlib
import platform
import statistics
import threading
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share a GPU with torch

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _reference import load_reference  # noqa: E402

from jaxdiff import compilation, gaussian, samplers, schedules, train  # noqa: E402
from jaxdiff.convert import torch_state_dict_to_flax  # noqa: E402
from jaxdiff.models import unet_from_config  # noqa: E402

jax.config.update("jax_enable_compilation_cache", False)  # first calls compile from scratch

CONFIGS = {
    # The CPU configuration (the ``cifar-small`` preset).
    "small": {"unet": {"dim": 32, "dim_mults": (1, 2, 2)}, "batch": 16},
    # The reference README's network, for a GPU.
    "large": {"unet": {"dim": 64, "dim_mults": (1, 2, 4, 8)}, "batch": 128},
}
SIZE, CHANNELS, T = 32, 3, 1000
LR, BETAS, CLIP = 1e-4, (0.9, 0.99), 1.0
# Dense peak FLOP/s (no sparsity) by device kind (a substring of jax's device_kind, first match)
# and math, from NVIDIA's H100 and H200 data sheets; "float32" is without tensor cores.
PEAK_FLOPS = {
    "H100 PCIe": {"float32": 51.2e12, "tf32": 378e12, "bfloat16": 756e12},
    "H100": {"float32": 66.9e12, "tf32": 494.7e12, "bfloat16": 989.4e12},  # SXM
    "H200": {"float32": 66.9e12, "tf32": 494.7e12, "bfloat16": 989.4e12},  # SXM
}
ROW_ORDER = (
    ("train_images_per_s", "training images/s", "{:.1f}"),
    ("train_first_call_s", "train step first call (s)", "{:.2f}"),
    ("train_peak_memory_mb", "training peak memory (MB)", "{:.0f}"),
    ("train_step_buffers_mb", "XLA buffers of one train step (MB)", "{:.0f}"),
    ("ddim50_s", "DDIM-50 sampling (s)", "{:.2f}"),
    ("ddpm1000_s", "DDPM-1000 sampling (s)", "{:.2f}"),
    ("sampler_first_call_s", "sampler first call (s)", "{:.2f}"),
    ("train_step_gflops", "GFLOPs of one train step", "{:.1f}"),
    ("mfu", "model FLOP utilisation", "{:.1%}"),
    ("train_step_compiles", "train step compilations over the run", "{:d}"),
    ("sampler_compiles_for_50_and_100_steps", "DDIM compilations for 50 and 100 steps", "{:d}"),
)


# ---------------------------------------------------------------------------------------------
# Measurement helpers


class PeakRSS:
    """Peak resident memory of this process above ``base`` (bytes), sampled while inside the
    ``with`` block; ``base`` defaults to the value at ``__enter__``, after ``malloc_trim``."""

    def __init__(self, base: int | None = None):
        self.peak = 0
        self.base = base
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.base is None:
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back first
            self.base = self._rss()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(1e-3)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss() - self.base)


def windows(step, sync, num_windows: int, window_steps: int, batch: int) -> list[float]:
    """Images/s of each of ``num_windows`` windows of ``window_steps`` steps."""
    rates = []
    for _ in range(num_windows):
        sync()
        start = time.perf_counter()
        for _ in range(window_steps):
            step()
        sync()
        rates.append(window_steps * batch / (time.perf_counter() - start))
    return rates


def measure_training(step, sync, args, side: str) -> dict:
    """First-call time, then warm-up steps, then the timed windows (printed as they end)."""
    start = time.perf_counter()
    step()
    sync()
    first_call = time.perf_counter() - start
    for _ in range(args.warmup):
        step()
    rates = windows(step, sync, args.windows, args.window_steps, args.batch)
    print(f"{side}: first call {first_call:.1f} s, windows {[round(r, 1) for r in rates]} images/s")
    return {
        "train_first_call_s": first_call,
        "train_images_per_s": statistics.median(rates),
        "train_window_images_per_s": rates,
    }


def seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# The reference


def bench_reference(torch, ddp, net, x, args, gpu: bool) -> dict:
    from ema_pytorch import EMA

    device = "cuda" if gpu else "cpu"
    autocast = (
        torch.autocast(device, dtype=torch.bfloat16)
        if args.dtype == "bfloat16"
        else contextlib.nullcontext()
    )
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
    out = {}

    def sync():
        if gpu:
            torch.cuda.synchronize()

    memory = PeakRSS() if not gpu else contextlib.nullcontext()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    with memory:
        model = net.to(device)
        if args.torch_compile:
            model = torch.compile(model)
        diffusion = ddp.GaussianDiffusion(
            model, image_size=SIZE, timesteps=T, sampling_timesteps=50, auto_normalize=False
        ).to(device)
        optimizer = torch.optim.Adam(diffusion.parameters(), lr=LR, betas=BETAS)
        ema = EMA(diffusion, beta=0.995, update_every=10)

        def step():
            with autocast:
                loss = diffusion(x)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(diffusion.parameters(), CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update()

        out.update(measure_training(step, sync, args, "reference"))
    if gpu:
        out["train_peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["train_peak_memory_mb"] = memory.peak / 2**20

    if not args.skip_sampling:
        shape = (args.batch, CHANNELS, SIZE, SIZE)
        diffusion.eval()
        with torch.inference_mode(), autocast:
            diffusion.ddim_sample(shape)  # warm-up
            sync()
            out["ddim50_s"] = seconds(lambda: (diffusion.ddim_sample(shape), sync()), args.repeats)
            out["ddpm1000_s"] = seconds(lambda: (diffusion.p_sample_loop(shape), sync()), 1)
    return out


# ---------------------------------------------------------------------------------------------
# jaxdiff


def bench_jaxdiff(unet, variables, x, args, gpu: bool) -> dict:
    options = {} if args.compiler_options == "none" else compilation.compiler_options()
    # bfloat16: the Unet computes in it, parameters and optimiser state stay float32
    unet = unet.clone(dtype=None if args.dtype == "float32" else args.dtype, remat=args.remat)
    coeffs = gaussian.make_coeffs(
        schedules.get_named_beta_schedule("sigmoid", T), convention="lucidrains"
    )
    x = jnp.asarray(x)
    out = {"compiler_options": options}

    def sync():
        jax.block_until_ready(state)

    memory = PeakRSS() if not gpu else contextlib.nullcontext()
    with memory:
        loss_fn = train.diffusion_loss_fn(unet.apply, coeffs, loss="simple", objective="v")
        optimizer = train.default_optimizer(LR, *BETAS, max_grad_norm=CLIP)
        train_step = train.make_train_step(loss_fn, optimizer, compiler_options=options)
        state = train.create_train_state(variables, optimizer, jax.random.PRNGKey(0))

        def step():
            nonlocal state
            state, _ = train_step(state, x)

        out.update(measure_training(step, sync, args, "jaxdiff"))
    if gpu:
        stats = jax.devices()[0].memory_stats() or {}
        out["train_peak_memory_mb"] = stats.get("peak_bytes_in_use", float("nan")) / 2**20
    else:
        out["train_peak_memory_mb"] = memory.peak / 2**20
    out["train_step_compiles"] = train_step.jitted._cache_size()
    compiled = train_step.jitted.lower(state, x).compile()
    buffers = compiled.memory_analysis()
    out["train_step_buffers_mb"] = (
        buffers.argument_size_in_bytes
        + buffers.output_size_in_bytes
        - buffers.alias_size_in_bytes
        + buffers.temp_size_in_bytes
    ) / 2**20
    # the model's FLOPs: the step before XLA's optimisations, without rematerialisation
    plain = train.diffusion_loss_fn(
        unet.clone(remat=False).apply, coeffs, loss="simple", objective="v"
    )
    lowered = train.make_train_step(plain, optimizer).jitted.lower(state, x)
    out["train_step_gflops"] = lowered.cost_analysis()["flops"] / 1e9

    if not args.skip_sampling:
        params = state.ema_params

        def model_fn(x_t, t):
            return unet.apply(params, x_t, t)

        def ddim(key, num_steps):
            x_T = jax.random.normal(key, x.shape)
            grid = samplers.ddim_grid(T, num_steps)
            return samplers.ddim_sample(
                model_fn, coeffs, x_T, grid=grid, key=key, mean_type="v"
            ).sample

        def ddpm(key):
            x_T = jax.random.normal(key, x.shape)
            return samplers.ddpm_sample(model_fn, coeffs, x_T, key=key, mean_type="v").sample

        ddim = jax.jit(ddim, compiler_options=options)
        ddpm = jax.jit(ddpm, compiler_options=options)
        key = jax.random.PRNGKey(1)
        start = time.perf_counter()
        jax.block_until_ready(ddim(key, jnp.int32(50)))
        out["sampler_first_call_s"] = time.perf_counter() - start
        jax.block_until_ready(ddim(key, jnp.int32(100)))  # another step count
        out["sampler_compiles_for_50_and_100_steps"] = ddim._cache_size()
        out["ddim50_s"] = seconds(
            lambda: jax.block_until_ready(ddim(key, jnp.int32(50))), args.repeats
        )
        jax.block_until_ready(ddpm(key))  # compile
        out["ddpm1000_s"] = seconds(lambda: jax.block_until_ready(ddpm(key)), 1)
    return out


# ---------------------------------------------------------------------------------------------


def set_fp32_precision(torch, precision: str) -> str:
    """One float32 math mode for both libraries on a GPU; returns the math's name."""
    tf32 = precision == "tf32"
    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if tf32 else "highest")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return "tf32" if tf32 else "float32"


def peak_flops(device_kind: str, math: str) -> float | None:
    """The dense peak FLOP/s of ``math`` on this GPU; None for a GPU not in PEAK_FLOPS."""
    peaks = next((v for k, v in PEAK_FLOPS.items() if k in device_kind), None)
    return None if peaks is None else peaks[math]


def markdown(result: dict) -> str:
    ref, ours = result["reference"], result["jaxdiff"]
    dtype = result["dtype"]
    if result["math"] != dtype:
        dtype += f" with {result['math']} math"
    lines = [
        f"config `{result['config']}` ({result['unet']}, {result['parameters_m']:.2f} M "
        f"parameters), batch {result['batch']} of {SIZE}x{SIZE}x{CHANNELS}, {dtype}; "
        f"{result['machine']}",
        "",
        "| measure | jaxdiff | reference | jaxdiff / reference |",
        "|---|---|---|---|",
    ]
    for key, label, fmt in ROW_ORDER:
        if key not in ours and key not in ref:
            continue
        a, b = ours.get(key), ref.get(key)
        cells = [fmt.format(v) if v is not None else "-" for v in (a, b)]
        ratio = f"{a / b:.2f}" if a is not None and b else "-"
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {ratio} |")
    return "\n".join(lines) + "\n"


def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    """The network, batch and numerics flags that bench.py and profile_unet.py share."""
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--batch", type=int, help="default: the config's")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--fp32-precision",
        choices=("tf32", "highest"),
        default="tf32",
        help="on a GPU, the math of float32 convolutions and matmuls, for both libraries",
    )
    parser.add_argument(
        "--compiler-options",
        choices=("auto", "none"),
        default="auto",
        help="jaxdiff's XLA options (jaxdiff.compilation) or XLA's defaults",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_setup_arguments(parser)
    parser.add_argument("--warmup", type=int, default=3, help="steps after the first call")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--window-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="DDIM-50 runs (median)")
    parser.add_argument("--skip-sampling", action="store_true")
    parser.add_argument("--torch-compile", action="store_true", help="torch.compile the Unet")
    parser.add_argument("--remat", action="store_true", help="jaxdiff's Unet(remat=True)")
    parser.add_argument("--out", default="bench.json")
    args = parser.parse_args()
    config = CONFIGS[args.config]
    args.batch = args.batch or config["batch"]

    torch, ddp = load_reference()
    gpu = jax.default_backend() == "gpu"
    if gpu != torch.cuda.is_available():
        raise SystemExit("run both libraries on the same device: jax and torch disagree on GPU")
    math = "float32"
    if args.dtype == "bfloat16":
        math = "bfloat16"
    elif gpu:
        math = set_fp32_precision(torch, args.fp32_precision)
    torch.manual_seed(0)
    net = ddp.Unet(**config["unet"])
    unet = unet_from_config(config["unet"])
    variables = torch_state_dict_to_flax(net.state_dict(), unet)
    x = np.random.default_rng(0).uniform(-1, 1, (args.batch, SIZE, SIZE, CHANNELS))
    x = x.astype(np.float32)

    # the same function on both sides
    t = np.arange(args.batch) % T
    with torch.no_grad():
        want = net(
            torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(t)
        ).numpy()
    with jax.default_matmul_precision("highest"):  # torch computes this on the CPU
        got = np.asarray(jax.jit(unet.apply)(variables, x, jnp.asarray(t, jnp.int32)))
    err = float(np.max(np.abs(got.transpose(0, 3, 1, 2) - want)) / np.max(np.abs(want)))
    assert err < 1e-4, f"the two networks differ: relative max error {err:.2g}"

    result = {
        "config": args.config,
        "unet": config["unet"],
        "parameters_m": sum(p.numel() for p in net.parameters()) / 1e6,
        "batch": args.batch,
        "dtype": args.dtype,
        "math": math,
        "machine": (
            f"{jax.devices()[0].device_kind}; {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores; jax {jax.__version__}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)"
            + (", torch.compile" if args.torch_compile else ", torch eager")
        ),
        "args": vars(args),
        "output_relative_difference": err,
    }
    result["reference"] = bench_reference(torch, ddp, net, x, args, gpu)
    print(f"reference: {json.dumps(result['reference'])}", flush=True)
    if gpu:
        torch.cuda.empty_cache()  # hand the reference's cached blocks back before jaxdiff runs
    result["jaxdiff"] = bench_jaxdiff(unet, variables, x, args, gpu)
    flops = result["jaxdiff"]["train_step_gflops"] * 1e9
    result["reference"]["train_step_gflops"] = flops / 1e9  # the same model and step
    peak = peak_flops(jax.devices()[0].device_kind, result["math"]) if gpu else None
    if peak is not None:
        result["peak_flops"] = peak
        for side in ("reference", "jaxdiff"):
            steps_per_s = result[side]["train_images_per_s"] / args.batch
            result[side]["mfu"] = flops * steps_per_s / peak
    out = pathlib.Path(args.out)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
