"""Live mode: re-run the upstream references and check that they reproduce every fixture.

Needs a Python with torch 2.13.0 and denoising-diffusion-pytorch 2.3.4 (the ``parity`` extra,
the package installed with ``--no-deps``) and a checkout of openai/improved-diffusion at 1bc7bbb;
see PROVENANCE.md. Point ``IMPROVED_DIFFUSION_DIR`` at the folder holding its
``improved_diffusion`` package, ``GUIDED_DIFFUSION_DIR`` at the one holding the
``guided_diffusion`` package of openai/guided-diffusion at 22e0df8 and, if torch lives in
another environment,
``JAXDIFF_REFERENCE_PYTHON`` at that environment's python.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.parity._fixtures import FIXTURES

HERE = pathlib.Path(__file__).resolve().parent
PYTHON = os.environ.get("JAXDIFF_REFERENCE_PYTHON", sys.executable)
IMPROVED = os.environ.get("IMPROVED_DIFFUSION_DIR", "")
GUIDED = os.environ.get("GUIDED_DIFFUSION_DIR", "")


def _references_available() -> bool:
    for folder, package in ((IMPROVED, "improved_diffusion"), (GUIDED, "guided_diffusion")):
        if not folder or not (pathlib.Path(folder) / package).is_dir():
            return False
    # The package itself imports torchvision; the generator supplies import-only stand-ins.
    code = (
        "import importlib.util, torch; "
        "assert importlib.util.find_spec('denoising_diffusion_pytorch')"
    )
    probe = [PYTHON, "-c", code]
    return subprocess.run(probe, capture_output=True).returncode == 0


pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(
        not _references_available(),
        reason="live parity needs torch + denoising-diffusion-pytorch, IMPROVED_DIFFUSION_DIR and "
        "GUIDED_DIFFUSION_DIR "
        "(see PROVENANCE.md); the committed fixtures are checked by the other parity tests",
    ),
]


def test_upstream_code_reproduces_every_fixture(tmp_path):
    subprocess.run(
        [
            PYTHON,
            str(HERE / "generate_fixtures.py"),
            "--improved-diffusion",
            IMPROVED,
            "--guided-diffusion",
            GUIDED,
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    # These have generators and live tests of their own (generate_unet_fixtures.py,
    # generate_cfg_unet_fixtures.py, generate_training_fixtures.py,
    # generate_inception_fixtures.py, generate_metrics_fixtures.py).
    own = {"unet.npz", "cfg_unet.npz", "training.npz", "inception.npz", "metrics.npz"}
    written = sorted(p.name for p in tmp_path.glob("*.npz"))
    committed = sorted(p.name for p in FIXTURES.glob("*.npz") if p.name not in own)
    assert written == committed
    for name in committed:
        fresh, stored = np.load(tmp_path / name), np.load(FIXTURES / name)
        assert sorted(fresh.files) == sorted(stored.files), name
        for key in stored.files:
            np.testing.assert_array_equal(fresh[key], stored[key], err_msg=f"{name}:{key}")
