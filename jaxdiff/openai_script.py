"""openai's script flags -> jaxdiff's openai network and diffusion process.

improved-diffusion's and guided-diffusion's scripts take their network and process as
command-line flags (``--image_size 64 --num_channels 128 --learn_sigma True ...``, the keys of
``script_util.model_and_diffusion_defaults()``), and every published checkpoint comes with such
a line. This module reads that line the way the scripts do (``add_dict_to_argparser``:
``str2bool`` for the booleans, the default's type otherwise) and builds what
``script_util.create_model_and_diffusion`` / ``create_classifier_and_diffusion`` build:

* the network, a :class:`jaxdiff.models.openai_unet.UNetModel` (or ``EncoderUNetModel``, the
  noisy classifier) with the reference's constructor arguments: ``channel_mult`` chosen by
  ``image_size`` (improved-diffusion: 32, 64, 256; guided-diffusion: 64, 128, 256, 512, or its
  ``--channel_mult`` flag), ``attention_resolutions`` as down-sampling rates
  ``image_size // resolution``, 6 output channels with ``learn_sigma``, 1000 classes with
  ``class_cond``; ``use_fp16`` becomes ``dtype="bfloat16"``, ``use_checkpoint`` ``remat=True``;
* the process, :class:`OpenAIDiffusion`: a :class:`jaxdiff.config.DiffusionConfig` (openai's
  loss; ``predict_xstart`` -> objective x0, ``learn_sigma`` -> learned_range, else
  ``sigma_small`` -> fixed_small, else fixed_large; ``use_kl`` -> rescaled_kl, else
  ``rescale_learned_sigmas`` -> rescaled_mse, else mse) and its coefficient table, respaced by
  ``timestep_respacing`` with the network times of ``SpacedDiffusion`` (``model_times``: the
  original timestep, times 1000 / T with ``rescale_timesteps``).

The two repositories differ in their defaults (``rescale_timesteps`` and
``rescale_learned_sigmas`` are True in improved-diffusion, False in guided-diffusion; only
improved-diffusion has ``sigma_small``) and in their flags (guided-diffusion adds
``num_head_channels``, ``channel_mult``, ``resblock_updown``, ``use_fp16``,
``use_new_attention_order``): pass ``layout="improved"`` or ``"guided"``.

Reference: openai/improved-diffusion 1bc7bbb and openai/guided-diffusion 22e0df8,
``script_util.py``; the checks are in ``tests/parity/test_openai_script_parity.py``.
"""

from __future__ import annotations

import difflib
import re
import shlex
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from jaxdiff.config import DiffusionConfig
from jaxdiff.gaussian import DiffusionCoeffs
from jaxdiff.models.openai_unet import EncoderUNetModel, UNetModel, openai_model_from_config
from jaxdiff.objectives import process_coeffs

__all__ = [
    "CLASSIFIER_DEFAULTS",
    "GUIDED_DEFAULTS",
    "IMPROVED_DEFAULTS",
    "SCRIPT_FLAGS",
    "OpenAIDiffusion",
    "create_classifier_and_diffusion",
    "create_model_and_diffusion",
    "parse_flags",
]

NUM_CLASSES = 1000  # script_util's, for class_cond

# improved-diffusion's model_and_diffusion_defaults(), in its order
IMPROVED_DEFAULTS: dict[str, Any] = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    attention_resolutions="16,8", dropout=0.0, learn_sigma=False, sigma_small=False,
    class_cond=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="",
    use_kl=False, predict_xstart=False, rescale_timesteps=True, rescale_learned_sigmas=True,
    use_checkpoint=False, use_scale_shift_norm=True,
)  # fmt: skip
# guided-diffusion's diffusion_defaults(), shared by the model's and the classifier's
_GUIDED_DIFFUSION: dict[str, Any] = dict(
    learn_sigma=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="",
    use_kl=False, predict_xstart=False, rescale_timesteps=False, rescale_learned_sigmas=False,
)  # fmt: skip
# guided-diffusion's model_and_diffusion_defaults()
GUIDED_DEFAULTS: dict[str, Any] = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    num_head_channels=-1, attention_resolutions="16,8", channel_mult="", dropout=0.0,
    class_cond=False, use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False,
    use_fp16=False, use_new_attention_order=False, **_GUIDED_DIFFUSION,
)  # fmt: skip
# guided-diffusion's classifier_and_diffusion_defaults()
CLASSIFIER_DEFAULTS: dict[str, Any] = dict(
    image_size=64, classifier_use_fp16=False, classifier_width=128, classifier_depth=2,
    classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True, classifier_pool="attention", **_GUIDED_DIFFUSION,
)  # fmt: skip

