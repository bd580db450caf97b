"""The Flax Unet with converted weights against denoising-diffusion-pytorch's Unet outputs.

Fixtures: ``fixtures/unet.npz`` from ``generate_unet_fixtures.py`` (see PROVENANCE.md): per
configuration the reference state_dict (every parameter redrawn), inputs and eval-mode output.
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.convert import torch_state_dict_to_flax
from jaxdiff.models import unet_from_config
from tests.parity._fixtures import FIXTURES, UNET, assert_close, load, nchw, nhwc

HERE = pathlib.Path(__file__).resolve().parent
PYTHON = os.environ.get("JAXDIFF_REFERENCE_PYTHON", sys.executable)

# Max |jaxdiff - reference| relative to max |reference output| (UNET in _fixtures): ~30 float32
# layers whose convolution, einsum and softmax sums run in a different order in XLA and in
# PyTorch, so round-off grows with the output's scale; a real mistake (a swapped channel, a wrong
# norm or embedding) moves the output by O(1).


def _cases():
    _, meta = load("unet")
    return sorted(meta)


def _state_dict(arrays, case):
    prefix = f"{case}/state_dict/"
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def _assert_unet_close(actual_nhwc, expected_nchw, what):
    actual = nchw(actual_nhwc)
    assert actual.shape == expected_nchw.shape, what
    assert_close(actual, expected_nchw, UNET, err_msg=what)


@pytest.mark.parametrize("case", _cases())
def test_flax_unet_matches_reference(case):
    arrays, meta = load("unet")
    info = meta[case]
    unet = unet_from_config(info["config"])
    variables = torch_state_dict_to_flax(_state_dict(arrays, case), unet)
    apply = jax.jit(unet.apply)
    x, time = nhwc(arrays[f"{case}/x"]), jnp.asarray(arrays[f"{case}/time"])
    if info["x_self_cond"]:
        self_cond = nhwc(arrays[f"{case}/x_self_cond"])
        out = apply(variables, x, time, self_cond)
        _assert_unet_close(out, arrays[f"{case}/out"], f"{case} with x_self_cond")
        out = apply(variables, x, time)
        _assert_unet_close(out, arrays[f"{case}/out_no_self_cond"], f"{case} without")
    else:
        out = apply(variables, x, time)
        _assert_unet_close(out, arrays[f"{case}/out"], case)
    assert out.shape[-1] == info["out_dim"]


def _reference_available() -> bool:
    code = (
        "import importlib.util, torch; "
        "assert importlib.util.find_spec('denoising_diffusion_pytorch')"
    )
    return subprocess.run([PYTHON, "-c", code], capture_output=True).returncode == 0


@pytest.mark.live
@pytest.mark.skipif(
    not _reference_available(),
    reason="live Unet parity needs torch 2.13.0 + denoising-diffusion-pytorch 2.3.4 in this "
    "Python or in $JAXDIFF_REFERENCE_PYTHON (see PROVENANCE.md); the committed fixture is "
    "checked by test_flax_unet_matches_reference",
)
def test_reference_reproduces_unet_fixture(tmp_path):
    subprocess.run(
        [PYTHON, str(HERE / "generate_unet_fixtures.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh, stored = np.load(tmp_path / "unet.npz"), np.load(FIXTURES / "unet.npz")
    assert sorted(fresh.files) == sorted(stored.files)
    for key in stored.files:
        np.testing.assert_array_equal(fresh[key], stored[key], err_msg=key)
