"""A new user's first hour, as a script, in a fresh virtual environment: the README's two
Quickstart commands (``jaxdiff train`` at a terminal, stopped with Ctrl-C and resumed; the
test install), then ``sample``, ``eval``, ``bpd``, ``export`` to ``.pt`` loaded by
denoising-diffusion-pytorch's ``Unet`` with equal outputs, and an RGB image folder trained and
resumed without flags.

Shortened where the user would wait: the Quickstart run is stopped after its first progress
window and resumed to 140 steps of its 1500, sampling and evaluation draw fewer images, and
bits/dim measures 16 test images (``--num``). The venv installs from PyPI and this machine's
wheels (torch==2.13.0, the CPU build) like the README's commands do.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import numpy as np
import pytest

from tests.slow import _xla_cache

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[2]


def _run(cmd, cwd, env, timeout=900):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _at_a_terminal(cmd, cwd, env, stop_at: int, timeout=900):
    """Run ``cmd`` with a 100-column pseudo-terminal as its stdout and stderr; send SIGINT once
    the progress bar shows ``stop_at`` steps done. Returns (output, seconds to the first
    output, exit code)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    output, first, interrupted = b"", None, False
    while time.perf_counter() - start < timeout:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the terminal closed: the process ended
                break
            if not chunk:
                break
            first = first or time.perf_counter() - start
            output += chunk
            done = [int(n) for n in re.findall(rb"\| *(\d+)/1500 \[", output)]
            if not interrupted and done and max(done) >= stop_at:
                proc.send_signal(signal.SIGINT)
                interrupted = True
        elif proc.poll() is not None:
            break
    code = proc.wait(timeout=120)
    os.close(master)
    return output.decode(errors="replace"), first, code


