"""The ``jaxdiff`` command end to end on tiny configurations: train, sample, bpd, resume after
SIGKILL, and bad input that must not touch a good checkpoint."""

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxdiff import checkpoint, cli, data, runner
from jaxdiff import workdir as wd
from tests.slow import _xla_cache
from tests.unit.test_logging import _scalars

pytestmark = pytest.mark.slow

TINY = [
    "--dim", "8", "--dim-mults", "1,2", "--image-size", "8", "--timesteps", "20",
    "--batch-size", "8", "--num-samples", "4", "--sample-steps", "3", "--log-every", "2",
    "--eval-every", "0",
]  # fmt: skip


def _jaxdiff(*args, **kwargs):
    kwargs.setdefault("env", _xla_cache.env())
    return subprocess.run(
        [sys.executable, "-m", "jaxdiff.cli", *args], capture_output=True, text=True, **kwargs
    )


def _tree_files(path: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_train_sample_bpd(tmp_path):
    workdir = tmp_path / "run"
    args = ["train", "--workdir", str(workdir), "--steps", "6", "--save-every", "3", *TINY]
    assert cli.main(args + ["--sample-every", "3", "--tensorboard"]) == 0
    for name in ("config.json", "metrics.jsonl", "loss.png", "samples/latest.png",
                 "samples/step_3.png", "samples/step_6.png"):  # fmt: skip
        assert (workdir / name).is_file(), name
    assert checkpoint.latest_step(workdir) == 6
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in rows)
    # TensorBoard has the same numbers
    scalars = _scalars(workdir / "tensorboard")
    losses = [(step, value) for tag, step, value in scalars if tag == "loss"]
    assert losses == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert {"grad_norm", "learning_rate", "images_per_s"} <= {tag for tag, _, _ in scalars}

    out = tmp_path / "grid"
    assert cli.main(["sample", "--workdir", str(workdir), "--num", "4", "--steps", "3",
                     "--out", str(out)]) == 0  # fmt: skip
    images = np.load(out.with_suffix(".npz"))["images"]
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8
    assert out.with_suffix(".png").is_file()
    # Refuses to overwrite without --force.
    assert cli.main(["sample", "--workdir", str(workdir), "--out", str(out)]) == 1

    result = _jaxdiff("bpd", "--workdir", str(workdir), "--split", "test")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["step"] == 6 and report["split"] == "test" and report["images"] > 100
    assert 0 < report["bits_per_dim"] < 20
    n = report["images"]
    assert f"bits/dim of {n} test images at step 6" in result.stderr  # progress on stderr
    assert f"{n}/{n} images" in result.stderr and "s left" in result.stderr

    _check_export(workdir, tmp_path)


# Loads an exported state_dict into the reference Unet (strict keys) and runs it on a probe.
_REFERENCE_LOAD = """
import importlib.util, json, sys
import numpy as np
spec = importlib.util.spec_from_file_location("gf", sys.argv[1])
gf = importlib.util.module_from_spec(spec); spec.loader.exec_module(gf); gf.install_stand_ins()
import torch
from denoising_diffusion_pytorch.denoising_diffusion_pytorch import Unet
net = Unet(**json.loads(sys.argv[3])).eval()
if sys.argv[2].endswith(".pt"):
    state = torch.load(sys.argv[2], weights_only=True)
else:
    state = {k: torch.from_numpy(v) for k, v in np.load(sys.argv[2]).items()}
net.load_state_dict(state, strict=True)
probe = np.load(sys.argv[4])
with torch.no_grad():
    out = net(torch.from_numpy(probe["x"]), torch.from_numpy(probe["t"]))
np.save(sys.argv[5], out.numpy())
"""


