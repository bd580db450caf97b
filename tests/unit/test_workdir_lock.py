"""The workdir lock: a second writer is refused at once and named; a killed holder, a normal
exit or an exception releases it."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from jaxdiff import checkpoint

# Acquires the lock, says so, then waits (for a kill, or for its stdin to close).
HOLDER = textwrap.dedent(
    """
    import sys
    from jaxdiff import checkpoint
    lock = checkpoint.WorkdirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    sys.stdin.read()
    """
)


def _holder(workdir):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(workdir), "--tag", "holder"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_second_process_is_refused_and_the_holder_named(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(checkpoint.WorkdirLockedError) as info:
            checkpoint.WorkdirLock(tmp_path).acquire()
        message = str(info.value)
        assert f"process {proc.pid} on host {socket.gethostname()!r}" in message
        assert "--tag holder" in message and "UTC" in message
        assert "use another workdir" in message and message.count("\n") <= 1
        assert "Traceback" not in message
        assert info.value.holder["pid"] == proc.pid
        assert isinstance(info.value, checkpoint.CheckpointError)
        assert isinstance(info.value, ValueError)
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    # The holder exited normally: the lock is free again.
    with checkpoint.WorkdirLock(tmp_path) as lock:
        assert lock.held
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


def test_sigkilled_holder_does_not_block_the_next_run(tmp_path):
    proc = _holder(tmp_path)
    with pytest.raises(checkpoint.WorkdirLockedError):
        checkpoint.WorkdirLock(tmp_path).acquire()
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    # The stale file still names the dead holder, but the kernel dropped its lock.
    assert json.loads((tmp_path / checkpoint.LOCK_FILE).read_text())["pid"] == proc.pid
    lock = checkpoint.WorkdirLock(tmp_path).acquire()
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()


def test_same_process_release_and_reacquire(tmp_path):
    lock = checkpoint.WorkdirLock(tmp_path / "new")  # created on acquisition
    lock.acquire()
    with pytest.raises(checkpoint.WorkdirLockedError, match=f"process {os.getpid()} "):
        checkpoint.WorkdirLock(tmp_path / "new").acquire()
    with pytest.raises(checkpoint.CheckpointError, match="already holds"):
        lock.acquire()
    lock.release()
    assert not lock.held and lock.path.read_text() == ""
    lock.release()  # a no-op
    lock.acquire()
    lock.release()

    with pytest.raises(RuntimeError, match="boom"), checkpoint.WorkdirLock(tmp_path / "new"):
        raise RuntimeError("boom")
    with checkpoint.WorkdirLock(tmp_path / "new"):
        pass
