"""Improved DDPM's loss ablation (Nichol & Dhariwal 2021, Table 1/2 and Sec. 3), in small, on the
embedded digits: L_simple with fixed variance, L_hybrid (learned-range variance) and L_vlb with
importance sampling of t, each on the linear and the cosine schedule, with the same budget and
the same seeds; every seed's test bits/dim and digits Fréchet distance (DDIM-50 and respaced
DDPM), and the wall time of each part.

The seeds of one recipe train together as one ensemble (``jaxdiff.ensemble``: one compiled
program over a leading axis of train states). Member s sees the batches of ``run.seed = s``
(``share_batch=False``), so it is the single run ``jaxdiff train --preset ... --seed s`` (up to
float32 summation order; tests/unit/test_ensemble.py). Each member is then saved as an ordinary
workdir (``config.json`` and a checkpoint) and evaluated with ``jaxdiff.evaluation`` as
``jaxdiff bpd`` and ``jaxdiff eval`` do.

    PYTHONPATH=. python experiments/ablation.py [--steps 1000] [--seeds 0,1] \
        [--workdirs /tmp/ablation] [--out experiments/results/ablation]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import sys
import time

import jax
import numpy as np

from jaxdiff import checkpoint, data, ensemble, evaluation, objectives, train
from jaxdiff import config as cfg
from jaxdiff import workdir as wd

RECIPES = {
    "L_simple": "digits",
    "L_hybrid": "digits-hybrid",
    "L_vlb (importance sampling)": "digits-vlb",
}
SCHEDULES = ("linear", "cosine")


def _config(preset: str, schedule: str, steps: int, seed: int) -> cfg.Config:
    base = cfg.PRESETS[preset]
    return cfg.validate(
        dataclasses.replace(
            base,
            diffusion=dataclasses.replace(base.diffusion, schedule=schedule),
            run=dataclasses.replace(base.run, steps=steps, seed=seed, eval_every=0),
        )
    )


def train_members(configs: list[cfg.Config], log) -> tuple[list[train.TrainState], float, float]:
    """Train one member per config (they differ only in run.seed) in one ensemble program;
    return the states, the wall seconds and the process CPU seconds (which a busy machine
    inflates less than the wall time)."""
    first = configs[0]
    model = wd.build_model(first)
    optimizer = wd.build_optimizer(first)
    inputs = wd.model_inputs(first)
    state = ensemble.create_ensemble_state(
        lambda key: model.init(key, *inputs["args"], **inputs["kwargs"]),
        optimizer,
        [c.run.seed for c in configs],
        loss_state=objectives.initial_loss_state(first.diffusion),
    )
    step_fn = ensemble.make_ensemble_train_step(
        objectives.loss_fn_from_config(model.apply, first),
        optimizer,
        num_models=len(configs),
        ema=wd.build_ema(first),
        share_batch=False,
    )
    dataset = data.load_digits(first.data.image_size, split="train")
    run = first.run
    start, cpu = time.perf_counter(), time.process_time()
    for step in range(run.steps):
        batch = np.stack(
            [data.batch_at(dataset, step, run.batch_size, seed=c.run.seed) for c in configs]
        )
        state, metrics = step_fn(state, batch)
        if (step + 1) % 250 == 0 or step + 1 == run.steps:
            loss = np.asarray(metrics["loss"])
            log(f"  step {step + 1}/{run.steps} loss {np.round(loss, 4).tolist()}")
    jax.block_until_ready(state)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return ensemble.unstack_states(state), wall, cpu


def save_workdir(config: cfg.Config, state: train.TrainState, workdir: pathlib.Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    with checkpoint.Checkpoints(
        workdir, config=config.identity(), save_every=config.run.steps, keep=1
    ) as ckpt:
        ckpt.save(state, force=True)
        ckpt.wait()


def evaluate_member(workdir: pathlib.Path, num: int, ddpm_steps: int, log) -> dict:
    out = {}
    start = time.perf_counter()
    out["bpd"] = evaluation.evaluate_bpd(workdir, split="test")["bits_per_dim"]
    out["bpd_seconds"] = round(time.perf_counter() - start, 1)
    for name, sampler, steps in (("ddim50", "ddim", 50), (f"ddpm{ddpm_steps}", "ddpm", ddpm_steps)):
        start = time.perf_counter()
        result = evaluation.evaluate(
            workdir, num=num, sampler=sampler, steps=steps, metric="digits"
        )
        out[f"fd_{name}"] = result["digits"]["fd"]
        out[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
    log(f"  {workdir.name}: {out}")
    return out


def _table(rows: list[dict], seeds: list[int], ddpm: str) -> str:
    lines = [
        f"| recipe | schedule | test bits/dim (seeds {', '.join(map(str, seeds))}) | "
        f"FD DDIM-50 | FD DDPM-{ddpm} (respaced) | train s | eval s per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["members"]

        def col(key, fmt, m=m):
            values = [fmt.format(x[key]) for x in m]
            return " / ".join(values) + f" (mean {fmt.format(np.mean([x[key] for x in m]))})"

        evals = np.mean([x["bpd_seconds"] + x["ddim50_seconds"] + x[f"ddpm{ddpm}_seconds"]
                         for x in m])  # fmt: skip
        lines.append(
            f"| {r['recipe']} | {r['schedule']} | {col('bpd', '{:.3f}')} | "
            f"{col('fd_ddim50', '{:.1f}')} | {col(f'fd_ddpm{ddpm}', '{:.1f}')} | "
            f"{r['train_seconds']:.0f} | {evals:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--num", type=int, default=1000, help="samples per FD")
    parser.add_argument("--ddpm-steps", type=int, default=100)
    parser.add_argument("--workdirs", type=pathlib.Path, default=pathlib.Path("/tmp/ablation"))
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("experiments/results/ablation")
    )
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names")
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]

    def log(message):
        print(message, file=sys.stderr, flush=True)

    results_path = args.out.with_suffix(".json")
    rows = json.loads(results_path.read_text())["rows"] if results_path.exists() else []
    done = {(r["recipe"], r["schedule"]) for r in rows if r["steps"] == args.steps}
    command = "PYTHONPATH=. python experiments/ablation.py " + " ".join(argv or sys.argv[1:])
    for recipe in args.recipes.split(","):
        for schedule in args.schedules.split(","):
            if (recipe, schedule) in done:
                continue
            preset = RECIPES[recipe]
            configs = [_config(preset, schedule, args.steps, s) for s in seeds]
            log(f"{recipe}, {schedule}: training {len(seeds)} seeds as one ensemble")
            states, seconds, cpu_seconds = train_members(configs, log)
            members = []
            for config, state in zip(configs, states, strict=True):
                name = f"{preset}-{schedule}-seed{config.run.seed}"
                workdir = args.workdirs / name
                save_workdir(config, state, workdir)
                members.append(
                    {"seed": config.run.seed, **evaluate_member(workdir, args.num,
                                                                args.ddpm_steps, log)}
                )  # fmt: skip
            rows.append({"recipe": recipe, "schedule": schedule, "preset": preset,
                         "steps": args.steps, "train_seconds": round(seconds, 1),
                         "train_cpu_seconds": round(cpu_seconds, 1),
                         "load_average": round(os.getloadavg()[0], 2),
                         "members": members})  # fmt: skip
            args.out.parent.mkdir(parents=True, exist_ok=True)
            machine = f"{platform.machine()}, {jax.device_count()} {jax.devices()[0].platform}"
            record = {"command": command, "seeds": seeds, "num_samples": args.num,
                      "machine": machine, "rows": rows}  # fmt: skip
            results_path.write_text(json.dumps(record, indent=1) + "\n")
            args.out.with_suffix(".md").write_text(
                f"# Loss ablation on digits ({args.steps} steps of 64, seeds {seeds})\n\n"
                f"`{command}`\n\n{_table(rows, seeds, str(args.ddpm_steps))}\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
