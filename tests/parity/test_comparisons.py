"""The comparison helpers of ``_fixtures.py`` can fail: on a NaN or an infinity anywhere, on a
NaN in a different place from the reference's, and (against a float64 reference run) on the
all-zeros gradients that the old ``REF_ERROR_FACTOR * |ref32 - ref64|`` allowance accepted."""

import numpy as np
import pytest

from tests.parity._fixtures import (
    GRAD,
    MEAN_FLAT,
    MODEL,
    TABLE,
    UNET,
    assert_close,
    assert_close_to_reference,
    assert_grad_close,
    load,
)

EXPECTED = np.linspace(-2.0, 3.0, 24).reshape(2, 3, 4)


def _poisoned(value=np.nan, where=(1, 2, 3)):
    out = EXPECTED.copy()
    out[where] = value
    return out


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("tol", [TABLE, MODEL, MEAN_FLAT, UNET, GRAD])
def test_assert_close_fails_on_a_non_finite_actual(bad, tol):
    assert_close(EXPECTED, EXPECTED, tol)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(_poisoned(bad), EXPECTED, tol)


def test_assert_close_fails_on_a_nan_in_both_unless_expected():
    # np.testing.assert_allclose passes NaN == NaN by default; these helpers do not.
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(_poisoned(), _poisoned(), MODEL)
    assert_close(_poisoned(), _poisoned(), MODEL, expect_nan=True)
    with pytest.raises(AssertionError, match="differ"):  # NaN in another place
        assert_close(_poisoned(where=(0, 0, 0)), _poisoned(), MODEL, expect_nan=True)
    with pytest.raises(AssertionError, match="differ"):  # NaN where the reference has +inf
        assert_close(_poisoned(), _poisoned(np.inf), MODEL, expect_nan=True)
    with pytest.raises(AssertionError, match="finite everywhere"):
        assert_close(EXPECTED, EXPECTED, MODEL, expect_nan=True)
    # The finite entries are still compared when NaNs are expected.
    off = _poisoned()
    off[0, 0, 0] += 1e-3
    with pytest.raises(AssertionError, match="differ beyond"):
        assert_close(off, _poisoned(), MODEL, expect_nan=True)


def test_assert_grad_close_fails_on_nan():
    assert_grad_close(EXPECTED, EXPECTED)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_grad_close(_poisoned(), EXPECTED)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_grad_close(EXPECTED, _poisoned())


@pytest.mark.parametrize("grad", [False, True])
def test_assert_close_to_reference_fails_on_nan(grad):
    ref64 = EXPECTED
    ref32 = EXPECTED + 1e-7
    assert_close_to_reference(EXPECTED, ref32, ref64, MODEL, grad=grad)
    for args in [
        (_poisoned(), ref32, ref64),  # NaN in jaxdiff's result
        (EXPECTED, _poisoned(), ref64),  # NaN in the float32 reference only
        (EXPECTED, ref32, _poisoned()),  # NaN in the float64 reference only
        (_poisoned(), _poisoned(), _poisoned()),  # NaN everywhere, not expected
        (_poisoned(np.inf), ref32, ref64),
    ]:
        with pytest.raises(AssertionError, match="non-finite"):
            assert_close_to_reference(*args, MODEL, grad=grad)


def test_assert_close_to_reference_is_tight_around_float64():
    """A float32 reference far from its float64 run no longer widens the bound: jaxdiff must be
    near the float64 value, and near the float32 one only where that one is accurate."""
    ref64 = EXPECTED
    ref32 = EXPECTED.copy()
    ref32[0] += 0.5  # a badly conditioned float32 reference on part of the array
    assert_close_to_reference(ref64, ref32, ref64, MODEL)
    with pytest.raises(AssertionError, match="vs float64"):
        assert_close_to_reference(ref32, ref32, ref64, MODEL)
    with pytest.raises(AssertionError, match="vs float64"):
        assert_close_to_reference(np.zeros_like(ref64), ref32, ref64, MODEL)


def _f64_gradient_cases():
    arrays, _ = load("gaussian_openai")
    for key in sorted(arrays):
        if "/f64/training_losses/" in key and "/grad_" in key:
            yield key.replace("/f64/", "/"), key


def test_all_zero_gradients_fail_against_every_float64_reference():
    arrays, _ = load("gaussian_openai")
    cases = list(_f64_gradient_cases())
    assert len(cases) > 100
    old_rule_accepted = []
    for key32, key64 in cases:
        ref32, ref64 = arrays[key32].astype(np.float64), arrays[key64].astype(np.float64)
        zeros = np.zeros_like(ref32)
        if not np.any(ref64):
            continue  # a gradient that is zero in the reference (no parameter dependence)
        with pytest.raises(AssertionError):
            assert_close_to_reference(zeros, ref32, ref64, GRAD, err_msg=key32, grad=True)
        # The rule this replaced: 1e-5 + 1e-3 max|ref32| + 1e-4 |ref32| + 2 |ref32 - ref64|.
        allowed = 1e-5 + 1e-3 * np.max(np.abs(ref32)) + 1e-4 * np.abs(ref32)
        allowed = allowed + 2.0 * np.abs(ref32 - ref64)
        if np.all(np.abs(ref32) <= allowed):
            old_rule_accepted.append(key32)
    # The fixtures hold gradients (KL losses) on which the old rule accepted all zeros.
    assert old_rule_accepted, "no fixture shows the old allowance's hole any more"
