"""Sample quality of a trained digits workdir: every figure of the README's quality table.

Runs ``jaxdiff eval`` (``jaxdiff.evaluation.evaluate``) on a workdir trained with ``jaxdiff
train`` and collects:

* the default evaluation (DDIM-50, ``--num`` samples) over several sampling seeds: the digits
  Fréchet distance, classifier score and precision/recall, as the median and range over seeds
  (the noise of the figure);
* the same network untrained (``--at-init``) and the real-data floor (the held-out test split
  against the training split's statistics);
* the Fréchet distance against the number of sampling steps: DDIM 10 / 20 / 50 / 100 and
  DDPM-1000 at ``--sweep-num`` samples (the shape of the DDIM paper's Table 1);
* the Fréchet distance during training (the ``digits_fd`` lines of ``metrics.jsonl``);
* the peak memory (RSS) of ``jaxdiff eval`` for N = 1,000 and 10,000 samples, each in its own
  process (DDIM-5 there: the sampler's step count does not change what is held in memory).

From the repository root, after ``jaxdiff train`` (the digits preset, into runs/digits):

    python experiments/quality.py --out experiments/results/quality-digits.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

from jaxdiff import evaluation


def _summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _row(result: dict) -> dict:
    r = result["digits"]
    return {k: r.get(k) for k in ("fd", "is", "precision", "recall", "n")} | {
        "mean_pixel": result["mean_pixel"],
        "seconds": result["seconds"],
    }


def _memory(workdir: str, num: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "jaxdiff.cli", "eval", "--workdir", workdir, "--num", str(num),
         "--steps", "5", "--quiet", "--seed", "99"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout)
    return {"num": num, "peak_rss_mb": result["peak_rss_mb"], "seconds": result["seconds"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/digits")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--sweep-num", type=int, default=500)
    parser.add_argument("--sweep", default="ddim10,ddim20,ddim50,ddim100,ddpm1000")
    parser.add_argument("--memory", default="1000,10000", help="'' to skip")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("quality-digits.json"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    report: dict = {"workdir": args.workdir, "num": args.num}

    def log(message):
        print(message, file=sys.stderr, flush=True)

    seeds = [int(s) for s in args.seeds.split(",")]
    runs = []
    for seed in seeds:
        result = evaluation.evaluate(args.workdir, num=args.num, seed=seed)
        runs.append(_row(result))
        log(f"seed {seed}: {runs[-1]}")
    report["step"] = result["step"]
    report["default"] = {"per_seed": runs} | {
        k: _summary([r[k] for r in runs]) for k in ("fd", "is", "precision", "recall", "mean_pixel")
    }
    report["floor"] = result["digits_floor"] | {"mean_pixel": result["mean_pixel_test"]}
    report["at_init"] = _row(evaluation.evaluate(args.workdir, num=args.num, at_init=True))
    log(f"at init: {report['at_init']}")

    sweep = []
    for name in args.sweep.split(","):
        sampler, steps = ("ddpm", 50) if name.startswith("ddpm") else ("ddim", int(name[4:]))
        result = evaluation.evaluate(args.workdir, num=args.sweep_num, sampler=sampler, steps=steps)
        sweep.append({"sampler": name} | _row(result))
        log(f"{name}: {sweep[-1]}")
    report["steps_sweep"] = sweep

    metrics = pathlib.Path(args.workdir) / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    report["during_training"] = [
        {"step": r["step"], "fd": r["digits_fd"], "is": r.get("digits_is")}
        for r in rows
        if r.get("digits_fd") is not None
    ]
    report["memory"] = [_memory(args.workdir, int(n)) for n in args.memory.split(",") if n]
    report["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(report))
    print(_markdown(report))
    return 0


def _markdown(r: dict) -> str:
    d = r["default"]
    lines = [
        f"Digits metric of `{r['workdir']}` (step {r['step']}), DDIM-50, N = {r['num']}, "
        f"{len(d['per_seed'])} sampling seeds: median (min..max)",
        "",
        "| set | FD | classifier score | precision | recall | mean pixel |",
        "|---|---|---|---|---|---|",
    ]

    def rng(k, fmt):
        s = d[k]
        return f"{s['median']:{fmt}} ({s['min']:{fmt}}..{s['max']:{fmt}})"

    lines.append(
        f"| samples | {rng('fd', '.1f')} | {rng('is', '.2f')} | {rng('precision', '.3f')} | "
        f"{rng('recall', '.3f')} | {rng('mean_pixel', '.3f')} |"
    )
    f, a = r["floor"], r["at_init"]
    lines.append(
        f"| real test split (N = {f['n']}) | {f['fd']:.1f} | {f['is']:.2f} | "
        f"{f['precision']:.3f} | {f['recall']:.3f} | {f['mean_pixel']:.3f} |"
    )
    lines.append(
        f"| untrained network | {a['fd']:.1f} | {a['is']:.2f} | {a['precision']:.3f} | "
        f"{a['recall']:.3f} | {a['mean_pixel']:.3f} |"
    )
    lines += ["", "| sampler (N = sweep) | FD | classifier score | precision | recall | s |"]
    lines.append("|---|---|---|---|---|---|")
    for s in r["steps_sweep"]:
        lines.append(
            f"| {s['sampler']} (N = {s['n']}) | {s['fd']:.1f} | {s['is']:.2f} | "
            f"{s['precision']:.3f} | {s['recall']:.3f} | {s['seconds']:.0f} |"
        )
    if r["during_training"]:
        lines += ["", "During training: " + ", ".join(
            f"step {e['step']}: FD {e['fd']:.1f}" for e in r["during_training"]
        )]  # fmt: skip
    if r["memory"]:
        lines += ["", "Peak RSS of `jaxdiff eval`: " + ", ".join(
            f"N = {m['num']}: {m['peak_rss_mb']:.0f} MB" for m in r["memory"]
        )]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
