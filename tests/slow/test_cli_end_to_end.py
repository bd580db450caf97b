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

pytestmark = pytest.mark.slow

TINY = [
    "--dim", "8", "--dim-mults", "1,2", "--image-size", "8", "--timesteps", "20",
    "--batch-size", "8", "--num-samples", "4", "--sample-steps", "3", "--log-every", "2",
]  # fmt: skip


def _jaxdiff(*args, **kwargs):
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
    resumed = _jaxdiff("train", "--workdir", str(killed), *steps)
    assert resumed.returncode == 0, resumed.stderr

    config = runner.load_config(straight)
    a = runner._restored(straight, None)[2]
    b = runner._restored(killed, None)[2]
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
    assert (
        result.returncode == 1
        and "empty" in result.stderr.lower()
        or "no image" in result.stderr.lower()
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    result = _jaxdiff("train", "--workdir", str(tmp_path / "z"), "--data-dir", str(broken), *TINY)
    assert result.returncode == 1 and "a.png" in result.stderr
    result = _jaxdiff("sample", "--workdir", str(tmp_path / "nowhere"))
    assert result.returncode == 1 and "not a jaxdiff workdir" in result.stderr
