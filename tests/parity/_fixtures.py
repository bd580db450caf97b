"""Loading the reference fixtures written by ``generate_fixtures.py`` (see PROVENANCE.md).

Fixture images are in the references' NCHW layout; jaxdiff is channels-last, so ``nhwc`` moves
the channel axis. The "tanh model" is the deterministic network both references were given.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax.numpy as jnp
import numpy as np

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"

# Tolerances. Tables and elementwise math: float32 against float32 torch.
RTOL = 1e-5
ATOL = 1e-6
# Results through the tanh model (a 3-term channel sum whose order differs between einsum and
# torch), means over images (mean_flat's summation order), and quantities amplified by
# 1/sqrt(abar) (up to 2e4 at the cosine schedule's last step).
MODEL_RTOL = 1e-4
MODEL_ATOL = 1e-5
# Parameter gradients: sums over the whole batch of products of the above.
GRAD_RTOL = 1e-3
GRAD_ATOL = 1e-5


@functools.cache
def load(name: str):
    data = np.load(FIXTURES / f"{name}.npz")
    arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop("__meta__")))
    return arrays, meta


def nhwc(x: np.ndarray) -> jnp.ndarray:
    """NCHW (reference) -> NHWC (jaxdiff)."""
    return jnp.asarray(np.moveaxis(np.asarray(x), 1, -1))


def nchw(x) -> np.ndarray:
    """NHWC (jaxdiff) -> NCHW (reference), for comparison with fixtures."""
    return np.moveaxis(np.asarray(x), -1, 1)


def tanh_model(params: dict):
    """out = tanh(W x + b + s * time), channels-last, the reference's deterministic model."""

    def model_fn(x, time):
        h = jnp.einsum("bhwc,oc->bhwo", x, params["W"]) + params["b"]
        return jnp.tanh(h + params["s"] * time.astype(x.dtype)[:, None, None, None])

    return model_fn


def params_of(arrays: dict, prefix: str) -> dict:
    return {k: jnp.asarray(arrays[f"{prefix}/{k}"]) for k in ("W", "b", "s")}


def assert_close(actual, expected, rtol=RTOL, atol=ATOL, err_msg=""):
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=rtol, atol=atol,
        err_msg=err_msg,
    )
