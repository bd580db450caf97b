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
from tests.parity._fixtures import FIXTURES, load, nchw, nhwc

HERE = pathlib.Path(__file__).resolve().parent
PYTHON = os.environ.get("JAXDIFF_REFERENCE_PYTHON", sys.executable)

# Max |jaxdiff - reference| relative to max |reference output|. Measured worst case 1.5e-6
# (full_attn_all: 7.6e-6 absolute on outputs up to 5.1; the other cases 4.7e-7 to 1.3e-6): ~30
# float32 layers whose convolution, einsum and softmax sums run in a different order in XLA and
# in PyTorch, so round-off grows with the output's scale. 1e-5 leaves a ~7x margin; a real
# mistake (a swapped channel, a wrong norm or embedding) moves the output by O(1).
UNET_REL_TOL = 1e-5


def _cases():
    _, meta = load("unet")
    return sorted(meta)


def _state_dict(arrays, case):
    prefix = f"{case}/state_dict/"
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def _assert_unet_close(actual_nhwc, expected_nchw, what):
    actual = nchw(actual_nhwc)
    scale = float(np.max(np.abs(expected_nchw)))
    err = float(np.max(np.abs(actual - expected_nchw)))
    assert actual.shape == expected_nchw.shape, what
    assert err <= UNET_REL_TOL * scale, f"{what}: max error {err:.3g}, output scale {scale:.3g}"


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
