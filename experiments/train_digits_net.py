"""Train the digits classifier whose features give jaxdiff's embedded quality metric.

Trains :class:`jaxdiff.models.digits_net.DigitsNet` on the training split of
``jaxdiff.data.load_digits(16)`` (1613 images; the 184 held-out test images are used only to
report the accuracy), deterministically from ``--seed``: AdamW (lr 2e-3 with cosine decay, weight
decay 1e-4), batch 64, every image shifted by up to ``--max-shift`` pixels in each direction (a
fresh shift per image and epoch, zero fill). The shuffling and the shifts come from NumPy's
``default_rng([seed, epoch])``, the initial weights from ``jax.random.PRNGKey(seed)``.

Writes the weights (``.npz``) and their provenance (``.json``: the command, the seeds, the
versions, the training and test accuracy and the weights' SHA-256). From the repository root:

    python experiments/train_digits_net.py            # writes jaxdiff/models/digits_net.{npz,json}
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff import data
from jaxdiff.models import digits_net

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _shifted(images: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Each image moved by its own (dy, dx) in [-max_shift, max_shift], zero fill."""
    n, h, w, _ = images.shape
    out = np.zeros_like(images)
    shifts = rng.integers(-max_shift, max_shift + 1, size=(n, 2))
    for i, (dy, dx) in enumerate(shifts):
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        out[i, yd, xd] = images[i, ys, xs]
    return out


def accuracy(apply, variables, images: np.ndarray, labels: np.ndarray) -> float:
    logits = np.concatenate(
        [
            np.asarray(apply(variables, jnp.asarray(images[i : i + 512])).logits)
            for i in range(0, len(images), 512)
        ]
    )
    return float(np.mean(logits.argmax(-1) == labels))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-shift", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, default=digits_net.WEIGHTS_PATH)
    args = parser.parse_args(argv)

    train, test = data.load_digits(16, split="train"), data.load_digits(16, split="test")
    train_images, train_labels = train.images, train.labels
    test_images, test_labels = test.images, test.labels
    net = digits_net.DigitsNet()
    variables = net.init(jax.random.PRNGKey(args.seed), jnp.zeros((1, 16, 16, 1), jnp.uint8))
    steps_per_epoch = len(train_images) // args.batch_size
    schedule = optax.cosine_decay_schedule(args.lr, args.epochs * steps_per_epoch)
    optimizer = optax.adamw(schedule, weight_decay=1e-4)
    opt_state = optimizer.init(variables)

    @jax.jit
    def step(variables, opt_state, images, labels):
        def loss_fn(v):
            logits = net.apply(v, images).logits
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(variables)
        updates, opt_state = optimizer.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, loss

    apply = jax.jit(net.apply)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        rng = np.random.default_rng([args.seed, epoch])
        order = rng.permutation(len(train_images))
        shifted = _shifted(train_images[order], rng, args.max_shift)
        for s in range(steps_per_epoch):
            rows = slice(s * args.batch_size, (s + 1) * args.batch_size)
            variables, opt_state, loss = step(
                variables,
                opt_state,
                jnp.asarray(shifted[rows]),
                jnp.asarray(train_labels[order][rows]),
            )
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1}: loss {float(loss):.4f}", flush=True)
    train_acc = accuracy(apply, variables, train_images, train_labels)
    test_acc = accuracy(apply, variables, test_images, test_labels)
    print(
        f"train accuracy {train_acc:.4f}, test accuracy {test_acc:.4f} ({len(test_images)} images)"
    )

    sha = digits_net.save_digits_net_npz(variables, args.out)
    record = {
        "what": "DigitsNet weights for jaxdiff's embedded digits metric",
        "command": " ".join(
            [
                "python",
                "experiments/train_digits_net.py",
                *(argv if argv is not None else sys.argv[1:]),
            ]
        ),
        "data": "jaxdiff.data.load_digits(16, split='train') (scikit-learn digits, 1613 images); "
        "test accuracy on split='test' (184 images), never used in training",
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": f"optax.adamw(cosine_decay_schedule({args.lr}), weight_decay=1e-4)",
        "augmentation": f"integer shifts up to {args.max_shift} px, zero fill",
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "test_images": len(test_images),
        "sha256": sha,
        "versions": {
            "jax": jax.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "machine": platform.machine(),
        "trained_at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    out_json = args.out.with_suffix(".json")
    out_json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} (sha256 {sha[:16]}...) and {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