def test_a_new_users_first_hour(tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, os.environ)
    bin_ = venv / "bin"
    env = {k: v for k, v in _xla_cache.env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{bin_}{os.pathsep}{os.environ['PATH']}", VIRTUAL_ENV=str(venv), TERM="xterm")
    work = tmp_path / "work"
    work.mkdir()

    # Quickstart 1: pip install -e . && jaxdiff train (at a terminal; Ctrl-C after a window)
    _run([bin_ / "pip", "install", "-e", str(REPO)], work, env)
    output, first, code = _at_a_terminal([bin_ / "jaxdiff", "train"], work, env, stop_at=60)
    assert code == 128 + signal.SIGINT, output[-3000:]
    assert first is not None and first < 10, first  # the first line comes before any compiling
    lines = output.replace("\r", "\n").splitlines()
    assert lines[0].startswith("training runs/digits: 1500 steps of 64 images"), lines[:3]
    assert any(line.startswith("compiling the train step") for line in lines)
    bar = [line for line in lines if re.match(r"train: +\d+%\|", line)]
    assert bar and "loss=" in output and "img_s=" in output, output[-2000:]
    assert "Resume with: jaxdiff train --workdir runs/digits" in output
    workdir = work / "runs" / "digits"
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and 60 <= saved[-1] < 140, saved
    # ... and resumed, off a terminal: plain progress lines, no bar
    resumed = _run([bin_ / "jaxdiff", "train", "--steps", "140"], work, env)
    assert f"resumed from the checkpoint of step {saved[-1]}" in resumed.stderr
    assert "step 140/140" in resumed.stderr and "\r" not in resumed.stderr
    assert "%|" not in resumed.stderr

    # Quickstart 2: the test install (its first test file, not the whole suite)
    _run([bin_ / "pip", "install", "-e", f"{REPO}[test]"], work, env)
    tests = _run([bin_ / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                  "tests/unit/test_purity.py"], REPO, env)  # fmt: skip
    assert " passed" in tests.stdout

    # After training: sample, eval, bpd
    sample = _run([bin_ / "jaxdiff", "sample", "--workdir", "runs/digits", "--sampler", "ddpm",
                   "--steps", "100", "--num", "16"], work, env)  # fmt: skip
    assert "100/100 network calls" in sample.stderr
    grid = workdir / "samples" / "ddpm100_seed0.npz"
    assert np.load(grid)["images"].shape == (16, 16, 16, 1)
    evaluated = _run([bin_ / "jaxdiff", "eval", "--workdir", "runs/digits", "--num", "100",
                      "--steps", "10"], work, env)  # fmt: skip
    result = json.loads(evaluated.stdout)
    assert result["step"] == 140 and np.isfinite(result["digits"]["fd"]), evaluated.stdout
    bpd = _run([bin_ / "jaxdiff", "bpd", "--workdir", "runs/digits", "--num", "16"], work, env)
    report = json.loads(bpd.stdout)
    assert report["split"] == "test" and report["images"] == 16 and report["step"] == 140
    assert 0 < report["bits_per_dim"] < 20

    # export to .pt, loaded by the reference Unet: equal outputs
    _run([bin_ / "pip", "install", "torch==2.13.0", "einops", "ema-pytorch", "packaging"],
         work, env)  # fmt: skip
    _run([bin_ / "pip", "install", "--no-deps", "denoising-diffusion-pytorch==2.3.4"], work, env)
    exported = _run([bin_ / "jaxdiff", "export", "--workdir", "runs/digits", "--out", "ema.pt"],
                    work, env)  # fmt: skip
    kwargs = exported.stdout.split("Unet(**", 1)[1].rsplit(") loads it", 1)[0]
    _check_reference_outputs(bin_ / "python", work, env, kwargs)

    # an RGB folder, and its resume without flags
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(12):
        (work / "photos" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(work / "photos" / f"c{i % 3}" / f"{i}.png")
    small = ["--dim", "8", "--dim-mults", "1,2", "--image-size", "8", "--timesteps", "20",
             "--batch-size", "8", "--num-samples", "4", "--sample-steps", "3", "--log-every",
             "2", "--eval-every", "0", "--save-every", "2"]  # fmt: skip
    _run([bin_ / "jaxdiff", "train", "--workdir", "runs/photos", "--data-dir", "photos",
          "--test-fraction", "0.25", "--steps", "2", *small], work, env)  # fmt: skip
    again = _run([bin_ / "jaxdiff", "train", "--workdir", "runs/photos", "--steps", "4"], work, env)
    assert "continuing runs/photos with its config.json" in again.stderr
    assert "resumed from the checkpoint of step 2" in again.stderr
    config = json.loads((work / "runs" / "photos" / "config.json").read_text())
    assert config["data"]["channels"] == 3 and config["run"]["steps"] == 4
    bpd = _run([bin_ / "jaxdiff", "bpd", "--workdir", "runs/photos", "--quiet"], work, env)
    assert json.loads(bpd.stdout)["images"] == 2  # the held-out files, counted


# Runs in the venv: jaxdiff's EMA network and the reference Unet loaded from the exported .pt
# (strict keys; the reference's Trainer imports get the parity suite's stand-ins), on one probe.
_COMPARE = """
import importlib.util, json, sys
import numpy as np
spec = importlib.util.spec_from_file_location("gf", sys.argv[1])
gf = importlib.util.module_from_spec(spec); spec.loader.exec_module(gf); gf.install_stand_ins()
import torch
from denoising_diffusion_pytorch.denoising_diffusion_pytorch import Unet
from jaxdiff import workdir as wd
_, model, state = wd.restored("runs/digits", None)
rng = np.random.default_rng(0)
x = rng.standard_normal((3, 16, 16, 1)).astype(np.float32)
t = np.array([0, 500, 999])
want = np.asarray(model.apply(state.ema_params, x, t))
net = Unet(**json.loads(sys.argv[2])).eval()
net.load_state_dict(torch.load("ema.pt", weights_only=True), strict=True)
with torch.no_grad():
    got = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t)).numpy()
np.savez(sys.argv[3], want=want.transpose(0, 3, 1, 2), got=got)
"""


def _check_reference_outputs(python, work, env, kwargs):
    from tests.parity._fixtures import UNET, assert_close

    out = work / "compare.npz"
    env = {**env, "XLA_FLAGS": ""}  # the numbers at XLA's default optimisation
    _run([python, "-c", _COMPARE, str(REPO / "tests/parity/generate_fixtures.py"), kwargs,
          str(out)], work, env)  # fmt: skip
    both = np.load(out)
    assert_close(both["got"], both["want"], UNET, err_msg="reference Unet on the exported .pt")
