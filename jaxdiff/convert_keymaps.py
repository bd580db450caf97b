"""The key maps of :mod:`jaxdiff.convert`: which Flax parameter is which PyTorch state_dict key,
with the layout change between them, one map per architecture.

* the lucid ``denoising_diffusion_pytorch.Unet`` <-> :class:`jaxdiff.models.Unet`;
* ``denoising_diffusion_pytorch.classifier_free_guidance.Unet`` <->
  :class:`jaxdiff.models.ClassConditionalUnet`.

Each map is derived from the Flax parameter tree of the configured network (an abstract
initialisation, free), so every Flax parameter has exactly one PyTorch key and vice versa. A
configuration names its architecture: a ``ClassConditionalUnet``, or a mapping (or JSON) with
``num_classes``, or a ``CFG_PRESETS`` name, is the class-conditional network; anything else the
lucid Unet.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdiff.models.cfg_unet import CFG_PRESETS, ClassConditionalUnet, cfg_unet_from_config
from jaxdiff.models.unet import PRESETS, Unet, unet_from_config

__all__ = ["ConfigLike", "KeyMapEntry", "Network", "network_from_config", "torch_key_map"]

Network = Unet | ClassConditionalUnet
ConfigLike = Unet | ClassConditionalUnet | Mapping[str, Any] | str
FlaxPath = tuple[str, ...]

# ----------------------------------------------------------------------------------------------
# Layout transforms: (PyTorch -> Flax, Flax -> PyTorch, Flax shape -> PyTorch shape)


def _conv_to_flax(w):
    return np.transpose(w, (2, 3, 1, 0))


def _conv_to_torch(w):
    return np.transpose(w, (3, 2, 0, 1))


def _conv1x1_to_flax(w):
    return w.reshape(w.shape[0], w.shape[1]).T


def _conv1x1_to_torch(w):
    return w.T.reshape(w.shape[1], w.shape[0], 1, 1)


def _same(w):
    return w


_Transform = tuple[Callable, Callable, Callable[[tuple], tuple]]
_KINDS: dict[str, _Transform] = {
    "conv": (_conv_to_flax, _conv_to_torch, lambda s: (s[3], s[2], s[0], s[1])),
    "conv1x1": (_conv1x1_to_flax, _conv1x1_to_torch, lambda s: (s[1], s[0], 1, 1)),
    "linear": (np.transpose, np.transpose, lambda s: (s[1], s[0])),
    "norm": (
        lambda w: w.reshape(-1),
        lambda w: w.reshape(1, -1, 1, 1),
        lambda s: (1, s[0], 1, 1),
    ),
    "mem_linear": (
        lambda w: np.swapaxes(w, -1, -2),
        lambda w: np.swapaxes(w, -1, -2),
        lambda s: (*s[:-2], s[-1], s[-2]),
    ),
    "same": (_same, _same, lambda s: tuple(s)),
}


class KeyMapEntry(NamedTuple):
    flax_path: FlaxPath
    kind: str  # the layout change, a key of _KINDS
    torch_shape: tuple[int, ...]
    flax_shape: tuple[int, ...]


# ----------------------------------------------------------------------------------------------
# The lucid Unet


# Flax module name -> PyTorch module name, at the top level and inside blocks.
_TOP = {
    "init_conv": "init_conv",
    "time_fourier": "time_mlp.0",
    "time_mlp_in": "time_mlp.1",
    "time_mlp_out": "time_mlp.3",
    "mid_block1": "mid_block1",
    "mid_attn": "mid_attn",
    "mid_block2": "mid_block2",
    "final_res_block": "final_res_block",
    "final_conv": "final_conv",
}
_STAGE = {"block1": "0", "block2": "1", "attn": "2"}
_LEAF = {"kernel": "weight", "bias": "bias", "scale": "g", "weights": "weights", "mem_kv": "mem_kv"}
# Flax Dense layers that are nn.Linear in PyTorch; every other Dense is a 1x1 Conv2d.
_LINEAR_MODULES = {"time_mlp_in", "time_mlp_out", "mlp"}


def _flax_shapes(unet: Unet) -> dict[FlaxPath, tuple[int, ...]]:
    """Shapes of every parameter of ``unet``, from an abstract (free) initialisation."""
    side = unet.downsample_factor
    x = jax.ShapeDtypeStruct((1, side, side, unet.channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    variables = jax.eval_shape(unet.init, jax.random.key(0), x, t)
    flat = traverse_util.flatten_dict(variables["params"])
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def _translate(path: FlaxPath, shape: tuple, flat: Mapping, num_stages: int) -> tuple[str, str]:
    """The PyTorch key and layout kind of the Flax parameter at ``path``."""
    top, *modules, leaf = path
    if top in _TOP:
        parts = [_TOP[top]]
    else:
        direction, index = top.rsplit("_", 1)  # "downs_0" -> downs.0
        stage_module, *modules = modules
        if stage_module in _STAGE:
            position = _STAGE[stage_module]
        else:
            # down/up-sampling is a Sequential (rearrange or upsample, then the conv) except in
            # the innermost down stage and the outermost up stage, where it is a lone 3x3 conv
            position = "3" if int(index) == num_stages - 1 else "3.1"
        parts = [f"{direction}.{index}", position]
    attention = path[:-1] if leaf == "mem_kv" else path[:-2]
    is_linear_attention = (*attention, "to_out_norm", "scale") in flat
    for name in modules:
        if name == "mlp":
            parts.append("mlp.1")
        elif name == "to_out" and is_linear_attention:
            parts.append("to_out.0")
        elif name == "to_out_norm":
            parts.append("to_out.1")
        else:
            parts.append(name)
    parts.append(_LEAF[leaf])

    if leaf == "kernel" and len(shape) == 4:
        kind = "conv"
    elif leaf == "kernel":
        kind = "linear" if path[-2] in _LINEAR_MODULES else "conv1x1"
    elif leaf == "scale":
        kind = "norm"
    elif leaf == "mem_kv" and is_linear_attention:
        kind = "mem_linear"
    else:
        kind = "same"
    return ".".join(parts), kind


# ----------------------------------------------------------------------------------------------
# The classifier-free-guidance Unet

# Flax module name -> PyTorch module name at the top level; the class embeddings are parameters
# of the network itself.
_CFG_TOP = {
    "init_conv": "init_conv",
    "time_fourier": "time_mlp.0",
    "time_mlp_in": "time_mlp.1",
    "time_mlp_out": "time_mlp.3",
    "classes_mlp_in": "classes_mlp.0",
    "classes_mlp_out": "classes_mlp.2",
    "mid_block1": "mid_block1",
    "mid_attn": "mid_attn",
    "mid_block2": "mid_block2",
    "final_res_block": "final_res_block",
    "final_conv": "final_conv",
}
_CFG_PARAMS = {"classes_emb": "classes_emb.weight", "null_classes_emb": "null_classes_emb"}
# Every stage position; the up-sampling is a Sequential (upsample, conv) except in the outermost
# up stage, where it is a lone 3x3 conv, as is the innermost down stage's (both at "3").
_CFG_STAGE = {"block1": "0", "block2": "1", "attn": "2", "downsample": "3", "upsample": "3.1"}
# Inside Residual(PreNorm(dim, attention)): the norm is PreNorm's, the rest the attention's.
_CFG_ATTENTION = {"norm": "fn.norm", "to_qkv": "fn.fn.to_qkv", "to_out_norm": "fn.fn.to_out.1"}
_CFG_LINEAR_MODULES = {"time_mlp_in", "time_mlp_out", "classes_mlp_in", "classes_mlp_out", "mlp"}


def _cfg_flax_shapes(net: ClassConditionalUnet) -> dict[FlaxPath, tuple[int, ...]]:
    side = net.downsample_factor
    x = jax.ShapeDtypeStruct((1, side, side, net.channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    label = jax.ShapeDtypeStruct((1,), jnp.int32)
    variables = jax.eval_shape(net.init, jax.random.key(0), x, t, label)
    flat = traverse_util.flatten_dict(variables["params"])
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def _cfg_translate(path: FlaxPath, shape: tuple, num_stages: int) -> tuple[str, str]:
    """The PyTorch key and layout kind of the class-conditional network's parameter ``path``."""
    if len(path) == 1:
        return _CFG_PARAMS[path[0]], "same"
    top, *modules, leaf = path
    if top in _CFG_TOP:
        parts = [_CFG_TOP[top]]
        in_attention, linear_attention = top == "mid_attn", False
    else:
        direction, index = top.rsplit("_", 1)  # "ups_1" -> ups.1
        stage_module, *modules = modules
        position = _CFG_STAGE[stage_module]
        if stage_module == "upsample" and int(index) == num_stages - 1:
            position = "3"
        parts = [f"{direction}.{index}", position]
        in_attention = linear_attention = stage_module == "attn"
    for name in modules:
        if name == "mlp":
            parts.append("mlp.1")
        elif in_attention and name == "to_out":
            parts.append("fn.fn.to_out.0" if linear_attention else "fn.fn.to_out")
        elif in_attention:
            parts.append(_CFG_ATTENTION[name])
        else:
            parts.append(name)
    parts.append(_LEAF[leaf])

    if leaf == "kernel" and len(shape) == 4:
        kind = "conv"
    elif leaf == "kernel":
        kind = "linear" if path[-2] in _CFG_LINEAR_MODULES else "conv1x1"
    elif leaf == "scale":
        kind = "norm"
    else:
        kind = "same"
    return ".".join(parts), kind


