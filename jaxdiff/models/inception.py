"""FID's Inception-v3 in Flax linen, channels-last: the TensorFlow 2015-12-05 graph.

The network of the Fréchet Inception Distance (Heusel et al. 2017) and the Inception Score
(Salimans et al. 2016) is not torchvision's Inception-v3 but the frozen TensorFlow graph
``inception-2015-12-05`` that the original FID code loads. This module computes what
torch-fidelity 0.4.0's ``FeatureExtractorInceptionV3`` (its faithful PyTorch port) computes, so
that its weight file ``weights-inception-2015-12-05-6726825d.pth`` gives the same features
(checked against it to float32 round-off by ``tests/parity/test_inception_parity.py``):

* input: uint8 images ``[N, H, W, 3]`` of any size, resized to 299 x 299 with TensorFlow 1.x's
  bilinear resize (``align_corners=False``: source coordinate ``i * in / out``, no half-pixel
  offset, the upper neighbour clamped to the last row/column), computed in float32, then
  scaled to ``(x - 128) / 128``;
* every convolution is ``conv (no bias) -> batch norm (running statistics, eps 1e-3) -> ReLU``;
* the blocks of the TF graph: the 3x3 average pools of the Mixed_5/6/7b blocks ignore the
  padded zeros (each output divides by the number of real pixels in its window), Mixed_6a and
  Mixed_7a max-pool 3x3 with stride 2, and the last block (Mixed_7c) max-pools where the paper
  average-pools;
* the global average pool gives the 2048-d ``pool_3`` features of FID; the 1008-way
  classifier (1000 ImageNet classes and 8 unused) gives the Inception Score's logits, with and
  without the bias (torch-fidelity's IS uses ``logits_unbiased``).

Weights: :func:`load_inception_variables` reads the reference's state_dict from a ``.pth``
(needs torch) or a ``.npz`` with the same key names (numpy only; write one with
:func:`save_inception_npz`). jaxdiff never downloads: the file is published at
``INCEPTION_WEIGHTS_URL``. torch is imported only inside the functions that read ``.pth`` files.

References: Szegedy et al. 2016 (Inception-v3); Heusel et al. 2017 (FID); torch-fidelity 0.4.0,
``feature_extractor_inceptionv3.py`` and ``interpolate_compat_tensorflow.py``.
"""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdiff._numpy import to_numpy as _to_numpy

__all__ = [
    "INCEPTION_INPUT_SIZE",
    "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_URL",
    "InceptionKeyEntry",
    "InceptionOutputs",
    "InceptionV3FID",
    "inception_key_map",
    "inception_variables_from_state_dict",
    "load_inception_state_dict",
    "load_inception_variables",
    "preprocess_inception",
    "resize_bilinear_tf1",
    "save_inception_npz",
]

INCEPTION_INPUT_SIZE = 299
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
)
_WHERE = (
    f"the file needed is torch-fidelity's {INCEPTION_WEIGHTS_FILE}, published at "
    f"{INCEPTION_WEIGHTS_URL} (jaxdiff does not download it)"
)
_BN_EPS = 1e-3  # the TF graph's batch-norm epsilon
# True float32 products on every backend: the default TF32 (GPU) or bfloat16 (TPU) passes would
# move the features by ~1e-3 and make FID depend on the accelerator.
_PRECISION = jax.lax.Precision.HIGHEST
_MAX_LISTED = 8


class InceptionOutputs(NamedTuple):
    pool: jax.Array  # [N, 2048] float32, FID's pool_3 features (torch-fidelity "2048")
    logits_unbiased: jax.Array  # [N, 1008] float32, pool @ W, for the Inception Score
    logits: jax.Array  # [N, 1008] float32, pool @ W + b


# ----------------------------------------------------------------------------------------------
# Input handling


