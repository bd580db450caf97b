"""Faults that must lose no work, through the ``jaxdiff`` command: a diverging run, a second
writer, SIGINT and SIGTERM, a full and a read-only disk. Each ends in a short message without a
traceback, and nothing already saved is lost or overwritten."""

import contextlib
import hashlib
import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxdiff import checkpoint, cli, train
from jaxdiff import workdir as wd
from tests.slow import _xla_cache

pytestmark = pytest.mark.slow

TINY = [
    "--dim", "8", "--dim-mults", "1,2", "--image-size", "8", "--timesteps", "20",
    "--batch-size", "8", "--num-samples", "4", "--sample-steps", "3", "--log-every", "2",
    "--eval-every", "0",
    "--sample-every", "1000",
]  # fmt: skip
# A message, not a traceback: a few lines (jax may add a warning line or two of its own).
MAX_STDERR_LINES = 40


def _jaxdiff(*args, **kwargs):
    kwargs.setdefault("env", _xla_cache.env())
    return subprocess.run(
        [sys.executable, "-m", "jaxdiff.cli", *args], capture_output=True, text=True, **kwargs
    )


def _short(stderr: str) -> None:
    """No traceback, and the lines besides the progress bar are few."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if not line.startswith("[")]
    assert len(lines) < MAX_STDERR_LINES, stderr


def _files(path: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def _strict_json_lines(path: pathlib.Path) -> list[dict]:
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_a_diverging_run_stops_and_keeps_its_finite_checkpoints(tmp_path, monkeypatch, capsys):
    """--lr 1e3: every loss from step 2 on is NaN. Before the guard the run went on, saved NaN
    states, rotated every finite checkpoint out (keep=3) and wrote bare NaN into metrics.jsonl."""
    workdir = tmp_path / "run"
    args = ["train", "--workdir", str(workdir), "--lr", "1000", "--steps", "60"]
    result = _jaxdiff(*args, "--save-every", "1", "--keep", "3", "--max-nonfinite-steps", "5",
                      *TINY)  # fmt: skip
    assert result.returncode == 1, result.stderr
    _short(result.stderr)
    assert "training diverged" in result.stderr and "--lr" in result.stderr, result.stderr
    steps = checkpoint.Checkpoints(workdir).all_steps()
    assert steps and max(steps) < 10, steps
    for step in steps:
        assert not train.nonfinite_leaves(wd.restored(workdir, step)[2]), step
    rows = _strict_json_lines(workdir / "metrics.jsonl")
    assert rows and sum(r["skipped_steps"] for r in rows) >= 1
    assert any(r["loss"] is None for r in rows)

    # sample and bpd refuse NaN parameters (a checkpoint written before the guard existed)
    real = checkpoint.restore

    def poisoned(*a, **k):
        state = real(*a, **k)
        return state.replace(ema_params=jax.tree.map(lambda x: x * np.nan, state.ema_params))

    monkeypatch.setattr(checkpoint, "restore", poisoned)
    out = tmp_path / "grid"
    capsys.readouterr()
    assert cli.main(["sample", "--workdir", str(workdir), "--out", str(out), "--num", "4"]) == 1
    assert "NaN or infinite" in capsys.readouterr().err
    assert not out.with_suffix(".png").exists() and not out.with_suffix(".npz").exists()
    assert cli.main(["bpd", "--workdir", str(workdir)]) == 1
    assert "NaN or infinite" in capsys.readouterr().err


def _start(workdir: pathlib.Path, *args: str) -> subprocess.Popen:
    """Start `jaxdiff train` and return once it has logged a step (it is under way)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxdiff.cli", "train", "--workdir", str(workdir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_xla_cache.env(),
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run logged no step"
        time.sleep(0.05)
    return proc


def _stop(proc: subprocess.Popen, signum: int, workdir: pathlib.Path) -> int:
    """Send ``signum``; the run must save its current step and say how to resume."""
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    _short(stderr)
    name = signal.Signals(signum).name
    assert f"stopped by {name} at step" in stderr and "Resume with: jaxdiff train" in stderr
    saved = checkpoint.Checkpoints(workdir).latest_step()
    assert saved is not None and f"saved the checkpoint of step {saved}" in stderr, stderr
    return saved


