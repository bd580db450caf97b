"""Two JAX processes (``jax.distributed`` on 127.0.0.1, gloo collectives, one CPU device each)
train into a fresh workdir with process 1 starting late, then resume; the result equals, bit for
bit, one process with two devices trained without interruption.

Each run is a subprocess (tests/slow/_multiprocess_worker.py) with a timeout; on failure the
test prints the tails of their stderr. All runs share one persistent XLA compilation cache, so
that only the first pays for compiling the programs the later ones reuse.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxdiff import checkpoint, train
from jaxdiff import workdir as wd
from tests.slow import _xla_cache
from tests.slow._multiprocess_worker import config

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[2]
LATE_START_S = 3.0  # process 1 starts after process 0 has created the workdir
TIMEOUT_S = 540  # per run; a loaded 2-core machine compiles the U-Net step slowly


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache: pathlib.Path, devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"{_xla_cache.FAST_COMPILE} --xla_force_host_platform_device_count={devices}",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    return env


def _run(workdir, steps, cache, num_processes: int) -> None:
    """Run the worker in ``num_processes`` processes (one device each; two devices when alone)."""
    port = _free_port()
    env = _env(cache, 2 if num_processes == 1 else 1)
    procs = []
    for i in range(num_processes):
        if i:
            time.sleep(LATE_START_S)
        cmd = [sys.executable, "-m", "tests.slow._multiprocess_worker", str(workdir), str(steps)]
        procs.append(
            subprocess.Popen(
                [*cmd, str(i), str(num_processes), str(port)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + TIMEOUT_S
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            outputs.append(proc.communicate())
    codes = [p.returncode for p in procs]
    if codes != [0] * num_processes:
        tails = "\n".join(
            f"--- process {i} (exit {code}) stderr tail:\n" + "\n".join(err.splitlines()[-25:])
            for i, (code, (_, err)) in enumerate(zip(codes, outputs, strict=True))
        )
        pytest.fail(f"{num_processes}-process run to step {steps} failed:\n{tails}")
    for i, (out, _) in enumerate(outputs):
        assert f"process {i}/{num_processes} done at step {steps} on 2 devices" in out


def _final(workdir: pathlib.Path):
    cfg = config(6)
    like = jax.eval_shape(
        lambda: wd.initial_state(
            cfg, wd.build_model(cfg), train.default_optimizer(cfg.run.lr), None
        )
    )
    return checkpoint.restore(workdir, like, config=cfg.identity())


def _losses(workdir: pathlib.Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_two_late_processes_resume_and_equal_one_process_on_two_devices(tmp_path):
    cache = tmp_path / "xla-cache"
    single, multi = tmp_path / "one-process", tmp_path / "two-processes"
    _run(single, 6, cache, num_processes=1)
    _run(multi, 4, cache, num_processes=2)
    assert checkpoint.all_steps(multi) == [2, 4]
    _run(multi, 6, cache, num_processes=2)  # resumes from step 4

    for workdir in (single, multi):
        assert checkpoint.all_steps(workdir) == [4, 6]
    a, b = _final(single), _final(multi)
    assert int(a.step) == int(b.step) == 6
    for name in ("params", "ema_params", "opt_state", "key"):
        x, y = getattr(a, name), getattr(b, name)
        assert jax.tree.structure(x) == jax.tree.structure(y), name
        for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=name)
    assert _losses(single) == _losses(multi)
    assert sorted(_losses(multi)) == [2, 4, 6]
