"""Live mode: re-run the upstream references and check that they reproduce every fixture.

Needs a Python with torch 2.13.0 and denoising-diffusion-pytorch 2.3.4 (the ``parity`` extra,
the package installed with ``--no-deps``) and a checkout of openai/improved-diffusion at 1bc7bbb;
see PROVENANCE.md. Point ``IMPROVED_DIFFUSION_DIR`` at the folder holding its
``improved_diffusion`` package, ``GUIDED_DIFFUSION_DIR`` at the one holding the
``guided_diffusion`` package of openai/guided-diffusion at 22e0df8 and, if torch lives in
another environment,
``JAXDIFF_REFERENCE_PYTHON`` at that environment's python.

The solver fixtures (``solvers_diffusers.npz``, ``solvers_kdiffusion.npz``) are re-run by their
own test, which needs diffusers 0.42.1 and k-diffusion 0.1.1 (with torchsde, trampoline, scipy
and tqdm) in that python but none of the folders above.
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


def _solver_references_available() -> bool:
    # find_spec only (importing diffusers takes seconds): the generator imports them itself
    code = (
        "import importlib.util as u; "
        "assert all(u.find_spec(p) for p in "
        "('torch', 'diffusers', 'k_diffusion', 'torchsde', 'trampoline', 'scipy', 'tqdm'))"
    )
    probe = [PYTHON, "-c", code]
    return subprocess.run(probe, capture_output=True).returncode == 0


pytestmark = [pytest.mark.live]

SOLVER_FIXTURES = ("solvers_diffusers.npz", "solvers_kdiffusion.npz")


@pytest.mark.skipif(
    not _references_available(),
    reason="live parity needs torch + denoising-diffusion-pytorch, IMPROVED_DIFFUSION_DIR and "
    "GUIDED_DIFFUSION_DIR "
    "(see PROVENANCE.md); the committed fixtures are checked by the other parity tests",
)
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
    # generate_inception_fixtures.py, generate_metrics_fixtures.py,
    # generate_solver_fixtures.py).
    own = {
        "unet.npz",
        "cfg_unet.npz",
        "training.npz",
        "inception.npz",
        "metrics.npz",
        "openai_unet.npz",
        "openai_script.npz",
        "openai_sampling.npz",
    }
    own.update(SOLVER_FIXTURES)
    written = sorted(p.name for p in tmp_path.glob("*.npz"))
    committed = sorted(p.name for p in FIXTURES.glob("*.npz") if p.name not in own)
    assert written == committed
    for name in committed:
        fresh, stored = np.load(tmp_path / name), np.load(FIXTURES / name)
        assert sorted(fresh.files) == sorted(stored.files), name
        for key in stored.files:
            np.testing.assert_array_equal(fresh[key], stored[key], err_msg=f"{name}:{key}")


@pytest.mark.skipif(
    not _solver_references_available(),
    reason="live solver parity needs torch, diffusers 0.42.1, k-diffusion 0.1.1 (with torchsde, "
    "trampoline, scipy, tqdm) in JAXDIFF_REFERENCE_PYTHON (see PROVENANCE.md, Fast solvers); "
    "the committed solver fixtures are read by the other parity tests",
)
def test_upstream_solvers_reproduce_every_solver_fixture(tmp_path):
    subprocess.run(
        [PYTHON, str(HERE / "generate_solver_fixtures.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    written = sorted(p.name for p in tmp_path.glob("*.npz"))
    assert written == sorted(SOLVER_FIXTURES)
    for name in SOLVER_FIXTURES:
        fresh, stored = np.load(tmp_path / name), np.load(FIXTURES / name)
        assert sorted(fresh.files) == sorted(stored.files), name
        for key in stored.files:
            np.testing.assert_array_equal(fresh[key], stored[key], err_msg=f"{name}:{key}")
