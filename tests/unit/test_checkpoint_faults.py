"""A full disk and a read-only disk, for real: a 2 MB tmpfs mounted in a private mount namespace
(``unshare -m``, as root). Each failed write is one CheckpointWriteError naming the directory
and the OS error, raised at the save, wait or next save (also for a background save); nothing
older is deleted, no temporary step is left, and stderr stays nearly silent."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
MAX_STDERR_LINES = 40  # issue 11's bar for a failed run
ENOSPC = "No space left on device (errno ENOSPC)"
EROFS = "Read-only file system (errno EROFS)"


def _can_mount(tmp_path) -> str | None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "needs root and unshare(1) to mount a tmpfs"
    probe = subprocess.run(
        ["unshare", "-m", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    return None if probe.returncode == 0 else f"cannot mount a tmpfs here: {probe.stderr.strip()}"


def test_full_and_read_only_disks(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    reason = _can_mount(mnt)
    if reason:
        pytest.skip(reason)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        ["unshare", "-m", sys.executable, "-m", "tests.unit._checkpoint_fault_worker", str(mnt)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stderr = proc.stderr.splitlines()
    assert len(stderr) < MAX_STDERR_LINES and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    got = {r["scenario"]: r for r in map(json.loads, proc.stdout.splitlines())}

    def failed(name, step, why):
        r = got[name]
        assert r["error"] == "CheckpointWriteError", r
        assert r["message"].startswith(f"cannot write the checkpoint of step {step} in "), r
        assert f"/run/checkpoints': {why}." in r["message"] and "another workdir" in r["message"]
        assert r["message"].count("\n") <= 1
        return r

    assert got["first"]["steps"] == [2]
    # keep=1, and the newer step failed: the older one stays, and no temporary directory.
    assert failed("full_sync", 4, ENOSPC)["entries"] == ["2"]
    assert got["retry_after_full"]["steps"] == [4] and got["retry_after_full"]["entries"] == ["4"]
    assert got["full_async_started"]["returned"] == "True"
    assert failed("full_async_next_save", 6, ENOSPC)["entries"] == ["4"]
    assert failed("full_async_wait", 10, ENOSPC)["entries"] == ["4"]
    assert got["restore_after_faults"]["equal"]
    for mode in (False, True):
        assert failed(f"read_only_async={mode}", 12, EROFS)["steps"] == [4]
    new = got["read_only_new_workdir"]
    assert (
        new["error"] == "CheckpointWriteError" and f"/fresh/checkpoints': {EROFS}" in new["message"]
    )
    lock = got["read_only_lock"]
    assert lock["error"] == "CheckpointWriteError" and f"/run': {EROFS}" in lock["message"]
