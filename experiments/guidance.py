"""Classifier-free guidance on the digits: how often the embedded digits classifier
(``jaxdiff/models/digits_net.npz``) recognises the requested class in guided samples of a
class-conditional workdir (the ``digits-cond`` preset), at several guidance scales, against the
samples of an unconditional workdir (``digits``), where a requested class can only be hit by
chance (about 10%). Also each setting's digits Fréchet distance over all classes.

    jaxdiff train --preset digits-cond --workdir runs/digits-cond
    PYTHONPATH=. python experiments/guidance.py --cond runs/digits-cond --uncond runs/digits \
        [--scales 1,2,3,5] [--per-class 100] [--out experiments/results/guidance]

DDIM-50 samples from the EMA weights, seed 0; sample j of class c starts from the same noise at
every scale.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import evaluation, features
from jaxdiff import workdir as wd


def _classify(images: np.ndarray) -> np.ndarray:
    extractor = features.digits_extractor()
    out = []
    for i in range(0, len(images), 500):
        _, logits = extractor.apply(jnp.asarray(images[i : i + 500]))
        out.append(np.argmax(np.asarray(logits), axis=-1))
    return np.concatenate(out)


def _samples(workdir, labels, scale, seed: int, batch: int = 500):
    config, model, state = wd.restored(workdir, None)
    conditional = config.model.num_classes is not None
    run = wd.sample_fn(
        config,
        model,
        batch,
        50,
        0.0,
        "ddim",
        guidance_scale=scale if conditional else None,
    )
    key = jax.random.PRNGKey(seed)
    out = []
    for first in range(0, len(labels), batch):
        y = labels[first : first + batch]
        y = np.pad(y, (0, batch - len(y)))
        images = run(state.ema_params, key, first, jnp.asarray(y) if conditional else None)
        out.append(wd.to_uint8(np.asarray(images)))
    return np.concatenate(out)[: len(labels)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cond", type=pathlib.Path, required=True)
    parser.add_argument("--uncond", type=pathlib.Path)
    parser.add_argument("--scales", default="1,2,3,5")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("experiments/results/guidance")
    )
    args = parser.parse_args(argv)
    config = wd.restored(args.cond, None)[0]
    k = config.model.num_classes
    labels = np.repeat(np.arange(k), args.per_class).astype(np.int32)
    rows = []
    settings = [("conditional", args.cond, float(s)) for s in args.scales.split(",")]
    if args.uncond:
        settings.append(("unconditional", args.uncond, None))
    for kind, workdir, scale in settings:
        start = time.perf_counter()
        images = _samples(workdir, labels, scale, args.seed)
        predicted = _classify(images)
        hits = predicted == labels
        extractor = features.digits_extractor()
        stats = features.image_statistics(extractor, iter([images]), source="samples")
        ref = evaluation.reference_statistics(config, extractor, None)
        row = {
            "model": kind,
            "workdir": str(workdir),
            "guidance_scale": scale,
            "accuracy": float(hits.mean()),
            "accuracy_per_class": [float(hits[labels == c].mean()) for c in range(k)],
            "digits_fd": features.quality(stats, ref)["fd"],
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    command = "PYTHONPATH=. python experiments/guidance.py " + " ".join(argv or sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"command": command, "per_class": args.per_class, "rows": rows}, indent=1)
    )
    lines = [
        f"# Classifier-free guidance on digits ({args.per_class} DDIM-50 samples per class)",
        "",
        f"`{command}`",
        "",
        "| model | guidance scale | requested class recognised | digits FD (all classes) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        scale = "-" if r["guidance_scale"] is None else f"{r['guidance_scale']:g}"
        lines.append(
            f"| {r['model']} | {scale} | {100 * r['accuracy']:.1f}% | {r['digits_fd']:.1f} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
