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

from jaxdiff import checkpoint, cli, runner
from jaxdiff import workdir as wd
from tests.slow import _xla_cache

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
    assert cli.main(args + ["--sample-every", "3"]) == 0
    for name in ("config.json", "metrics.jsonl", "loss.png", "samples/latest.png",
                 "samples/step_3.png", "samples/step_6.png"):  # fmt: skip
        assert (workdir / name).is_file(), name
    assert checkpoint.latest_step(workdir) == 6
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in rows)

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


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    """Acceptance: kill `jaxdiff train` with SIGKILL mid-run, start it again, and the final
    parameters equal those of a run that was never stopped."""
    # 120 steps with a checkpoint every 4 take several seconds after compilation: the kill lands
    # mid-run.
    steps = ["--steps", "120", "--save-every", "4", "--sample-every", "1000", *TINY]
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
    assert 8 <= checkpoint.latest_step(killed) < 120
    resumed = _jaxdiff("train", "--workdir", str(killed))  # the workdir is the run: no flags
    assert resumed.returncode == 0, resumed.stderr
    assert f"continuing {killed} with its config.json" in resumed.stderr

    config = runner.load_config(straight)
    a = wd.restored(straight, None)[2]
    b = wd.restored(killed, None)[2]
    assert int(a.step) == int(b.step) == 120
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    steps_logged = [
        json.loads(r)["step"] for r in (killed / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps_logged == list(range(2, 121, 2)), steps_logged
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
