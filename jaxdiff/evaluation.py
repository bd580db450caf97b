"""Evaluating a trained workdir: sample images (``jaxdiff sample``), bits/dim (``jaxdiff bpd``)
and sample quality (``jaxdiff eval``): the digits metric and FID, against reference statistics
cached in the workdir.

Results of ``evaluate`` go to ``<workdir>/eval/results.json``, keyed by checkpoint step and by
the sampling setting (``ddim50_n1000_seed0``); the reference statistics to
``<workdir>/eval/reference-<metric>.npz``, recomputed only when the data or the metric's weights
change.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pathlib
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import data, features, likelihood, progress
from jaxdiff import workdir as wd
from jaxdiff.compilation import compiler_options
from jaxdiff.config import Config

__all__ = [
    "METRICS",
    "digits_metrics",
    "evaluate",
    "evaluate_bpd",
    "real_statistics",
    "sample_images",
    "sample_statistics",
]

METRICS = ("auto", "digits", "fid", "all")
SAMPLERS = wd.SAMPLERS


def sample_images(
    workdir,
    out: str | os.PathLike,
    *,
    num: int = 64,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    seed: int = 0,
    step: int | None = None,
    overwrite: bool = False,
    labels=None,
    guidance_scale: float | None = None,
    rescaled_phi: float = 0.0,
    respacing: str | None = None,
    var_type: str | None = None,
    cols: int | None = None,
    grid: str | None = None,
    show_progress: bool = False,
    batch_size: int | None = None,
    classifier=None,
    classifier_scale: float = 1.0,
    npz_keys: tuple[str, str] = ("images", "labels"),
) -> np.ndarray:
    """Sample ``num`` images from a workdir's EMA weights (or a :class:`jaxdiff.workdir.Loaded`
    network, e.g. an openai checkpoint); write ``out`` (.png grid, ``cols`` per row) and the
    uint8 array next to it (.npz, under ``npz_keys``, with the labels of a conditional or
    classifier-guided model). Returns the images. The options are
    :func:`jaxdiff.workdir.sample_fn`'s; ``labels`` [num] is required for a class-conditional
    model and refused for an unconditional one (unless a ``classifier``, a
    :class:`jaxdiff.pretrained.Classifier`, guides it at ``classifier_scale``; default labels:
    sample j has class j mod K). ``batch_size`` samples that many at a time (default: all;
    sample j's result does not depend on it for a deterministic sampler).
    ``show_progress`` shows the network calls done on stderr (a bar on a terminal)."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    batch = num if batch_size is None else batch_size
    if batch < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch}")
    batch = min(batch, num)
    out = pathlib.Path(out)
    targets = [out.with_suffix(".png"), out.with_suffix(".npz")]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise ValueError(f"{existing} exist; pass --force to replace them")
    config, model, params, at_step = wd.loaded(workdir, step)
    steps = wd.resolve_steps(config, sampler, steps)
    guide = None
    if classifier is not None:
        if classifier.image_size != config.data.image_size:
            raise ValueError(
                f"the classifier takes {classifier.image_size}x{classifier.image_size} images, "
                f"the model makes {config.data.image_size}x{config.data.image_size}: pass the "
                "classifier of the model's image size (--image_size in --classifier-flags)"
            )
        guide = (classifier.apply, classifier_scale, classifier.num_classes)
        if labels is not None:
            labels = np.asarray(labels)
            k = config.model.num_classes or classifier.num_classes
            if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= k:
                raise ValueError(f"class labels must be integers in [0, {k}) for the classifier")
        elif config.model.num_classes is None:
            labels = np.arange(num) % classifier.num_classes
    if guide is None or config.model.num_classes is not None:
        wd.check_labels(config, labels, guidance_scale)
    if labels is not None and np.shape(labels) != (num,):
        raise ValueError(f"labels must have shape [{num}], got {np.shape(labels)}")
    shown: list = []  # the bar, made once the sampler knows its number of calls
    run = wd.sample_fn(
        config,
        model,
        batch,
        steps,
        eta,
        sampler,
        on_call=(lambda: shown[0].update(1)) if show_progress else None,
        respacing=respacing,
        var_type=var_type,
        guidance_scale=guidance_scale,
        rescaled_phi=rescaled_phi,
        grid=grid,
        classifier=guide,
    )
    batches = -(-num // batch)
    # the last batch runs whole (one compiled program) and is cut to num
    padded = None if labels is None else np.resize(np.asarray(labels, np.int32), batches * batch)
    if show_progress:
        shown.append(progress.Progress(run.calls * batches, desc="sample", unit="network call"))
        shown[0].write(
            f"sampling {num} images, {run.calls * batches} network calls; compiling first"
        )
    key, parts = jax.random.PRNGKey(seed), []
    extra = () if classifier is None else (classifier.params,)
    with shown[0] if shown else contextlib.nullcontext():
        for first in range(0, num, batch):
            y = None if padded is None else jnp.asarray(padded[first : first + batch])
            parts.append(np.asarray(run(params, key, first, y, *extra)))
    raw = np.concatenate(parts)[:num]
    wd.refuse_nonfinite(raw, "the samples", at_step)
    images = wd.to_uint8(raw)
    out.parent.mkdir(parents=True, exist_ok=True)
    wd.grid_png(images, targets[0], cols)
    saved = {npz_keys[0]: images}
    if labels is not None:
        saved[npz_keys[1]] = np.asarray(labels, np.int32)
    np.savez_compressed(targets[1], **saved)
    return images


def evaluate_bpd(
    workdir,
    *,
    split: str = "test",
    batch_size: int = 256,
    seed: int = 0,
    step: int | None = None,
    at_init: bool = False,
    tails: str = "exact",
    var_type: str | None = None,
    log: Callable[[str], None] | None = None,
    num: int | None = None,
    respacing: str | None = None,
    dataset=None,
) -> dict[str, Any]:
    """Bits/dim of the EMA model on a split of the run's data (the full bound, T network calls
    per batch) with the model's own variance: a learned one, or its fixed one (``var_type``
    may swap fixed_small and fixed_large; see :func:`jaxdiff.workdir.sampling_var_type`). A
    class-conditional model is evaluated given each image's label (the conditional
    likelihood). ``at_init`` evaluates the untrained network instead; ``tails="reference"``
    computes the decoder term with the references' float32 arithmetic
    (:func:`jaxdiff.likelihood.discretized_gaussian_log_likelihood`). ``log`` receives a
    progress line per batch (images done, elapsed time, the time left). ``num`` evaluates the
    first ``num`` images of the split only (improved-diffusion's ``image_nll.py --num_samples``;
    the output's ``images`` says how many).

    ``workdir`` may be a :class:`jaxdiff.workdir.Loaded` network (an openai checkpoint, see
    :mod:`jaxdiff.pretrained`) with ``dataset`` (images and, for a conditional model, labels)
    in place of the run's split; ``respacing`` evaluates the bound over a respaced chain, as
    improved-diffusion's ``image_nll.py`` does with ``--timestep_respacing``."""
    likelihood.check_tails(tails)
    config, model, params, at_step = wd.loaded(workdir, step, at_init=at_init)
    if config.diffusion.loss == "continuous":
        raise ValueError(
            "bits/dim is defined here for discrete-time models; this one is continuous-time "
            "(--loss continuous)"
        )
    var_type = wd.sampling_var_type(config, var_type)
    if dataset is None:
        dataset = wd.load_dataset(config.data, split)
    if num is not None and num < 1:
        raise ValueError(f"--num must be at least 1, got {num}")
    count = len(dataset) if num is None else min(num, len(dataset))
    images = data.to_unit_range(dataset.get(np.arange(count)))
    conditional = config.model.num_classes is not None
    labels = (data.dataset_labels(dataset)[:count] if conditional
              else np.zeros(count, np.int32))  # fmt: skip
    # The decoder term needs a finite variance at t = 0: improved-diffusion's beta-tilde_1, not
    # denoising-diffusion-pytorch's floor of 1e-20 (which only sampling, where t = 0 adds no
    # noise, can afford).
    c = wd.build_coeffs(config.diffusion, convention="openai", respacing=respacing)

    @functools.partial(jax.jit, compiler_options=compiler_options())
    def bpd(params, x, y, key):
        kwargs = {"label": y} if conditional else {}
        return likelihood.calc_bpd_loop(
            lambda x_t, t: model.apply(params, x_t, t, **kwargs),
            c,
            x,
            key=key,
            mean_type=config.diffusion.objective,
            var_type=var_type,
            tails=tails,
        )

    totals, priors, decoders = [], [], []
    log = log or (lambda message: None)
    log(
        f"bits/dim of {len(images)} {split} images at step {at_step}: "
        f"{c.num_timesteps} network calls per batch of {batch_size}; compiling first"
    )
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        res = bpd(
            params,
            jnp.asarray(images[i : i + batch_size]),
            jnp.asarray(labels[i : i + batch_size]),
            jax.random.PRNGKey(seed + i),
        )
        totals.append(np.asarray(res.total_bpd))
        priors.append(np.asarray(res.prior_bpd))
        decoders.append(np.asarray(res.vb[:, 0]))
        done, elapsed = min(i + batch_size, len(images)), time.perf_counter() - start
        left = elapsed / done * (len(images) - done)
        log(f"  {done}/{len(images)} images, {elapsed:.0f} s, about {left:.0f} s left")
    total = np.concatenate(totals)
    wd.refuse_nonfinite(total, "the bits/dim", at_step)
    return {
        "bits_per_dim": float(np.mean(total)),
        "prior_bpd": float(np.mean(np.concatenate(priors))),
        "decoder_bpd": float(np.mean(np.concatenate(decoders))),
        "split": split,
        "images": int(len(images)),
        "step": at_step,
        "timesteps": c.num_timesteps,
        "var_type": var_type,
        "tails": tails,
    }


# ---------------------------------------------------------------------------------------------
# Sample quality


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def extractors_for(
    config: Config, metric: str, inception_weights: str | os.PathLike | None = None
) -> list[features.FeatureExtractor]:
    """The extractors ``metric`` asks for on this run's data: ``auto`` is the digits metric on
    digits and FID elsewhere; ``all`` is both (digits runs only)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
    digits = config.data.dataset == "digits"
    wanted = {
        "auto": ["digits"] if digits else ["fid"],
        "digits": ["digits"],
        "fid": ["fid"],
        "all": ["digits", "fid"],
    }[metric]
    if "digits" in wanted and wd.num_channels(config.data) != 1:
        raise ValueError(
            "the digits metric is for grayscale digits; this run has "
            f"{wd.num_channels(config.data)} channels: use --metric fid with --inception-weights"
        )
    out = []
    for name in wanted:
        if name == "digits":
            out.append(features.digits_extractor())
        else:
            out.append(features.inception_extractor(inception_weights))
    return out


def _reference_source(config: Config) -> tuple[str, str]:
    d = config.data
    if d.dataset == "digits":
        return "train", f"digits train split, {d.image_size}x{d.image_size}"
    # the files' names, sizes and times: a changed folder is a new reference
    files = sorted(
        p for p in pathlib.Path(d.folder).rglob("*") if p.suffix.lower() in data.IMAGE_EXTENSIONS
    )
    listing = hashlib.sha256()
    for p in files:
        st = p.stat()
        listing.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    held = f", test fraction {d.test_fraction} held out" if d.test_fraction else ""
    return (
        "train",
        f"folder {d.folder} at {d.image_size}x{d.image_size}, {wd.num_channels(d)} channels, "
        f"{len(files)} files (listing {listing.hexdigest()[:12]}){held}",
    )


def _batches_of(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for lo in range(0, len(images), batch_size):
        yield images[lo : lo + batch_size]


def reference_statistics(
    config: Config,
    extractor: features.FeatureExtractor,
    cache_dir: pathlib.Path | None,
    batch_size: int = 250,
) -> features.Statistics:
    """Statistics of the run's training data (as the model sees it: at its size and channels),
    cached in ``cache_dir/reference-<metric>.npz`` when given."""
    split, source = _reference_source(config)

    def batches():  # decoded a batch at a time: a folder is never held whole
        ds = wd.load_dataset(config.data, split)
        return (ds.get(np.arange(lo, min(lo + batch_size, len(ds))))
                for lo in range(0, len(ds), batch_size))  # fmt: skip

    if cache_dir is None:
        return features.image_statistics(extractor, batches(), source=source)
    path = cache_dir / f"reference-{extractor.name}.npz"
    return features.cached_statistics(path, extractor, source, batches, batch_size=batch_size)


def real_statistics(
    path: str | os.PathLike, extractor: features.FeatureExtractor, batch_size: int = 250
) -> features.Statistics:
    """Statistics of a folder of images as they are, or of a statistics ``.npz``."""
    path = pathlib.Path(path)
    if path.suffix == ".npz" and path.is_file():
        return features.load_statistics(path, extractor)
    count, batches = features.folder_images(path, batch_size)
    return features.image_statistics(
        extractor, batches, source=f"folder {path} ({count} images)", batch_size=batch_size
    )


def sample_statistics(
    sample: Callable[[Any, jax.Array], jax.Array],
    params,
    extractors: list[features.FeatureExtractor],
    *,
    num: int,
    seed: int,
    source: str,
    log: Callable[[str], None] | None = None,
) -> tuple[list[features.Statistics], np.ndarray, float]:
    """Draw ``num`` images with ``sample(params, key, first)`` (one compiled batch, called with
    ``key = PRNGKey(seed)`` and the index of its first image) and stream them through every
    extractor.

    Returns the statistics (one per extractor), the first 64 images (uint8) and the mean pixel
    value of all of them in [0, 1]."""
    key = jax.random.PRNGKey(seed)
    grid, pixel_sum, done, start = [], 0.0, 0, time.perf_counter()

    def images() -> Iterator[np.ndarray]:
        nonlocal pixel_sum, done
        while done < num:
            raw = np.asarray(sample(params, key, done))
            if not np.isfinite(raw).all():
                raise ValueError(
                    "the samples are NaN or infinite, so nothing was measured; the model is "
                    "broken at this step: try an earlier one (--step N)"
                )
            batch = wd.to_uint8(raw)[: num - done]
            done += len(batch)
            pixel_sum += float(batch.astype(np.float64).sum()) / 255.0 / batch[0].size
            if sum(len(g) for g in grid) < 64:
                grid.append(batch[: 64 - sum(len(g) for g in grid)])
            if log is not None:
                elapsed = time.perf_counter() - start
                log(f"sampled {done}/{num} images ({elapsed:.0f} s)")
            yield batch

    if len(extractors) == 1:
        stats = [features.image_statistics(extractors[0], images(), source=source)]
    else:  # one pass of sampling for several extractors
        cache = list(images())
        stats = [features.image_statistics(e, iter(cache), source=source) for e in extractors]
    return stats, np.concatenate(grid), pixel_sum / max(done, 1)


def _run_key(name: str, eta: float, num: int, seed: int) -> str:
    if name.startswith("ddim") and eta:
        name += f"_eta{eta:g}"
    return f"{name}_n{num}_seed{seed}"


def _merge_results(path: pathlib.Path, step_key: str, run_key: str, result: dict) -> None:
    try:
        table = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        table = {}
    table.setdefault(step_key, {})[run_key] = result
    text = json.dumps(table, indent=1, sort_keys=True) + "\n"
    wd.write_atomic(path, lambda tmp: tmp.write_text(text))


def evaluate(
    workdir: str | os.PathLike,
    *,
    num: int = 1000,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 250,
    step: int | None = None,
    metric: str = "auto",
    inception_weights: str | os.PathLike | None = None,
    real: str | os.PathLike | None = None,
    at_init: bool = False,
    bpd: bool = False,
    respacing: str | None = None,
    var_type: str | None = None,
    guidance_scale: float | None = None,
    rescaled_phi: float = 0.0,
    log: Callable[[str], None] | None = None,
    grid: str | None = None,
) -> dict[str, Any]:
    """Sample-quality metrics of a workdir's EMA model (``jaxdiff eval``).

    ``num`` images are sampled in batches of ``batch_size`` with one compiled program, quantised
    to uint8 as a saved image would be, and streamed through each metric's network; the result
    has, per metric, the Fréchet distance against the reference statistics (the run's training
    data, or ``real``: a folder or a statistics ``.npz``), the Inception Score (classifier score
    for the digits metric) and precision/recall (k = 3, over the first 2000 rows of each set).
    On digits, and on a folder with a held-out share (``--test-fraction``), it also has the
    real-data floor: the held-out test split against the same reference. ``bpd=True`` adds
    the test bits/dim (:func:`evaluate_bpd`). ``steps`` (default 50 for DDIM, T for DDPM),
    ``respacing``, ``var_type``, ``guidance_scale`` and ``rescaled_phi`` are
    :func:`jaxdiff.workdir.sample_fn`'s; a class-conditional model draws every class equally
    often (sample j has class j mod K).

    The result is also merged into ``<workdir>/eval/results.json`` under the checkpoint step and
    the sampling setting, and the first 64 samples are written as a PNG grid next to it.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
    grid_kind = grid
    for name, value, low in (("num", num, 2), ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    config, model, state = wd.restored(workdir, step, at_init=at_init)
    steps = wd.resolve_steps(config, sampler, steps)
    extractors = extractors_for(config, metric, inception_weights)
    for e in extractors:  # fail before sampling, not after
        if num <= e.dim and real is None:
            raise ValueError(
                f"the Fréchet distance of the {e.name} metric's {e.dim}-d features needs at "
                f"least N = {e.dim + 1} samples for a full-rank covariance, got --num {num}"
            )
    out_dir = pathlib.Path(workdir) / "eval"
    out_dir.mkdir(exist_ok=True)
    start = time.perf_counter()
    refs = [
        real_statistics(real, e, batch_size)
        if real is not None
        else reference_statistics(config, e, out_dir, batch_size)
        for e in extractors
    ]
    batch = min(batch_size, num)
    sample = wd.sample_fn(
        config,
        model,
        batch,
        steps,
        eta,
        sampler,
        respacing=respacing,
        var_type=var_type,
        guidance_scale=guidance_scale,
        rescaled_phi=rescaled_phi,
        grid=grid_kind,
    )
    at = int(state.step)
    stats, grid, mean_pixel = sample_statistics(
        sample,
        state.ema_params,
        extractors,
        num=num,
        seed=seed,
        source=f"samples of step {at}",
        log=log,
    )
    result: dict[str, Any] = {
        "step": at,
        "sampler": sampler,
        "steps": steps,
        "respacing": respacing,
        "eta": eta,
        "seed": seed,
        "num": num,
        "at_init": at_init,
        "mean_pixel": mean_pixel,
    }
    for e, s, ref in zip(extractors, stats, refs, strict=True):
        result[e.name] = {**features.quality(s, ref), "reference": ref.source}
    held_out = config.data.dataset == "digits" or config.data.test_fraction > 0
    if held_out and real is None:
        test = wd.load_dataset(config.data, "test")
        images = test.get(np.arange(len(test)))
        result["mean_pixel_test"] = float(images.mean() / 255.0)
        for e, ref in zip(extractors, refs, strict=True):
            if len(images) > e.dim:
                s = features.image_statistics(
                    e, _batches_of(images, batch_size), source=f"{config.data.dataset} test split"
                )
                result[f"{e.name}_floor"] = features.quality(s, ref)
    if bpd:
        result["bpd"] = evaluate_bpd(workdir, step=step, at_init=at_init, var_type=var_type)[
            "bits_per_dim"
        ]
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    if guidance_scale is not None:
        result["guidance_scale"], result["rescaled_phi"] = guidance_scale, rescaled_phi
    run_key = _run_key(
        wd.sampler_name(config, sampler, steps, respacing, grid_kind), eta, num, seed
    )
    if guidance_scale is not None:
        run_key += f"_w{guidance_scale:g}" + (f"_phi{rescaled_phi:g}" if rescaled_phi else "")
    step_key = "init" if at_init else str(at)
    wd.write_atomic(out_dir / f"samples-{step_key}-{run_key}.png", lambda t: wd.grid_png(grid, t))
    _merge_results(out_dir / "results.json", step_key, run_key, result)
    return result


def format_table(result: dict) -> str:
    """The metrics of one :func:`evaluate` result as an aligned text table."""
    rows = [("metric", "FD", "IS", "precision", "recall", "N")]
    for name in ("digits", "inception", "digits_floor", "inception_floor"):
        if name in result:
            r = result[name]
            label = {"digits": "digits (samples)", "inception": "FID (samples)"}.get(
                name, f"{name.split('_')[0]} (real test split)"
            )
            rows.append(
                (
                    label,
                    f"{r['fd']:.4g}",
                    f"{r['is']:.3f}" if "is" in r else "-",
                    f"{r['precision']:.3f}" if "precision" in r else "-",
                    f"{r['recall']:.3f}" if "recall" in r else "-",
                    str(r["n"]),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


@functools.lru_cache(maxsize=4)
def _digits_reference(image_size: int) -> tuple[features.FeatureExtractor, features.Statistics]:
    extractor = features.digits_extractor()
    images = data.load_digits(image_size, split="train").images
    ref = features.image_statistics(
        extractor, _batches_of(images, 250), source=f"digits train split, {image_size}x{image_size}"
    )
    return extractor, ref


def digits_metrics(images, image_size: int | None = None) -> dict[str, Any]:
    """The digits metric of an image array (uint8, or floats in [-1, 1]) against the digits
    training split at ``image_size`` (default: the images' size): Fréchet distance, classifier
    score, precision/recall and the mean pixel value in [0, 1]."""
    images = features.as_uint8(images)
    size = image_size or images.shape[1]
    extractor, ref = _digits_reference(size)
    s = features.image_statistics(extractor, _batches_of(images, 250), source="images")
    return {**features.quality(s, ref), "mean_pixel": float(images.mean() / 255.0)}
