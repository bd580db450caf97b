"""The typed configuration of a ``jaxdiff train`` run: the network, the process, the data and the
run, as frozen dataclasses; the presets; reading a workdir's ``config.json`` back.

``Config.identity()`` is what a workdir's checkpoints must match (what defines the run's numbers);
the run's length, logging and fault limits may change when it is resumed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tomllib
import types
import typing

__all__ = [
    "Config",
    "DataConfig",
    "DiffusionConfig",
    "ModelConfig",
    "PRESETS",
    "RunConfig",
    "config_from_dict",
    "load_config",
    "load_config_file",
]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The U-Net (denoising-diffusion-pytorch ``Unet`` options, and jaxdiff's execution
    options ``dtype``, the computation dtype, and ``remat``)."""

    dim: int = 16
    dim_mults: tuple[int, ...] = (1, 2, 2)
    dropout: float = 0.0
    attn_heads: int = 4
    attn_dim_head: int = 32
    dtype: str = "float32"
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """The process and the loss (denoising-diffusion-pytorch ``GaussianDiffusion``)."""

    schedule: str = "cosine"
    timesteps: int = 1000
    objective: str = "eps"
    min_snr_gamma: float | None = None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """``digits`` (embedded, no download) or an image folder."""

    dataset: str = "digits"
    image_size: int = 16
    folder: str | None = None
    # None: from the images (a folder is RGB when any file is in colour; digits are grayscale)
    channels: int | None = None
    flip: bool = False


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Length, optimiser and logging of a run."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    save_every: int = 250
    keep: int = 3
    log_every: int = 50
    sample_every: int = 500
    num_samples: int = 64
    sample_steps: int = 50
    max_nonfinite_steps: int = 20
    # quality during training: every eval_every steps (0: never), eval_num DDIM samples (of
    # sample_steps steps) scored with the digits metric, or FID with inception_weights
    eval_every: int = 500
    eval_num: int = 500
    inception_weights: str | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    data: DataConfig = DataConfig()
    run: RunConfig = RunConfig()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """What defines the run's numbers; a workdir's checkpoints must match it. The run's
        length and logging may change on resumption."""
        d = self.to_dict()
        for name in (
            "steps",
            "save_every",
            "keep",
            "log_every",
            "sample_every",
            "num_samples",
            "sample_steps",
            "max_nonfinite_steps",
            "eval_every",
            "eval_num",
            "inception_weights",
        ):
            d["run"].pop(name)
        # remat recomputes the same values; float32, the default dtype, is left out so that
        # workdirs from before the dtype option keep matching
        # the digits are grayscale whether or not the count was resolved yet
        if d["data"]["dataset"] == "digits" and d["data"]["channels"] is None:
            d["data"]["channels"] = 1
        d["model"].pop("remat")
        if d["model"]["dtype"] == "float32":
            d["model"].pop("dtype")
        return d


PRESET_HELP: dict[str, str] = {
    "digits": "the embedded 8x8 digits at 16x16, Unet dim 16 (1, 2, 2), 1500 steps of 64: "
    "recognisable digits in minutes on a 2-core CPU",
    "digits32": "the digits at 32x32, Unet dim 32 (1, 2, 2, 2), 8000 steps of 32",
}

PRESETS: dict[str, Config] = {
    # Draws recognisable digits in a few minutes on a 2-core CPU.
    "digits": Config(),
    "digits32": Config(
        model=ModelConfig(dim=32, dim_mults=(1, 2, 2, 2)),
        data=DataConfig(image_size=32),
        run=RunConfig(steps=8000, batch_size=32),
    ),
}


def choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of the string fields that take one of a few names (by field name)."""
    from jaxdiff import schedules

    return {
        "schedule": tuple(schedules.BETA_SCHEDULES),
        "objective": ("eps", "x0", "v"),
        "dtype": ("float32", "bfloat16", "float16"),
        "dataset": ("digits", "folder"),
    }


def _checked(where: str, value, hint):
    """``value`` as the field type ``hint`` wants it (lists become tuples, ints floats), or a
    ValueError naming the field, the value and the type."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        args = typing.get_args(hint)
    ok = False
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif typing.get_origin(hint) is tuple:
        item = args[0]
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, item) and not isinstance(v, bool) for v in value
        )
        value = tuple(value) if ok else value
    if not ok:
        want = getattr(hint, "__name__", str(hint))
        raise ValueError(f"{where} must be {want}, got {value!r} ({type(value).__name__})")
    return value


def _from_dict(cls, values, base=None, where: str = ""):
    """``cls`` from a (possibly partial) mapping: the given keys replace those of ``base``
    (default ``cls()``); unknown keys and wrongly typed values raise a ValueError naming them."""
    base = cls() if base is None else base
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'the config'} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        section = f"{where} " if where else ""
        raise ValueError(
            f"unknown {section}key(s) {unknown} ({cls.__name__}); allowed: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    out = {}
    for name, value in values.items():
        key = f"{where}.{name}" if where else name
        current = getattr(base, name)
        if dataclasses.is_dataclass(current):
            out[name] = _from_dict(type(current), value, current, key)
        else:
            out[name] = _checked(key, value, hints[name])
            allowed = choices().get(name)
            if allowed and out[name] not in allowed:
                raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")
    return dataclasses.replace(base, **out)


def config_from_dict(values: dict, base: Config | None = None) -> Config:
    """A :class:`Config` from a nested mapping such as ``config.json``'s; missing keys keep
    ``base``'s values (default ``Config()``), so a file may give only what differs.

    Raises:
      ValueError: naming an unknown key (and the allowed ones) or a value of the wrong type.
    """
    return _from_dict(Config, values, base)


def load_config_file(path: str | os.PathLike, base: Config | None = None) -> Config:
    """A :class:`Config` from a ``.json`` or ``.toml`` file, over ``base`` (see
    :func:`config_from_dict`): sections ``model``, ``diffusion``, ``data``, ``run``.

    Raises:
      ValueError: a missing or unparsable file, an unknown key, a value of the wrong type.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} not found")
    try:
        if path.suffix == ".toml":
            values = tomllib.loads(path.read_text())
        else:
            values = json.loads(path.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise ValueError(f"{str(path)!r} is not valid {kind}: {err}") from None
    try:
        return config_from_dict(values, base)
    except ValueError as err:
        raise ValueError(f"{str(path)!r}: {err}") from None


def load_config(workdir: str | os.PathLike) -> Config:
    """The configuration a workdir was trained with (its ``config.json``)."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        raise ValueError(
            f"{str(path)!r} not found: {str(workdir)!r} is not a jaxdiff workdir "
            "(run `jaxdiff train --workdir ...` first)"
        )
    try:
        return config_from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValueError) as err:
        raise ValueError(f"{str(path)!r} is not a valid jaxdiff config: {err}") from None
