"""Images/s of the default run (`jaxdiff train`, the digits preset) with and without a host sync
on every step, and the first logging window's throughput against the later ones.

The runner decides when to save from the host's own step counter and reads a step's
non-finite flag one step late, so the host never waits for the device inside a step. Before
(the first runner), the save decision read ``state.step`` back from the device after every
step. ``--mode per-step-sync`` puts exactly that read back after each train step; ``host``
is the runner as it is. The two modes alternate, ``--repeats`` runs each, in one process, and
the report gives every window's images/s and the medians.

    PYTHONPATH=. python experiments/host_sync.py [--steps 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import sys
import tempfile

import jax
import numpy as np

from jaxdiff import config as cfg
from jaxdiff import runner, train


def _with_per_step_sync(make_train_step):
    def make(*args, **kwargs):
        step_fn = make_train_step(*args, **kwargs)

        def synced(state, batch):
            state, metrics = step_fn(state, batch)
            int(jax.device_get(state.step))  # what the first runner's save decision read
            return state, metrics

        return synced

    return make


def run_once(mode: str, steps: int, log_every: int, directory: pathlib.Path) -> list[float]:
    base = cfg.PRESETS["digits"]
    config = dataclasses.replace(
        base,
        run=dataclasses.replace(
            base.run, steps=steps, log_every=log_every, sample_every=10**9, eval_every=0
        ),
    )
    original = train.make_train_step
    if mode == "per-step-sync":
        train.make_train_step = _with_per_step_sync(original)
    try:
        workdir = pathlib.Path(tempfile.mkdtemp(dir=directory))
        runner.train_and_evaluate(config, workdir, log=lambda message: None)
    finally:
        train.make_train_step = original
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["images_per_s"] for line in lines if "images_per_s" in line]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("experiments/results/host_sync")
    )
    args = parser.parse_args(argv)
    runs = {"host": [], "per-step-sync": []}
    with tempfile.TemporaryDirectory() as directory:
        run_once("host", args.log_every, args.log_every, pathlib.Path(directory))  # compile
        for repeat in range(args.repeats):
            for mode in runs:
                windows = run_once(mode, args.steps, args.log_every, pathlib.Path(directory))
                runs[mode].append(windows)
                print(f"{mode} run {repeat}: {np.round(windows, 1).tolist()}", file=sys.stderr)
    summary = {}
    for mode, windows in runs.items():
        later = [np.median(w[1:]) for w in windows]
        first_ratio = [w[0] / np.median(w[1:]) for w in windows]
        summary[mode] = {
            "median_images_per_s": round(float(np.median(later)), 1),
            "runs_median_images_per_s": [round(float(x), 1) for x in later],
            "first_window_over_later": [round(float(x), 3) for x in first_ratio],
        }
    command = "PYTHONPATH=. python experiments/host_sync.py " + " ".join(argv or sys.argv[1:])
    record = {
        "command": command,
        "machine": f"{platform.machine()}, {jax.device_count()} {jax.devices()[0].platform}",
        "steps": args.steps,
        "log_every": args.log_every,
        "windows": runs,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    table = [
        "| mode | images/s (median of runs' median windows) | each run | first window / later |",
        "|---|---|---|---|",
    ]
    for mode, s in summary.items():
        table.append(
            f"| {mode} | {s['median_images_per_s']} | {s['runs_median_images_per_s']} | "
            f"{s['first_window_over_later']} |"
        )
    text = f"# Host sync per step, the default run\n\n`{command}`\n\n" + "\n".join(table) + "\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
