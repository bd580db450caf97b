"""PyTorch ``denoising_diffusion_pytorch.Unet`` weights <-> jaxdiff Flax ``Unet`` variables, and
the same for the class-conditional ``denoising_diffusion_pytorch.classifier_free_guidance.Unet``
<-> :class:`~jaxdiff.models.ClassConditionalUnet` (every function takes either configuration:
one with ``num_classes`` is the class-conditional network).

The key map (:mod:`jaxdiff.convert_keymaps`) is derived from the Flax parameter tree of the
configured network, so every Flax parameter has exactly one PyTorch key and vice versa. A
conversion checks both directions before it moves a number: a missing key, an unexpected key or
a shape mismatch raises a ``ValueError`` naming every offending key (usually the state_dict comes
from a network with another configuration). Values are only transposed / reshaped and held as
float32 (the network's parameter dtype; float16 and bfloat16 checkpoints widen exactly), never
recomputed, so a round trip of a float32 state_dict reproduces every tensor bit for bit.

Layouts (PyTorch -> Flax):

* ``Conv2d`` weight ``[O, I, kh, kw]`` -> ``kernel [kh, kw, I, O]``; 1x1 convolutions (qkv,
  attention outputs, down-sampling, shortcuts, final) are Flax ``Dense``: ``[O, I, 1, 1]`` ->
  ``[I, O]``; ``Linear`` weight ``[O, I]`` -> ``[I, O]``;
* RMSNorm gain ``g [1, C, 1, 1]`` -> ``scale [C]``;
* memory key/values: full attention keeps ``[2, heads, slots, dim_head]``; linear attention's
  ``[2, heads, dim_head, slots]`` is transposed to the same layout;
* the class-conditional network's ``classes_emb.weight [num_classes, dim]`` and
  ``null_classes_emb [dim]`` are kept as they are.

torch is imported only inside the functions that read or write ``.pt`` files. A weights file that
cannot be read (missing, a directory, empty, truncated, junk bytes, a zip or pickle of something
else, or a ``.pt`` without torch installed) raises a one-line ``FileNotFoundError`` or
``ValueError`` naming the file and what was expected.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from jaxdiff._numpy import to_numpy as _to_numpy
from jaxdiff.convert_keymaps import (
    _KINDS,
    ConfigLike,
    KeyMapEntry,
    Network,
    network_from_config,
    torch_key_map,
)
from jaxdiff.models.cfg_unet import ClassConditionalUnet

__all__ = [
    "KeyMapEntry",
    "extract_unet_state_dict",
    "flax_to_torch_state_dict",
    "load_flax_params",
    "load_state_dict_file",
    "load_torch_checkpoint",
    "network_from_config",
    "save_flax_params",
    "save_state_dict_npz",
    "save_torch_checkpoint",
    "torch_key_map",
    "torch_state_dict_to_flax",
]

_LIKELY_CAUSE = (
    "The weights were probably saved from a Unet with another configuration (compare dim, "
    "init_dim, out_dim, dim_mults, channels, self_condition, learned_variance, "
    "learned_sinusoidal_cond / random_fourier_features, attn_heads, attn_dim_head, full_attn)."
)
_CFG_LIKELY_CAUSE = (
    "The weights were probably saved from a classifier_free_guidance.Unet with another "
    "configuration (compare dim, num_classes, init_dim, out_dim, dim_mults, channels, "
    "learned_variance, learned_sinusoidal_cond / random_fourier_features, attn_heads, "
    "attn_dim_head)."
)
_CFG_ANCHOR = "classes_emb.weight"  # only the class-conditional network has it
_MAX_LISTED = 12

# ----------------------------------------------------------------------------------------------
# Checks


def _listed(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f", ... and {more} more" if more > 0 else "")


def _common_prefix_hint(keys) -> str:
    heads = {k.split(".", 1)[0] for k in keys if "." in k}
    if len(heads) == 1 and heads.pop() in {"model", "ema_model", "online_model", "module", "ema"}:
        return (
            " The keys carry a wrapper prefix: this looks like a GaussianDiffusion, EMA or "
            "Trainer checkpoint; use load_torch_checkpoint / extract_unet_state_dict, which "
            "strip it."
        )
    return ""


def _architecture_hint(have, net: Network) -> str:
    """Where a state_dict is of the other architecture, say so and how to convert it."""
    conditional = _CFG_ANCHOR in set(have)
    if conditional and not isinstance(net, ClassConditionalUnet):
        return (
            f" The state_dict has {_CFG_ANCHOR}: it is a classifier_free_guidance.Unet's; pass "
            "its configuration with num_classes (a ClassConditionalUnet)."
        )
    if not conditional and isinstance(net, ClassConditionalUnet) and "init_conv.weight" in have:
        return (
            f" The state_dict has no {_CFG_ANCHOR}: it looks like a (lucid) Unet's, not a "
            "classifier_free_guidance.Unet's; pass its configuration without num_classes."
        )
    return ""


def _check_keys(have, expected, what: str, net: Network) -> None:
    missing = set(expected) - set(have)
    unexpected = set(have) - set(expected)
    if not (missing or unexpected):
        return
    conditional = isinstance(net, ClassConditionalUnet)
    lines = [f"{what} does not match the {type(net).__name__} configuration."]
    if missing:
        lines.append(f"Missing {len(missing)} key(s): {_listed(missing)}.")
    if unexpected:
        lines.append(f"Unexpected {len(unexpected)} key(s): {_listed(unexpected)}.")
    raise ValueError(
        " ".join(lines)
        + " "
        + (_CFG_LIKELY_CAUSE if conditional else _LIKELY_CAUSE)
        + _common_prefix_hint(unexpected)
        + _architecture_hint(have, net)
    )


def _check_shapes(pairs, what: str, net: Network) -> None:
    bad = [
        f"{k}: got {tuple(got)}, expected {tuple(want)}" for k, got, want in pairs if got != want
    ]
    if bad:
        raise ValueError(
            f"{what}: {len(bad)} shape mismatch(es): {'; '.join(bad[:_MAX_LISTED])}"
            + (f"; ... and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else "")
            + ". "
            + (_CFG_LIKELY_CAUSE if isinstance(net, ClassConditionalUnet) else _LIKELY_CAUSE)
        )


def _unwrap_params(variables: Mapping) -> Mapping:
    if set(variables) == {"params"}:
        return variables["params"]
    return variables


# ----------------------------------------------------------------------------------------------
# Conversion


def torch_state_dict_to_flax(state_dict: Mapping[str, Any], config: ConfigLike) -> dict:
    """Flax variables ``{"params": ...}`` of ``Unet`` from the reference ``Unet.state_dict()``
    (or of ``ClassConditionalUnet`` from the ``classifier_free_guidance.Unet``'s).

    Args:
      state_dict: ``{key: array}`` keyed exactly as the reference network's ``state_dict()``
        (numpy arrays or torch tensors). Strip wrapper prefixes first
        (:func:`extract_unet_state_dict`).
      config: the network: a :class:`~jaxdiff.models.Unet` or
        :class:`~jaxdiff.models.ClassConditionalUnet`, a dict of its (the reference's)
        constructor arguments (with ``num_classes`` for the class-conditional one), a JSON
        string or a preset name.

    Returns:
      ``{"params": tree}`` of float32 arrays, ready for the network's ``apply``.

    Raises:
      ValueError: naming every missing, unexpected or mis-shaped key.
    """
    net = network_from_config(config)
    table = torch_key_map(net)
    _check_keys(state_dict.keys(), table.keys(), "The PyTorch state_dict", net)
    arrays = {k: _to_numpy(v) for k, v in state_dict.items()}
    _check_shapes(
        ((k, arrays[k].shape, table[k].torch_shape) for k in sorted(table)),
        "The PyTorch state_dict",
        net,
    )
    flat = {}
    for key, e in table.items():
        value = _KINDS[e.kind][0](arrays[key])
        flat[e.flax_path] = jnp.asarray(np.ascontiguousarray(value, dtype=np.float32))
    return {"params": traverse_util.unflatten_dict(flat)}


def _checked_flax_arrays(variables: Mapping, net: Network) -> dict:
    """``{torch_key: numpy array}`` of a Flax tree, after checking its paths and shapes."""
    table = torch_key_map(net)
    flat = traverse_util.flatten_dict(dict(_unwrap_params(variables)))
    named = {"/".join(path): value for path, value in flat.items()}
    expected = {"/".join(e.flax_path): key for key, e in table.items()}
    _check_keys(named.keys(), expected.keys(), "The Flax parameter tree", net)
    arrays = {expected[name]: np.asarray(value) for name, value in named.items()}
    _check_shapes(
        (
            (f"{'/'.join(e.flax_path)} (PyTorch {key})", arrays[key].shape, e.flax_shape)
            for key, e in sorted(table.items())
        ),
        "The Flax parameter tree",
        net,
    )
    return arrays


def flax_to_torch_state_dict(variables: Mapping, config: ConfigLike) -> dict[str, np.ndarray]:
    """The reference ``Unet.state_dict()`` (as float32 numpy arrays) from Flax variables.

    The inverse of :func:`torch_state_dict_to_flax`, exact, for either network. ``variables``
    is ``{"params": tree}`` or the bare tree. Load into PyTorch with
    ``unet.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``.

    Raises:
      ValueError: naming every missing, unexpected or mis-shaped parameter.
    """
    net = network_from_config(config)
    table = torch_key_map(net)
    arrays = _checked_flax_arrays(variables, net)
    return {
        key: np.array(_KINDS[e.kind][1](arrays[key]), dtype=np.float32, order="C", copy=True)
        for key, e in table.items()
    }


# ----------------------------------------------------------------------------------------------
# Checkpoint files

_TRAINER_ENTRIES = ("model", "ema")
_ANCHOR = "init_conv.weight"


def extract_unet_state_dict(
    checkpoint: Mapping[str, Any], *, which: str = "ema", prefix: str | None = None
) -> dict[str, Any]:
    """The bare ``Unet`` state_dict inside a checkpoint, with its wrapper prefix removed.

    Accepts a bare Unet state_dict; a ``GaussianDiffusion`` state_dict (prefix ``model.``; the
    diffusion's schedule buffers are dropped); an ema-pytorch ``EMA`` state_dict (prefixes
    ``ema_model.`` and ``online_model.``); or a lucidrains ``Trainer`` checkpoint, a dict with
    ``'model'`` (the diffusion's state_dict) and ``'ema'`` (the EMA's) entries.

    Args:
      checkpoint: what ``torch.load`` returned (or any mapping of arrays).
      which: ``"ema"`` (default: the EMA weights, which the reference's Trainer samples with)
        or ``"model"`` (the online, raw training weights). It picks the Trainer entry and,
        inside an EMA state_dict, ``ema_model.`` or ``online_model.``.
      prefix: take exactly the keys under this prefix, overriding the detection.
    """
    if which not in _TRAINER_ENTRIES:
        raise ValueError(f"which must be one of {_TRAINER_ENTRIES}, got {which!r}")
    state = checkpoint
    if any(isinstance(checkpoint.get(e), Mapping) for e in _TRAINER_ENTRIES):
        if not isinstance(checkpoint.get(which), Mapping):
            present = [e for e in _TRAINER_ENTRIES if isinstance(checkpoint.get(e), Mapping)]
            raise ValueError(
                f"the Trainer checkpoint has no {which!r} entry (it has {present}); pass "
                f"which={present[0]!r}"
            )
        state = checkpoint[which]
    if prefix is None:
        candidates = sorted(k[: -len(_ANCHOR)] for k in state if k.endswith(_ANCHOR))
        if not candidates:
            raise ValueError(
                f"no Unet weights found: no key ends with {_ANCHOR!r} (keys: "
                f"{_listed(state.keys())})"
            )
        if len(candidates) > 1:
            wanted = "ema_model." if which == "ema" else "online_model."
            preferred = [c for c in candidates if c.startswith(wanted)]
            if len(preferred) != 1:
                raise ValueError(
                    f"several Unets in the checkpoint, under prefixes {candidates}; pass prefix="
                )
            candidates = preferred
        prefix = candidates[0]
    out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"no key starts with prefix {prefix!r}")
    return out


_PT_EXPECTED = "a PyTorch checkpoint written by torch.save (.pt / .pth)"
_NPZ_EXPECTED = "a .npz of the reference state_dict (save_state_dict_npz)"
_MSGPACK_EXPECTED = "Flax variables written by save_flax_params (flax.serialization msgpack)"
_TORCH_HINT = (
    "pip install torch==2.13.0 (the CPU wheel, also in the jaxdiff[parity] extra), or convert "
    "the file to .npz where torch is installed"
)


def _one_line(error: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, shortened: the cause inside a one-line error."""
    text = str(error).strip().splitlines()
    text = text[0] if text else ""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _readable_file(path: str | os.PathLike, expected: str) -> Path:
    """``path`` as a Path after checking it is a non-empty regular file; else a one-line
    FileNotFoundError / ValueError naming it and ``expected``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected {expected}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected {expected}")
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ValueError(f"cannot read {path} ({_one_line(error)}); expected {expected}") from None
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes); expected {expected}")
    return path


def _corrupt(path: Path, expected: str, error: BaseException | str) -> ValueError:
    cause = (error if isinstance(error, str) else _one_line(error)).rstrip(".")
    return ValueError(
        f"cannot read {path}: {cause}. Expected {expected}; the file is truncated, corrupt or "
        f"of another kind"
    )


def _read_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, every failure one ValueError
    (or FileNotFoundError) naming the file. torch is needed only for a plausible file."""
    path = _readable_file(path, _PT_EXPECTED)
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":  # torch.save's zip format (PyTorch >= 1.6)
        if not zipfile.is_zipfile(path):
            raise _corrupt(path, _PT_EXPECTED, "a truncated or damaged zip archive")
    elif head[:1] != b"\x80":  # a legacy torch.save file is a pickle (protocol 2+)
        raise _corrupt(path, _PT_EXPECTED, "neither a zip archive nor a pickle")
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"reading {path} needs PyTorch, which is not installed: {_TORCH_HINT}"
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types; one clear message
        raise _corrupt(path, _PT_EXPECTED, error) from None


def _read_npz_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz``, every failure one ValueError (or FileNotFoundError) naming it."""
    path = _readable_file(path, _NPZ_EXPECTED)
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as error:  # noqa: BLE001 - zipfile / numpy raise many types
        raise _corrupt(path, _NPZ_EXPECTED, error) from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise _corrupt(path, _NPZ_EXPECTED, "it is a single .npy array, not a .npz archive")
    try:
        with data:
            return {k: data[k] for k in data.files}
    except Exception as error:  # noqa: BLE001
        raise _corrupt(path, _NPZ_EXPECTED, error) from None


def load_torch_checkpoint(
    path: str | os.PathLike,
    config: ConfigLike,
    *,
    which: str = "ema",
    prefix: str | None = None,
) -> dict:
    """Flax variables from a PyTorch ``.pt`` file (bare Unet, GaussianDiffusion, EMA or Trainer).

    Reads with ``torch.load(path, map_location="cpu", weights_only=True)`` (no pickled code is
    executed), picks the Unet with :func:`extract_unet_state_dict` (``which="ema"`` by default
    for Trainer checkpoints) and converts it with :func:`torch_state_dict_to_flax`. Needs torch.
    """
    state = load_state_dict_file(Path(path), which=which, prefix=prefix, kind="pt")
    return torch_state_dict_to_flax(state, config)


def save_torch_checkpoint(
    variables: Mapping, path: str | os.PathLike, config: ConfigLike, *, overwrite: bool = False
) -> Path:
    """Write Flax variables as a bare reference ``Unet`` state_dict with ``torch.save``.

    ``Unet(**config).load_state_dict(torch.load(path, weights_only=True))`` reads it back in
    PyTorch. Needs torch (without it: a ValueError saying how to install it).
    """
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"writing {path} needs PyTorch, which is not installed: pip install torch==2.13.0 "
            "(the CPU wheel, also in the jaxdiff[parity] extra), or write a .npz instead"
        ) from None

    state = flax_to_torch_state_dict(variables, config)
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    return _write_atomic(Path(path), overwrite, lambda f: torch.save(tensors, f))


def save_state_dict_npz(
    variables: Mapping, path: str | os.PathLike, config: ConfigLike, *, overwrite: bool = False
) -> Path:
    """Write the reference state_dict as a ``.npz`` (torch-free exchange; same keys and layout)."""
    state = flax_to_torch_state_dict(variables, config)
    return _write_atomic(Path(path), overwrite, lambda f: np.savez(f, **state))


def load_state_dict_file(
    path: str | os.PathLike, *, kind: str | None = None, **extract_kwargs
) -> dict[str, Any]:
    """The bare Unet state_dict from a ``.npz`` (numpy only) or a ``.pt`` file (needs torch).

    ``kind`` is ``"npz"`` or ``"pt"``; None picks by suffix (``.npz``, anything else is read as
    a PyTorch file). ``extract_kwargs`` go to :func:`extract_unet_state_dict`.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: one line naming the file, for a directory, an empty, truncated or junk file,
        a file of another kind, a ``.pt`` without torch installed, or one holding no Unet.
    """
    path = Path(path)
    if kind is None:
        kind = "npz" if path.suffix == ".npz" else "pt"
    if kind not in ("npz", "pt"):
        raise ValueError(f"kind must be 'npz', 'pt' or None, got {kind!r}")
    state = _read_npz_file(path) if kind == "npz" else _read_torch_file(path)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state_dict")
    try:
        return extract_unet_state_dict(state, **extract_kwargs)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def save_flax_params(variables: Mapping, path: str | os.PathLike, *, overwrite=False) -> Path:
    """Write Flax variables with ``flax.serialization.to_bytes`` (msgpack)."""
    data = serialization.to_bytes(jax.device_get(dict(variables)))
    return _write_atomic(Path(path), overwrite, lambda f: f.write(data))


def load_flax_params(path: str | os.PathLike, config: ConfigLike) -> dict:
    """Read msgpack Flax variables and check them against the configuration.

    Raises:
      ValueError: naming every parameter that is missing, unexpected or mis-shaped.
    """
    path = _readable_file(path, _MSGPACK_EXPECTED)
    try:
        restored = serialization.msgpack_restore(path.read_bytes())
    except Exception as error:  # noqa: BLE001 - msgpack raises many types
        raise _corrupt(path, _MSGPACK_EXPECTED, error) from None
    if not isinstance(restored, Mapping):
        raise _corrupt(path, _MSGPACK_EXPECTED, f"it holds a {type(restored).__name__}")
    net = network_from_config(config)
    table = torch_key_map(net)
    arrays = _checked_flax_arrays(restored, net)
    flat = {e.flax_path: jnp.asarray(arrays[key]) for key, e in table.items()}
    return {"params": traverse_util.unflatten_dict(flat)}


def _write_atomic(path: Path, overwrite: bool, write: Callable) -> Path:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--force) to replace it")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)
    return path
