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
    "OptimConfig",
    "PRESETS",
    "RunConfig",
    "config_from_dict",
    "load_config",
    "load_config_file",
    "validate",
]


# the `jaxdiff sample` / `eval` choices (jaxdiff.workdir.SOLVERS builds each fast solver;
# kept here so that the command line does not import JAX to list them)
SAMPLERS = ("ddim", "ddpm", "dpmpp-2m", "dpmpp-3m", "dpmpp-2m-sde", "dpmpp-2s", "dpmpp-3s",
            "unipc-bh1", "unipc-bh2", "euler", "euler-a", "heun", "dpm2", "lms")  # fmt: skip
SAMPLER_GRIDS = ("linspace", "leading", "trailing", "karras", "exponential")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network: ``arch`` "lucid" is denoising-diffusion-pytorch's ``Unet`` (its options
    below), "openai" is improved/guided-diffusion's ``UNetModel`` (``dim`` is its
    ``model_channels``, ``dim_mults`` its ``channel_mult``, ``dropout`` and ``num_classes`` are
    shared, the ``num_res_blocks`` ... ``use_new_attention_order`` fields are its own, with
    ``attention_resolutions`` in pixels as its scripts take them); jaxdiff's execution options
    ``dtype``, the computation dtype, and ``remat``."""

    arch: str = "lucid"
    dim: int = 16
    dim_mults: tuple[int, ...] = (1, 2, 2)
    dropout: float = 0.0
    attn_heads: int = 4
    attn_dim_head: int = 32
    # the Unet's time embedding: learned sinusoidal or random Fourier features of that dim
    learned_sinusoidal_cond: bool = False
    random_fourier_features: bool = False
    learned_sinusoidal_dim: int = 16
    num_mem_kv: int = 4
    # self-conditioning (Chen et al. 2022): the network also sees its own x0 estimate
    self_condition: bool = False
    # class conditioning (denoising-diffusion-pytorch's classifier_free_guidance.Unet): the
    # number of classes (None: unconditional) and the probability that training drops a label
    # (the null class), which classifier-free guidance needs
    num_classes: int | None = None
    cond_drop_prob: float = 0.5
    # openai's UNetModel (arch "openai"): its script_util options, attention where the feature
    # map is one of these sizes in pixels
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16, 8)
    num_heads: int = 4
    num_head_channels: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    dtype: str = "float32"
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """The process and the loss.

    ``loss`` picks the objective (:func:`jaxdiff.objectives.diffusion_loss_fn`): ``"simple"`` is
    denoising-diffusion-pytorch's ``p_losses`` (``objective`` eps, x0 or v; ``min_snr_gamma``,
    ``offset_noise_strength``, self-conditioning); ``"openai"`` is improved-diffusion's
    ``training_losses`` (``objective`` eps, x0 or prev_x, ``var_type``, ``loss_type``; a learned
    variance with ``loss_type="mse"`` is L_hybrid, with ``"kl"`` L_vlb; ``vb_weight`` is
    denoising-diffusion-pytorch's hybrid weight, None for improved-diffusion's T/1000;
    ``timestep_sampler="loss-second-moment"`` is its importance sampling of t);
    ``"continuous"`` is the continuous-time process of ``log_snr_schedule`` (+ ``log_snr_shift``)
    with ``objective`` eps or v.
    """

    schedule: str = "cosine"
    timesteps: int = 1000
    objective: str = "eps"
    min_snr_gamma: float | None = None
    loss: str = "simple"
    var_type: str = "fixed_small"
    loss_type: str = "mse"
    vb_weight: float | None = None
    rescale_timesteps: bool = False
    offset_noise_strength: float = 0.0
    timestep_sampler: str = "uniform"
    log_snr_schedule: str = "cosine"
    log_snr_shift: float = 0.0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimiser (the learning rate itself is ``run.lr``): Adam or AdamW after global-norm
    clipping (None: no clipping), a linear warm-up and a decay of the learning rate (optax
    schedules; ``decay_steps`` None is the run's length when it starts, then recorded),
    gradient accumulation over micro-batches, and ema-pytorch's EMA schedule."""

    optimizer: str = "adam"
    b1: float = 0.9
    b2: float = 0.99
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    warmup_steps: int = 0
    lr_decay: str = "constant"
    decay_steps: int | None = None
    end_lr_ratio: float = 0.0
    grad_accum_steps: int = 1
    ema_decay: float = 0.995
    ema_update_every: int = 10
    ema_update_after_step: int = 100


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """``digits`` (embedded, no download) or an image folder."""

    dataset: str = "digits"
    image_size: int = 16
    folder: str | None = None
    # None: from the images (a folder is RGB when any file is in colour; digits are grayscale)
    channels: int | None = None
    flip: bool = False
    # a folder's held-out share (data.folder_split, by file name): trained on the rest, measured
    # by bpd and eval; 0 holds out nothing. The digits have their fixed split (184 images).
    test_fraction: float = 0.0


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
    sample_every: int = 500  # 0: never
    num_samples: int = 64
    sample_steps: int = 50
    max_nonfinite_steps: int = 20
    # quality during training: every eval_every steps (0: never), eval_num DDIM samples (of
    # sample_steps steps) scored with the digits metric, or FID with inception_weights
    eval_every: int = 500
    eval_num: int = 500
    inception_weights: str | None = None
    # TensorBoard event files in <workdir>/tensorboard beside metrics.jsonl (tensorboardX)
    tensorboard: bool = False


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    optim: OptimConfig = OptimConfig()
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
            "tensorboard",
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
        # options added after the first workdirs were written count only when they differ from
        # their defaults, so that those workdirs keep matching
        for section, cls in (
            ("model", ModelConfig),
            ("diffusion", DiffusionConfig),
            ("data", DataConfig),
        ):
            for name in _ADDED[section]:
                if d[section][name] == getattr(cls(), name):
                    d[section].pop(name)
        if d["optim"] == dataclasses.asdict(OptimConfig()):
            d.pop("optim")
        return d


