"""openai checkpoints (improved-diffusion, guided-diffusion) <-> jaxdiff Flax parameters, for
:class:`~jaxdiff.models.openai_unet.UNetModel`, ``SuperResModel`` and ``EncoderUNetModel``.

The key map is derived from the Flax parameter tree of the configured network (an abstract
initialisation, free): every Flax module is named after the reference's module path with an
index written ``_N`` (``input_blocks_4/0/in_layers_2`` is ``input_blocks.4.0.in_layers.2``), so
every Flax parameter has exactly one PyTorch key and vice versa. A conversion checks both
directions before it moves a number: a missing key, an unexpected key or a shape mismatch raises
a ``ValueError`` naming every offending key (usually the checkpoint comes from a network with
another configuration). Values are only transposed / reshaped and held as float32 (float16 and
bfloat16 tensors widen exactly), never recomputed, so a float32 state_dict survives
``state_dict -> params -> state_dict`` bit for bit.

Layouts (PyTorch -> Flax):

* ``Conv2d`` weight ``[O, I, kh, kw]`` -> ``kernel [kh, kw, I, O]`` (the 3x3 convolutions and
  the 1x1 shortcut / classifier convolutions);
* ``Conv1d`` 1x1 weight ``[O, I, 1]`` (attention ``qkv``, ``proj_out``, the attention pool's
  ``qkv_proj``, ``c_proj``) and ``Linear`` weight ``[O, I]`` -> Dense ``kernel [I, O]``;
* GroupNorm weight / bias -> ``scale`` / ``bias``; ``label_emb.weight`` -> ``embedding``; the
  attention pool's ``positional_embedding [C, HW + 1]`` is kept as it is.

torch is imported only inside :func:`load_openai_pt` and :func:`save_openai_pt`; a file that
cannot be read (missing, a directory, empty, truncated, junk, a pickle of something else, or a
``.pt`` without torch installed) raises a one-line ``FileNotFoundError`` or ``ValueError`` naming
the file and what was expected (the readers of :mod:`jaxdiff.convert`).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdiff._numpy import to_numpy
from jaxdiff.convert import (
    _PT_EXPECTED,
    _corrupt,
    _listed,
    _read_npz_file,
    _read_torch_file,
    _unwrap_params,
    _write_atomic,
)
from jaxdiff.convert_keymaps import _KINDS, KeyMapEntry
from jaxdiff.models.openai_layers import CONV1D_MODULES
from jaxdiff.models.openai_unet import EncoderUNetModel, SuperResModel, UNetModel

__all__ = [
    "KeyMapEntry",
    "load_openai_pt",
    "load_openai_state_dict",
    "openai_key_map",
    "openai_state_dict_to_params",
    "params_to_openai_state_dict",
    "save_openai_pt",
]

OpenAIModel = UNetModel | SuperResModel | EncoderUNetModel

# (PyTorch -> Flax, Flax -> PyTorch, Flax shape -> PyTorch shape), as convert_keymaps._KINDS
_OPENAI_KINDS = {
    "conv": _KINDS["conv"],
    "linear": _KINDS["linear"],
    "same": _KINDS["same"],
    "conv1d": (lambda w: w[..., 0].T, lambda w: w.T[..., None], lambda s: (s[1], s[0], 1)),
}
_LEAF = {
    "kernel": "weight",
    "scale": "weight",
    "embedding": "weight",
    "bias": "bias",
    "positional_embedding": "positional_embedding",
}
_INDEXED = re.compile(r"(.+)_(\d+)")
_LIKELY_CAUSE = (
    "The checkpoint was probably saved from a network with another configuration: compare "
    "image_size, model_channels, channel_mult, num_res_blocks, attention_resolutions, "
    "num_classes (class_cond), out_channels (learn_sigma doubles it), num_heads / "
    "num_head_channels, use_scale_shift_norm, resblock_updown and, for the classifier, pool "
    "(the flags of the reference's script_util)."
)

# ----------------------------------------------------------------------------------------------
# The key map


def _abstract_inputs(model: OpenAIModel) -> tuple[tuple, dict]:
    """Shape-only inputs that initialise ``model`` (the smallest image it accepts)."""
    factor = model.plan().downsample_factor
    side = factor
    if isinstance(model, EncoderUNetModel) and model.pool == "attention":
        side = model.image_size // factor * factor
    x = jax.ShapeDtypeStruct((1, side, side, model.in_channels), jnp.float32)
    args, kwargs = (x, jax.ShapeDtypeStruct((1,), jnp.float32)), {}
    if isinstance(model, UNetModel) and model.num_classes is not None:
        kwargs["y"] = jax.ShapeDtypeStruct((1,), jnp.int32)
    if isinstance(model, SuperResModel):
        kwargs["low_res"] = x
    return args, kwargs


def _torch_key(path: tuple[str, ...]) -> str:
    """The PyTorch key of the Flax parameter at ``path``."""
    parts = []
    for name in path[:-1]:
        indexed = _INDEXED.fullmatch(name)
        parts.append(f"{indexed[1]}.{indexed[2]}" if indexed else name)
    return ".".join([*parts, _LEAF[path[-1]]])


@functools.lru_cache(maxsize=32)
def _key_map(model: OpenAIModel) -> tuple[tuple[str, KeyMapEntry], ...]:
    args, kwargs = _abstract_inputs(model)
    variables = jax.eval_shape(model.init, jax.random.key(0), *args, **kwargs)
    table: dict[str, KeyMapEntry] = {}
    for path, leaf in traverse_util.flatten_dict(variables["params"]).items():
        key = _torch_key(path)
        shape = tuple(leaf.shape)
        if path[-1] == "kernel" and len(shape) == 4:
            kind = "conv"
        elif path[-1] == "kernel":
            kind = "conv1d" if path[-2] in CONV1D_MODULES else "linear"
        else:
            kind = "same"
        if key in table:
            raise AssertionError(f"two Flax parameters map to {key}: {table[key][0]}, {path}")
        table[key] = KeyMapEntry(path, kind, _OPENAI_KINDS[kind][2](shape), shape)
    return tuple(table.items())


def _model(model: Any) -> OpenAIModel:
    if not isinstance(model, UNetModel | EncoderUNetModel):
        raise ValueError(
            "model must be a jaxdiff.models.openai_unet UNetModel, SuperResModel or "
            f"EncoderUNetModel, got {type(model).__name__}"
        )
    return model.clone(parent=None, name=None)


def openai_key_map(model: OpenAIModel) -> dict[str, KeyMapEntry]:
    """``{torch_key: KeyMapEntry}`` for the configured network: a bijection onto its Flax tree."""
    return dict(_key_map(_model(model)))


# ----------------------------------------------------------------------------------------------
# Checks


def _architecture_hint(have: set, model: OpenAIModel) -> str:
    """Where a state_dict is of another kind of network, say which."""
    if not have:
        return " The state_dict is empty."
    heads = {k.split(".", 1)[0] for k in have}
    if len(heads) == 1 and heads.pop() in {"module", "model", "ema", "ema_model"}:
        return " Every key carries one prefix (a training wrapper's): strip it first."
    has_up = any(k.startswith("output_blocks.") for k in have)
    if isinstance(model, EncoderUNetModel) and has_up:
        return " The state_dict has output_blocks: it is a UNetModel's, not a classifier's."
    if (
        isinstance(model, UNetModel)
        and not has_up
        and any(k.startswith("input_blocks.") for k in have)
    ):
        return (
            " The state_dict has no output_blocks: it looks like an EncoderUNetModel's (the "
            "noisy classifier)."
        )
    if isinstance(model, UNetModel):
        if "label_emb.weight" in have and model.num_classes is None:
            return " The state_dict has label_emb.weight: build the network with num_classes."
        if "label_emb.weight" not in have and model.num_classes is not None:
            return (
                " The state_dict has no label_emb.weight: build the network with num_classes=None."
            )
    return ""


def _check_keys(have, expected, what: str, model: OpenAIModel) -> None:
    have, expected = set(have), set(expected)
    missing, unexpected = expected - have, have - expected
    if not (missing or unexpected):
        return
    lines = [f"{what} does not match the {type(model).__name__} configuration."]
    if missing:
        lines.append(f"Missing {len(missing)} key(s): {_listed(missing)}.")
    if unexpected:
        lines.append(f"Unexpected {len(unexpected)} key(s): {_listed(unexpected)}.")
    raise ValueError(" ".join(lines) + " " + _LIKELY_CAUSE + _architecture_hint(have, model))


def _check_shapes(pairs, what: str) -> None:
    bad = [
        f"{k}: got {tuple(got)}, expected {tuple(want)}" for k, got, want in pairs if got != want
    ]
    if bad:
        more = f"; ... and {len(bad) - 12} more" if len(bad) > 12 else ""
        raise ValueError(
            f"{what}: {len(bad)} shape mismatch(es): {'; '.join(bad[:12])}{more}. {_LIKELY_CAUSE}"
        )


# ----------------------------------------------------------------------------------------------
# Conversion


def openai_state_dict_to_params(state_dict: Mapping[str, Any], model: OpenAIModel) -> dict:
    """Flax variables ``{"params": ...}`` of ``model`` from the reference network's
    ``state_dict()`` (improved-diffusion or guided-diffusion, the same keys).

    Args:
      state_dict: ``{key: array}`` keyed exactly as the reference's ``state_dict()`` (numpy
        arrays or torch tensors), e.g. from :func:`load_openai_pt`.
      model: the configured network (UNetModel, SuperResModel or EncoderUNetModel).

    Returns:
      ``{"params": tree}`` of float32 arrays, ready for ``model.apply``.

    Raises:
      ValueError: naming every missing, unexpected or mis-shaped key.
    """
    model = _model(model)
    table = openai_key_map(model)
    _check_keys(state_dict.keys(), table.keys(), "The openai state_dict", model)
    arrays = {k: to_numpy(v) for k, v in state_dict.items()}
    _check_shapes(
        ((k, arrays[k].shape, table[k].torch_shape) for k in sorted(table)),
        "The openai state_dict",
    )
    flat = {}
    for key, entry in table.items():
        value = _OPENAI_KINDS[entry.kind][0](arrays[key])
        flat[entry.flax_path] = jnp.asarray(np.ascontiguousarray(value, dtype=np.float32))
    return {"params": traverse_util.unflatten_dict(flat)}


def params_to_openai_state_dict(params: Mapping, model: OpenAIModel) -> dict[str, np.ndarray]:
    """The reference network's ``state_dict()`` (float32 numpy arrays) from Flax parameters
    (``{"params": tree}`` or the bare tree): the exact inverse of
    :func:`openai_state_dict_to_params`. Load it in PyTorch with
    ``net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``.

    Raises:
      ValueError: naming every missing, unexpected or mis-shaped parameter.
    """
    model = _model(model)
    table = openai_key_map(model)
    flat = traverse_util.flatten_dict(dict(_unwrap_params(params)))
    named = {"/".join(path): value for path, value in flat.items()}
    expected = {"/".join(e.flax_path): key for key, e in table.items()}
    _check_keys(named.keys(), expected.keys(), "The Flax parameter tree", model)
    arrays = {expected[name]: np.asarray(value) for name, value in named.items()}
    _check_shapes(
        (
            (f"{'/'.join(e.flax_path)} (PyTorch {key})", arrays[key].shape, e.flax_shape)
            for key, e in sorted(table.items())
        ),
        "The Flax parameter tree",
    )
    return {
        key: np.array(_OPENAI_KINDS[e.kind][1](arrays[key]), dtype=np.float32, order="C", copy=True)
        for key, e in table.items()
    }


# ----------------------------------------------------------------------------------------------
# Files


def load_openai_pt(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state_dict in an openai ``.pt`` checkpoint (e.g. ``256x256_diffusion.pt``) as
    ``{key: numpy array}`` (float16 / bfloat16 tensors widened to float32).

    Reads with ``torch.load(path, map_location="cpu", weights_only=True)`` (no pickled code
    runs). Needs torch: ``pip install torch==2.13.0``.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: one line naming the file: a directory, an empty, truncated or junk file, a
        file that holds no state_dict of tensors, or torch not installed.
    """
    state = _read_torch_file(path)
    if not isinstance(state, Mapping):
        raise _corrupt(Path(path), _PT_EXPECTED, f"it holds a {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if not (hasattr(value, "detach") and hasattr(value, "shape")):
            raise ValueError(
                f"{path} is not a state_dict of tensors: {key!r} holds a {type(value).__name__}; "
                "expected the bare state_dict the reference saves (model.state_dict())"
            )
        out[str(key)] = to_numpy(value)
    return out


def save_openai_pt(
    path: str | os.PathLike, state_dict: Mapping[str, np.ndarray], *, overwrite: bool = False
) -> Path:
    """Write ``state_dict`` (e.g. from :func:`params_to_openai_state_dict`) with ``torch.save``,
    readable by the reference's ``load_state_dict(torch.load(path))``. Needs torch (without it:
    a ValueError saying how to install it); an existing file needs ``overwrite=True``."""
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"writing {path} needs PyTorch, which is not installed: pip install torch==2.13.0 "
            "(the CPU wheel, also in the jaxdiff[parity] extra), or keep the state_dict as numpy "
            "arrays (np.savez)"
        ) from None

    tensors = {
        k: torch.from_numpy(np.ascontiguousarray(to_numpy(v))) for k, v in state_dict.items()
    }
    return _write_atomic(Path(path), overwrite, lambda f: torch.save(tensors, f))


def load_openai_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """An openai network's state_dict from a ``.npz`` of its arrays (numpy only, as ``jaxdiff
    export`` writes it) or a ``.pt`` (any other suffix; :func:`load_openai_pt`, needs torch).
    Raises FileNotFoundError or a one-line ValueError naming the file, as those readers do."""
    if Path(path).suffix == ".npz":
        return _read_npz_file(path)
    return load_openai_pt(path)
