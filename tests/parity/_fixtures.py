"""Loading the reference fixtures written by ``generate_fixtures.py`` (see PROVENANCE.md), and the
comparisons every parity test uses.

Fixture images are in the references' NCHW layout; jaxdiff is channels-last, so ``nhwc`` moves
the channel axis. The "tanh model" is the deterministic network both references were given.

Every comparison fails on a NaN or an infinity (in either array) unless the test passes
``expect_nan=True``, and then the non-finite entries must sit in the same places with the same
values. Tolerances come in families (``Tol``), each set to about 10x the worst error measured
over all fixtures (``tests/parity/measure_errors.py`` prints the table; set
``JAXDIFF_PARITY_ERRORS=FILE`` and every comparison appends its errors to FILE).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


class Tol(NamedTuple):
    """A tolerance family: |actual - expected| <= atol + rtol * |expected| elementwise, or, for
    the scale-relative families (``scaled=True``), <= atol + rtol * max|expected|."""

    name: str
    rtol: float
    atol: float
    scaled: bool = False


# Each family is |err| <= atol + rtol |expected|. Its worst measured error (measure_errors.py, all
# fixtures) is given as "abs" (largest error where atol dominates) and "rel" (largest relative
# error where rtol dominates); each constant is about 10x that.
# Tables, q_sample, q posterior, loss weights, resampler weights (float32 vs float32 torch):
# 2.9e-8 abs (values below 0.1), 8.3e-7 rel.
TABLE = Tol("table", 3e-6, 3e-7)
# float64 betas against float64 torch/NumPy (an ulp in exp/cos; 1 - abar_t/abar_t-1 cancels):
# 1.1e-11 rel.
F64_TABLE = Tol("f64_table", 6e-11, 1e-15)
# eps/x0/v conversions, x 1/sqrt(abar) up to 2e4, one rounding per product: 1.2e-7 rel.
CONVERT = Tol("convert", 1.2e-6, 1e-9)
# Through the tanh model (a 3-term channel sum in another order) and the closed-form math after
# it (p_mean_variance, model_predictions, normal_kl, reverse DDIM steps): 1.9e-6 abs, 4e-7 rel.
MODEL = Tol("model", 4e-6, 2e-5)
# Continuous time, downstream of a log-SNR that carries 1e-6..2e-5 of float32 cancellation:
# 1.9e-7 abs, 9.3e-5 rel (unclipped means of ~1e2).
CONTINUOUS = Tol("continuous", 3e-4, 2.5e-6)
# log-SNR itself: log(expm1(~1e-4)) or log(tan(~3e-4)) near t = 0: 4.1e-6 rel.
LOG_SNR = Tol("log_snr", 4e-5, 1e-6)
# Means over images (mean_flat: losses, VB terms, prior bits/dim), summation order: 6.4e-8 abs,
# 2.7e-6 rel.
MEAN_FLAT = Tol("mean", 1e-5, 5e-7)
# Bits/dim totals, sums of up to 4000 per-step terms in another order: 3.3e-6 abs, 3.7e-7 rel.
TOTAL = Tol("total", 7e-6, 3.3e-5)
# Parameter gradients, relative to max |grad| (batch sums that cancel): 7.6e-7.
GRAD = Tol("grad", 8e-6, 1e-9, scaled=True)
# The tanh CDF in sigmoid form against torch's 0.5 (1 + tanh), 1 + tanh cancels in the lower
# tail: 1.5e-8 abs, 1.2e-6 rel.
CDF = Tol("cdf", 2e-6, 1.5e-7)
# jaxdiff's exact-tail log-likelihood against its float64 evaluation: 9.4e-6 rel.
LOGLIK_F64 = Tol("loglik_f64", 1e-4, 4e-6)
# Sampling chains, compared at every step: the per-step error compounds over up to 50 steps
# through coefficients up to 1/sqrt(abar): 1.2e-4 abs (unclipped or eta = 1 chains), 1e-5 rel.
CHAIN = Tol("chain", 1.5e-5, 1.2e-3)
# Fast solvers against diffusers 0.42.1 / k-diffusion 0.1.1, every step of up to 50 (float32 on
# both sides, the references with exp(x) - 1 where jaxdiff has expm1, and states that pass through
# x0 = (x - sigma eps) / alpha with 1 / alpha up to 157 (2e4 on the cosine table)). Worst errors,
# |expected| < 1 abs / >= 1 rel:
# DPM-Solver(++) multistep and singlestep, the SDE variants: 6.2e-5 / 7.8e-5.
SOLVER = Tol("solver", 8e-4, 6e-4)
# UniPC (predictor and corrector, bh1 and bh2): 2.3e-5 / 2.7e-5.
SOLVER_UNIPC = Tol("solver_unipc", 3e-4, 2.5e-4)
# DDIM, DDPM (1000 steps), Euler, Euler ancestral, Heun: 3.4e-5 / 3.5e-5.
SOLVER_EULER = Tol("solver_euler", 3.5e-4, 3.5e-4)
# k-diffusion, including its denoised x0 at sigma up to 157 (x0 = x - sigma eps): 1.5e-4 / 1.2e-4.
SOLVER_K = Tol("solver_k", 1.2e-3, 1.5e-3)
# Unet outputs relative to max |output|: ~30 float32 layers summed in another order: 6.7e-7.
UNET = Tol("unet", 7e-6, 0.0, scaled=True)
# jaxdiff against the reference's float64 run. jaxdiff computes in float32 (with exact tails),
# so where the math is ill-conditioned in float32 (the PREVIOUS_X inversion, KL terms that
# cancel) its own float32 error shows here as well:
# x0 predictions: 3.9e-5 abs, 2.5e-5 rel.
F64_MODEL = Tol("f64_model", 2.5e-4, 4e-4)
# losses and VB terms: 9.5e-5 abs (below 25), 5.4e-6 rel.
F64_MEAN = Tol("f64_mean", 4e-5, 1e-3)
# bits/dim totals: 4e-7 rel.
F64_TOTAL = Tol("f64_total", 4e-6, 1e-6)
# gradients, relative to max |grad|: 1.9e-5.
F64_GRAD = Tol("f64_grad", 1.6e-4, 1e-9, scaled=True)

F64_FOR = {"model": F64_MODEL, "mean": F64_MEAN, "total": F64_TOTAL, "grad": F64_GRAD}

# Names the older tests used; the families above are the source of truth.
RTOL, ATOL = TABLE.rtol, TABLE.atol
MODEL_RTOL, MODEL_ATOL = MODEL.rtol, MODEL.atol
GRAD_RTOL, GRAD_ATOL = GRAD.rtol, GRAD.atol

_ERRORS_FILE = os.environ.get("JAXDIFF_PARITY_ERRORS", "")


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


def _as_tol(rtol, atol, default: Tol) -> Tol:
    if isinstance(rtol, Tol):
        return rtol
    return Tol(f"unnamed:{default.name}", default.rtol if rtol is None else rtol, atol)


def _check_finite(actual, expected, expect_nan: bool, err_msg: str) -> np.ndarray:
    """The mask of entries to compare numerically; raises on any non-finite mismatch."""
    bad_a, bad_e = ~np.isfinite(actual), ~np.isfinite(expected)
    if not expect_nan:
        assert not (bad_a.any() or bad_e.any()), (
            f"{err_msg}: {int(bad_a.sum())} non-finite values in actual, {int(bad_e.sum())} in "
            f"expected (pass expect_nan=True where the reference itself is non-finite)\n"
            f"actual {actual[bad_a | bad_e][:8]}\nexpected {expected[bad_a | bad_e][:8]}"
        )
        return np.ones(actual.shape, bool)
    same = np.array_equal(bad_a, bad_e) and np.array_equal(
        actual[bad_a], expected[bad_e], equal_nan=True
    )
    assert same, (
        f"{err_msg}: non-finite entries differ: {int(bad_a.sum())} in actual, "
        f"{int(bad_e.sum())} in expected, {int((bad_a != bad_e).sum())} in only one of them"
    )
    assert bad_e.any(), f"{err_msg}: expect_nan=True but the reference is finite everywhere"
    return ~bad_e


# |expected| bins for the error envelope that measure_errors.py fits tolerances to: [0, 1e-8),
# then decades [1e-8, 1e-7), ..., [1e4, inf).
ENVELOPE_EDGES = [0.0] + [10.0**k for k in range(-8, 5)]


def _record(tol: Tol, err, expected, allowed, err_msg: str, max_expected: float):
    """Append this comparison's worst errors to $JAXDIFF_PARITY_ERRORS (measure_errors.py)."""
    if not _ERRORS_FILE or err.size == 0:
        return
    scale = np.full(err.shape, max_expected) if tol.scaled else np.abs(expected)
    bins = np.searchsorted(ENVELOPE_EDGES, scale, side="right") - 1
    envelope, rel_envelope = np.zeros(len(ENVELOPE_EDGES)), np.zeros(len(ENVELOPE_EDGES))
    np.maximum.at(envelope, bins, err)
    with np.errstate(divide="ignore", invalid="ignore"):
        np.maximum.at(rel_envelope, bins, np.where(scale > 0, err / scale, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(allowed > 0, err / allowed, np.where(err > 0, np.inf, 0.0))
    row = {
        "family": tol.name,
        "test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0],
        "what": err_msg,
        "envelope": envelope.tolist(),
        "rel_envelope": rel_envelope.tolist(),
        "ratio": float(np.max(ratio)),
    }
    with open(_ERRORS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")


def _compare(actual, expected, tol: Tol, err_msg: str, expect_nan: bool, mask=None):
    compare = _check_finite(actual, expected, expect_nan, err_msg)
    # a scaled family is relative to the largest finite expected value, mask or not
    scale = float(np.max(np.abs(expected[compare]))) if compare.any() else 0.0
    if mask is not None:
        compare = compare & mask
    a, e = actual[compare], expected[compare]
    if tol.scaled:
        allowed = np.full(e.shape, tol.atol + tol.rtol * scale)
    else:
        allowed = tol.atol + tol.rtol * np.abs(e)
    err = np.abs(a - e)
    _record(tol, err, e, allowed, err_msg, scale)
    bad = ~(err <= allowed)
    assert not bad.any(), (
        f"{err_msg}: {int(bad.sum())} of {e.size} elements differ beyond {tol}\n"
        f"max |actual - expected| {float(np.max(err)):.3g}\n"
        f"actual   {a[bad][:8]}\nexpected {e[bad][:8]}"
    )


def assert_close(actual, expected, rtol=TABLE, atol=None, err_msg="", *, expect_nan=False):
    """|actual - expected| within a tolerance family (or rtol, atol), failing on any NaN/Inf."""
    tol = _as_tol(rtol, TABLE.atol if atol is None else atol, TABLE)
    actual = np.asarray(actual, np.float64)
    # denoising-diffusion-pytorch returns per-timestep values as [B, 1, 1, 1]; jaxdiff broadcasts.
    expected = np.broadcast_to(np.asarray(expected, np.float64), actual.shape)
    assert actual.shape == expected.shape
    _compare(actual, expected, tol, err_msg, expect_nan)


def assert_grad_close(actual, expected, err_msg="", tol=GRAD):
    """Gradients: the error bound is relative to the largest component (see GRAD)."""
    assert_close(actual, expected, tol, err_msg=err_msg)


def assert_close_to_reference(
    actual,
    ref32,
    ref64,
    rtol=MODEL,
    atol=None,
    err_msg="",
    grad=False,
    *,
    f64: Tol | None = None,
    expect_nan=False,
):
    """Where the reference also ran in float64 (PROVENANCE, "Float64 companion runs").

    jaxdiff computes the exact tails in float32, so it must be within the float64 family of its
    float32 family (``F64_FOR[rtol.name]``, or ``f64``) of the float64 run. It must match the
    float32 reference to the same bound where that reference is accurate (within a tenth of
    the bound of its float64 run); elsewhere the float32 reference is the one that is off, and
    no allowance widens with |ref32 - ref64|.
    """
    tol = _as_tol(rtol, MODEL.atol if atol is None else atol, MODEL)
    if grad and not tol.scaled:
        tol = GRAD
    actual, ref32, ref64 = (np.asarray(a, np.float64) for a in (actual, ref32, ref64))
    ref32, ref64 = (np.broadcast_to(r, actual.shape) for r in (ref32, ref64))
    f64 = f64 or F64_FOR.get(tol.name, F64_GRAD if tol.scaled else F64_MODEL)
    _compare(actual, ref64, f64, f"{err_msg} (vs float64)", expect_nan)
    # The float32 reference is compared only where it is itself accurate, within a tenth of the
    # float64 bound of its float64 run; there jaxdiff must match it to the same bound.
    with np.errstate(invalid="ignore"):
        if f64.scaled:
            bound = f64.atol + f64.rtol * float(np.max(np.abs(ref64[np.isfinite(ref64)])))
        else:
            bound = f64.atol + f64.rtol * np.abs(ref64)
        well_conditioned = np.abs(ref32 - ref64) <= 0.1 * bound
    _compare(actual, ref32, f64, f"{err_msg} (vs float32)", expect_nan, mask=well_conditioned)


# ----------------------------------------------------------------------------------------------
# Live mode of the openai fixtures: re-run a generator with the upstream code, compare exactly

REFERENCE_PYTHON = os.environ.get("JAXDIFF_REFERENCE_PYTHON", sys.executable)
IMPROVED_DIR = os.environ.get("IMPROVED_DIFFUSION_DIR", "")
GUIDED_DIR = os.environ.get("GUIDED_DIFFUSION_DIR", "")


def openai_references_available() -> bool:
    """Both repositories' packages in their folders, and torch in the reference Python."""
    for folder, package in ((IMPROVED_DIR, "improved_diffusion"), (GUIDED_DIR, "guided_diffusion")):
        if not folder or not (pathlib.Path(folder) / package).is_dir():
            return False
    check = [REFERENCE_PYTHON, "-c", "import torch"]
    return subprocess.run(check, capture_output=True).returncode == 0


def regenerated_equals_committed(generator: str, name: str, out: pathlib.Path) -> None:
    """Run ``generator`` (a file of tests/parity) with the upstream code into ``out`` and
    require every array of ``<name>.npz`` to equal the committed fixture's exactly."""
    command = [REFERENCE_PYTHON, str(FIXTURES.parent / generator), "--improved-diffusion",
               IMPROVED_DIR, "--guided-diffusion", GUIDED_DIR, "--out", str(out)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    fresh = np.load(out / f"{name}.npz")
    stored = np.load(FIXTURES / f"{name}.npz")
    assert sorted(fresh.files) == sorted(stored.files)
    for key in stored.files:
        np.testing.assert_array_equal(fresh[key], stored[key], err_msg=key)