# The flags image_sample.py, classifier_sample.py and image_nll.py add to the model's: options
# of the run, not of the network or the process (jaxdiff's command line has its own).
# Each is named with the jaxdiff option that takes its place.
SCRIPT_FLAGS: dict[str, str] = {
    "clip_denoised": "none: jaxdiff always clips x0 to [-1, 1], the scripts' default",
    "num_samples": "--num", "batch_size": "--batch-size", "use_ddim": "--sampler ddim",
    "model_path": "--openai-checkpoint", "classifier_path": "--classifier-checkpoint",
    "classifier_scale": "--classifier-scale", "data_dir": "--data-dir",
}  # fmt: skip

LAYOUTS = ("guided", "improved")
NOISE_SCHEDULES = ("linear", "cosine")  # openai's get_named_beta_schedule
# channel_mult by image_size, as create_model / create_classifier choose it
_IMPROVED_MULT = {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}
_GUIDED_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                64: (1, 2, 3, 4)}  # fmt: skip
_SIZES = (
    "improved-diffusion's create_model has 32, 64, 256; guided-diffusion's (layout='guided') "
    "64, 128, 256, 512 and any size with --channel_mult; its create_classifier 64, 128, 256, 512"
)
_TRUE, _FALSE = ("yes", "true", "t", "y", "1"), ("no", "false", "f", "n", "0")  # str2bool's
_NEGATIVE_NUMBER = re.compile(r"-\d+|-\d*\.\d+")  # argparse takes these as values, not flags
_MISSING = object()
_DEFAULTS_OF = {"improved": IMPROVED_DEFAULTS, "guided": GUIDED_DEFAULTS}


class OpenAIDiffusion(NamedTuple):
    """The process of openai's ``create_gaussian_diffusion`` (a ``SpacedDiffusion``).

    Attributes:
      config: the :class:`jaxdiff.config.DiffusionConfig` (``loss="openai"``; schedule,
        timesteps, objective, var_type, loss_type and rescale_timesteps from the flags).
      respacing: ``timestep_respacing`` ("250", "ddim25", ...), None for the whole chain.
      coeffs: the (respaced) coefficient table, convention "openai"; call the network at
        ``coeffs.model_times[t]``, what ``SpacedDiffusion``'s wrapped model passes it.
    """

    config: DiffusionConfig
    respacing: str | None
    coeffs: DiffusionCoeffs


def _defaults(layout: str, classifier: bool) -> dict[str, Any]:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if classifier and layout != "guided":
        raise ValueError(
            "the noisy classifier is guided-diffusion's (improved-diffusion has none): pass "
            "layout='guided' with classifier=True"
        )
    return CLASSIFIER_DEFAULTS if classifier else _DEFAULTS_OF[layout]


def _tokens(flags: str | Sequence[str]) -> Iterator[tuple[str, Any]]:
    """``(name, raw value)`` pairs from a command line (``--name value`` or ``--name=value``),
    one at a time: each is checked before the next token is read."""
    if isinstance(flags, str):
        try:
            flags = shlex.split(flags)
        except ValueError as err:  # an unclosed quote
            raise ValueError(f"cannot split the flags {flags!r}: {err}") from None
    elif not (isinstance(flags, Sequence) and all(isinstance(f, str) for f in flags)):
        raise ValueError(
            "flags must be a string ('--image_size 64 --learn_sigma True'), a sequence of such "
            f"tokens or a mapping of name to value, got {type(flags).__name__}"
        )
    i = 0
    while i < len(flags):
        token = flags[i]
        if not token.startswith("--") or len(token) == 2:
            raise ValueError(
                f"unexpected argument {token!r}: flags are written --name value or --name=value"
            )
        if "=" in token:
            name, value = token[2:].split("=", 1)
            i += 1
        else:
            name, value, i = token[2:], _MISSING, i + 1
            after = flags[i] if i < len(flags) else None
            if after is not None and not (
                after.startswith("-") and not _NEGATIVE_NUMBER.fullmatch(after)
            ):
                value, i = after, i + 1
        yield name, value


def _type_name(default: Any) -> str:
    if isinstance(default, bool):
        return "a boolean (yes, true, t, y, 1 or no, false, f, n, 0, any case)"
    return {int: "an integer", float: "a number (float)"}.get(type(default), "a string")


