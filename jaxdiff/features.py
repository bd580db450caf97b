"""Feature statistics of image sets, for the quality metrics: extractors, streaming, caching.

A :class:`FeatureExtractor` turns uint8 images into features and class logits with a network:
:func:`digits_extractor` (the shipped digits classifier, no download) or
:func:`inception_extractor` (FID's Inception, from a weights file the user gives).
:func:`image_statistics` streams batches of images through one, keeping only the running mean
and covariance (:mod:`jaxdiff.metrics`, float64), the logits (for the Inception Score) and the
first ``keep`` feature rows (for precision/recall), so its memory does not grow with the number
of images beyond those. :func:`quality` compares two :class:`Statistics`.

The statistics files (``save_statistics`` / ``load_statistics``) are ``.npz`` with pytorch-fid's
``mu`` and ``sigma`` keys, so pytorch-fid's own ``--save-stats`` files load too.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import zipfile
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import data, metrics

__all__ = [
    "INCEPTION_ENV",
    "FeatureExtractor",
    "Statistics",
    "as_uint8",
    "digits_extractor",
    "folder_images",
    "image_statistics",
    "inception_extractor",
    "load_statistics",
    "quality",
    "save_statistics",
]

INCEPTION_ENV = "JAXDIFF_INCEPTION_WEIGHTS"
# feature rows kept for precision/recall (k-NN over [keep, keep] distances, in blocks)
PR_ROWS = 2000


class FeatureExtractor(NamedTuple):
    """A network that maps uint8 ``[N, H, W, channels]`` to (features ``[N, dim]``, logits)."""

    name: str  # "digits" or "inception"
    dim: int  # feature dimension
    channels: int  # input channels it takes (1 or 3); 1-channel images are repeated for 3
    fingerprint: str  # SHA-256 of its weights: cached statistics are tied to it
    apply: Callable[[jax.Array], tuple[jax.Array, jax.Array]]  # jitted


class Statistics(NamedTuple):
    """What a set of images contributes to the metrics."""

    stats: metrics.FeatureStats  # running mean and M2 of every row (float64)
    logits: np.ndarray | None  # [N, K] float32 class logits (None when loaded from mu/sigma)
    sample: np.ndarray | None  # [<= keep, dim] float32: the first feature rows, for P/R
    extractor: str  # the extractor's name and fingerprint
    source: str  # what the images were

    @property
    def count(self) -> int:
        return self.stats.count


def _sha256_of_tree(tree) -> str:
    digest = hashlib.sha256()
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    for path, leaf in sorted(flat, key=lambda item: jax.tree_util.keystr(item[0])):
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return digest.hexdigest()


def digits_extractor(weights: str | os.PathLike | None = None) -> FeatureExtractor:
    """The digits classifier (:mod:`jaxdiff.models.digits_net`): 64-d features, 10 logits."""
    from jaxdiff.models import digits_net

    variables = digits_net.load_digits_net_variables(weights)
    net = digits_net.DigitsNet()

    @jax.jit
    def apply(images):
        out = net.apply(variables, images)
        return out.features, out.logits

    return FeatureExtractor(
        "digits", digits_net.FEATURE_DIM, 1, _sha256_of_tree(variables)[:16], apply
    )


def inception_extractor(weights: str | os.PathLike | None = None) -> FeatureExtractor:
    """FID's Inception (:class:`jaxdiff.models.InceptionV3FID`): 2048-d pool features and the
    unbiased 1008 logits (torch-fidelity's Inception Score), from ``weights`` or
    ``$JAXDIFF_INCEPTION_WEIGHTS``.

    Raises:
      ValueError: when neither is given or the file is not FID's Inception, naming the file
        needed and where it is published.
    """
    from jaxdiff.models import inception

    weights = weights or os.environ.get(INCEPTION_ENV)
    if not weights:
        raise ValueError(
            f"FID needs the Inception weights: pass --inception-weights FILE or set "
            f"${INCEPTION_ENV}; the file is torch-fidelity's {inception.INCEPTION_WEIGHTS_FILE}, "
            f"published at {inception.INCEPTION_WEIGHTS_URL} (jaxdiff never downloads it), or "
            "its .npz form"
        )
    variables = inception.load_inception_variables(weights)
    net = inception.InceptionV3FID()

    @jax.jit
    def apply(images):
        out = net.apply(variables, images)
        return out.pool, out.logits_unbiased

    return FeatureExtractor("inception", 2048, 3, _sha256_of_tree(variables)[:16], apply)


def as_uint8(images, what: str = "images") -> np.ndarray:
    """uint8 ``[N, H, W, C]`` as they are, or floats in [-1, 1] quantised as the samplers' images
    are (:func:`jaxdiff.data.to_uint8`). Anything else is refused with the range found."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(
            f"{what} must be [N, H, W, C] with C = 1 or 3 (channels-last), got shape {x.shape}"
        )
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{what} must be uint8 (0..255) or floats in [-1, 1], got {x.dtype}")
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
        raise ValueError(
            f"{what} are floats in [{lo:.4g}, {hi:.4g}], outside the expected [-1, 1]; pass "
            "uint8 0..255 or floats in [-1, 1] (for [0, 1] images use 2 * x - 1)"
        )
    return data.to_uint8(x)


