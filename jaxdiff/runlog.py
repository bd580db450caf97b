"""The run's log in its workdir: ``metrics.jsonl`` (one strict-JSON line per logged step, the
means over the steps since the last), TensorBoard event files beside it when asked for
(``--tensorboard``; the optional ``tensorboard`` extra), the loss plot ``loss.png``, and the
logging window that sums each step's metrics on the device so that logging costs no host sync
per step."""

from __future__ import annotations

import json
import math
import os
import pathlib
import time

import jax
import jax.numpy as jnp

from jaxdiff import workdir as wd

__all__ = [
    "EVAL_KEYS",
    "MetricsLog",
    "duration",
    "json_line",
    "loss_png",
    "tensorboard_writer",
    "truncate_metrics",
    "window_add",
    "window_init",
    "window_values",
]

EVAL_KEYS = (
    ("digits_fd", "digits Frechet distance of samples during training"),
    ("fid", "FID of samples during training"),
)


def _panel(draw, box, points, title: str, log_scale: bool) -> None:
    """A line plot of ``points`` (step, value) inside ``box`` = (left, top, right, bottom)."""
    left, top, right, bottom = box
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, top - 20), title, fill="black")
    points = [(x, math.log10(max(y, 1e-12)) if log_scale else y) for x, y in points]
    if len(points) < 2:
        return
    xs, ys = zip(*points, strict=True)
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    y1 = y1 if y1 > y0 else y0 + 1

    def to_px(x, y):
        px = left + (x - x0) / max(x1 - x0, 1) * (right - left)
        return px, bottom - (y - y0) / (y1 - y0) * (bottom - top)

    draw.line([to_px(x, y) for x, y in points], fill=(31, 119, 180), width=2)
    for x, y in points if len(points) <= 20 else ():
        px, py = to_px(x, y)
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(31, 119, 180))
    label = (lambda v: f"{10**v:.3g}") if log_scale else (lambda v: f"{v:.3g}")
    draw.text((left, bottom + 8), f"step {x0}", fill="black")
    draw.text((right - 70, bottom + 8), f"step {x1}", fill="black")
    draw.text((left - 46, top), label(y1), fill="black")
    draw.text((left - 46, bottom - 10), label(y0), fill="black")


def loss_png(metrics_path: pathlib.Path, path: pathlib.Path) -> None:
    """Plot the training loss (log scale) against the step from metrics.jsonl and, beside it,
    the Fréchet distance of the evaluations during training (when there are any)."""
    from PIL import Image, ImageDraw

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    loss = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    quality = [(k, n) for k, n in EVAL_KEYS if any(r.get(k) is not None for r in rows)]
    width, height = (1200 if quality else 640), 400
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    _panel(draw, (60, 30, 620, height - 40), loss, "training loss (log scale)", True)
    for key, name in quality[:1]:
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        _panel(draw, (680, 30, width - 20, height - 40), points, name, False)
    img.save(path, format="PNG")


def truncate_metrics(path: pathlib.Path, keep_through: int | None) -> None:
    """Keep only the lines up to the restored step: the steps a killed run logged after its
    last checkpoint are run, and logged, again (and a line torn by the kill is dropped)."""
    lines = path.read_text().splitlines() if path.exists() and keep_through is not None else []
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= keep_through:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    wd.write_atomic(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


_LAST = ("learning_rate", "skipped")  # logged as the window's last value


@jax.jit
def window_add(window: dict, metrics: dict) -> dict:
    """Fold one step's metrics into the logging window, on the device (no host sync): sums of
    the finite values and their counts, the last learning rate, and the decay of the last EMA
    update (steps where the EMA is left alone have decay 1 and are not updates)."""
    out = dict(window)
    for name, value in metrics.items():
        value = value.astype(jnp.float32)
        if name in _LAST:
            out[name] = value
        elif name == "ema_decay":
            out[name] = jnp.where(value < 1, value, window[name])
        else:
            finite = jnp.isfinite(value)
            out[name] = window[name] + jnp.where(finite, value, 0.0)
            out[f"{name}/count"] = window[f"{name}/count"] + finite.astype(jnp.float32)
    return out


def window_init(metrics_shape: dict, previous: dict | None = None) -> dict:
    window = {}
    for name in metrics_shape:
        if name in _LAST:
            window[name] = jnp.zeros((), jnp.float32)
        elif name == "ema_decay":  # carried over: an EMA may update less often than logging
            window[name] = jnp.ones((), jnp.float32) if previous is None else previous[name]
        else:
            window[name] = window[f"{name}/count"] = jnp.zeros((), jnp.float32)
    return window


def window_values(window: dict) -> dict[str, float]:
    """The window's means (NaN when no step of it was finite), last and EMA values."""
    got = {k: float(v) for k, v in jax.device_get(window).items()}
    out = {}
    for name, value in got.items():
        if name.endswith("/count"):
            continue
        count = got.get(f"{name}/count")
        out[name] = value if count is None else (value / count if count else math.nan)
    return out


def duration(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``1h02m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def json_line(values: dict) -> str:
    """One strict-JSON line: a NaN or infinite value is written as null."""
    clean = {
        k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in values.items()
    }
    return json.dumps(clean, allow_nan=False)


def tensorboard_writer():
    """tensorboardX's ``SummaryWriter`` class, or a ValueError that says how to install it."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError as err:
        raise ValueError(
            "--tensorboard writes TensorBoard event files with tensorboardX, which is not "
            "installed: pip install 'jaxdiff[tensorboard]' (or tensorboardX)"
        ) from err
    return SummaryWriter


class MetricsLog:
    """The run's metrics: a line of ``metrics.jsonl`` per :meth:`write` and, with
    ``tensorboard``, the same numbers as TensorBoard scalars in ``<workdir>/tensorboard``.

    A resumed run (``start_step``, the restored checkpoint's step) first drops what the stopped
    run logged after that step, from the JSON lines and (tensorboardX's ``purge_step``) from
    TensorBoard, since those steps run, and are logged, again. A process other than the main
    one (``write=False``) writes nothing.
    """

    def __init__(
        self, workdir: pathlib.Path, *, write: bool, tensorboard: bool, start_step: int | None
    ):
        self.path = workdir / "metrics.jsonl"
        self._tb = None
        if not write:
            self._file = open(os.devnull, "a")  # noqa: SIM115 - closed by close()
            return
        writer = tensorboard_writer() if tensorboard else None
        truncate_metrics(self.path, start_step)
        self._file = open(self.path, "a")  # noqa: SIM115 - closed by close()
        if writer is not None:
            purge = None if start_step is None else start_step + 1
            # a file of its own (the default name has whole seconds: a quick resume would
            # truncate the last run's file)
            suffix = f".{time.time_ns()}"
            self._tb = writer(
                str(workdir / "tensorboard"), purge_step=purge, filename_suffix=suffix
            )

    def write(self, step: int, values: dict) -> None:
        """Log ``values`` (name -> number) at ``step``; a NaN or infinity is null in the JSON
        line and left out of TensorBoard."""
        self._file.write(json_line({"step": step, **values}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(name, value, step)
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
