"""Training data on the host: the embedded digits dataset, image folders, deterministic batches.

Everything here is NumPy (and Pillow for image files); no JAX. A dataset is anything with
``len(dataset)``, ``dataset.image_shape`` (H, W, C) and ``dataset.get(indices) -> uint8
[n, H, W, C]``: :class:`ArrayDataset` (in memory) and :class:`ImageFolder` (decoded on demand).

Batches are a pure function of ``(seed, step)`` (:func:`batch_at`): epoch e = step // S is a
permutation of the dataset drawn from ``default_rng([seed, e])``, step s takes the rows
``[(s mod S) B, (s mod S + 1) B)`` of it, and the last partial batch of an epoch is dropped
(S = floor(N / B)). A run resumed at step k with :func:`batches` ``(start_step=k)`` therefore
sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

__all__ = [
    "DIGITS_SIZES",
    "IMAGE_EXTENSIONS",
    "RESIZE_METHODS",
    "SPLITS",
    "ArrayDataset",
    "Dataset",
    "ImageFolder",
    "batch_at",
    "batches",
    "digits_split",
    "folder_split",
    "load_digits",
    "prefetch",
    "resize_images",
    "steps_per_epoch",
    "to_uint8",
    "to_unit_range",
]

DIGITS_SIZES: tuple[int, ...] = (8, 16, 32)
RESIZE_METHODS: tuple[str, ...] = ("bilinear", "nearest")
SPLITS: tuple[str, ...] = ("train", "test", "all")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")


class Dataset(Protocol):
    """What :func:`batch_at` needs from a dataset."""

    image_shape: tuple[int, int, int]

    def __len__(self) -> int: ...

    def get(self, indices: np.ndarray) -> np.ndarray: ...


class ArrayDataset:
    """Images held in memory as uint8 [N, H, W, C], with optional integer class labels [N]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(
                f"images must be a non-empty uint8 array [N, H, W, C], got {images.dtype}"
                f"{list(images.shape)}"
            )
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(
                    f"labels must be integers of shape [{images.shape[0]}], got {labels.dtype}"
                    f"{list(labels.shape)}"
                )
        self.images = images
        self.labels = labels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def get(self, indices: np.ndarray) -> np.ndarray:
        return self.images[np.asarray(indices)]