def _fit_channels(images: np.ndarray, extractor: FeatureExtractor, what: str) -> np.ndarray:
    c = images.shape[-1]
    if c == extractor.channels:
        return images
    if c == 1 and extractor.channels == 3:
        return np.repeat(images, 3, axis=-1)
    raise ValueError(
        f"the {extractor.name} metric takes {extractor.channels}-channel images, {what} have "
        f"{c}: the digits metric is for the grayscale digits; measure RGB images with FID "
        "(--inception-weights)"
    )


def image_statistics(
    extractor: FeatureExtractor,
    batches: Iterable,
    *,
    source: str,
    batch_size: int = 250,
    keep: int = PR_ROWS,
    progress: Callable[[int], None] | None = None,
) -> Statistics:
    """Stream image batches (uint8, or floats in [-1, 1]) through ``extractor``.

    Every batch is cut or padded to ``batch_size`` rows, so one compiled program serves all of
    them. Only the running statistics, the logits and the first ``keep`` feature rows are kept.
    ``progress(n)`` is called with the number of images done after each batch.
    """
    stats = metrics.init_feature_stats(extractor.dim)
    logits, sample, kept, shape = [], [], 0, None
    for batch in batches:
        batch = _fit_channels(as_uint8(batch), extractor, source)
        if shape is None:
            shape = batch.shape[1:]
        elif batch.shape[1:] != shape:
            raise ValueError(
                f"{source}: images of shape {list(batch.shape[1:])} after images of shape "
                f"{list(shape)}; every image of one set must have the same size and channels"
            )
        for lo in range(0, len(batch), batch_size):
            part = batch[lo : lo + batch_size]
            n = len(part)
            if n < batch_size:
                part = np.concatenate([part, np.zeros((batch_size - n, *shape), np.uint8)])
            feats, logs = jax.device_get(extractor.apply(jnp.asarray(part)))
            feats, logs = np.asarray(feats[:n]), np.asarray(logs[:n])
            stats = metrics.update_feature_stats(stats, feats)
            logits.append(logs.astype(np.float32))
            if kept < keep:
                sample.append(feats[: keep - kept].astype(np.float32))
                kept += len(sample[-1])
            if progress is not None:
                progress(stats.count)
    if stats.count == 0:
        raise ValueError(f"{source}: no images")
    return Statistics(
        stats,
        np.concatenate(logits),
        np.concatenate(sample),
        f"{extractor.name}:{extractor.fingerprint}",
        source,
    )


def _mean_cov(s: Statistics, dim: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    if s.count <= dim:
        raise ValueError(
            f"the Fréchet distance of {dim}-d features needs a full-rank covariance: at least "
            f"N = {dim + 1} {what}, got {s.count} (pass --num {dim + 1} or more; more images "
            "give a less biased figure)"
        )
    return metrics.finalize_feature_stats(s.stats)


def quality(fake: Statistics, real: Statistics, *, k: int = 3) -> dict:
    """Fréchet distance, Inception Score (of ``fake``'s logits) and precision/recall (k-NN,
    over the kept rows) of ``fake`` against ``real``; both from one extractor."""
    if fake.extractor != real.extractor:
        raise ValueError(
            f"statistics from different networks ({fake.extractor} vs {real.extractor}); "
            "recompute the reference statistics"
        )
    dim = fake.stats.mean.shape[0]
    mu1, sigma1 = _mean_cov(fake, dim, "generated images")
    mu2, sigma2 = _mean_cov(real, dim, "reference images")
    out = {"fd": metrics.frechet_distance(mu1, sigma1, mu2, sigma2)}
    if fake.logits is not None and len(fake.logits) >= 10:
        out["is"], out["is_std"] = metrics.inception_score(fake.logits, splits=10)
    if fake.sample is not None and real.sample is not None:
        n = min(len(fake.sample), len(real.sample))
        if n > k:
            out["precision"], out["recall"] = metrics.precision_recall(
                real.sample[:n], fake.sample[:n], k=k
            )
            out["pr_rows"] = n
    out["n"], out["n_reference"] = fake.count, real.count
    return out


# ---------------------------------------------------------------------------------------------
# Statistics files


def save_statistics(s: Statistics, path: str | os.PathLike) -> pathlib.Path:
    """Write ``s`` as ``.npz`` (pytorch-fid's ``mu``/``sigma`` plus what resumes streaming),
    atomically."""
    path = pathlib.Path(path)
    mu, sigma = metrics.finalize_feature_stats(s.stats) if s.count >= 2 else (s.stats.mean, None)
    arrays = {
        "mu": mu,
        "sigma": sigma if sigma is not None else np.zeros_like(s.stats.m2),
        "count": np.asarray(s.count),
        "m2": s.stats.m2,
        "extractor": np.asarray(s.extractor),
        "source": np.asarray(s.source),
    }
    if s.logits is not None:
        arrays["logits"] = s.logits
    if s.sample is not None:
        arrays["sample"] = s.sample
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


def load_statistics(path: str | os.PathLike, extractor: FeatureExtractor) -> Statistics:
    """Read a statistics ``.npz`` (jaxdiff's, or pytorch-fid's ``mu``/``sigma`` with an unknown
    sample count, taken as large enough) for ``extractor``."""
    path = pathlib.Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"cannot read the statistics file {str(path)!r}: {err}") from None
    if "mu" not in arrays or "sigma" not in arrays:
        raise ValueError(
            f"{str(path)!r} is not a statistics file: it has {sorted(arrays)}, not 'mu' and "
            "'sigma' (write one with jaxdiff eval --real FOLDER --save-stats FILE)"
        )
    mu, sigma = np.asarray(arrays["mu"], np.float64), np.asarray(arrays["sigma"], np.float64)
    if mu.shape != (extractor.dim,) or sigma.shape != (extractor.dim, extractor.dim):
        raise ValueError(
            f"{str(path)!r} holds statistics of {mu.shape[0] if mu.ndim else '?'}-d features; "
            f"the {extractor.name} metric has {extractor.dim}"
        )
    name = str(arrays["extractor"]) if "extractor" in arrays else f"{extractor.name}:?"
    if name.split(":")[0] != extractor.name:
        raise ValueError(f"{str(path)!r} holds {name} statistics, not {extractor.name}")
    count = int(arrays["count"]) if "count" in arrays else extractor.dim + 1
    m2 = np.asarray(arrays["m2"], np.float64) if "m2" in arrays else sigma * (count - 1)
    ours = f"{extractor.name}:{extractor.fingerprint}"
    if name.endswith(":?") or "extractor" not in arrays:
        name = ours  # pytorch-fid's files: trusted to be of the same network
    return Statistics(
        metrics.FeatureStats(count, mu, m2),
        arrays.get("logits"),
        arrays.get("sample"),
        name,
        str(arrays.get("source", path)),
    )


