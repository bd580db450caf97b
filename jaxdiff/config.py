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

__all__ = [
    "Config",
    "DataConfig",
    "DiffusionConfig",
    "ModelConfig",
    "PRESETS",
    "RunConfig",
    "load_config",
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
    channels: int = 1
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
        d["model"].pop("remat")
        if d["model"]["dtype"] == "float32":
            d["model"].pop("dtype")
        return d


PRESETS: dict[str, Config] = {
    # Draws recognisable digits in a few minutes on a 2-core CPU.
    "digits": Config(),
    "digits32": Config(
        model=ModelConfig(dim=32, dim_mults=(1, 2, 2, 2)),
        data=DataConfig(image_size=32),
        run=RunConfig(steps=8000, batch_size=32),
    ),
}


def _from_dict(cls, values: dict):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; allowed: {sorted(fields)}")
    out = {}
    for name, value in values.items():
        if dataclasses.is_dataclass(fields[name].default):
            value = _from_dict(type(fields[name].default), value)
        elif isinstance(value, list):
            value = tuple(value)
        out[name] = value
    return cls(**out)


def load_config(workdir: str | os.PathLike) -> Config:
    """The configuration a workdir was trained with (its ``config.json``)."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        raise ValueError(
            f"{str(path)!r} not found: {str(workdir)!r} is not a jaxdiff workdir "
            "(run `jaxdiff train --workdir ...` first)"
        )
    try:
        return _from_dict(Config, json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{str(path)!r} is not a valid jaxdiff config: {err}") from err