def _unknown(name: str, layout: str, classifier: bool, known: Mapping[str, Any]) -> ValueError:
    source = (
        "guided-diffusion's classifier_and_diffusion_defaults()"
        if classifier
        else f"{layout}-diffusion's model_and_diffusion_defaults()"
    )
    if name in SCRIPT_FLAGS:
        return ValueError(
            f"--{name} is a flag of openai's sampling scripts (image_sample.py, "
            "classifier_sample.py, image_nll.py), not of the network or the diffusion: leave "
            f"it out of the model flags (jaxdiff's option: {SCRIPT_FLAGS[name]})"
        )
    hints = []
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    if close:
        hints.append(f"Did you mean {' or '.join('--' + c for c in close)}?")
    if not classifier and name in CLASSIFIER_DEFAULTS:
        hints.append(
            f"--{name} is a flag of guided-diffusion's classifier: parse it with "
            "classifier=True (create_classifier_and_diffusion)."
        )
    elif classifier and name in GUIDED_DEFAULTS:
        hints.append(f"--{name} is a flag of the diffusion model, not of the classifier.")
    for other in LAYOUTS:
        if not classifier and other != layout and name in _DEFAULTS_OF[other]:
            hints.append(f"--{name} is a flag of {other}-diffusion: pass layout={other!r}.")
    known_list = ", ".join("--" + k for k in known)
    return ValueError(
        " ".join([f"unknown flag --{name} for {source}.", *hints, f"Its flags: {known_list}."])
    )


def _convert(name: str, raw: Any, default: Any) -> Any:
    """``raw`` as the scripts' argparse type of ``default`` (str2bool, int, float, str)."""
    if raw is _MISSING:
        raise ValueError(f"--{name} needs a value: {_type_name(default)}")
    kind = type(default)
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
    elif not isinstance(raw, bool) and kind is int and isinstance(raw, int | str):
        try:
            return int(raw)
        except ValueError:
            pass
    elif not isinstance(raw, bool) and kind is float and isinstance(raw, int | float | str):
        try:
            return float(raw)
        except ValueError:
            pass
    elif kind is str and isinstance(raw, str | int) and not isinstance(raw, bool):
        return str(raw)
    raise ValueError(f"--{name} takes {_type_name(default)}, got {raw!r}")


def parse_flags(
    flags: str | Sequence[str] | Mapping[str, Any], *, layout: str = "guided", classifier=False
) -> dict[str, Any]:
    """Every option of the network and the process: the defaults of ``layout``
    (``IMPROVED_DEFAULTS`` or ``GUIDED_DEFAULTS``; ``CLASSIFIER_DEFAULTS`` with
    ``classifier=True``), overridden by ``flags``.

    ``flags`` is a command line (``"--image_size 64 --learn_sigma True"``, split like a shell;
    ``--name=value`` too), a sequence of its tokens, or a mapping ``name -> value``. Values are
    converted as the scripts' argparse does: a boolean flag takes yes / true / t / y / 1 or
    no / false / f / n / 0 (any case), the others the type of their default (int, float, str;
    ``timestep_respacing`` and ``attention_resolutions`` are strings). A flag given twice keeps
    its last value, as in argparse; abbreviated names are refused. Raises a ValueError naming
    the flag for an unknown flag (with close matches), a value of the wrong type, a flag
    without a value, or a flag of the sampling scripts (``SCRIPT_FLAGS``).
    """
    defaults = _defaults(layout, classifier)
    if isinstance(flags, Mapping):
        pairs = [(str(k).removeprefix("--"), v) for k, v in flags.items()]
    else:
        pairs = _tokens(flags)
    options = dict(defaults)
    for name, raw in pairs:
        if name not in defaults:
            raise _unknown(name, layout, classifier, defaults)
        options[name] = _convert(name, raw, defaults[name])
    return options


def _channel_mult(image_size: int, flag: str, table: dict, what: str) -> tuple:
    if flag:  # guided's --channel_mult
        try:
            return tuple(int(m) for m in flag.split(","))
        except ValueError:
            raise ValueError(
                "--channel_mult takes comma-separated integers (guided-diffusion's create_model "
                f"reads each with int()), got {flag!r}"
            ) from None
    if image_size not in table:
        raise ValueError(
            f"unsupported --image_size {image_size} for {what}, which chooses channel_mult by "
            f"image size: {_SIZES}"
        )
    return table[image_size]