def _resize_table(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower/upper source indices and the float32 fraction of each output row (or column).

    TF1 (``align_corners=False``): the source coordinate of output ``i`` is ``i * (in / out)``,
    with the scale rounded to float32 and the product taken in float32, as the reference does.
    """
    coord = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
    lo = coord.astype(np.int64)  # truncation; coordinates are non-negative
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, coord - lo.astype(np.float32)


def resize_bilinear_tf1(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """TensorFlow 1.x bilinear resize (``align_corners=False``) of float ``[N, H, W, C]``.

    ``out[i, j] = lerp_y(lerp_x(in[lo_i, lo_j], in[lo_i, hi_j]), lerp_x(in[hi_i, lo_j],
    in[hi_i, hi_j]))`` with ``lerp(a, b) = a + (b - a) * frac`` along x first, then y, where
    ``(lo, hi, frac)`` come from the source coordinate ``i * in / out`` (no half-pixel offset).
    Resizing to the same size is the identity.
    """
    if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be float [N, H, W, C], got {images.dtype} {images.shape}")
    out_h, out_w = size
    y_lo, y_hi, dy = _resize_table(images.shape[1], out_h)
    x_lo, x_hi, dx = _resize_table(images.shape[2], out_w)
    dx = jnp.asarray(dx, images.dtype)[None, None, :, None]
    dy = jnp.asarray(dy, images.dtype)[None, :, None, None]
    top, bottom = images[:, y_lo], images[:, y_hi]
    top = top[:, :, x_lo] + (top[:, :, x_hi] - top[:, :, x_lo]) * dx
    bottom = bottom[:, :, x_lo] + (bottom[:, :, x_hi] - bottom[:, :, x_lo]) * dx
    return top + (bottom - top) * dy


def _check_images(images) -> None:
    if images.dtype != jnp.uint8:
        raise ValueError(
            f"InceptionV3FID takes uint8 images (0..255), got dtype {images.dtype}; quantise "
            "first, e.g. jnp.clip(jnp.round((x + 1) * 127.5), 0, 255).astype(jnp.uint8)"
        )
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be RGB [N, H, W, 3] (channels-last), got {images.shape}")


def preprocess_inception(images: jax.Array) -> jax.Array:
    """uint8 ``[N, H, W, 3]`` -> float32 ``[N, 299, 299, 3]``: TF1 bilinear resize, then
    ``(x - 128) / 128`` (the graph's ``(x - 128) * 0.0078125``, equal bit for bit)."""
    _check_images(images)
    size = (INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE)
    x = resize_bilinear_tf1(images.astype(jnp.float32), size)
    return (x - 128.0) / 128.0


# ----------------------------------------------------------------------------------------------
# Layers and blocks


class BasicConv(nn.Module):
    """``relu(batch_norm(conv(x)))``, the convolution without bias, the norm on running stats."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        (ph, pw), s = self.padding, self.strides
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=(s, s),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=_PRECISION,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPS, name="bn")(x)
        return nn.relu(x)


def _conv(features, kernel, strides=1, padding=(0, 0)) -> BasicConv:
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    return BasicConv(features, kernel, strides, padding)


def _avg_pool_3x3_valid_count(x):
    """3x3, stride 1, zero padding 1, each sum divided by the count of real pixels only."""
    pad = ((1, 1), (1, 1))
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=pad, count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


def _max_pool_3x3_same(x):
    """3x3, stride 1, padding 1 that never wins (Flax pads a max-pool with -inf)."""
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


class InceptionA(nn.Module):
    """Mixed_5b/c/d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg-pool-1x1, concatenated."""

    pool_features: int

    def setup(self):
        self.branch1x1 = _conv(64, 1)
        self.branch5x5_1 = _conv(48, 1)
        self.branch5x5_2 = _conv(64, 5, padding=(2, 2))
        self.branch3x3dbl_1 = _conv(64, 1)
        self.branch3x3dbl_2 = _conv(96, 3, padding=(1, 1))
        self.branch3x3dbl_3 = _conv(96, 3, padding=(1, 1))
        self.branch_pool = _conv(self.pool_features, 1)

    def __call__(self, x):
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg_pool_3x3_valid_count(x))
        return jnp.concatenate([a, b, c, d], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (grid 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | max-pool 3x3/2."""

    def setup(self):
        self.branch3x3 = _conv(384, 3, strides=2)
        self.branch3x3dbl_1 = _conv(64, 1)
        self.branch3x3dbl_2 = _conv(96, 3, padding=(1, 1))
        self.branch3x3dbl_3 = _conv(96, 3, strides=2)

    def __call__(self, x):
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([a, b, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..e: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avg-pool-1x1."""

    channels_7x7: int

    def setup(self):
        c7, row, col = self.channels_7x7, (1, 7), (7, 1)
        self.branch1x1 = _conv(192, 1)
        self.branch7x7_1 = _conv(c7, 1)
        self.branch7x7_2 = _conv(c7, row, padding=(0, 3))
        self.branch7x7_3 = _conv(192, col, padding=(3, 0))
        self.branch7x7dbl_1 = _conv(c7, 1)
        self.branch7x7dbl_2 = _conv(c7, col, padding=(3, 0))
        self.branch7x7dbl_3 = _conv(c7, row, padding=(0, 3))
        self.branch7x7dbl_4 = _conv(c7, col, padding=(3, 0))
        self.branch7x7dbl_5 = _conv(192, row, padding=(0, 3))
        self.branch_pool = _conv(192, 1)

    def __call__(self, x):
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            c = layer(c)
        c = self.branch7x7dbl_5(c)
        d = self.branch_pool(_avg_pool_3x3_valid_count(x))
        return jnp.concatenate([a, b, c, d], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a (grid 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max-pool 3x3/2."""

    def setup(self):
        self.branch3x3_1 = _conv(192, 1)
        self.branch3x3_2 = _conv(320, 3, strides=2)
        self.branch7x7x3_1 = _conv(192, 1)
        self.branch7x7x3_2 = _conv(192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _conv(192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _conv(192, 3, strides=2)

    def __call__(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b = layer(b)
        return jnp.concatenate([a, b, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b/c: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.

    ``pool="avg"`` (Mixed_7b) excludes the padding from the average; ``pool="max"`` (Mixed_7c,
    the TF graph's max-pool where the paper has an average) is a 3x3, stride 1, pad 1 max-pool.
    """

    pool: str

    def setup(self):
        if self.pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
        self.branch1x1 = _conv(320, 1)
        self.branch3x3_1 = _conv(384, 1)
        self.branch3x3_2a = _conv(384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _conv(384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _conv(448, 1)
        self.branch3x3dbl_2 = _conv(384, 3, padding=(1, 1))
        self.branch3x3dbl_3a = _conv(384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _conv(384, (3, 1), padding=(1, 0))
        self.branch_pool = _conv(192, 1)

    def __call__(self, x):
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = jnp.concatenate([self.branch3x3_2a(b), self.branch3x3_2b(b)], axis=-1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = jnp.concatenate([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], axis=-1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3_valid_count(x)
        else:
            pooled = _max_pool_3x3_same(x)
        return jnp.concatenate([a, b, c, self.branch_pool(pooled)], axis=-1)


class _Classifier(nn.Module):
    """The 1008-way softmax layer's logits, without and with its bias."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 1008))
        bias = self.param("bias", nn.initializers.zeros, (1008,))
        unbiased = jnp.matmul(x, kernel, precision=_PRECISION)
        return unbiased, unbiased + bias[None, :]


class InceptionV3FID(nn.Module):
    """FID's Inception-v3: uint8 ``[N, H, W, 3]`` -> :class:`InceptionOutputs` (float32).

    ``apply(variables, images)`` resizes and scales (:func:`preprocess_inception`) and runs the
    network; ``apply(variables, x, method="trunk")`` runs it on already preprocessed float32
    ``[N, 299, 299, 3]``. Submodule names are the reference's, so parameter paths read like its
    state_dict keys. ``variables`` has ``params`` (kernels, norm scales and biases, the
    classifier) and ``batch_stats`` (running means and variances): load them with
    :func:`load_inception_variables`.
    """

    def setup(self):
        self.Conv2d_1a_3x3 = _conv(32, 3, strides=2)
        self.Conv2d_2a_3x3 = _conv(32, 3)
        self.Conv2d_2b_3x3 = _conv(64, 3, padding=(1, 1))
        self.Conv2d_3b_1x1 = _conv(80, 1)
        self.Conv2d_4a_3x3 = _conv(192, 3)
        self.Mixed_5b = InceptionA(pool_features=32)
        self.Mixed_5c = InceptionA(pool_features=64)
        self.Mixed_5d = InceptionA(pool_features=64)
        self.Mixed_6a = InceptionB()
        self.Mixed_6b = InceptionC(channels_7x7=128)
        self.Mixed_6c = InceptionC(channels_7x7=160)
        self.Mixed_6d = InceptionC(channels_7x7=160)
        self.Mixed_6e = InceptionC(channels_7x7=192)
        self.Mixed_7a = InceptionD()
        self.Mixed_7b = InceptionE(pool="avg")
        self.Mixed_7c = InceptionE(pool="max")
        self.fc = _Classifier()

    def __call__(self, images: jax.Array) -> InceptionOutputs:
        return self.trunk(preprocess_inception(images))

    def trunk(self, x: jax.Array) -> InceptionOutputs:
        """The network on preprocessed float32 ``[N, 299, 299, 3]`` (values in [-1, 1))."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool_3x3_s2(x)
        x = _max_pool_3x3_s2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        pool = jnp.mean(x, axis=(1, 2))
        return InceptionOutputs(pool, *self.fc(pool))


# ----------------------------------------------------------------------------------------------
# Weights: the reference state_dict <-> Flax variables


class InceptionKeyEntry(NamedTuple):
    """Where one reference state_dict entry lives in the Flax variables, and its layout."""

    path: tuple[str, ...]  # (collection, *modules, leaf) in the Flax variables
    transpose: tuple[int, ...] | None  # axes taking the PyTorch array to the Flax one
    torch_shape: tuple[int, ...]


# Flax (module, leaf) -> PyTorch leaf name; the module path is the same in both.
_LEAVES = {
    ("params", "conv", "kernel"): "weight",
    ("params", "bn", "scale"): "weight",
    ("params", "bn", "bias"): "bias",
    ("batch_stats", "bn", "mean"): "running_mean",
    ("batch_stats", "bn", "var"): "running_var",
    ("params", "fc", "kernel"): "weight",
    ("params", "fc", "bias"): "bias",
}
_OPTIONAL = "num_batches_tracked"  # a BatchNorm training counter some state_dicts carry


def inception_key_map() -> dict[str, InceptionKeyEntry]:
    """``{PyTorch key: entry}``, sorted by key: a bijection between the reference's state_dict
    and the Flax variables of :class:`InceptionV3FID`, derived from an abstract init (the
    reference's ``num_batches_tracked`` counters are accepted and not needed)."""
    return dict(_key_map())


@functools.cache
def _key_map() -> tuple[tuple[str, InceptionKeyEntry], ...]:
    x = jax.ShapeDtypeStruct((1, INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE, 3), jnp.float32)
    variables = jax.eval_shape(
        functools.partial(InceptionV3FID().init, method="trunk"), jax.random.key(0), x
    )
    table = []
    for path, leaf in traverse_util.flatten_dict(variables).items():
        collection, *modules, layer, name = path
        key = ".".join([*modules, layer, _LEAVES[(collection, layer, name)]])
        shape = tuple(leaf.shape)
        if len(shape) == 4:  # conv [kh, kw, I, O] <- [O, I, kh, kw]
            transpose, torch_shape = (2, 3, 1, 0), (shape[3], shape[2], shape[0], shape[1])
        elif len(shape) == 2:  # dense [I, O] <- [O, I]
            transpose, torch_shape = (1, 0), (shape[1], shape[0])
        else:
            transpose, torch_shape = None, shape
        table.append((key, InceptionKeyEntry(path, transpose, torch_shape)))
    return tuple(sorted(table))


def _listed(keys) -> str:
    keys = sorted(keys)
    more = len(keys) - _MAX_LISTED
    return ", ".join(keys[:_MAX_LISTED]) + (f", ... and {more} more" if more > 0 else "")


def inception_variables_from_state_dict(
    state_dict: Mapping[str, Any], *, source: str = "the state_dict"
) -> dict:
    """Flax variables ``{"params", "batch_stats"}`` of :class:`InceptionV3FID` from the
    reference's state_dict (torch-fidelity's weight file; numpy arrays or torch tensors).

    Every key is mapped and every shape checked before a number moves; values are only
    transposed (conv ``[O, I, kh, kw] -> [kh, kw, I, O]``, fc ``[O, I] -> [I, O]``) and held as
    float32. ``num_batches_tracked`` entries, if present, are ignored.

    Raises:
      ValueError: naming every missing, unexpected or mis-shaped key and the file needed.
    """
    table = inception_key_map()
    keys = {k for k in state_dict if k.rsplit(".", 1)[-1] != _OPTIONAL}
    missing, unexpected = set(table) - keys, keys - set(table)
    if missing or unexpected:
        raise ValueError(
            f"{source} is not FID's Inception: {len(missing)} missing key(s) "
            f"[{_listed(missing)}], {len(unexpected)} unexpected [{_listed(unexpected)}]; {_WHERE}"
        )
    arrays = {k: _to_numpy(state_dict[k]) for k in table}
    bad = [
        f"{k}: {arrays[k].shape} (expected {e.torch_shape})"
        for k, e in table.items()
        if arrays[k].shape != e.torch_shape
    ]
    if bad:
        raise ValueError(
            f"{source} is not FID's Inception: {len(bad)} shape mismatch(es) "
            f"[{'; '.join(bad[:_MAX_LISTED])}]; {_WHERE}"
        )
    flat = {}
    for key, e in table.items():
        value = arrays[key] if e.transpose is None else np.transpose(arrays[key], e.transpose)
        flat[e.path] = jnp.asarray(np.ascontiguousarray(value, dtype=np.float32))
    return traverse_util.unflatten_dict(flat)


def load_inception_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The reference state_dict from a ``.npz`` (numpy only) or a ``.pth`` (needs torch) file.

    Raises:
      ValueError: if the file is missing or unreadable, naming the file needed and its URL.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"FID Inception weights not found at {path}: {_WHERE}")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        try:
            import torch
        except ImportError:
            raise ImportError(
                f"reading {path} needs torch; or convert it to .npz with save_inception_npz "
                "where torch is installed and pass the .npz"
            ) from None
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"cannot read {path} as a state_dict ({err}); {_WHERE}") from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state_dict; {_WHERE}")
    return {k: _to_numpy(v) for k, v in state.items()}


def load_inception_variables(path: str | os.PathLike) -> dict:
    """Flax variables of :class:`InceptionV3FID` from the weight file (``.pth`` or ``.npz``).

    Raises:
      ValueError: if the file is missing, unreadable or not FID's Inception, naming the file
        needed (``INCEPTION_WEIGHTS_FILE``) and where it is published.
    """
    state = load_inception_state_dict(path)
    return inception_variables_from_state_dict(state, source=str(path))


def save_inception_npz(
    pth_path: str | os.PathLike, npz_path: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write the ``.pth`` weight file as a ``.npz`` with the same keys (float32, numpy only to
    read back). The state_dict is checked first, so only FID's Inception is written. Needs
    torch."""
    npz_path = Path(npz_path)
    if npz_path.exists() and not overwrite:
        raise FileExistsError(f"{npz_path} exists; pass overwrite=True to replace it")
    state = load_inception_state_dict(pth_path)
    inception_variables_from_state_dict(state, source=str(pth_path))
    arrays = {k: np.asarray(state[k], np.float32) for k in inception_key_map()}
    tmp = npz_path.with_name(npz_path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, npz_path)
    return npz_path
