"""A small convolutional classifier of the embedded digits, whose features measure sample quality
without a download (the digits counterpart of FID's Inception network).

:class:`DigitsNet` reads uint8 digit images ``[N, H, W, 1]`` of any size (they are resized to
16x16, the classifier's input, with :func:`jax.image.resize`'s antialiased bilinear filter) and
returns 64-dimensional penultimate features and 10 class logits. The features are taken before
the last ReLU, so none is identically zero and their covariance has full rank.

Its trained weights ship inside the package (``digits_net.npz``, with ``digits_net.json``: the
command that trained them, the seeds, the accuracies and the file's SHA-256).
``experiments/train_digits_net.py`` trains them, deterministically, on the training split of
:func:`jaxdiff.data.load_digits` only; the held-out test split is never seen in training.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import zipfile
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DIGITS_NET_INPUT_SIZE",
    "DigitsNet",
    "DigitsNetOutputs",
    "digits_net_provenance",
    "load_digits_net_variables",
    "save_digits_net_npz",
]

DIGITS_NET_INPUT_SIZE = 16
FEATURE_DIM = 64
NUM_CLASSES = 10
WEIGHTS_PATH = pathlib.Path(__file__).with_name("digits_net.npz")
PROVENANCE_PATH = pathlib.Path(__file__).with_name("digits_net.json")


class DigitsNetOutputs(NamedTuple):
    features: jax.Array  # [N, 64] penultimate features (before the ReLU)
    logits: jax.Array  # [N, 10] class logits


def preprocess_digits(images: jax.Array) -> jax.Array:
    """uint8 ``[N, H, W, 1]`` -> float32 ``[N, 16, 16, 1]`` in [0, 1]."""
    if images.dtype != jnp.uint8:
        raise ValueError(
            f"DigitsNet takes uint8 images (0..255), got dtype {images.dtype}; quantise first, "
            "e.g. jaxdiff.data.to_uint8(x) for x in [-1, 1]"
        )
    if images.ndim != 4 or images.shape[-1] != 1:
        raise ValueError(
            f"DigitsNet takes grayscale images [N, H, W, 1] (channels-last), got {images.shape}"
        )
    x = images.astype(jnp.float32) / 255.0
    size = DIGITS_NET_INPUT_SIZE
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 1), "bilinear", antialias=True)
    return x


class DigitsNet(nn.Module):
    """Two 3x3 convolution pairs (32 and 64 channels, ReLU, 2x2 average pooling), a dense layer
    to the 64 features, ReLU, and a dense layer to the 10 logits."""

    @nn.compact
    def __call__(self, images: jax.Array) -> DigitsNetOutputs:
        x = preprocess_digits(images)
        for width in (32, 64):
            x = nn.relu(nn.Conv(width, (3, 3), padding=1)(x))
            x = nn.relu(nn.Conv(width, (3, 3), padding=1)(x))
            n, h, w, c = x.shape  # 2x2 average pooling
            x = x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
        features = nn.Dense(FEATURE_DIM)(x.reshape(x.shape[0], -1))
        logits = nn.Dense(NUM_CLASSES)(nn.relu(features))
        return DigitsNetOutputs(features, logits)


def _flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for name, value in tree.items():
        key = f"{prefix}/{name}" if prefix else name
        if isinstance(value, dict) or hasattr(value, "items"):
            out.update(_flatten(value, key))
        else:
            out[key] = np.asarray(value)
    return out


def save_digits_net_npz(variables, path: str | pathlib.Path) -> str:
    """Write ``variables`` as an ``.npz`` of ``/``-joined keys; returns the file's SHA-256."""
    path = pathlib.Path(path)
    with open(path, "wb") as f:
        np.savez(f, **_flatten(dict(variables)))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes = jax.eval_shape(
        DigitsNet().init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1), jnp.uint8)
    )
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def load_digits_net_variables(path: str | pathlib.Path | None = None) -> dict:
    """The Flax variables of :class:`DigitsNet`: the shipped weights, or those at ``path``.

    Every key and shape is checked against the network; a file that does not match raises a
    ValueError naming the keys.
    """
    path = pathlib.Path(path) if path is not None else WEIGHTS_PATH
    try:
        with np.load(path) as f:
            flat = {k: np.asarray(f[k]) for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(
            f"cannot read the digits classifier weights {str(path)!r} ({err}); reinstall "
            "jaxdiff, or retrain them with experiments/train_digits_net.py"
        ) from err
    expected = _expected_shapes()
    got = {k: tuple(v.shape) for k, v in flat.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        raise ValueError(
            f"{str(path)!r} is not a DigitsNet weights file: missing {missing}, unexpected "
            f"{extra}, wrong shapes {wrong}"
        )
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value, jnp.float32)
    return tree


def digits_net_provenance() -> dict:
    """The shipped weights' provenance record (``digits_net.json``)."""
    return json.loads(PROVENANCE_PATH.read_text())
