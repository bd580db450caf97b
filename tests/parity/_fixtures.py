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
# Parameter gradients: each component is a sum over the whole batch of terms about as large as
# the largest component, which cancel; the error is relative to the gradient's scale, so it is
# bounded by GRAD_RTOL * max|grad| (see assert_grad_close).
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
        h = jnp.einsum("bhwc,oc->bhwo", x, params["W"]) + params["b"][None, None, None, :]
        time = time.astype(x.dtype)[:, None, None, None]
        return jnp.tanh(h + params["s"][None, None, None, :] * time)

    return model_fn


def params_of(arrays: dict, prefix: str) -> dict:
    return {k: jnp.asarray(arrays[f"{prefix}/{k}"]) for k in ("W", "b", "s")}


def assert_close(actual, expected, rtol=RTOL, atol=ATOL, err_msg=""):
    actual = np.asarray(actual, np.float64)
    # denoising-diffusion-pytorch returns per-timestep values as [B, 1, 1, 1]; jaxdiff broadcasts.
    expected = np.broadcast_to(np.asarray(expected, np.float64), actual.shape)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=err_msg)


def assert_grad_close(actual, expected, err_msg=""):
    expected = np.asarray(expected, np.float64)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    assert_close(actual, expected, GRAD_RTOL, GRAD_ATOL + GRAD_RTOL * scale, err_msg)


# Where the math is ill-conditioned in float32 (decoder tail probabilities, the PREVIOUS_X
# inversion by a tiny posterior coefficient), the reference's own float32 result is off from the
# same reference run in float64 by |ref32 - ref64|. jaxdiff must agree with ref32 to within that
# error plus its own of the same size.
REF_ERROR_FACTOR = 2.0


def assert_close_to_reference(actual, ref32, ref64, rtol, atol, err_msg="", grad=False):
    actual, ref32, ref64 = (np.asarray(a, np.float64) for a in (actual, ref32, ref64))
    if grad:
        atol = atol + GRAD_RTOL * float(np.max(np.abs(ref32)))
    allowed = atol + rtol * np.abs(ref32) + REF_ERROR_FACTOR * np.abs(ref32 - ref64)
    bad = np.abs(actual - ref32) > allowed
    assert not bad.any(), (
        f"{err_msg}: {int(bad.sum())} elements differ beyond the bound\n"
        f"actual {actual[bad]}\nref32  {ref32[bad]}\nref64  {ref64[bad]}"
    )
