"""Generate ``fixtures/metrics.npz``: pytorch-fid 0.3.0's ``calculate_frechet_distance`` on
seeded random statistics.

Every stored distance is what the upstream function returns (or, for the non-PSD case, the
error it raises); this script only builds the inputs, calls the reference and saves its outputs.
It never imports jaxdiff. See PROVENANCE.md ("Metrics fixtures").

Regenerate (from the repository root; torch is needed only because pytorch_fid imports it):

    /work/ref/torchenv/bin/python tests/parity/generate_metrics_fixtures.py

Inputs:
  * 64-d cases (and one 1-d case) store mu and sigma themselves in float64.
  * 2048-d cases store float32 factors ``F`` [2048, R], ``d`` [2048] and ``mu`` [2048]; both this
    script and the test rebuild ``sigma = F64 @ F64.T / R + diag(d64)`` in float64 (``F64``,
    ``d64`` the float32 arrays cast to float64; ``d`` is all zeros for a rank-R covariance),
    ``mu = mu.astype(float64)``. A rebuilt matrix can differ from this script's by BLAS round-off
    (an ulp); the distances move by far less than the test's tolerance.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import importlib.metadata
import importlib.util
import io
import json
import platform
import sys
import types
import zipfile
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "fixtures"
RANK = 32  # R, the factor width of the 2048-d covariances
EPS_MESSAGE = "fid calculation produces singular product"

SEEDS: dict[str, int] = {}


def seed_for(name: str) -> int:
    """Fixed seed of a named random draw: crc32 of the name, recorded in SEEDS."""
    seed = zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF
    SEEDS[name] = seed
    return seed


# ----------------------------------------------------------------------------------------------
# Import-only stand-in for torchvision: pytorch_fid's fid_score imports torchvision.transforms and
# its inception module subclasses torchvision's Inception blocks at import time. None of that
# code runs here (only calculate_frechet_distance, which is NumPy/SciPy), so each imported name
# is a placeholder that raises when used. The PyPI torchvision wheel is a CUDA build that does
# not import with the CPU torch here (see PROVENANCE.md).


def _raising(qualname: str):
    def stand_in(*args, **kwargs):
        raise RuntimeError(f"{qualname} is an import-only stand-in (generate_metrics_fixtures.py)")

    stand_in.__name__ = qualname.rsplit(".", 1)[-1]
    stand_in.__qualname__ = qualname
    return stand_in


def _placeholder_class(qualname: str):
    return type(qualname.rsplit(".", 1)[-1], (), {"__init__": _raising(qualname)})


TORCHVISION_STAND_IN = {
    "torchvision": {"functions": (), "classes": ()},
    "torchvision.transforms": {"functions": ("Compose", "ToTensor"), "classes": ()},
    "torchvision.models": {"functions": ("inception_v3",), "classes": ()},
    "torchvision.models.inception": {
        "functions": (),
        "classes": ("InceptionA", "InceptionC", "InceptionE"),
    },
}


def install_torchvision_stand_in() -> bool:
    if importlib.util.find_spec("torchvision") is not None:
        return False
    for module_name, names in TORCHVISION_STAND_IN.items():
        module = types.ModuleType(module_name, "import-only stand-in")
        module.__spec__ = importlib.machinery.ModuleSpec(module_name, loader=None)
        for name in names["functions"]:
            setattr(module, name, _raising(f"{module_name}.{name}"))
        for name in names["classes"]:
            setattr(module, name, _placeholder_class(f"{module_name}.{name}"))
        sys.modules[module_name] = module
        parent, _, child = module_name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
    sys.modules["torchvision"].__version__ = "0.0.0+stand-in"
    return True


# ----------------------------------------------------------------------------------------------
# Inputs


def correlated_features(rng: np.random.Generator, n: int, dim: int, shift: float) -> np.ndarray:
    """Non-negative, correlated features (like pooled ReLU activations), in float64."""
    mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    z = rng.standard_normal((n, dim)) @ mixing + shift
    return np.abs(z)


def stats_of(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(axis=0), np.cov(features, rowvar=False)


def rebuild(factor: np.ndarray, diag: np.ndarray) -> np.ndarray:
    """sigma = F F^T / R + diag(d), float64 from the stored float32 arrays (see module doc)."""
    f64 = factor.astype(np.float64)
    return f64 @ f64.T / f64.shape[1] + np.diag(diag.astype(np.float64))


def factors(name: str, dim: int, full_rank: bool):
    rng = np.random.default_rng(seed_for(name))
    factor = rng.standard_normal((dim, RANK)).astype(np.float32)
    diag = (0.5 + rng.random(dim)).astype(np.float32) if full_rank else np.zeros(dim, np.float32)
    mu = np.abs(rng.standard_normal(dim)).astype(np.float32)
    return factor, diag, mu


class Reference:
    def __init__(self):
        self.stand_in = install_torchvision_stand_in()
        from pytorch_fid import fid_score

        self.fid_score = fid_score

    def __call__(self, mu1, sigma1, mu2, sigma2) -> dict:
        """The reference's distance, whether it took the eps path, or the error it raised."""
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                value = self.fid_score.calculate_frechet_distance(mu1, sigma1, mu2, sigma2)
        except ValueError as error:
            return {"raises": True, "error": str(error), "eps_path": EPS_MESSAGE in out.getvalue()}
        return {"raises": False, "fid": float(value), "eps_path": EPS_MESSAGE in out.getvalue()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    ref = Reference()
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, dict] = {}

    def direct(case: str, mu1, sigma1, mu2, sigma2, **params):
        result = ref(mu1, sigma1, mu2, sigma2)
        for key, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
            arrays[f"{case}/{key}"] = np.asarray(value, np.float64)
        meta[case] = {"storage": "direct", **params, **result}
        print(case, meta[case], flush=True)

    dim = 64
    for case, n1, n2, shift2 in (
        ("d64_full", 400, 500, 0.3),
        ("d64_rankdef_one", 40, 500, 0.1),  # sigma1 from N = 40 < D samples: rank 39
        ("d64_rankdef_both", 30, 20, 0.0),
    ):
        rng = np.random.default_rng(seed_for(case))
        mu1, s1 = stats_of(correlated_features(rng, n1, dim, 0.0))
        mu2, s2 = stats_of(correlated_features(rng, n2, dim, shift2))
        direct(case, mu1, s1, mu2, s2, n1=n1, n2=n2, dim=dim, seed=SEEDS[case])

    rng = np.random.default_rng(seed_for("d64_identical"))
    mu, s = stats_of(correlated_features(rng, 300, dim, 0.0))
    direct("d64_identical", mu, s, mu, s, n1=300, n2=300, dim=dim, seed=SEEDS["d64_identical"])

    # D = 1: SciPy 1.17's sqrtm returns a bare array for 1x1 input even with disp=False, so the
    # reference's tuple unpacking raises; the fixture records that error.
    rng = np.random.default_rng(seed_for("d1"))
    mu1, s1 = stats_of(correlated_features(rng, 50, 1, 0.0))
    mu2, s2 = stats_of(correlated_features(rng, 60, 1, 0.5))
    direct("d1", mu1, np.atleast_2d(s1), mu2, np.atleast_2d(s2), dim=1, seed=SEEDS["d1"])

    # Not covariances (sigma2 negative definite): the reference raises on the imaginary part.
    rng = np.random.default_rng(seed_for("d64_not_psd"))
    mu1, s1 = stats_of(correlated_features(rng, 200, dim, 0.0))
    direct("d64_not_psd", mu1, s1, mu1 + 1.0, -s1, dim=dim, seed=SEEDS["d64_not_psd"])

    # The eps path: dead (constant) features in both sets and 2 and 5 samples give a product whose
    # Schur form has exact zeros coupled by non-zero entries, where sqrtm is not finite. Draws
    # are tried in order until the reference takes that path; the attempt is recorded.
    for attempt in range(200):
        name = f"d64_eps/{attempt}"
        rng = np.random.default_rng(seed_for(name))
        x = correlated_features(rng, 2, dim, 0.0)
        y = correlated_features(rng, 5, dim, 0.2)
        x[:, rng.random(dim) < 0.5] = 1.0
        y[:, rng.random(dim) < 0.5] = 2.0
        mu1, s1 = stats_of(x)
        mu2, s2 = stats_of(y)
        if ref(mu1, s1, mu2, s2)["eps_path"]:
            direct(
                "d64_eps", mu1, s1, mu2, s2, n1=2, n2=5, dim=dim, attempt=attempt, seed=SEEDS[name]
            )
            break
    else:
        raise RuntimeError("no draw took pytorch-fid's eps path")

    dim = 2048
    # One 2048-d case (a 2048x2048 Schur square root costs tens of seconds on two cores): sigma1
    # of rank R = 32 (the rank-deficient FID of few samples) against a full-rank sigma2. The
    # full-rank path is the same code, checked at 64-d.
    for case, full1, full2 in (("d2048_rankdef", False, True),):
        f1, d1, m1 = factors(f"{case}/1", dim, full1)
        f2, d2, m2 = factors(f"{case}/2", dim, full2)
        result = ref(m1.astype(np.float64), rebuild(f1, d1), m2.astype(np.float64), rebuild(f2, d2))
        for key, value in (
            ("F1", f1),
            ("d1", d1),
            ("mu1", m1),
            ("F2", f2),
            ("d2", d2),
            ("mu2", m2),
        ):
            arrays[f"{case}/{key}"] = value
        meta[case] = {
            "storage": "factors",
            "dim": dim,
            "rank": RANK,
            "rank1": dim if full1 else RANK,
            "rank2": dim if full2 else RANK,
            "seeds": [SEEDS[f"{case}/1"], SEEDS[f"{case}/2"]],
            **result,
        }
        print(case, meta[case], flush=True)

    import scipy
    import torch

    meta["__versions__"] = {
        "pytorch-fid": importlib.metadata.version("pytorch-fid"),
        "scipy": scipy.__version__,
        "numpy": np.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torchvision": "import-only stand-in" if ref.stand_in else "installed",
        "seeds": "crc32 of each case name & 0x7FFFFFFF, numpy default_rng",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "metrics.npz"
    members = dict(arrays)
    members["__meta__"] = np.array(json.dumps(meta, sort_keys=True))
    # np.savez_compressed stamps members with the current time; a fixed stamp keeps reruns
    # byte-identical.
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in members.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            buffer = io.BytesIO()
            np.lib.format.write_array(
                buffer, np.require(array, requirements="C"), allow_pickle=False
            )
            archive.writestr(info, buffer.getvalue())
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