def cached_statistics(
    path: pathlib.Path,
    extractor: FeatureExtractor,
    source: str,
    batches: Callable[[], Iterable],
    **kwargs,
) -> Statistics:
    """Statistics of ``source`` from ``path`` when it holds them for this extractor's weights,
    else computed from ``batches()`` and written there."""
    if path.is_file():
        try:
            s = load_statistics(path, extractor)
        except ValueError:
            s = None
        if s is not None and s.extractor == f"{extractor.name}:{extractor.fingerprint}":
            if s.source == source:
                return s
    s = image_statistics(extractor, batches(), source=source, **kwargs)
    save_statistics(s, path)
    return s


# ---------------------------------------------------------------------------------------------
# Image folders as they are (no resizing)


def folder_images(root: str | os.PathLike, batch_size: int = 250) -> tuple[int, Iterator]:
    """``(count, batches)`` of every .png/.jpg/.jpeg under ``root`` (recursive, sorted), as they
    are: grayscale files as 1 channel, every other mode as RGB. Every header is read first; a
    folder of mixed sizes or channels, or an unreadable file, is refused before any decoding."""
    from PIL import Image, UnidentifiedImageError

    root = pathlib.Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist or is not a folder")
    files = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in data.IMAGE_EXTENSIONS and p.is_file()
    )
    if not files:
        raise ValueError(f"no .png/.jpg/.jpeg images under {str(root)!r}")
    kinds: dict[tuple, list[pathlib.Path]] = {}
    for p in files:
        try:
            with Image.open(p) as im:
                kind = (im.size[1], im.size[0], data.mode_channels(im.mode))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            raise ValueError(f"cannot read image file {str(p)!r} ({err}); remove it") from None
        kinds.setdefault(kind, []).append(p)
    if len(kinds) > 1:
        listed = "; ".join(
            f"{len(v)} of {k[0]}x{k[1]} with {k[2]} channel{'s' * (k[2] > 1)} (e.g. {v[0]})"
            for k, v in sorted(kinds.items(), key=lambda kv: -len(kv[1]))
        )
        raise ValueError(
            f"{str(root)!r} mixes image sizes or channels: {listed}; the metrics compare one "
            "kind of image: resize or convert them to one size and mode first"
        )
    ((h, w, c),) = kinds

    def batches():
        for lo in range(0, len(files), batch_size):
            out = np.empty((len(files[lo : lo + batch_size]), h, w, c), np.uint8)
            for i, p in enumerate(files[lo : lo + batch_size]):
                try:
                    with Image.open(p) as im:
                        out[i] = np.asarray(im.convert("L" if c == 1 else "RGB")).reshape(h, w, c)
                except (OSError, ValueError) as err:
                    raise ValueError(f"cannot decode {str(p)!r} ({err}); remove it") from None
            yield out

    return len(files), batches()
