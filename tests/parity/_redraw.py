"""The counter-based weights of the openai script fixtures (numpy only): the generator
(generate_openai_script_fixtures.py) writes the reference networks with them, the test
(test_openai_script_parity.py) rebuilds them instead of storing them, and checks their CRCs."""

from __future__ import annotations

import zlib

import numpy as np


def _codes(seed: int, n: int) -> np.ndarray:
    """11-bit integers in [0, 2048): SplitMix64 of (seed << 32) + i, top bits (exact uint64)."""
    z = (np.uint64(seed) << np.uint64(32)) + np.arange(n, dtype=np.uint64)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))) >> np.uint64(53)


def redraw(owner: str, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """The value of parameter ``key`` (state_dict layout), float16-representable float32.

    u = (code + 1/2) / 1024 - 1 is uniform on (-1, 1), exact in float64; the value is
    ``1 + u / 4`` for a GroupNorm gain (a 1-D ``weight``), ``u / 4`` for a bias, ``2 u`` for the
    class embedding, ``u / 2**j`` for a convolution / linear weight (2**j <= sqrt(fan_in) <
    2**(j+1), fan_in the product of the shape after the first axis) and for the attention
    pool's positional embedding (fan_in = its first axis), then rounded to float16 (NumPy,
    round to nearest even). The seed is crc32 of ``openai_script/{owner}/weights/{key}``.
    """
    seed = zlib.crc32(f"openai_script/{owner}/weights/{key}".encode()) & 0x7FFFFFFF
    n = int(np.prod(shape, dtype=np.int64))
    u = (_codes(seed, n).astype(np.float64) + 0.5) / 1024.0 - 1.0
    leaf = key.rsplit(".", 1)[-1]
    if key == "label_emb.weight":
        value = 2.0 * u
    elif leaf == "bias":
        value = u / 4.0
    elif leaf == "weight" and len(shape) == 1:
        value = 1.0 + u / 4.0
    elif leaf in ("weight", "positional_embedding"):
        fan_in = shape[0] if leaf == "positional_embedding" else int(np.prod(shape[1:]))
        value = u / float(2 ** ((fan_in.bit_length() - 1) // 2))
    else:
        raise ValueError(f"no redraw rule for parameter {key}")
    return value.reshape(shape).astype(np.float16).astype(np.float32)