def _attention_rates(image_size: int, resolutions: str, flag: str) -> tuple[int, ...]:
    """``image_size // int(res)`` for each resolution, as create_model computes them (a rate of
    0, a resolution above image_size, matches no level there: it is left out here)."""
    try:
        values = [int(r) for r in resolutions.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise ValueError(
            f"--{flag} takes comma-separated positive integers, the resolutions with attention "
            f"(e.g. 32,16,8), got {resolutions!r}"
        )
    return tuple(r for r in (image_size // v for v in values) if r >= 1)


def _diffusion(options: Mapping[str, Any]) -> OpenAIDiffusion:
    """create_gaussian_diffusion (with ``sigma_small`` only where the layout has it)."""
    schedule, steps = options["noise_schedule"], options["diffusion_steps"]
    if schedule not in NOISE_SCHEDULES:
        raise ValueError(
            f"unknown --noise_schedule {schedule!r}; openai's get_named_beta_schedule has "
            f"{' and '.join(NOISE_SCHEDULES)}"
        )
    if steps < 1:
        raise ValueError(f"--diffusion_steps must be a positive integer, got {steps}")
    if options["learn_sigma"]:
        var_type = "learned_range"
    else:
        var_type = "fixed_small" if options.get("sigma_small", False) else "fixed_large"
    if options["use_kl"]:
        loss_type = "rescaled_kl"
    else:
        loss_type = "rescaled_mse" if options["rescale_learned_sigmas"] else "mse"
    config = DiffusionConfig(
        schedule=schedule,
        timesteps=steps,
        objective="x0" if options["predict_xstart"] else "eps",
        loss="openai",
        var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=options["rescale_timesteps"],
    )
    respacing = options["timestep_respacing"] or None
    return OpenAIDiffusion(config, respacing, process_coeffs(config, "openai", respacing))


def _build(kind: str, reference: dict[str, Any], **options) -> UNetModel | EncoderUNetModel:
    try:
        return openai_model_from_config(reference, model=kind, **options)
    except ValueError as err:
        raise ValueError(f"these flags give a {kind} that cannot be built: {err}") from None


def create_model_and_diffusion(
    flags: str | Sequence[str] | Mapping[str, Any], *, layout: str = "guided", dtype=None
) -> tuple[UNetModel, OpenAIDiffusion]:
    """The network and the process of ``script_util.create_model_and_diffusion``.

    Args:
      flags: the model and diffusion flags, as :func:`parse_flags` takes them.
      layout: "guided" (guided-diffusion's flags and defaults) or "improved"; also the
        network's layout (improved-diffusion's UNetModel refuses guided's extra options).
      dtype: the network's compute dtype; None: "bfloat16" with ``--use_fp16 True``, else the
        parameters' dtype (float32).

    Returns:
      ``(UNetModel, OpenAIDiffusion)``. Import a checkpoint's weights with
      :func:`jaxdiff.convert_openai.openai_state_dict_to_params`.
    """
    o = parse_flags(flags, layout=layout)
    size = o["image_size"]
    if layout == "improved":
        mult = _channel_mult(size, "", _IMPROVED_MULT, "improved-diffusion's create_model")
    else:
        what = "guided-diffusion's create_model"
        mult = _channel_mult(size, o["channel_mult"], _GUIDED_MULT, what)
    rates = _attention_rates(size, o["attention_resolutions"], "attention_resolutions")
    # the constructor arguments create_model passes (use_checkpoint and use_fp16 are mapped)
    reference = dict(
        in_channels=3, model_channels=o["num_channels"], out_channels=6 if o["learn_sigma"] else 3,
        num_res_blocks=o["num_res_blocks"], attention_resolutions=rates, dropout=o["dropout"],
        channel_mult=mult, num_classes=NUM_CLASSES if o["class_cond"] else None,
        use_checkpoint=o["use_checkpoint"], num_heads=o["num_heads"],
        num_heads_upsample=o["num_heads_upsample"], use_scale_shift_norm=o["use_scale_shift_norm"],
    )  # fmt: skip
    if layout == "guided":
        extra = ("use_fp16", "num_head_channels", "resblock_updown", "use_new_attention_order")
        reference.update(image_size=size, **{name: o[name] for name in extra})
    model = _build("UNetModel", reference, layout=layout, dtype=dtype)
    return model, _diffusion(o)


def create_classifier_and_diffusion(
    flags: str | Sequence[str] | Mapping[str, Any], *, dtype=None
) -> tuple[EncoderUNetModel, OpenAIDiffusion]:
    """guided-diffusion's noisy classifier and its process
    (``script_util.create_classifier_and_diffusion``): an ``EncoderUNetModel`` with 1000
    outputs, ``classifier_width`` channels, ``classifier_depth`` ResBlocks per level,
    ``channel_mult`` by ``image_size`` (64, 128, 256, 512), 64 channels per attention head and
    ``classifier_pool``. ``dtype``: None is "bfloat16" with ``--classifier_use_fp16 True``.
    """
    o = parse_flags(flags, classifier=True)
    size = o["image_size"]
    rates = _attention_rates(
        size, o["classifier_attention_resolutions"], "classifier_attention_resolutions"
    )
    mult = _channel_mult(size, "", _GUIDED_MULT, "guided-diffusion's create_classifier")
    reference = dict(
        image_size=size, in_channels=3, model_channels=o["classifier_width"],
        out_channels=NUM_CLASSES, num_res_blocks=o["classifier_depth"],
        attention_resolutions=rates, channel_mult=mult, use_fp16=o["classifier_use_fp16"],
        num_head_channels=64, use_scale_shift_norm=o["classifier_use_scale_shift_norm"],
        resblock_updown=o["classifier_resblock_updown"], pool=o["classifier_pool"],
    )  # fmt: skip
    return _build("EncoderUNetModel", reference, dtype=dtype), _diffusion(o)
