"""Does jaxdiff train as well as PyTorch? The ``digits`` preset trained by both, scored alike.

For each training seed s (``--seeds``, default 0..4), two runs of the ``digits`` preset
(``jaxdiff.config.PRESETS["digits"]``: Unet dim 16, dim_mults (1, 2, 2), 1 channel, 16x16,
cosine schedule, T = 1000, eps objective, batch 64, lr 1e-3, ``--steps`` default 1500):

* jaxdiff: ``jaxdiff.runner.train_and_evaluate(config, workdir)`` with ``run.seed = s`` (Adam
  (0.9, 0.99) after global-norm clipping at 1, ema-pytorch's EMA schedule);
* the reference: denoising-diffusion-pytorch 2.3.4's own ``Unet`` and ``GaussianDiffusion``
  (``objective="pred_noise"``, ``beta_schedule="cosine"``, T = 1000) in the loop of its
  ``Trainer.train``: ``loss = diffusion(x)``, ``backward``, ``clip_grad_norm_(1.0)``,
  ``Adam(lr, betas=(0.9, 0.99))``, ``zero_grad``, ``ema_pytorch.EMA(beta=0.995,
  update_every=10).update()``, with ``torch.manual_seed(s)``.

Both sides see the same batches in the same order: ``jaxdiff.data.batch_at(load_digits(16,
"train"), step, 64, seed=s)``, the uint8 batches the runner draws. The reference gets them as
NCHW float32 ``x / 127.5 - 1`` (``jaxdiff.data.to_unit_range``, what jaxdiff's loss computes on
device) with ``auto_normalize=False``. The script records a SHA-256 of every batch each side was
fed (on the jaxdiff side by wrapping ``jaxdiff.data.batch_at`` while the runner trains) and
refuses to report a seed whose two lists differ.

Both sides are then evaluated through one jaxdiff path: the reference's EMA ``Unet`` weights go
through ``jaxdiff.convert.torch_state_dict_to_flax`` (checked first: the converted network must
reproduce the torch network's output on a probe input), and each model draws ``--num`` images
with jaxdiff's DDIM-50 (eta 0) from the same x_T for each sampling seed (``--sample-seeds``),
scored by ``jaxdiff.evaluation.digits_metrics`` (Fréchet distance, Inception-style score,
precision, recall in the digits feature net's space) and by the mean brightness (pixels in
[0, 1]) next to the training data's. ``--bpd`` adds test-split bits/dim (the full bound, T
network calls per image, as ``jaxdiff bpd``; about 2 minutes per model on 2 CPU cores).

Each finished training run (EMA weights, losses, batch checksums, wall time) and each
evaluation is cached under ``--cache-dir`` (default /tmp/compare_pytorch): an interrupted run
started again with the same flags continues where it stopped.

Writes ``--out`` (JSON: every seed x side x sampling seed, the config, the versions, the wall
time of each training run) and the same name with ``.md``: per side the median and min..max
over seeds of each metric (the mean over sampling seeds per training seed), the paired per-seed
differences (jaxdiff - reference), a Mann-Whitney U p-value (two-sided, scipy) and an exact
sign-flip permutation p-value of the paired differences, and whether the gap is within the
seed-to-seed spread.

Environment (jax and the CPU build of torch in one virtual environment)::

    python3.11 -m venv /work/cmpenv
    /work/cmpenv/bin/pip install -e /work/main torch==2.13.0 einops ema-pytorch packaging
    /work/cmpenv/bin/pip install --no-deps denoising-diffusion-pytorch==2.3.4

(``--no-deps``: the reference's torchvision, accelerate and other Trainer-only requirements
would pull a CUDA torch; ``experiments/_reference.py`` serves them with import-only stand-ins.)
From the repository root::

    PYTHONPATH=. /work/cmpenv/bin/python experiments/compare_pytorch.py          # ~1 hour
    PYTHONPATH=. /work/cmpenv/bin/python experiments/compare_pytorch.py \\
        --steps 30 --seeds 0 --num 64 --sample-seeds 0 --out /tmp/smoke.json    # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import pathlib
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share a GPU with torch

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

import jaxdiff.data  # noqa: E402
from jaxdiff import gaussian, likelihood, runner, samplers, schedules  # noqa: E402
from jaxdiff.compilation import compiler_options  # noqa: E402
from jaxdiff.config import PRESETS, Config  # noqa: E402
from jaxdiff.convert import torch_state_dict_to_flax  # noqa: E402
from jaxdiff.models import unet_from_config  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIDES = ("jaxdiff", "reference")
METRICS = ("fd", "is", "precision", "recall", "brightness")
# EMA of the reference Trainer (ema_decay, ema_update_every; ema-pytorch's other defaults)
EMA_BETA, EMA_EVERY = 0.995, 10
ADAM_BETAS, MAX_GRAD_NORM = (0.9, 0.99), 1.0
PROBE_TOLERANCE = 1e-4  # relative max error of the converted network on the probe input


class ComparisonError(RuntimeError):
    """A check of the comparison failed (batches, conversion, cache): its result would be void."""


# ---------------------------------------------------------------------------------------------
# Configuration


def run_config(seed: int, steps: int) -> Config:
    """The digits preset with ``run.seed = seed``, ``steps`` steps, one checkpoint at the end and
    (almost) no sampling during training."""
    base = PRESETS["digits"]
    changes = {
        "seed": seed,
        "steps": steps,
        "sample_every": 10**9,
        "num_samples": 16,
        "save_every": max(steps, 1),
        "log_every": 10,
    }
    if "eval_every" in {f.name for f in dataclasses.fields(base.run)}:
        changes["eval_every"] = 0
    return dataclasses.replace(base, run=dataclasses.replace(base.run, **changes))


def unet_kwargs(config: Config) -> dict:
    """The reference ``Unet``'s constructor arguments for the config's network (jaxdiff's
    ``unet_from_config`` takes the same dict)."""
    m = config.model
    if config.data.dataset != "digits":
        raise ValueError(f"this comparison trains on 'digits', not {config.data.dataset!r}")
    return {
        "dim": m.dim,
        "dim_mults": tuple(m.dim_mults),
        "channels": 1,
        "dropout": m.dropout,
        "attn_heads": m.attn_heads,
        "attn_dim_head": m.attn_dim_head,
    }


def coeffs_of(config: Config, convention: str = "lucidrains") -> gaussian.DiffusionCoeffs:
    betas = schedules.get_named_beta_schedule(config.diffusion.schedule, config.diffusion.timesteps)
    return gaussian.make_coeffs(betas, convention=convention)


def training_dataset(config: Config) -> jaxdiff.data.ArrayDataset:
    """The runner's training set for the digits preset: ``load_digits(size, split="train")``
    (the runner's dataset for ``digits``; the batch hashes check that the two agree)."""
    return jaxdiff.data.load_digits(config.data.image_size, split="train")


def batch_hash(batch: np.ndarray) -> str:
    batch = np.ascontiguousarray(batch)
    head = f"{batch.dtype}{list(batch.shape)}".encode()
    return hashlib.sha256(head + batch.tobytes()).hexdigest()[:16]


def digest(hashes: list[str]) -> str:
    return hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from err
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


def parse_sides(text: str) -> list[str]:
    sides = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in sides if s not in SIDES]
    if bad or not sides:
        raise argparse.ArgumentTypeError(f"unknown side(s) {bad or text!r}; choose from {SIDES}")
    return sides