def _check_export(workdir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """``jaxdiff export``: .npz and .msgpack read back to the checkpoint's weights exactly; the
    reference Unet loads the export (.pt where torch is installed) with equal outputs."""
    from jaxdiff import convert
    from tests.parity._fixtures import UNET, assert_close, nchw
    from tests.parity.test_unet_parity import HERE, PYTHON, _reference_available

    _, model, state = wd.restored(workdir, None)
    npz, msgpack = tmp_path / "ema.npz", tmp_path / "model.msgpack"
    result = _jaxdiff("export", "--workdir", str(workdir), "--out", str(npz))
    assert result.returncode == 0, result.stderr
    # it says how to build the reference network that loads it
    kwargs = result.stdout.split("Unet(**", 1)[1].rsplit(") loads it", 1)[0]
    assert json.loads(kwargs) == {"dim": 8, "dim_mults": [1, 2], "channels": 1}
    assert cli.main(["export", "--workdir", str(workdir), "--out", str(msgpack),
                     "--which", "model", "--step", "3"]) == 0  # fmt: skip
    ema = convert.torch_state_dict_to_flax(dict(np.load(npz)), model)
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(state.ema_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    step3 = wd.restored(workdir, 3)[2].params
    back = convert.load_flax_params(msgpack, model)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(step3), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # an existing file is kept, a missing step and an unknown suffix are named
    before = npz.read_bytes()
    assert _jaxdiff("export", "--workdir", str(workdir), "--out", str(npz)).returncode == 1
    assert npz.read_bytes() == before
    missing = _jaxdiff("export", "--workdir", str(workdir), "--out", str(tmp_path / "a.npz"),
                       "--step", "5")  # fmt: skip
    assert missing.returncode == 1 and "no checkpoint of step 5" in missing.stderr
    assert "[3, 6]" in missing.stderr and "Traceback" not in missing.stderr
    odd = _jaxdiff("export", "--workdir", str(workdir), "--out", str(tmp_path / "a.bin"))
    assert odd.returncode == 1 and ".pt" in odd.stderr and not (tmp_path / "a.bin").exists()

    pt = tmp_path / "ema.pt"
    result = _jaxdiff("export", "--workdir", str(workdir), "--out", str(pt))
    try:
        import torch  # noqa: F401
    except ImportError:  # the message says how to get it, and nothing is written
        assert result.returncode == 1 and "pip install torch==2.13.0" in result.stderr
        assert not pt.exists()
    else:
        assert result.returncode == 0, result.stderr
    if not _reference_available():
        return
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8, 8, 1)).astype(np.float32)
    t = np.array([0, 7, 19])
    np.savez(tmp_path / "probe.npz", x=nchw(x), t=t)
    want = model.apply(state.ema_params, x, t)
    for path in [npz] + ([pt] if pt.exists() else []):
        out = tmp_path / f"out_{path.suffix[1:]}.npy"
        subprocess.run(
            [PYTHON, "-c", _REFERENCE_LOAD, str(HERE / "generate_fixtures.py"), str(path), kwargs,
             str(tmp_path / "probe.npz"), str(out)],
            check=True, capture_output=True,
        )  # fmt: skip
        assert_close(np.load(out), nchw(want), UNET, err_msg=f"reference Unet on {path.name}")


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    """Acceptance: kill `jaxdiff train` with SIGKILL mid-run, start it again, and the final
    parameters equal those of a run that was never stopped."""
    # 40 steps with a checkpoint every 4: a save takes about a second on the test machine, so
    # the kill, sent once the checkpoint of step 8 is complete, lands mid-run (checked below).
    steps = ["--steps", "40", "--save-every", "4", "--sample-every", "1000", *TINY]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _jaxdiff("train", "--workdir", str(straight), *steps).returncode == 0

    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxdiff.cli", "train", "--workdir", str(killed), *steps],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_xla_cache.env(),
    )
    deadline = time.time() + 300
    while (
        time.time() < deadline
        and not (killed / "checkpoints" / "8" / "commit_success.txt").exists()
    ):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 8 <= checkpoint.latest_step(killed) < 40
    resumed = _jaxdiff("train", "--workdir", str(killed))  # the workdir is the run: no flags
    assert resumed.returncode == 0, resumed.stderr
    assert f"continuing {killed} with its config.json" in resumed.stderr

    config = runner.load_config(straight)
    a = wd.restored(straight, None)[2]
    b = wd.restored(killed, None)[2]
    assert int(a.step) == int(b.step) == 40
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    steps_logged = [
        json.loads(r)["step"] for r in (killed / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps_logged == list(range(2, 41, 2)), steps_logged
    assert config == runner.load_config(killed)


def test_bad_input_is_reported_and_never_touches_a_good_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    base = ["train", "--workdir", str(workdir), "--steps", "2", "--save-every", "2", *TINY]
    assert cli.main(base) == 0
    before = _tree_files(workdir / "checkpoints")

    other = _jaxdiff(*base, "--dim", "16")
    assert other.returncode == 1 and "model.dim" in other.stderr, other.stderr
    assert _tree_files(workdir / "checkpoints") == before

    missing = _jaxdiff(
        "train", "--workdir", str(tmp_path / "x"), "--data-dir", str(tmp_path / "nope"), *TINY
    )
    assert missing.returncode == 1 and "nope" in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _jaxdiff("train", "--workdir", str(tmp_path / "y"), "--data-dir", str(empty), *TINY)
    stderr = result.stderr.lower()
    assert result.returncode == 1 and ("empty" in stderr or "no image" in stderr), result.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    result = _jaxdiff("train", "--workdir", str(tmp_path / "z"), "--data-dir", str(broken), *TINY)
    assert result.returncode == 1 and "a.png" in result.stderr
    result = _jaxdiff("sample", "--workdir", str(tmp_path / "nowhere"))
    assert result.returncode == 1 and "not a jaxdiff workdir" in result.stderr


def test_an_rgb_folder_trains_as_rgb_and_resumes_without_flags(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    for i in range(12):
        (images / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"c{i % 3}" / f"{i}.png")
    workdir = tmp_path / "run"
    args = ["train", "--workdir", str(workdir), "--data-dir", str(images), *TINY]
    # 2 of the 12 files held out by name (data.folder_split), 10 to train on
    held = data.folder_split(sorted(f"c{i % 3}/{i}.png" for i in range(12)), 0.25)
    assert held.sum() == 2
    trained = _jaxdiff(*args, "--steps", "2", "--save-every", "2", "--test-fraction", "0.25")
    assert trained.returncode == 0, trained.stderr
    assert runner.load_config(workdir).data.channels == 3  # detected, and recorded
    resumed = _jaxdiff("train", "--workdir", str(workdir), "--steps", "4")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from the checkpoint of step 2" in resumed.stderr
    assert checkpoint.latest_step(workdir) == 4
    samples = _jaxdiff("sample", "--workdir", str(workdir), "--num", "2", "--steps", "2")
    assert samples.returncode == 0, samples.stderr
    grid = np.load(workdir / "samples" / "ddim2_seed0.npz")["images"]
    assert grid.shape == (2, 8, 8, 3)
    # bits/dim on the held-out files, named as such
    bpd = _jaxdiff("bpd", "--workdir", str(workdir), "--split", "test", "--quiet")
    assert bpd.returncode == 0, bpd.stderr
    report = json.loads(bpd.stdout)
    assert report["split"] == "test" and report["images"] == 2
    # an explicit count converts the images, and says so
    gray = _jaxdiff("train", "--workdir", str(tmp_path / "gray"), "--data-dir", str(images),
                    "--channels", "1", "--steps", "1", *TINY)  # fmt: skip
    assert gray.returncode == 0 and "converts them to grayscale" in gray.stderr, gray.stderr


def _params(workdir):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(wd.restored(workdir, None)[2])]


def test_compilation_cache_is_reused_and_changes_no_result(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # tiny programs too
    cache = tmp_path / "cache"
    base = ["train", "--steps", "2", "--save-every", "2", "--sample-every", "2", *TINY]
    first = _jaxdiff(*base, "--workdir", str(tmp_path / "a"), "--compilation-cache", str(cache))
    assert first.returncode == 0, first.stderr
    entries = sorted(p.name for p in cache.iterdir())
    assert any(name.startswith("jit_step_fn") for name in entries), entries
    # the same programs again: loaded from the cache, none compiled anew
    again = _jaxdiff(*base, "--workdir", str(tmp_path / "b"), "--compilation-cache", str(cache))
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in cache.iterdir()) == entries
    off = _jaxdiff(*base, "--workdir", str(tmp_path / "c"), "--compilation-cache", "none")
    assert off.returncode == 0, off.stderr
    runs = [_params(tmp_path / name) for name in "abc"]
    for x, y, z in zip(*runs, strict=True):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)

    # without the flag: $JAXDIFF_COMPILATION_CACHE, else ~/.cache/jaxdiff/xla
    monkeypatch.delenv("JAXDIFF_COMPILATION_CACHE", raising=False)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    code = "import jax; from jaxdiff import cli; cli._compilation_cache(None); "
    code += "print(jax.config.jax_compilation_cache_dir)"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert shown.stdout.strip() == str(tmp_path / "home" / ".cache" / "jaxdiff" / "xla")
    monkeypatch.setenv("JAXDIFF_COMPILATION_CACHE", str(cache))
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert shown.stdout.strip() == str(cache)


def test_unusable_compilation_cache_is_refused_before_anything_runs(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    workdir = tmp_path / "run"
    result = _jaxdiff(
        "train", "--workdir", str(workdir), *TINY, "--compilation-cache", str(blocker / "xla")
    )
    assert result.returncode == 1
    assert "compilation cache" in result.stderr and str(blocker) in result.stderr, result.stderr
    assert not workdir.exists()