# --------------------------------------------------------------------------------------------
# Pixel ranges and resizing
# --------------------------------------------------------------------------------------------


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 0..255 -> float32 [-1, 1]: ``x / 127.5 - 1`` (as the train step does on device)."""
    return np.asarray(images, np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> uint8: ``round((x + 1) * 127.5)`` clipped to 0..255."""
    return np.clip(np.rint((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _check_choice(value, allowed: Sequence, what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose one of {list(allowed)}")


def resize_images(images: np.ndarray, size: int, method: str = "bilinear") -> np.ndarray:
    """Resize float [N, h, w, C] images to [N, size, size, C].

    ``bilinear`` samples at half-pixel centres, source coordinate ``(i + 1/2) h / size - 1/2``
    clamped to the edge (``torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False)``; for upscaling it is also what Pillow's bilinear gives).
    ``nearest`` repeats pixels and needs ``size`` to be a multiple of h and w.
    """
    _check_choice(method, RESIZE_METHODS, "resize method")
    images = np.asarray(images, np.float64)
    _, height, width, _ = images.shape
    if method == "nearest":
        if size % height or size % width:
            raise ValueError(
                f"nearest resizing repeats pixels: size {size} must be a multiple of {height} "
                f"and {width}"
            )
        return images.repeat(size // height, axis=1).repeat(size // width, axis=2)

    def axis_weights(n_in: int):
        src = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0, n_in - 1)
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    lo, hi, frac = axis_weights(height)
    rows = (
        images[:, lo] * (1.0 - frac)[None, :, None, None]
        + images[:, hi] * frac[None, :, None, None]
    )
    lo, hi, frac = axis_weights(width)
    return (
        rows[:, :, lo] * (1.0 - frac)[None, None, :, None]
        + rows[:, :, hi] * frac[None, None, :, None]
    )


# --------------------------------------------------------------------------------------------
# The embedded dataset: scikit-learn's digits
# --------------------------------------------------------------------------------------------


def digits_split(images8: np.ndarray, test_fraction: float = 0.1) -> np.ndarray:
    """Boolean mask of the test images: those whose content hash falls below ``test_fraction``.

    The test split is the set of images with ``sha256(raw 8x8 bytes)`` (first 8 bytes, big
    endian) mod 10000 < 10000 * ``test_fraction``. It depends only on each image's pixels, so it
    is the same on every machine and NumPy version, and identical images can never be on both
    sides. For the 1797 digits and 0.1 it holds 184 images.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    raw = np.ascontiguousarray(images8, np.uint8)
    return _held_out([im.tobytes() for im in raw], test_fraction)


def _held_out(keys: Sequence[bytes], fraction: float) -> np.ndarray:
    """``sha256(key)`` (first 8 bytes, big endian) mod 10000 < 10000 * ``fraction``, per key."""
    buckets = np.array(
        [int.from_bytes(hashlib.sha256(k).digest()[:8], "big") % 10000 for k in keys], np.int64
    )
    return buckets < round(10000 * fraction)


def folder_split(relative_paths: Sequence[str], test_fraction: float) -> np.ndarray:
    """Boolean mask of an image folder's held-out (test) files.

    A file is held out when ``sha256(its path relative to the folder, POSIX, UTF-8)`` (first 8
    bytes, big endian) mod 10000 < 10000 * ``test_fraction``. It depends on the file's name
    only, so a file keeps its side when others are added or removed, on every machine and
    without decoding any image (the same picture saved under two names may fall on both
    sides). ``test_fraction`` 0 holds out nothing.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    return _held_out([str(path).encode() for path in relative_paths], test_fraction)


def load_digits(
    image_size: int = 16,
    *,
    split: str = "train",
    resize: str = "bilinear",
    test_fraction: float = 0.1,
) -> ArrayDataset:
    """scikit-learn's handwritten digits (1797 images, 8x8, shipped inside scikit-learn), with
    their class labels 0..9 (``.labels``).

    Pixel values 0..16 become ``v * 255 / 16``, the image is upscaled to ``image_size`` (8 keeps
    it as it is) by :func:`resize_images` and rounded to uint8, one channel: [N, S, S, 1].

    Args:
      image_size: 8, 16 or 32.
      split: ``"train"`` (about 90%), ``"test"`` (the held-out images of :func:`digits_split`)
        or ``"all"``.
      resize: ``"bilinear"`` (default: smooth strokes) or ``"nearest"`` (blocky, exact).
      test_fraction: share of the held-out split.
    """
    _check_choice(image_size, DIGITS_SIZES, "digits image size")
    _check_choice(split, SPLITS, "split")
    _check_choice(resize, RESIZE_METHODS, "resize method")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the embedded digits dataset needs scikit-learn: pip install scikit-learn"
        ) from err
    digits = sklearn_digits()
    raw = digits.images  # float64 [1797, 8, 8], integer values 0..16
    labels = np.asarray(digits.target, np.int32)
    test = digits_split(raw, test_fraction)
    if split != "all":
        keep = test if split == "test" else ~test
        raw, labels = raw[keep], labels[keep]
    images = resize_images(raw[..., None] * (255.0 / 16.0), image_size, resize)
    return ArrayDataset(np.clip(np.rint(images), 0, 255).astype(np.uint8), labels)


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")


def mode_channels(mode: str) -> int:
    """1 for a grayscale Pillow mode (with or without alpha), else 3 (RGB, RGBA, palette...)."""
    return 1 if mode in GRAYSCALE_MODES else 3


def _open_image(path: pathlib.Path):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ValueError(
            f"cannot read image file {str(path)!r} ({type(err).__name__}: {err}); remove or "
            "replace it"
        ) from err
    return image


class ImageFolder:
    """The .png/.jpg/.jpeg files under ``root`` (recursive, sorted by relative path) of one
    split: ``"all"``, or the ``"train"`` and ``"test"`` sides of :func:`folder_split` at
    ``test_fraction``.

    Class labels (``labels``, int32 [N], and ``class_names``) come from the top-level
    subfolders, sorted by name, when every image lies in one (``root/<class>/...``); otherwise
    ``labels`` is None. Each image is converted to grayscale (``channels=1``, Pillow mode
    ``L``) or RGB (``channels=3``; None: ``detected_channels``, RGB when any file is in
    colour), its shorter side resized to ``image_size`` (Pillow bilinear, with antialiasing
    when shrinking) and the centre ``image_size`` square cropped, as
    denoising-diffusion-pytorch's ``Dataset`` (``Resize`` then ``CenterCrop``). Every file's
    header is read at construction, so an unreadable file is reported before training; a file
    that fails later to decode raises a ValueError naming it as well.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int,
        *,
        channels: int | None = 3,
        split: str = "all",
        test_fraction: float = 0.0,
    ):
        from PIL import Image  # noqa: F401 - fail early when Pillow is missing

        if channels is not None:
            _check_choice(channels, (1, 3), "channel count")
        _check_choice(split, SPLITS, "split")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be an int >= 1, got {image_size!r}")
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise ValueError(f"image folder {str(self.root)!r} does not exist or is not a folder")
        self.files = tuple(
            sorted(
                (
                    p
                    for p in self.root.rglob("*")
                    if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                ),
                key=lambda p: p.relative_to(self.root).as_posix(),
            )
        )
        if not self.files:
            raise ValueError(
                f"image folder {str(self.root)!r} holds no {'/'.join(IMAGE_EXTENSIONS)} files"
            )
        self.modes = {}  # Pillow mode -> number of files
        for path in self.files:
            mode = self._check_header(path)
            self.modes[mode] = self.modes.get(mode, 0) + 1
        self.detected_channels = max(mode_channels(m) for m in self.modes)
        self.image_size = image_size
        self.channels = self.detected_channels if channels is None else channels
        # classes: the top-level subfolders (sorted names), when every image lies in one; from
        # the whole folder, so that both splits number the classes alike
        parts = [p.relative_to(self.root).parts for p in self.files]
        if all(len(q) > 1 for q in parts):
            self.class_names = tuple(sorted({q[0] for q in parts}))
            index = {name: i for i, name in enumerate(self.class_names)}
            self.labels = np.asarray([index[q[0]] for q in parts], np.int32)
        else:
            self.class_names, self.labels = (), None
        self.split, self.test_fraction = split, test_fraction
        if split != "all":
            held = folder_split(
                [p.relative_to(self.root).as_posix() for p in self.files], test_fraction
            )
            keep = held if split == "test" else ~held
            if not keep.any():
                fix = "lower --test-fraction"
                if split == "test":
                    fix = (
                        "train with --test-fraction (e.g. 0.1) to hold some out, or pass "
                        "--split all (the training images)"
                    )
                raise ValueError(
                    f"image folder {str(self.root)!r} has no {split} images at test_fraction "
                    f"{test_fraction} ({len(self.files)} files): {fix}"
                )
            self.files = tuple(f for f, k in zip(self.files, keep, strict=True) if k)
            if self.labels is not None:
                self.labels = self.labels[keep]

    @staticmethod
    def _check_header(path: pathlib.Path) -> str:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                mode = image.mode
                image.verify()
                return mode
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            raise ValueError(
                f"cannot read image file {str(path)!r} ({type(err).__name__}: {err}); remove "
                "or replace it"
            ) from err

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)

    def __len__(self) -> int:
        return len(self.files)

    def load_one(self, index: int) -> np.ndarray:
        """Decode, convert, resize and crop one file to uint8 [S, S, C]."""
        from PIL import Image

        path = self.files[int(index)]
        image = _open_image(path).convert("L" if self.channels == 1 else "RGB")
        width, height = image.size
        size = self.image_size
        if min(width, height) != size:
            # torchvision's Resize(int): the shorter side becomes `size`, the longer one is
            # scaled and truncated to an int.
            if width <= height:
                new = (size, int(size * height / width))
            else:
                new = (int(size * width / height), size)
            image = image.resize(new, Image.BILINEAR)
            width, height = new
        top = int(round((height - size) / 2.0))
        left = int(round((width - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
        array = np.asarray(image, np.uint8)
        return array[..., None] if self.channels == 1 else array

    def get(self, indices: np.ndarray) -> np.ndarray:
        return np.stack([self.load_one(i) for i in np.asarray(indices).reshape(-1)])

    def load(self) -> ArrayDataset:
        """Decode every image now and keep them in memory."""
        return ArrayDataset(self.get(np.arange(len(self))), self.labels)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """S = floor(N / B): full batches per epoch (the remainder of each epoch is dropped)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if batch_size > num_examples:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} examples")
    return num_examples // batch_size


def _epoch_order(seed: int, epoch: int, num_examples: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_examples)
    flips = rng.random(num_examples) < 0.5
    return order, flips


def _process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, got {process_index} and {process_count}"
        )
    if batch_size % process_count:
        raise ValueError(
            f"global batch size {batch_size} is not divisible by the {process_count} processes"
        )
    share = batch_size // process_count
    return slice(process_index * share, (process_index + 1) * share)


def _assemble(dataset, order, flips, position, batch_size, rows, flip, labels=False):
    picked = order[position * batch_size : (position + 1) * batch_size][rows]
    images = dataset.get(picked)
    if flip:
        mirror = flips[position * batch_size : (position + 1) * batch_size][rows]
        images = np.where(mirror[:, None, None, None], images[:, :, ::-1], images)
    images = np.ascontiguousarray(images, np.uint8)
    if not labels:
        return images
    return {"image": images, "label": np.asarray(dataset_labels(dataset)[picked], np.int32)}


def dataset_labels(dataset) -> np.ndarray:
    """The dataset's class labels [N], or a ValueError saying where labels come from."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise ValueError(
            "this dataset has no class labels: the digits have them, and an image folder has "
            "them when every image lies in a subfolder named after its class"
        )
    return labels


def batch_at(
    dataset: Dataset,
    step: int,
    batch_size: int,
    *,
    seed: int,
    flip: bool = False,
    process_index: int = 0,
    process_count: int = 1,
    labels: bool = False,
) -> np.ndarray | dict[str, np.ndarray]:
    """The batch of global step ``step``: uint8 [B / process_count, H, W, C]; with ``labels``
    a dict of those images (``"image"``) and their int32 class labels (``"label"``).

    Epoch e = step // S draws ``order, flips = permutation(N), uniform(N) < 1/2`` from
    ``np.random.default_rng([seed, e])``; the batch is ``order[i B : (i + 1) B]`` with
    i = step mod S, each image mirrored left-right where ``flip`` and its flip draw say so.
    Process p of P gets rows ``[p B / P, (p + 1) B / P)`` of that global batch.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    per_epoch = steps_per_epoch(len(dataset), batch_size)
    rows = _process_rows(batch_size, process_index, process_count)
    order, flips = _epoch_order(seed, step // per_epoch, len(dataset))
    return _assemble(dataset, order, flips, step % per_epoch, batch_size, rows, flip, labels)


def batches(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    num_steps: int | None = None,
    flip: bool = False,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[np.ndarray]:
    """Yield :func:`batch_at` for steps ``start_step, start_step + 1, ...`` (forever, or
    ``num_steps`` of them), computing each epoch's permutation once."""
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    per_epoch = steps_per_epoch(len(dataset), batch_size)
    rows = _process_rows(batch_size, process_index, process_count)
    step, epoch, order, flips = start_step, None, None, None
    while num_steps is None or step < start_step + num_steps:
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            order, flips = _epoch_order(seed, epoch, len(dataset))
        yield _assemble(dataset, order, flips, step % per_epoch, batch_size, rows, flip)
        step += 1


def prefetch(
    fn: Callable[[int], object], start: int, stop: int, *, depth: int = 4, workers: int = 2
) -> Iterator[tuple[int, object]]:
    """``(step, fn(step))`` for steps ``start, ..., stop - 1`` in order, each computed up to
    ``depth`` steps ahead by ``workers`` background threads.

    The training loop's input pipeline: ``fn`` is :func:`batch_at` of the run, so an image
    folder is decoded (Pillow releases the GIL while it decodes and resizes) while the device
    runs the steps before, and only ``depth`` batches are held at a time, never the folder. An
    exception raised by ``fn`` is raised here, at its step. A plain thread pool rather than a
    data-loading library: the batches are a pure function of the step, so order, resumption
    and process sharding need nothing more.
    """
    if depth < 1 or workers < 1:
        raise ValueError(f"depth and workers must be >= 1, got {depth} and {workers}")
    with ThreadPoolExecutor(workers, thread_name_prefix="jaxdiff-data") as pool:
        pending: deque = deque()
        ahead = start
        try:
            while pending or ahead < stop:
                while ahead < stop and len(pending) < depth:
                    pending.append((ahead, pool.submit(fn, ahead)))
                    ahead += 1
                step, future = pending.popleft()
                yield step, future.result()
        finally:
            for _, future in pending:
                future.cancel()