def test_a_second_writer_is_refused_at_once_naming_the_holder(tmp_path):
    workdir = tmp_path / "run"
    holder = _start(workdir, "--steps", "100000", "--save-every", "100000", *TINY)
    began = time.time()
    second = _jaxdiff("train", "--workdir", str(workdir), "--steps", "10", *TINY)
    assert second.returncode == 1, second.stderr
    _short(second.stderr)
    assert "in use" in second.stderr and f"process {holder.pid}" in second.stderr, second.stderr
    assert time.time() - began < 60  # refused before compiling anything
    saved = _stop(holder, signal.SIGTERM, workdir)
    assert saved > 0
    # the holder is gone, so its lock is too
    again = _jaxdiff("train", "--workdir", str(workdir), "--steps", str(saved), *TINY)
    assert again.returncode == 0, again.stderr


def test_sigint_saves_the_current_step_and_resumes_to_identical_parameters(tmp_path):
    steps = ["--steps", "80", "--save-every", "1000", *TINY]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert _jaxdiff("train", "--workdir", str(straight), *steps).returncode == 0
    saved = _stop(_start(stopped, *steps), signal.SIGINT, stopped)
    assert 0 < saved < 80  # no checkpoint but the one written on the way out
    assert checkpoint.Checkpoints(stopped).all_steps() == [saved]
    resumed = _jaxdiff("train", "--workdir", str(stopped), *steps)
    assert resumed.returncode == 0, resumed.stderr
    a, b = wd.restored(straight, None)[2], wd.restored(stopped, None)[2]
    assert int(a.step) == int(b.step) == 80
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    logged = [r["step"] for r in _strict_json_lines(stopped / "metrics.jsonl")]
    assert logged == list(range(2, 81, 2)), logged


@contextlib.contextmanager
def _tmpfs(path: pathlib.Path, size: str):
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here to fill a disk: {mounted.stderr.decode()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_and_a_read_only_disk_end_in_a_short_message(tmp_path):
    # Full: the configuration and the logs fit, a checkpoint does not.
    with _tmpfs(tmp_path / "small", "96k") as disk:
        result = _jaxdiff("train", "--workdir", str(disk / "run"), "--steps", "4",
                          "--save-every", "2", *TINY)  # fmt: skip
        assert result.returncode == 1, result.stderr
        _short(result.stderr)
        assert "No space left on device" in result.stderr, result.stderr

    # Read-only, holding a good run: nothing in it may change.
    good = tmp_path / "good"
    base = ["train", "--workdir", str(good), "--save-every", "2", *TINY]
    assert _jaxdiff(*base, "--steps", "2").returncode == 0
    with _tmpfs(tmp_path / "ro", "64m") as disk:
        shutil.copytree(good, disk / "run")
        before = _files(disk / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        result = _jaxdiff("train", "--workdir", str(disk / "run"), "--steps", "4",
                          "--save-every", "2", *TINY)  # fmt: skip
        assert result.returncode == 1, result.stderr
        _short(result.stderr)
        assert "Read-only file system" in result.stderr, result.stderr
        assert _files(disk / "run") == before
        # reading still works on a read-only disk
        sampled = _jaxdiff("sample", "--workdir", str(disk / "run"), "--num", "4", "--steps",
                           "3", "--out", str(tmp_path / "grid"))  # fmt: skip
        assert sampled.returncode == 0, sampled.stderr


def test_a_corrupt_newest_checkpoint_names_the_step_and_the_flag_to_use(tmp_path, capsys):
    workdir = tmp_path / "run"
    base = ["train", "--workdir", str(workdir), "--steps", "4", "--save-every", "2", *TINY]
    assert cli.main(base) == 0
    state_dir = workdir / "checkpoints" / "4" / "state"
    data = [p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    largest = max(data, key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    capsys.readouterr()

    out = tmp_path / "grid"
    for command in (["sample", "--out", str(out)], ["bpd"]):
        assert cli.main([command[0], "--workdir", str(workdir), *command[1:]]) == 1
        err = capsys.readouterr().err
        _short(err)
        assert "step 4" in err and "corrupt" in err and "--step 2" in err, err
    assert cli.main(base) == 1
    err = capsys.readouterr().err
    _short(err)
    assert "step 4" in err and "--restore-step 2" in err, err
    assert cli.main([*base, "--restore-step", "2"]) == 0
    assert checkpoint.all_steps(workdir) == [2, 4]
    assert (workdir / checkpoint.SET_ASIDE / "4" / "state").is_dir()  # kept, not deleted
    assert not train.nonfinite_leaves(wd.restored(workdir, 4)[2])
