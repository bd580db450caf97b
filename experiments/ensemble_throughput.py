"""Training throughput of K models in one vmapped program against K single runs, on this machine.

The network and loss are the ``digits`` preset's: ``Unet(dim=16, dim_mults=(1, 2, 2),
channels=1)`` at 16x16, batch 64, ``diffusion_loss_fn`` (L_simple, eps) with the cosine
coefficients of ``DiffusionConfig()``, ``default_optimizer()`` and the EMA, float32. For each K:

* ensemble: :func:`jaxdiff.ensemble.make_ensemble_train_step` over K seeds, every member on the
  same batch (a seed ensemble over identical data, ``share_batch=True``); one call trains K
  models one step;
* K single runs: :func:`jaxdiff.train.make_train_step` (compiled once) stepping K states in
  turn, the same total work (K member-steps per round).

Throughput is member-images/s: K x 64 images per round over the round's time. After the first
call (compilation, reported separately) and ``--warmup`` rounds, ``--windows`` windows of
``--window-steps`` rounds are timed, the single-run and ensemble windows alternating so that
both see the same load; the figure is the median window. Random uint8 images (the speed does
not depend on the pixels). Writes ``--out`` (JSON) and the same name with ``.md``.

    PYTHONPATH=. python experiments/ensemble_throughput.py
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import config, ensemble, objectives, train, workdir
from jaxdiff.models import Unet

SIZE, BATCH = 16, 64


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def measure(k: int, windows: int, window_steps: int, warmup: int) -> dict:
    unet = Unet(dim=16, dim_mults=(1, 2, 2), channels=1)
    coeffs = workdir.build_coeffs(config.DiffusionConfig())
    loss_fn = objectives.diffusion_loss_fn(unet.apply, coeffs)
    optimizer = train.default_optimizer()

    def init_fn(key):
        return unet.init(key, jnp.zeros((1, SIZE, SIZE, 1)), jnp.zeros((1,)))

    rng = np.random.default_rng(0)
    batch = jax.device_put(rng.integers(0, 256, (BATCH, SIZE, SIZE, 1), dtype=np.uint8))

    stacked = ensemble.create_ensemble_state(init_fn, optimizer, range(k))
    singles = ensemble.unstack_states(stacked)
    ensemble_step = ensemble.make_ensemble_train_step(loss_fn, optimizer, num_models=k)
    single_step = train.make_train_step(loss_fn, optimizer)

    box = {"stacked": stacked, "singles": singles}

    def ensemble_rounds(n):
        for _ in range(n):
            box["stacked"], _ = ensemble_step(box["stacked"], batch)
        return box["stacked"]

    def single_rounds(n):
        for _ in range(n):
            box["singles"] = [single_step(s, batch)[0] for s in box["singles"]]
        return box["singles"]

    compile_ensemble = _timed(lambda: ensemble_rounds(1))

    def first_single():
        box["singles"][0], _ = single_step(box["singles"][0], batch)
        return box["singles"][0]

    compile_single = _timed(first_single)
    ensemble_rounds(warmup)
    single_rounds(warmup)
    single_t, ensemble_t, load = [], [], []
    for _ in range(windows):
        load.append(os.getloadavg()[0])
        single_t.append(_timed(lambda: single_rounds(window_steps)))
        ensemble_t.append(_timed(lambda: ensemble_rounds(window_steps)))
    assert ensemble_step.jitted._cache_size() == 1, "the ensemble step recompiled"
    images = k * BATCH * window_steps
    single_ips = [images / t for t in single_t]
    ensemble_ips = [images / t for t in ensemble_t]
    return {
        "K": k,
        "single_images_per_s": statistics.median(single_ips),
        "ensemble_images_per_s": statistics.median(ensemble_ips),
        "speedup": statistics.median(ensemble_ips) / statistics.median(single_ips),
        "single_windows_images_per_s": single_ips,
        "ensemble_windows_images_per_s": ensemble_ips,
        "single_first_call_s": compile_single,
        "ensemble_first_call_s": compile_ensemble,
        "load_average_1min": load,
    }


def to_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# K models in one vmapped program against K single runs",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; jax {m['jax']} "
        f"({m['backend']}). {result['setup']}.",
        "",
        "| K | K single runs (images/s) | ensemble (images/s) | ensemble / single | "
        "first call single (s) | first call ensemble (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['K']} | {r['single_images_per_s']:.1f} | {r['ensemble_images_per_s']:.1f} | "
            f"{r['speedup']:.2f} | {r['single_first_call_s']:.1f} | "
            f"{r['ensemble_first_call_s']:.1f} |"
        )
    lines += ["", "Windows (images/s) and the 1-minute load average at each window's start:", ""]
    for r in result["results"]:
        single = ", ".join(f"{x:.1f}" for x in r["single_windows_images_per_s"])
        ens = ", ".join(f"{x:.1f}" for x in r["ensemble_windows_images_per_s"])
        load = ", ".join(f"{x:.2f}" for x in r["load_average_1min"])
        lines.append(f"- K={r['K']}: single {single}; ensemble {ens}; load {load}")
    lines += ["", result["note"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--window-steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("experiments/results/ensemble_throughput.json"),
    )
    args = parser.parse_args()
    if args.windows < 5:
        parser.error("--windows must be >= 5 (the figure is a median)")
    results = []
    for k in args.ks:
        r = measure(k, args.windows, args.window_steps, args.warmup)
        print(json.dumps({key: v for key, v in r.items() if not isinstance(v, list)}), flush=True)
        results.append(r)
    result = {
        "command": "PYTHONPATH=. python "
        + " ".join(["experiments/ensemble_throughput.py"] + sys.argv[1:]),
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
        },
        "setup": (
            f"digits preset network Unet(dim=16, dim_mults=(1, 2, 2), channels=1), {SIZE}x{SIZE}, "
            f"batch {BATCH}, L_simple eps, cosine T=1000, default_optimizer, EMA, float32; "
            f"median of {args.windows} windows of {args.window_steps} rounds after "
            f"{args.warmup} warm-up rounds, single and ensemble windows alternating"
        ),
        "note": (
            "Member-images/s: each of the K members trains on 64 images per round. The machine's "
            "2 cores were shared with other jobs during the run (see the load averages), so "
            "absolute images/s are noisy; the ratio within one K compares windows taken "
            "alternately under the same load."
        ),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