# ----------------------------------------------------------------------------------------------
# Either network


def network_from_config(config: ConfigLike) -> Network:
    """The network a conversion configuration names: a :class:`~jaxdiff.models.Unet` or a
    :class:`~jaxdiff.models.ClassConditionalUnet` (returned as they are), a mapping or JSON
    string of the reference's constructor arguments (with ``num_classes``: the
    class-conditional one), or a preset name of ``PRESETS`` or ``CFG_PRESETS``."""
    if isinstance(config, Unet | ClassConditionalUnet):
        return config
    if isinstance(config, str):
        if config in CFG_PRESETS:
            return cfg_unet_from_config(config)
        if config in PRESETS:
            return unet_from_config(config)
        try:
            config = json.loads(config)
        except json.JSONDecodeError as error:
            presets = ", ".join(sorted({*PRESETS, *CFG_PRESETS}))
            raise ValueError(
                f"config {config!r} is neither a preset ({presets}) nor JSON: {error}"
            ) from None
    if isinstance(config, Mapping) and "num_classes" in config:
        return cfg_unet_from_config(config)
    return unet_from_config(config)


def torch_key_map(config: ConfigLike) -> dict[str, KeyMapEntry]:
    """``{torch_key: KeyMapEntry}`` for the configured network: a bijection onto its Flax tree."""
    net = network_from_config(config)
    kind = "cfg" if isinstance(net, ClassConditionalUnet) else "lucid"
    return dict(_key_map(kind, json.dumps(net.config(), sort_keys=True)))


@functools.lru_cache(maxsize=32)
def _key_map(architecture: str, config_json: str) -> tuple[tuple[str, KeyMapEntry], ...]:
    config = json.loads(config_json)
    if architecture == "cfg":
        net = cfg_unet_from_config(config)
        flat = _cfg_flax_shapes(net)
        num_stages = len(net.dim_mults)
        keys = {path: _cfg_translate(path, shape, num_stages) for path, shape in flat.items()}
    else:
        net = unet_from_config(config)
        flat = _flax_shapes(net)
        num_stages = len(net.dim_mults)
        keys = {path: _translate(path, shape, flat, num_stages) for path, shape in flat.items()}
    table: dict[str, KeyMapEntry] = {}
    for path, (key, kind) in keys.items():
        if key in table:
            raise AssertionError(f"two Flax parameters map to {key}: {table[key][0]}, {path}")
        table[key] = KeyMapEntry(path, kind, _KINDS[kind][2](flat[path]), flat[path])
    return tuple(table.items())
