"""Sample quality against network evaluations: every fast solver on the default digits run.

For each solver and each budget of network function evaluations (NFE), sample ``--num``
images from the workdir's EMA model and measure the digits Fréchet distance (``jaxdiff eval
--metric digits``); DDIM at the same budgets and DDPM over the whole chain are the baselines.
Heun and DPM-2 call the network twice per step, once on the step to sigma 0: n steps cost
2n - 1 evaluations, so a budget B runs (B + 1) // 2 steps. Resumable: finished rows of the
JSON are kept.

    PYTHONPATH=. python experiments/solvers.py --workdir /work/runs/digits [--num 500] \
        [--nfe 5,10,20,50] [--out experiments/results/solvers]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import time

import jax

from jaxdiff import evaluation

SOLVERS = ("ddim", "dpmpp-2m", "dpmpp-3m", "unipc-bh1", "unipc-bh2", "dpmpp-2m-sde",
           "euler", "heun", "lms")  # fmt: skip
TWO_CALLS = ("heun", "dpm2")


def steps_for(solver: str, nfe: int) -> int:
    return (nfe + 1) // 2 if solver in TWO_CALLS else nfe


def _table(rows, nfes):
    """FD of seed 0 per sampler and budget (and its wall time); then, where more seeds ran,
    every seed's FD with the median and the range: the noise of the figure."""
    by = {}
    for r in rows:
        by.setdefault(r["sampler"], {}).setdefault(r["nfe"], {})[r["seed"]] = r
    lines = [
        "| sampler | " + " | ".join(f"FD at {n} NFE (s)" for n in nfes) + " |",
        "|---|" + "---|" * len(nfes),
    ]
    for name, cells in by.items():
        if name.startswith("ddpm"):
            continue
        row = []
        for n in nfes:
            cell = cells.get(n, {}) or cells.get(2 * ((n + 1) // 2) - 1, {})
            r = cell.get(0)
            row.append(f"{r['fd']:.1f} ({r['seconds']:.0f})" if r else "-")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    for name, cells in by.items():
        if name.startswith("ddpm"):
            for nfe, seeds in cells.items():
                r = seeds[min(seeds)]
                lines.append(f"| {name} | FD {r['fd']:.1f} at {nfe} NFE ({r['seconds']:.0f} s) |")
    noise = [
        (name, nfe, seeds)
        for name, cells in by.items()
        for nfe, seeds in sorted(cells.items())
        if len(seeds) > 1
    ]
    if noise:
        lines += [
            "",
            "| sampler | NFE | FD per seed | median | range | minus DDIM's FD, same seed |",
            "|---|---|---|---|---|---|",
        ]
        for name, nfe, seeds in noise:
            keys = sorted(seeds)
            fds = [seeds[k]["fd"] for k in keys]
            per = " / ".join(f"{f:.1f}" for f in fds)
            median = statistics.median(fds)
            ddim = by.get("ddim", {}).get(nfe, {})
            diff = " / ".join(
                f"{seeds[k]['fd'] - ddim[k]['fd']:+.1f}" for k in keys if k in ddim
            ) if name != "ddim" else ""  # fmt: skip
            lines.append(
                f"| {name} | {nfe} | {per} (seeds {', '.join(map(str, keys))}) | "
                f"{median:.1f} | {max(fds) - min(fds):.1f} | {diff} |"
            )
    return "\n".join(lines)


COLORS = ["#000000", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf"]  # fmt: skip


def plot(rows, path: pathlib.Path, fd_max: float = 400.0) -> None:
    """FD against NFE (log scale) per sampler, with PIL; FDs above ``fd_max`` sit on the top
    edge."""
    import math

    from PIL import Image, ImageDraw

    width, height, left, top, right, bottom = 900, 520, 70, 20, 700, 470
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle((left, top, right, bottom), outline="black")
    lo, hi = math.log(4), math.log(60)

    def xy(nfe, fd):
        x = left + (math.log(nfe) - lo) / (hi - lo) * (right - left)
        y = bottom - min(fd, fd_max) / fd_max * (bottom - top)
        return x, y

    for nfe in (5, 10, 20, 50):
        x, _ = xy(nfe, 0)
        draw.line((x, bottom, x, bottom + 5), fill="black")
        draw.text((x - 6, bottom + 8), str(nfe), fill="black")
    for fd in range(0, int(fd_max) + 1, 50):
        _, y = xy(5, fd)
        draw.line((left - 5, y, left, y), fill="black")
        draw.text((left - 35, y - 6), str(fd), fill="black")
    draw.text((left + 250, bottom + 28), "network evaluations (log scale)", fill="black")
    draw.text((5, top), "FD", fill="black")
    names = [n for n in dict.fromkeys(r["sampler"] for r in rows) if not n.startswith("ddpm")]
    for k, name in enumerate(names):
        pts = sorted((r["nfe"], r["fd"]) for r in rows if r["sampler"] == name and r["seed"] == 0)
        color = COLORS[k % len(COLORS)]
        xys = [xy(n, f) for n, f in pts]
        if len(xys) > 1:
            draw.line(xys, fill=color, width=2)
        for x, y in xys:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
        draw.text((right + 15, top + 18 * k), name, fill=color)
    for r in rows:
        if r["sampler"].startswith("ddpm"):
            _, y = xy(5, r["fd"])
            draw.line((left, y, right, y), fill="#999999")
            draw.text((right + 15, top + 18 * len(names)), f"DDPM-{r['nfe']}", fill="#999999")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=pathlib.Path, required=True)
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--nfe", default="5,10,20,50")
    parser.add_argument("--solvers", default=",".join(SOLVERS))
    parser.add_argument("--ddpm", type=int, default=1000, help="DDPM steps (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=pathlib.Path, default=pathlib.Path("docs/solvers_fd.png"))
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path("experiments/results/solvers"))  # fmt: skip
    args = parser.parse_args(argv)
    nfes = [int(n) for n in args.nfe.split(",")]
    path = args.out.with_suffix(".json")
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    done = {(r["sampler"], r["nfe"], r["seed"], r["num"]) for r in rows}
    command = "PYTHONPATH=. python experiments/solvers.py " + " ".join(argv or sys.argv[1:])
    jobs = [(s, n) for n in nfes for s in args.solvers.split(",")]
    if args.ddpm:
        jobs.append(("ddpm", args.ddpm))
    for solver, nfe in jobs:
        if (solver, nfe, args.seed, args.num) in done:
            continue
        steps = nfe if solver == "ddpm" else steps_for(solver, nfe)
        start = time.perf_counter()
        result = evaluation.evaluate(
            args.workdir, num=args.num, sampler=solver, steps=steps, metric="digits",
            seed=args.seed,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        calls = 2 * steps - 1 if solver in TWO_CALLS else steps
        fd = result["digits"]["fd"]
        row = {"sampler": solver, "nfe": calls, "steps": steps, "seed": args.seed,
               "num": args.num, "fd": fd, "seconds": round(seconds, 1)}  # fmt: skip
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
        machine = f"{platform.machine()}, {jax.device_count()} {jax.devices()[0].platform}"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"command": command, "machine": machine, "rows": rows},
                                   indent=1) + "\n")  # fmt: skip
        args.out.with_suffix(".md").write_text(
            f"# Digits FD against network evaluations ({args.num} samples)\n\n"
            f"`{command}`\n\n{_table(rows, nfes)}\n"
        )
    plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