# the ModelConfig fields of openai's UNetModel alone, and those of the lucid Unet alone
OPENAI_FIELDS = (
    "num_res_blocks",
    "attention_resolutions",
    "num_heads",
    "num_head_channels",
    "use_scale_shift_norm",
    "resblock_updown",
    "use_new_attention_order",
)
LUCID_FIELDS = (
    "attn_heads",
    "attn_dim_head",
    "learned_sinusoidal_cond",
    "random_fourier_features",
    "learned_sinusoidal_dim",
    "num_mem_kv",
    "self_condition",
)

_ADDED = {
    "model": (
        "learned_sinusoidal_cond",
        "random_fourier_features",
        "learned_sinusoidal_dim",
        "num_mem_kv",
        "self_condition",
        "num_classes",
        "cond_drop_prob",
        "arch",
        *OPENAI_FIELDS,
    ),
    "diffusion": (
        "loss",
        "var_type",
        "loss_type",
        "vb_weight",
        "rescale_timesteps",
        "offset_noise_strength",
        "timestep_sampler",
        "log_snr_schedule",
        "log_snr_shift",
    ),
    "data": ("test_fraction",),
}


PRESET_HELP: dict[str, str] = {
    "digits": "the embedded 8x8 digits at 16x16, Unet dim 16 (1, 2, 2), 1500 steps of 64, "
    "L_simple (eps, fixed variance, cosine): recognisable digits in minutes on a 2-core CPU",
    "digits-hybrid": "digits with improved DDPM's L_hybrid: learned-range variance, "
    "L_simple + L_vlb (rescaled_mse), cosine",
    "digits-vlb": "digits with improved DDPM's L_vlb (rescaled_kl, learned-range variance) and "
    "importance sampling of t (loss-second-moment)",
    "digits-continuous": "digits with the continuous-time process (cosine log-SNR), v prediction",
    "digits-cond": "class-conditional digits (10 classes, labels dropped with probability 0.2 "
    "for classifier-free guidance)",
    "digits-openai": "digits with openai's UNetModel (model_channels 32, channel_mult 1,2,2, "
    "one ResBlock per level, attention at 8x8 and 4x4, scale-shift norm) and improved DDPM's "
    "L_hybrid (learned-range variance, rescaled_mse, cosine)",
    "digits32": "the digits at 32x32, Unet dim 32 (1, 2, 2, 2), 8000 steps of 32",
}

PRESETS: dict[str, Config] = {
    # Draws recognisable digits in a few minutes on a 2-core CPU.
    "digits": Config(),
    "digits-hybrid": Config(
        diffusion=DiffusionConfig(loss="openai", var_type="learned_range", loss_type="rescaled_mse")
    ),
    "digits-vlb": Config(
        diffusion=DiffusionConfig(
            loss="openai",
            var_type="learned_range",
            loss_type="rescaled_kl",
            timestep_sampler="loss-second-moment",
        )
    ),
    "digits-continuous": Config(diffusion=DiffusionConfig(loss="continuous", objective="v")),
    "digits-cond": Config(model=ModelConfig(num_classes=10, cond_drop_prob=0.2)),
    "digits-openai": Config(
        model=ModelConfig(arch="openai", dim=32, num_res_blocks=1, attention_resolutions=(8, 4)),
        diffusion=DiffusionConfig(
            loss="openai", var_type="learned_range", loss_type="rescaled_mse"
        ),
    ),
    "digits32": Config(
        model=ModelConfig(dim=32, dim_mults=(1, 2, 2, 2)),
        data=DataConfig(image_size=32),
        run=RunConfig(steps=8000, batch_size=32),
    ),
}


def choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of the string fields that take one of a few names (by field name)."""
    from jaxdiff import gaussian, losses, schedules

    return {
        "schedule": tuple(schedules.BETA_SCHEDULES),
        "objective": ("eps", "x0", "v", "prev_x"),
        "loss": ("simple", "openai", "continuous"),
        "var_type": gaussian.VAR_TYPES,
        "loss_type": losses.LOSS_TYPES,
        "timestep_sampler": TIMESTEP_SAMPLERS,
        "log_snr_schedule": tuple(sorted(schedules.LOG_SNR_SCHEDULES)),
        "optimizer": ("adam", "adamw"),
        "lr_decay": ("constant", "cosine", "linear"),
        "dtype": ("float32", "bfloat16", "float16"),
        "dataset": ("digits", "folder"),
        "arch": ("lucid", "openai"),
    }


TIMESTEP_SAMPLERS = ("uniform", "loss-second-moment")


def validate(config: Config) -> Config:
    """``config`` when its fields agree with each other, else a ValueError that names the
    fields and the fix. (Each field's type and name is checked when it is read.)"""
    m, d, o, r = config.model, config.diffusion, config.optim, config.run
    learned = d.var_type in ("learned", "learned_range")

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    need(d.timesteps >= 1, f"diffusion.timesteps must be >= 1, got {d.timesteps}")
    f = config.data.test_fraction
    need(0 <= f < 1, f"data.test_fraction must be in [0, 1), got {f}")
    need(
        f == 0 or config.data.dataset == "folder",
        "--test-fraction holds out part of an image folder; the digits have their fixed "
        "held-out split",
    )
    if d.loss == "simple":
        need(
            d.objective in ("eps", "x0", "v"),
            f"loss 'simple' predicts eps, x0 or v, not {d.objective!r} "
            "(prev_x needs --loss openai)",
        )
        need(
            not learned,
            f"var_type {d.var_type!r} is learned, which needs improved-diffusion's loss: pass "
            "--loss openai (L_hybrid with --loss-type mse, L_vlb with --loss-type kl)",
        )
        need(d.loss_type == "mse", "loss_type is an option of --loss openai; loss 'simple' is mse")
    if d.loss == "openai":
        need(
            d.objective in ("eps", "x0", "prev_x"),
            f"improved-diffusion's loss predicts eps, x0 or prev_x, not {d.objective!r} "
            "(v needs --loss simple or continuous)",
        )
        need(not m.self_condition, "self-conditioning needs --loss simple")
        need(not d.offset_noise_strength, "offset noise needs --loss simple")
        need(d.min_snr_gamma is None, "min_snr_gamma needs --loss simple or continuous")
    if d.loss == "continuous":
        need(
            d.objective in ("eps", "v"),
            f"the continuous-time loss predicts eps or v, not {d.objective!r}",
        )
        need(d.var_type == "fixed_small", "the continuous-time process has no var_type option")
        need(d.loss_type == "mse", "loss_type is an option of --loss openai")
        need(
            d.timestep_sampler == "uniform",
            "importance sampling of t needs a discrete loss (--loss simple or openai)",
        )
        need(not m.self_condition, "self-conditioning needs --loss simple")
        need(not d.offset_noise_strength, "offset noise needs --loss simple")
    need(
        d.vb_weight is None or (learned and d.loss == "openai"),
        "vb_weight weighs the variational term of a learned variance (--var-type learned_range)",
    )
    need(
        not d.rescale_timesteps or d.loss != "continuous",
        "rescale_timesteps is an option of the discrete process",
    )
    if m.arch == "openai":
        _validate_openai(m, config.data.image_size, need)
    else:
        changed = [f for f in OPENAI_FIELDS if getattr(m, f) != getattr(ModelConfig(), f)]
        need(
            not changed,
            f"{', '.join(changed)}: options of openai's UNetModel; pass --arch openai "
            "(or leave them out)",
        )
    if m.num_classes is not None:
        need(m.num_classes >= 1, f"num_classes must be >= 1, got {m.num_classes}")
        need(not m.self_condition, "the class-conditional Unet has no self-conditioning")
        need(
            m.dropout == 0 or m.arch == "openai",
            "the class-conditional Unet has no dropout option (--dropout 0)",
        )
        need(m.num_mem_kv == 4, "the class-conditional Unet has no num_mem_kv option")
    need(
        0.0 <= m.cond_drop_prob <= 1.0, f"cond_drop_prob must be in [0, 1], got {m.cond_drop_prob}"
    )
    need(r.lr > 0, f"lr must be > 0, got {r.lr}")
    for name in ("save_every", "log_every"):
        need(getattr(r, name) >= 1, f"{name} must be >= 1, got {getattr(r, name)}")
    for name in ("sample_every", "eval_every"):
        need(getattr(r, name) >= 0, f"{name} must be >= 0 (0: never), got {getattr(r, name)}")
    need(
        o.weight_decay == 0 or o.optimizer == "adamw",
        f"weight_decay {o.weight_decay} needs --optimizer adamw (Adam has no decoupled decay)",
    )
    need(o.weight_decay >= 0, f"weight_decay must be >= 0, got {o.weight_decay}")
    need(
        o.max_grad_norm is None or o.max_grad_norm > 0,
        f"max_grad_norm must be > 0 (or null for no clipping), got {o.max_grad_norm}",
    )
    need(o.warmup_steps >= 0, f"warmup_steps must be >= 0, got {o.warmup_steps}")
    need(
        o.decay_steps is None or o.decay_steps > o.warmup_steps,
        f"decay_steps ({o.decay_steps}) must exceed warmup_steps ({o.warmup_steps})",
    )
    need(0.0 <= o.end_lr_ratio <= 1.0, f"end_lr_ratio must be in [0, 1], got {o.end_lr_ratio}")
    need(o.grad_accum_steps >= 1, f"grad_accum_steps must be >= 1, got {o.grad_accum_steps}")
    need(
        r.batch_size % o.grad_accum_steps == 0,
        f"batch_size {r.batch_size} is not divisible by grad_accum_steps {o.grad_accum_steps}",
    )
    need(0.0 <= o.ema_decay <= 1.0, f"ema_decay must be in [0, 1], got {o.ema_decay}")
    need(
        o.ema_update_every >= 1 and o.ema_update_after_step >= 0,
        "need ema_update_every >= 1 and ema_update_after_step >= 0",
    )
    return config


def _validate_openai(m: ModelConfig, image_size: int, need) -> None:
    """The ModelConfig of openai's UNetModel (``arch="openai"``): no lucid-only option, a
    valid attention and head layout, and no label dropout (the network has no null class)."""
    changed = [f for f in LUCID_FIELDS if getattr(m, f) != getattr(ModelConfig(), f)]
    need(
        not changed,
        f"{', '.join(changed)}: options of the lucid Unet, which openai's UNetModel (--arch "
        "openai) does not have; leave them out",
    )
    narrow = [w for w in (int(f * m.dim) for f in m.dim_mults) if w <= 0 or w % 32]
    need(
        not narrow,
        f"openai's UNetModel normalises with GroupNorm(32): every level's width dim * dim_mult "
        f"must be a multiple of 32, got {narrow} (dim {m.dim}, dim_mults {list(m.dim_mults)}); "
        "try --dim 32",
    )
    need(m.num_res_blocks >= 1, f"num_res_blocks must be >= 1, got {m.num_res_blocks}")
    need(
        m.num_heads >= 1 or m.num_head_channels > 0,
        f"num_heads must be >= 1 (or num_head_channels > 0), got {m.num_heads}",
    )
    sizes = {image_size // 2**i for i in range(len(m.dim_mults))}
    unused = sorted(set(m.attention_resolutions) - sizes, reverse=True)
    need(
        not unused,
        f"attention_resolutions {list(m.attention_resolutions)}: no level of this network has "
        f"a feature map of size {unused} (the sizes are {sorted(sizes, reverse=True)} for "
        f"image_size {image_size} and {len(m.dim_mults)} levels)",
    )
    need(
        m.num_classes is None or m.cond_drop_prob == 0,
        "openai's UNetModel has no null class, so it cannot drop labels for classifier-free "
        "guidance: pass --cond-drop-prob 0 (guided-diffusion trains its class-conditional "
        "models without label dropout and guides them with a noisy classifier)",
    )


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
    return validate(_from_dict(Config, values, base))


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
