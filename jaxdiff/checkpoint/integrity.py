"""Host copies of a state, the per-leaf SHA-256 record saved with each checkpoint, and the
finite check."""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

_INTEGRITY_FORMAT = 1

# --------------------------------------------------------------------------------------------
# Host copies, checksums and the finite check
# --------------------------------------------------------------------------------------------


def _host_leaves(tree: Any) -> list[tuple[str, np.ndarray]]:
    """``(keystr path, host array)`` of every leaf. A typed PRNG key becomes its key data; an
    array split over several processes is gathered (a collective: every process calls this)."""
    paths, leaves = [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            if leaf.sharding.is_fully_replicated:
                leaf = leaf.addressable_shards[0].data
            else:
                leaf = multihost_utils.process_allgather(leaf, tiled=True)
        paths.append(jax.tree_util.keystr(path))
        leaves.append(leaf)
    return list(zip(paths, (np.asarray(x) for x in jax.device_get(leaves)), strict=True))


def _digest(value: np.ndarray) -> str:
    flat = np.ascontiguousarray(value).reshape(-1)
    return hashlib.sha256(flat.view(np.uint8).data).hexdigest()


def _integrity_record(step: int, host: list[tuple[str, np.ndarray]]) -> dict:
    return {
        "format": _INTEGRITY_FORMAT,
        "algorithm": "sha256",
        "step": step,
        "leaves": {
            path: {"shape": list(value.shape), "dtype": str(value.dtype), "sha256": _digest(value)}
            for path, value in host
        },
    }


def _first_nonfinite(host: list[tuple[str, np.ndarray]]) -> str | None:
    for path, value in host:
        if jnp.issubdtype(value.dtype, jnp.inexact) and not np.isfinite(value).all():
            return path
    return None


def _verify(state: Any, record: dict) -> str | None:
    """The reason the restored ``state`` fails ``record``'s checksums, or None. Leaves restored
    into another shape or dtype than they were saved with (a cast on restore) are not checked."""
    leaves = record.get("leaves", {})
    for path, value in _host_leaves(state):
        expected = leaves.get(path)
        if expected is None:
            continue
        if list(value.shape) != expected["shape"] or str(value.dtype) != expected["dtype"]:
            continue
        if _digest(value) != expected["sha256"]:
            return (
                f"the array {path} (shape {tuple(value.shape)}, {value.dtype}) differs from the "
                "checksum written with it"
            )
    return None