# ---------------------------------------------------------------------------------------------
# The cache of finished runs


def run_dir(cache: pathlib.Path, side: str, seed: int, steps: int) -> pathlib.Path:
    return cache / f"{side}-seed{seed}-steps{steps}"


def load_finished(directory: pathlib.Path, config: Config) -> dict | None:
    """The meta of a finished run in ``directory``, or None when it has not finished."""
    meta_path, weights = directory / "meta.json", directory / "ema.npz"
    if not (meta_path.is_file() and weights.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    want = {"identity": _plain(config.identity()), "steps": config.run.steps}
    if {k: meta.get(k) for k in want} != want:
        raise ComparisonError(
            f"the cached run in {str(directory)!r} was trained with another configuration; "
            "delete it or pass another --cache-dir"
        )
    return meta


def _plain(value):
    """``value`` as JSON reads it back (tuples become lists)."""
    return json.loads(json.dumps(value))


def save_finished(directory: pathlib.Path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    np.savez(directory / ".ema.npz", **arrays)
    os.replace(directory / ".ema.npz", directory / "ema.npz")
    (directory / ".meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(directory / ".meta.json", directory / "meta.json")  # last: marks it finished


def flatten_params(variables) -> dict[str, np.ndarray]:
    flat = traverse_util.flatten_dict(jax.device_get(variables))
    return {"/".join(path): np.asarray(value) for path, value in flat.items()}


def unflatten_params(arrays) -> dict:
    return traverse_util.unflatten_dict(
        {tuple(k.split("/")): jnp.asarray(arrays[k]) for k in arrays}
    )


# ---------------------------------------------------------------------------------------------
# Training


def _loss_tail(losses: dict[int, float], steps: int) -> float | None:
    """Mean training loss over the logged steps (multiples of 10) of the last third."""
    tail = [v for s, v in losses.items() if s % 10 == 0 and s > steps - steps // 3]
    return float(np.mean(tail)) if tail else None


def train_jaxdiff(config: Config, directory: pathlib.Path) -> tuple[dict, dict]:
    """Train with ``runner.train_and_evaluate``; record a hash of every batch it draws."""
    workdir = directory / "workdir"
    if workdir.exists():  # an interrupted run: its earlier batches were not recorded
        shutil.rmtree(workdir)
    seen: dict[int, str] = {}
    original = jaxdiff.data.batch_at

    def recording_batch_at(dataset, step, *args, **kwargs):
        batch = original(dataset, step, *args, **kwargs)
        seen[int(step)] = batch_hash(batch)
        return batch

    def log(message: str) -> None:
        # the runner logs every 10 steps: show every 250th, the last, and everything else
        match = re.search(r"step (\d+)/", message)
        if match is None or int(match[1]) % 250 == 0 or int(match[1]) == config.run.steps:
            print(f"  jaxdiff seed {config.run.seed}: {message}", flush=True)

    jaxdiff.data.batch_at = recording_batch_at
    try:
        start = time.perf_counter()
        state = runner.train_and_evaluate(config, workdir, log=log)
        jax.block_until_ready(state.ema_params)
        wall = time.perf_counter() - start
    finally:
        jaxdiff.data.batch_at = original
    if sorted(seen) != list(range(config.run.steps)):
        raise ComparisonError(
            f"the runner drew batches for steps {sorted(seen)[:5]}..., not "
            f"0..{config.run.steps - 1}"
        )
    losses = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("loss") is not None:
            losses[int(row["step"])] = row["loss"]
    meta = {
        "wall_s": wall,
        "batch_hashes": [seen[s] for s in range(config.run.steps)],
        "losses": {str(k): v for k, v in losses.items()},
        "loss_tail": _loss_tail(losses, config.run.steps),
    }
    return meta, flatten_params(state.ema_params)


def train_reference(config: Config, torch, ddp) -> tuple[dict, dict]:
    """The reference ``Trainer.train`` loop on jaxdiff's batches."""
    from ema_pytorch import EMA

    run = config.run
    torch.manual_seed(run.seed)
    net = ddp.Unet(**unet_kwargs(config))
    diffusion = ddp.GaussianDiffusion(
        net,
        image_size=config.data.image_size,
        timesteps=config.diffusion.timesteps,
        objective={"eps": "pred_noise", "x0": "pred_x0", "v": "pred_v"}[config.diffusion.objective],
        beta_schedule=config.diffusion.schedule,
        auto_normalize=False,  # fed x / 127.5 - 1 directly
    )
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=run.lr, betas=ADAM_BETAS)
    ema = EMA(diffusion, beta=EMA_BETA, update_every=EMA_EVERY)
    dataset = training_dataset(config)
    hashes, losses = [], {}
    start = time.perf_counter()
    for step in range(run.steps):
        batch = jaxdiff.data.batch_at(
            dataset, step, run.batch_size, seed=run.seed, flip=config.data.flip
        )
        hashes.append(batch_hash(batch))
        x = np.ascontiguousarray(jaxdiff.data.to_unit_range(batch).transpose(0, 3, 1, 2))
        diffusion.train()
        loss = diffusion(torch.from_numpy(x))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        if (step + 1) % 10 == 0 or step + 1 == run.steps:
            losses[step + 1] = float(loss.detach())
        if (step + 1) % 250 == 0 or step + 1 == run.steps:
            print(
                f"  reference seed {run.seed}: step {step + 1}/{run.steps} loss "
                f"{losses[step + 1]:.4f}",
                flush=True,
            )
    wall = time.perf_counter() - start
    state = {
        k: v.detach().cpu().numpy().copy() for k, v in ema.ema_model.model.state_dict().items()
    }
    meta = {
        "wall_s": wall,
        "batch_hashes": hashes,
        "losses": {str(k): v for k, v in losses.items()},
        "loss_tail": _loss_tail(losses, run.steps),
    }
    return meta, state


# ---------------------------------------------------------------------------------------------
# Evaluation: one jaxdiff path for both sides


def jax_variables(side: str, arrays, unet) -> dict:
    if side == "jaxdiff":
        return unflatten_params(arrays)
    return torch_state_dict_to_flax({k: arrays[k] for k in arrays}, unet)


def check_conversion(arrays, variables, config: Config, unet, torch, ddp) -> float:
    """Relative max error of the converted network against the torch network on a probe."""
    net = ddp.Unet(**unet_kwargs(config))
    net.load_state_dict({k: torch.from_numpy(np.array(arrays[k])) for k in arrays})
    net.eval()
    size = config.data.image_size
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((8, size, size, 1)).astype(np.float32)
    t = np.linspace(0, config.diffusion.timesteps - 1, 8).astype(np.int64)
    with torch.no_grad():
        want = net(
            torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(t)
        )
        want = want.numpy().transpose(0, 2, 3, 1)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(jax.jit(unet.apply)(variables, jnp.asarray(x), jnp.asarray(t, jnp.int32)))
    err = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12))
    if not err < PROBE_TOLERANCE:
        raise ComparisonError(
            f"the converted reference weights do not reproduce the torch network: relative max "
            f"error {err:.3g} on the probe (tolerance {PROBE_TOLERANCE})"
        )
    return err


def ddim_program(unet, coeffs: gaussian.DiffusionCoeffs, steps: int, objective: str):
    """``run(variables, x_T, key)``: jaxdiff's DDIM (eta 0) over ``steps`` steps, jitted once
    for every model of the same network (with the runner's XLA options)."""

    @functools.partial(jax.jit, compiler_options=compiler_options())
    def run(variables, x_T, key):
        grid = samplers.ddim_grid(coeffs.num_timesteps, steps)
        return samplers.ddim_sample(
            lambda x, t: unet.apply(variables, x, t),
            coeffs,
            x_T,
            grid=grid,
            eta=0.0,
            key=key,
            mean_type=objective,
        ).sample

    return run


def sample(run, variables, config: Config, *, num: int, seed: int, chunk: int) -> np.ndarray:
    """``num`` uint8 images from ``run`` (:func:`ddim_program`); x_T = normal(fold_in(key(seed),
    0)) [num, S, S, 1], the same for every model, ``chunk`` images per call."""
    size = config.data.image_size
    key = jax.random.PRNGKey(seed)
    x_T = jax.random.normal(jax.random.fold_in(key, 0), (num, size, size, 1))
    chunk = min(chunk, num)
    padded = math.ceil(num / chunk) * chunk
    x_T = jnp.concatenate([x_T, jnp.zeros((padded - num, size, size, 1))]) if padded > num else x_T
    noise_key = jax.random.fold_in(key, 1)
    out = [
        np.asarray(run(variables, x_T[i : i + chunk], jax.random.fold_in(noise_key, i // chunk)))
        for i in range(0, padded, chunk)
    ]
    raw = np.concatenate(out)[:num]
    if not np.isfinite(raw).all():
        raise ComparisonError("the samples hold NaN or infinite values: the model is broken")
    return jaxdiff.data.to_uint8(raw)


def test_bpd(variables, unet, config: Config) -> float:
    """Bits/dim on the test split, as ``runner.evaluate_bpd`` computes it (openai convention,
    fixed-small variance, exact tails, key PRNGKey(i) per batch of 256)."""
    images = jaxdiff.data.to_unit_range(
        jaxdiff.data.load_digits(config.data.image_size, split="test").images
    )
    c = coeffs_of(config, convention="openai")

    @functools.partial(jax.jit, compiler_options=compiler_options())
    def bpd(x, key):
        return likelihood.calc_bpd_loop(
            lambda x_t, t: unet.apply(variables, x_t, t),
            c,
            x,
            key=key,
            mean_type=config.diffusion.objective,
            var_type="fixed_small",
        ).total_bpd

    totals = [
        np.asarray(bpd(jnp.asarray(images[i : i + 256]), jax.random.PRNGKey(i)))
        for i in range(0, len(images), 256)
    ]
    return float(np.mean(np.concatenate(totals)))


# ---------------------------------------------------------------------------------------------
# Statistics and the report


def sign_flip_p(differences: list[float]) -> float:
    """Exact two-sided sign-flip permutation p-value of the mean paired difference."""
    d = np.asarray(differences, np.float64)
    observed = abs(d.mean())
    means = [
        abs(np.mean(d * np.asarray(signs)))
        for signs in itertools.product((1.0, -1.0), repeat=len(d))
    ]
    return float(np.mean(np.asarray(means) >= observed - 1e-12 * max(observed, 1.0)))


def mann_whitney_p(a: list[float], b: list[float]) -> float | None:
    from scipy import stats

    if len(a) < 1 or len(b) < 1 or len(set(a) | set(b)) < 2:
        return None
    return float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)


def summarize(per_seed: dict[str, dict[int, dict]], seeds: list[int], keys: list[str]) -> dict:
    out = {}
    for key in keys:
        values = {
            side: [per_seed[side][s][key] for s in seeds if per_seed[side][s].get(key) is not None]
            for side in SIDES
        }
        if not all(values.values()):
            continue
        row = {
            side: {
                "median": statistics.median(v),
                "min": min(v),
                "max": max(v),
                "values": v,
            }
            for side, v in values.items()
        }
        paired = [
            per_seed["jaxdiff"][s][key] - per_seed["reference"][s][key]
            for s in seeds
            if per_seed["jaxdiff"][s].get(key) is not None
            and per_seed["reference"][s].get(key) is not None
        ]
        a, b = values["jaxdiff"], values["reference"]
        overlap = min(a) <= max(b) and min(b) <= max(a)
        p_mw = mann_whitney_p(a, b)
        p_sign = sign_flip_p(paired) if paired else None
        row["paired_difference"] = {
            "median": statistics.median(paired),
            "min": min(paired),
            "max": max(paired),
            "values": paired,
        }
        row["ranges_overlap"] = overlap
        row["mann_whitney_p"] = p_mw
        row["sign_flip_p"] = p_sign
        row["within_spread"] = bool(overlap and (p_mw is None or p_mw >= 0.05))
        out[key] = row
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0 or 1e-3 <= abs(v) < 1e4:
        return f"{v:.4g}"
    return f"{v:.3g}"


def markdown(result: dict) -> str:
    summary = result["summary"]
    seeds = result["seeds"]
    reference = result["versions"]["denoising-diffusion-pytorch"]
    lines = [
        f"jaxdiff vs denoising-diffusion-pytorch {reference}"
        f" on the `digits` preset, {result['steps']} steps; training seeds {seeds}, DDIM-"
        f"{result['sample_steps']} (eta 0), {result['num']} samples per model and sampling seed "
        f"{result['sample_seeds']} (a seed's value is the mean over sampling seeds). "
        f"{result['machine']}",
        "",
        "| measure | jaxdiff median [min..max] | reference median [min..max] | "
        "paired diff (jaxdiff - ref) median [min..max] | Mann-Whitney p | sign-flip p | "
        "within seed spread |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = {
        "fd": "Fréchet distance (digits features)",
        "is": "Inception-style score",
        "precision": "precision",
        "recall": "recall",
        "brightness": "mean brightness",
        "bpd": "test bits/dim",
        "loss_tail": "training loss (mean, last third)",
        "wall_s": "training wall time (s; jaxdiff's with compile and checkpoint)",
    }
    for key, row in summary.items():
        j, r, d = row["jaxdiff"], row["reference"], row["paired_difference"]
        cells = [f"{_fmt(x['median'])} [{_fmt(x['min'])}..{_fmt(x['max'])}]" for x in (j, r, d)]
        lines.append(
            f"| {labels.get(key, key)} | {cells[0]} | {cells[1]} | {cells[2]} | "
            f"{_fmt(row['mann_whitney_p'])} | {_fmt(row['sign_flip_p'])} | "
            f"{'yes' if row['within_spread'] else 'no'} |"
        )
    lines += [
        "",
        f"Training data mean brightness: {result['data_brightness']:.4f}. "
        f"Batches identical on both sides for every seed: {result['batches_identical']}. "
        f"Converted reference weights vs torch, worst relative max error on the probe: "
        f"{_fmt(result['worst_probe_error'])}.",
        "",
    ]
    quality = [k for k in ("fd", "is", "precision", "recall") if k in summary]
    if quality:
        inside = [k for k in quality if summary[k]["within_spread"]]
        outside = [k for k in quality if not summary[k]["within_spread"]]
        if not outside:
            lines.append(
                f"Every sample-quality metric ({', '.join(quality)}) differs by less than the "
                "seed-to-seed spread: the two sides' ranges over seeds overlap and the "
                "Mann-Whitney p-value is at least 0.05."
            )
        else:
            lines.append(
                f"Outside the seed-to-seed spread (ranges disjoint or Mann-Whitney p < 0.05): "
                f"{', '.join(outside)}; within it: {', '.join(inside) or 'none'}."
            )
        if len(seeds) < 4:
            lines.append(
                f"With {len(seeds)} seed(s) per side no p-value can fall below 0.05: this is a "
                "smoke run, not evidence."
            )
    else:
        lines.append("No sample-quality metric was computed (--no-metric).")
    return "\n".join(lines) + "\n"


def versions(torch) -> dict:
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "jax": jax.__version__,
        "jaxlib": version("jaxlib"),
        "flax": version("flax"),
        "optax": version("optax"),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "denoising-diffusion-pytorch": version("denoising-diffusion-pytorch"),
        "ema-pytorch": version("ema-pytorch"),
        "jaxdiff_commit": commit,
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=parse_ints, default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=PRESETS["digits"].run.steps)
    parser.add_argument("--num", type=int, default=1000, help="samples per model and seed")
    parser.add_argument("--sample-seeds", type=parse_ints, default=[0, 1])
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--sample-batch", type=int, default=500, help="images per DDIM call")
    parser.add_argument("--sides", type=parse_sides, default=list(SIDES))
    parser.add_argument("--no-metric", action="store_true", help="skip digits_metrics")
    parser.add_argument("--bpd", action="store_true", help="also test bits/dim (~2 min/model)")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--cache-dir", default="/tmp/compare_pytorch")
    parser.add_argument("--out", default=str(ROOT / "experiments/results/compare_pytorch.json"))
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.num < 2:
        parser.error(f"--num must be >= 2, got {args.num}")
    if args.sample_batch < 1:
        parser.error(f"--sample-batch must be >= 1, got {args.sample_batch}")
    timesteps = PRESETS["digits"].diffusion.timesteps
    if not 1 <= args.sample_steps <= timesteps:
        parser.error(f"--sample-steps must be in [1, {timesteps}], got {args.sample_steps}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds repeats a seed: {args.seeds}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT / "experiments"))
    from _reference import load_reference

    torch, ddp = load_reference()
    torch.set_num_threads(args.torch_threads)
    metric = None
    if not args.no_metric:
        try:
            from jaxdiff.evaluation import digits_metrics as metric
        except ImportError as err:
            raise SystemExit(
                f"jaxdiff.evaluation.digits_metrics is not available ({err}); pass --no-metric "
                "to compare brightness (and --bpd) only"
            ) from err
        from jaxdiff.models.digits_net import FEATURE_DIM

        if args.num <= FEATURE_DIM:
            raise SystemExit(
                f"--num {args.num} is too few for the digits metric's {FEATURE_DIM}-d features "
                f"(a Fréchet distance needs a full-rank covariance): pass --num "
                f"{FEATURE_DIM + 1} or more, or --no-metric"
            )
    cache = pathlib.Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    sides = args.sides

    # 1. train (or find in the cache) every (side, seed)
    trained: dict[str, dict[int, dict]] = {side: {} for side in sides}
    for seed in args.seeds:
        config = run_config(seed, args.steps)
        for side in sides:
            directory = run_dir(cache, side, seed, args.steps)
            meta = load_finished(directory, config)
            if meta is not None:
                print(f"{side} seed {seed}: trained already ({directory})", flush=True)
            else:
                print(f"{side} seed {seed}: training {args.steps} steps", flush=True)
                directory.mkdir(parents=True, exist_ok=True)
                if side == "jaxdiff":
                    meta, arrays = train_jaxdiff(config, directory)
                else:
                    meta, arrays = train_reference(config, torch, ddp)
                meta["identity"] = _plain(config.identity())
                meta["steps"] = config.run.steps
                save_finished(directory, meta, arrays)
                print(f"{side} seed {seed}: {meta['wall_s']:.0f} s", flush=True)
            trained[side][seed] = meta

    batches_identical = None
    if set(sides) == set(SIDES):
        for seed in args.seeds:
            a, b = (trained[side][seed]["batch_hashes"] for side in SIDES)
            if a != b:
                first = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
                raise ComparisonError(
                    f"seed {seed}: the two sides were fed different batches (first at step "
                    f"{first}); the comparison is void"
                )
        batches_identical = True

    # 2. evaluate every model through the same jaxdiff path
    config0 = run_config(args.seeds[0], args.steps)
    unet = unet_from_config(unet_kwargs(config0))
    data_images = training_dataset(config0).images
    ddim = ddim_program(unet, coeffs_of(config0), args.sample_steps, config0.diffusion.objective)
    rows, per_seed, probe_errors = [], {side: {} for side in SIDES}, []
    for seed in args.seeds:
        config = run_config(seed, args.steps)
        for side in sides:
            directory = run_dir(cache, side, seed, args.steps)
            with np.load(directory / "ema.npz") as npz:
                arrays = {k: npz[k] for k in npz.files}
            variables = jax_variables(side, arrays, unet)
            if side == "reference":
                err = check_conversion(arrays, variables, config, unet, torch, ddp)
                probe_errors.append(err)
                print(f"reference seed {seed}: converted network probe error {err:.2g}")
            seed_rows = []
            for sample_seed in args.sample_seeds:
                name = f"eval-ss{sample_seed}-n{args.num}-ddim{args.sample_steps}.json"
                path = directory / name
                row = json.loads(path.read_text()) if path.is_file() else None
                if row is None or (metric is not None and "fd" not in row):
                    start = time.perf_counter()
                    images = sample(
                        ddim,
                        variables,
                        config,
                        num=args.num,
                        seed=sample_seed,
                        chunk=args.sample_batch,
                    )
                    row = {
                        "side": side,
                        "seed": seed,
                        "sample_seed": sample_seed,
                        "brightness": float(np.mean(images / 255.0)),
                        "sample_s": time.perf_counter() - start,
                    }
                    if metric is not None:
                        scores = metric(images, image_size=config.data.image_size)
                        row.update(
                            {k: v if isinstance(v, int) else float(v) for k, v in scores.items()}
                        )
                    path.write_text(json.dumps(row, indent=1) + "\n")
                seed_rows.append(row)
                shown = ", ".join(f"{k} {row[k]:.4g}" for k in METRICS if k in row)
                print(f"{side} seed {seed} sampling seed {sample_seed}: {shown}", flush=True)
            rows.extend(seed_rows)
            values = {
                k: float(np.mean([r[k] for r in seed_rows]))
                for k in METRICS
                if all(k in r for r in seed_rows)
            }
            values["loss_tail"] = trained[side][seed]["loss_tail"]
            values["wall_s"] = trained[side][seed]["wall_s"]
            if args.bpd:
                path = directory / "bpd.json"
                if not path.is_file():
                    path.write_text(json.dumps({"bpd": test_bpd(variables, unet, config)}) + "\n")
                values["bpd"] = json.loads(path.read_text())["bpd"]
                print(f"{side} seed {seed}: test bits/dim {values['bpd']:.4f}", flush=True)
            per_seed[side][seed] = values

    keys = [*METRICS, "bpd", "loss_tail", "wall_s"]
    summary = summarize(per_seed, args.seeds, keys) if set(sides) == set(SIDES) else {}
    result = {
        "preset": "digits",
        "config": run_config(args.seeds[0], args.steps).to_dict(),
        "seeds": args.seeds,
        "steps": args.steps,
        "num": args.num,
        "sample_seeds": args.sample_seeds,
        "sample_steps": args.sample_steps,
        "sides": sides,
        "reference_setup": {
            "GaussianDiffusion": {
                "objective": "pred_noise",
                "beta_schedule": "cosine",
                "timesteps": 1000,
                "auto_normalize": False,
                "input": "NCHW float32 x / 127.5 - 1 of the uint8 batch",
            },
            "Adam": {"lr": config0.run.lr, "betas": list(ADAM_BETAS)},
            "clip_grad_norm": MAX_GRAD_NORM,
            "EMA": {"beta": EMA_BETA, "update_every": EMA_EVERY},
        },
        "data_brightness": float(np.mean(data_images / 255.0)),
        "batches_identical": batches_identical,
        "batch_digests": {
            side: {str(s): digest(trained[side][s]["batch_hashes"]) for s in args.seeds}
            for side in sides
        },
        "worst_probe_error": max(probe_errors) if probe_errors else None,
        "versions": versions(torch),
        "machine": (
            f"{jax.devices()[0].device_kind}; {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores; jax {jax.__version__}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)"
        ),
        "training": {
            side: {
                str(s): {
                    "wall_s": trained[side][s]["wall_s"],
                    "loss_tail": trained[side][s]["loss_tail"],
                }
                for s in args.seeds
            }
            for side in sides
        },
        "runs": rows,
        "per_seed": {side: {str(s): v for s, v in per_seed[side].items()} for side in sides},
        "summary": summary,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if summary:
        table = markdown(result)
        out.with_suffix(".md").write_text(table)
        print(table)
    print(f"wrote {out}" + (f" and {out.with_suffix('.md')}" if summary else ""))


if __name__ == "__main__":
    try:
        main()
    except ComparisonError as err:
        raise SystemExit(f"compare_pytorch: {err}") from None
