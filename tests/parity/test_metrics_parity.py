"""jaxdiff.metrics.frechet_distance against pytorch-fid 0.3.0's calculate_frechet_distance.

Fixtures: ``fixtures/metrics.npz`` from ``generate_metrics_fixtures.py`` (PROVENANCE.md,
"Metrics fixtures"). 64-d and 1-d cases store mu and sigma; 2048-d cases store float32 factors
from which the covariances are rebuilt exactly as the generator does.
"""

import json
import os
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest

from jaxdiff import metrics
from tests.parity._fixtures import FIXTURES, load

GENERATOR = pathlib.Path(__file__).resolve().parent / "generate_metrics_fixtures.py"
PYTHON = os.environ.get("JAXDIFF_REFERENCE_PYTHON", sys.executable)

# The acceptance bound of issue 12. Both sides run scipy.linalg.sqrtm on the same float64
# product, so the measured error is round-off of the BLAS product (PROVENANCE.md gives it).
FID_RTOL = 1e-6

ARRAYS, META = load("metrics")
CASES = {k: v for k, v in META.items() if not k.startswith("__")}


def rebuild(factor: np.ndarray, diag: np.ndarray) -> np.ndarray:
    """sigma = F F^T / R + diag(d) in float64 from float32 factors (as the generator does)."""
    f64 = factor.astype(np.float64)
    return f64 @ f64.T / f64.shape[1] + np.diag(diag.astype(np.float64))


def inputs(case: str):
    if CASES[case]["storage"] == "direct":
        return tuple(ARRAYS[f"{case}/{k}"] for k in ("mu1", "sigma1", "mu2", "sigma2"))
    a = {k: ARRAYS[f"{case}/{k}"] for k in ("F1", "d1", "mu1", "F2", "d2", "mu2")}
    return (
        a["mu1"].astype(np.float64),
        rebuild(a["F1"], a["d1"]),
        a["mu2"].astype(np.float64),
        rebuild(a["F2"], a["d2"]),
    )


def distance_and_eps_path(case: str) -> tuple[float, bool]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = metrics.frechet_distance(*inputs(case))
    eps_path = any("pytorch-fid" in str(w.message) for w in caught)
    return value, eps_path


def _finite_cases(dim_filter):
    return [
        c for c, m in CASES.items() if not m["raises"] and dim_filter(m["dim"]) and m["fid"] > 1e-6
    ]


def check(case: str) -> None:
    expected = CASES[case]
    value, eps_path = distance_and_eps_path(case)
    assert eps_path == expected["eps_path"], f"{case}: eps path {eps_path}, reference {expected}"
    rel = abs(value - expected["fid"]) / abs(expected["fid"])
    assert rel <= FID_RTOL, f"{case}: {value!r} vs pytorch-fid {expected['fid']!r} (rel {rel:.3g})"


def test_fixture_covers_the_required_cases():
    dims = {m["dim"] for m in CASES.values()}
    assert {64, 2048} <= dims
    assert any(m["eps_path"] for m in CASES.values())
    assert any("rankdef" in c and m["dim"] == 2048 for c, m in CASES.items())
    assert META["__versions__"]["pytorch-fid"] == "0.3.0"


@pytest.mark.parametrize("case", _finite_cases(lambda d: d < 2048))
def test_frechet_distance_matches_pytorch_fid(case):
    check(case)


@pytest.mark.slow  # one 2048x2048 Schur square root per case, tens of seconds on two cores
@pytest.mark.parametrize("case", _finite_cases(lambda d: d == 2048))
def test_frechet_distance_matches_pytorch_fid_2048(case):
    check(case)


def test_identical_statistics_give_zero_like_the_reference():
    mu1, s1, mu2, s2 = inputs("d64_identical")
    scale = np.trace(s1) + np.trace(s2)
    value = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert abs(value) <= 1e-12 * scale
    assert abs(value - CASES["d64_identical"]["fid"]) <= 1e-12 * scale


def test_not_psd_raises_like_the_reference():
    assert CASES["d64_not_psd"]["raises"]
    assert "Imaginary component" in CASES["d64_not_psd"]["error"]
    with pytest.raises(ValueError, match="imaginary diagonal component"):
        metrics.frechet_distance(*inputs("d64_not_psd"))


def test_one_dimension_where_the_reference_fails():
    # pytorch-fid 0.3.0 with SciPy >= 1.16 raises for D = 1 (sqrtm returns no error estimate for
    # a 1x1 input); jaxdiff returns the closed form (mu1 - mu2)^2 + (sqrt(s1) - sqrt(s2))^2.
    assert CASES["d1"]["raises"]
    mu1, s1, mu2, s2 = inputs("d1")
    expected = (mu1[0] - mu2[0]) ** 2 + (np.sqrt(s1[0, 0]) - np.sqrt(s2[0, 0])) ** 2
    np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-12)


@pytest.mark.live
@pytest.mark.slow  # re-runs the reference, two 2048-d square roots included
def test_reference_reproduces_metrics_fixture(tmp_path):
    probe = "import importlib.util, torch, scipy; assert importlib.util.find_spec('pytorch_fid')"
    if subprocess.run([PYTHON, "-c", probe], capture_output=True).returncode != 0:
        pytest.skip(
            "live parity needs torch, scipy and pytorch-fid==0.3.0 in $JAXDIFF_REFERENCE_PYTHON "
            "(see PROVENANCE.md, Metrics fixtures); the committed fixture is checked above"
        )
    subprocess.run(
        [PYTHON, str(GENERATOR), "--out", str(tmp_path)], check=True, capture_output=True
    )
    fresh, stored = np.load(tmp_path / "metrics.npz"), np.load(FIXTURES / "metrics.npz")
    assert sorted(fresh.files) == sorted(stored.files)
    for key in stored.files:
        if key != "__meta__":
            np.testing.assert_array_equal(fresh[key], stored[key], err_msg=key)
    fresh_meta = json.loads(str(fresh["__meta__"]))
    for case, expected in CASES.items():
        got = fresh_meta[case]
        assert (got["raises"], got["eps_path"]) == (expected["raises"], expected["eps_path"])
        if not expected["raises"]:
            # the reference's own BLAS products may round differently with another thread count
            np.testing.assert_allclose(got["fid"], expected["fid"], rtol=1e-9, atol=1e-12)
