"""FID's Inception in Flax against torch-fidelity 0.4.0's ``FeatureExtractorInceptionV3``.

Fixtures: ``fixtures/inception.npz`` from ``generate_inception_fixtures.py`` (PROVENANCE.md):
the reference with seeded random weights, run on seeded uint8 images of several sizes, and its
TF1 bilinear resize alone. The 24M weights are not stored: they are redrawn here, without
torch, by the generator's numpy-only ``random_state_dict`` from the stored seed and layout.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models.inception import (
    InceptionV3FID,
    inception_key_map,
    inception_variables_from_state_dict,
    preprocess_inception,
    resize_bilinear_tf1,
)
from tests.parity._fixtures import FIXTURES, TABLE, Tol, assert_close, load, nhwc

HERE = pathlib.Path(__file__).resolve().parent
PYTHON = os.environ.get("JAXDIFF_REFERENCE_PYTHON", sys.executable)

# Features and logits relative to their largest reference value: ~95 float32 convolutions whose
# sums run in another order in XLA and in PyTorch; worst measured 4.2e-7 (pool) and 6.6e-7
# (logits) on the CPU. A real mistake (a pool counting the padding, a swapped branch, another
# resize) moves them by O(1e-2) or more.
INCEPTION = Tol("inception", 7e-6, 0.0, scaled=True)
FEATURE_NAMES = ("pool", "logits_unbiased", "logits")


def _generator():
    spec = importlib.util.spec_from_file_location(
        "jaxdiff_generate_inception_fixtures", HERE / "generate_inception_fixtures.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # numpy only at import time
    return module


def _cases(kind):
    _, meta = load("inception")
    return sorted(c for c, info in meta.items() if info["kind"] == kind)


@pytest.fixture(scope="module")
def variables():
    arrays, meta = load("inception")
    info = meta["__weights__"]
    layout = [(k, tuple(s)) for k, s in info["layout"]]
    assert sorted(k for k, _ in layout) == sorted(inception_key_map())
    state = _generator().random_state_dict(layout, info["seed"])
    sums = np.array([state[k].sum(dtype=np.float64) for k, _ in layout])
    np.testing.assert_array_equal(
        sums,
        arrays["weights/sums"],
        err_msg="the redrawn random weights differ from the generator's: numpy's "
        "default_rng stream changed (regenerate the fixture, PROVENANCE.md)",
    )
    return inception_variables_from_state_dict(state)


@pytest.fixture(scope="module")
def outputs(variables):
    """Every image case through one compiled network: resize per size, then one batch."""
    arrays, _ = load("inception")
    cases = _cases("features")
    preprocess = jax.jit(preprocess_inception)
    x = jnp.concatenate([preprocess(nhwc(arrays[f"{c}/images"])) for c in cases])
    out = jax.jit(lambda v, x: InceptionV3FID().apply(v, x, method="trunk"))(variables, x)
    bounds = np.cumsum([0] + [arrays[f"{c}/images"].shape[0] for c in cases])
    return {
        c: {name: np.asarray(getattr(out, name))[lo:hi] for name in FEATURE_NAMES}
        for c, lo, hi in zip(cases, bounds[:-1], bounds[1:], strict=True)
    }


@pytest.mark.parametrize("case", _cases("features"))
def test_features_match_reference(case, outputs):
    arrays, meta = load("inception")
    for name in FEATURE_NAMES:
        expected = arrays[f"{case}/{name}"]
        assert outputs[case][name].shape == expected.shape
        assert_close(outputs[case][name], expected, INCEPTION, err_msg=f"{case} {name}")
    # the random weights keep the features O(1): the comparison is not of near-zeros
    assert 1.0 < meta[case]["max_abs_pool"] < 100.0


def test_public_call_matches_reference(variables):
    """``apply(v, images)`` on a small input against the reference (the resize inside)."""
    arrays, _ = load("inception")
    images = nhwc(arrays["32x32/images"])[:1]
    out = jax.jit(InceptionV3FID().apply)(variables, images)
    assert out.pool.dtype == jnp.float32
    assert_close(out.pool, arrays["32x32/pool"][:1], INCEPTION, err_msg="32x32 apply")


@pytest.mark.parametrize("case", _cases("resize"))
def test_resize_matches_tf1_reference(case):
    arrays, meta = load("inception")
    x = nhwc(arrays[f"{case}/in"])
    out = jax.jit(resize_bilinear_tf1, static_argnums=1)(x, tuple(meta[case]["out"]))
    expected = np.moveaxis(arrays[f"{case}/out"], 1, -1)
    assert out.shape == expected.shape
    # bit-exact on the CPU (the same float32 coordinates and lerps); TABLE leaves room for a
    # fused multiply-add on accelerators
    assert_close(out, expected, TABLE, err_msg=case)


def _reference_available() -> bool:
    code = "import importlib.util, torch; assert importlib.util.find_spec('torch_fidelity')"
    return subprocess.run([PYTHON, "-c", code], capture_output=True).returncode == 0


@pytest.mark.live
@pytest.mark.skipif(
    not _reference_available(),
    reason="live Inception parity needs torch 2.13.0 + torch-fidelity 0.4.0 in this Python or "
    "in $JAXDIFF_REFERENCE_PYTHON (see PROVENANCE.md); the committed fixture is checked by "
    "test_features_match_reference",
)
def test_reference_reproduces_inception_fixture(tmp_path):
    subprocess.run(
        [PYTHON, str(HERE / "generate_inception_fixtures.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh, stored = np.load(tmp_path / "inception.npz"), np.load(FIXTURES / "inception.npz")
    assert sorted(fresh.files) == sorted(stored.files)
    for key in stored.files:
        np.testing.assert_array_equal(fresh[key], stored[key], err_msg=key)
