"""Generate ``fixtures/inception.npz``: outputs of torch-fidelity 0.4.0's FID Inception.

The reference is ``torch_fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3``
(the PyTorch port of the TensorFlow 2015-12-05 graph), built with random weights: every entry of
its state_dict except the ``num_batches_tracked`` counters (the published weight file has none)
is drawn by :func:`random_state_dict` from ``numpy.random.default_rng(seed)`` in the
reference's state_dict order, written to a temporary ``.pth`` and loaded through the reference's
own ``feature_extractor_weights_path`` (its strict ``load_state_dict``). The 24M weights are
not stored: the parity test redraws them, without torch, from the seed and the layout kept in
``__meta__``, and checks their per-key sums. The reference then runs on seeded uint8 images of
several sizes (the TF1 bilinear resize included); its resize function also runs alone on small
float inputs. This script never imports jaxdiff; :func:`random_state_dict` needs numpy only, so
the test imports it from here.

Regenerate (from the repository root; see PROVENANCE.md):

    /work/ref/torchenv/bin/python tests/parity/generate_inception_fixtures.py

torch-fidelity's package ``__init__`` imports modules that need torchvision, which does not
import with the CPU torch here; ``load_reference`` registers the package without running its
``__init__`` and imports only the Inception module and its three torch-fidelity imports.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import math
import sys
import tempfile
import time
import types
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "fixtures"

# case -> (H, W, batch): the identity resize, CIFAR-size and non-square up-sampling, and an odd
# down-sampling.
IMAGE_CASES: dict[str, tuple[int, int, int]] = {
    "299x299": (299, 299, 2),
    "32x32": (32, 32, 2),
    "64x48": (64, 48, 2),
    "347x311": (347, 311, 1),
}
# The resize alone: (in H, in W) -> (out H, out W), float inputs in [0, 255).
RESIZE_CASES: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "up_5x7_to_13x11": ((5, 7), (13, 11)),
    "down_13x11_to_5x7": ((13, 11), (5, 7)),
    "same_6x9": ((6, 9), (6, 9)),
    "up_32x32_to_299x17": ((32, 32), (299, 17)),
}
FEATURES = ("2048", "logits_unbiased", "logits")
OPTIONAL_KEY = "num_batches_tracked"


def seed_for(name: str) -> int:
    """Fixed seed of a named draw: crc32 of the name (as generate_fixtures.py)."""
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


WEIGHTS_SEED = seed_for("inception/weights")


def random_state_dict(layout, seed: int) -> dict[str, np.ndarray]:
    """float32 arrays for ``layout`` (``[(key, shape), ...]`` in state_dict order), all from one
    ``default_rng(seed)`` stream, scaled to keep activations O(1) through the ~95 layers:

    conv weights N(0, 2 / fan_in) (He); batch-norm weight 1 + N(0, 0.1^2), bias and running
    mean N(0, 0.1^2), running variance exp(N(0, 0.2^2)); fc weight N(0, 1 / 2048), bias
    N(0, 0.1^2).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in layout:
        shape = tuple(shape)
        z = rng.standard_normal(shape, dtype=np.float32)
        leaf = key.rsplit(".", 1)[-1]
        if key.endswith("conv.weight"):
            value = z * np.float32(math.sqrt(2.0 / math.prod(shape[1:])))
        elif key == "fc.weight":
            value = z * np.float32(math.sqrt(1.0 / shape[1]))
        elif key.endswith("bn.weight"):
            value = np.float32(1.0) + np.float32(0.1) * z
        elif leaf in ("bias", "running_mean"):
            value = np.float32(0.1) * z
        elif leaf == "running_var":
            value = np.exp(np.float32(0.2) * z)
        else:
            raise KeyError(f"no random draw defined for {key}")
        out[key] = value.astype(np.float32)
    return out


def load_reference():
    """torch-fidelity's Inception module, imported without the package ``__init__``."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        raise SystemExit("pip install --no-deps torch-fidelity==0.4.0 (see PROVENANCE.md)")
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules.setdefault("torch_fidelity", package)
    from torch_fidelity import feature_extractor_inceptionv3 as fe
    from torch_fidelity import interpolate_compat_tensorflow as ict

    return fe, ict


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    start = time.time()

    spec = importlib.util.spec_from_file_location("jaxdiff_gf", HERE / "generate_fixtures.py")
    gf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gf)  # for its deterministic .npz writer

    fe, ict = load_reference()
    store = gf.Store("inception")
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "unused"
        torch.save({}, empty)
        cls = fe.FeatureExtractorInceptionV3
        real_load = cls.load_state_dict
        cls.load_state_dict = lambda self, state_dict: None
        try:
            skeleton = cls("inception-v3-compat", list(FEATURES), str(empty))
        finally:
            cls.load_state_dict = real_load
        layout = [
            (k, list(v.shape))
            for k, v in skeleton.state_dict().items()
            if k.rsplit(".", 1)[-1] != OPTIONAL_KEY
        ]
        weights = random_state_dict(layout, WEIGHTS_SEED)
        path = Path(tmp) / "random-inception.pth"
        torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, path)
        net = cls("inception-v3-compat", list(FEATURES), feature_extractor_weights_path=str(path))
    for key, value in net.state_dict().items():
        if key in weights:
            assert np.array_equal(value.numpy(), weights[key]), key
    store.put("weights/sums", np.array([weights[k].sum(dtype=np.float64) for k, _ in layout]))

    cases = {}
    for case, (h, w, batch) in IMAGE_CASES.items():
        seed = seed_for(f"inception/images/{case}")
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, size=(batch, 3, h, w), dtype=np.uint8)
        with torch.no_grad():
            outputs = net(torch.from_numpy(images))
        store.put(f"{case}/images", images)
        for name, value in zip(FEATURES, outputs, strict=True):
            store.put(f"{case}/{'pool' if name == '2048' else name}", value)
        pool = outputs[0].numpy()
        cases[case] = {
            "kind": "features",
            "size": [h, w],
            "batch": batch,
            "seed": seed,
            "max_abs_pool": float(np.abs(pool).max()),
            "mean_pool": float(pool.mean()),
        }
        print(f"{case}: max|pool| {cases[case]['max_abs_pool']:.4g}", flush=True)

    for case, (in_size, out_size) in RESIZE_CASES.items():
        seed = seed_for(f"inception/resize/{case}")
        rng = np.random.default_rng(seed)
        x = (rng.random((2, 3, *in_size)) * 255).astype(np.float32)
        out = ict.interpolate_bilinear_2d_like_tensorflow1x(
            torch.from_numpy(x), size=out_size, align_corners=False
        )
        store.put(f"resize/{case}/in", x)
        store.put(f"resize/{case}/out", out)
        cases[f"resize/{case}"] = {
            "kind": "resize",
            "in": list(in_size),
            "out": list(out_size),
            "seed": seed,
        }

    store.case(
        "__weights__",
        kind="weights",
        seed=WEIGHTS_SEED,
        layout=layout,
        num_parameters=int(sum(math.prod(s) for _, s in layout)),
    )
    for case, params in cases.items():
        store.case(case, **params)
    store.case(
        "__versions__",
        kind="versions",
        torch=torch.__version__,
        torch_fidelity=importlib.metadata.version("torch-fidelity"),
        numpy=np.__version__,
    )
    if store.nonfinite:
        raise SystemExit(f"non-finite reference outputs: {store.nonfinite}")
    args.out.mkdir(parents=True, exist_ok=True)
    written = store.write(args.out)
    print(f"wrote {written} ({written.stat().st_size / 1e6:.2f} MB) in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
