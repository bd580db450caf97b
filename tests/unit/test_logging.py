"""What ``metrics.jsonl`` logs: means over the logging window, the decay of the last EMA update;
the same numbers as TensorBoard scalars, and what a resumed run drops from both."""

import json
import math
import struct

import jax.numpy as jnp
import pytest

from jaxdiff import runlog


def _step(loss, decay, lr=0.1, skipped=0.0):
    return {
        "loss": jnp.float32(loss),
        "grad_norm": jnp.float32(2 * loss),
        "ema_decay": jnp.float32(decay),
        "learning_rate": jnp.float32(lr),
        "skipped": jnp.float32(skipped),
    }


def test_the_window_logs_means_of_finite_values_and_the_last_ema_update():
    steps = [
        _step(1.0, 0.0),
        _step(float("nan"), 1.0, skipped=1.0),
        _step(3.0, 0.9),
        _step(2.0, 1.0, lr=0.2),
    ]
    window = runlog.window_init(steps[0])
    for metrics in steps:
        window = runlog.window_add(window, metrics)
    values = runlog.window_values(window)
    assert values["loss"] == 2.0 and values["grad_norm"] == 4.0  # (1 + 3 + 2) / 3
    assert math.isclose(values["ema_decay"], 0.9, rel_tol=1e-6)  # not the 1.0 of the last step
    assert math.isclose(values["learning_rate"], 0.2, rel_tol=1e-6)

    # the next window starts afresh but remembers the last update's decay
    window = runlog.window_init(steps[0], window)
    window = runlog.window_add(window, _step(float("inf"), 1.0))
    values = runlog.window_values(window)
    assert math.isnan(values["loss"])  # no finite step: written as null
    assert math.isclose(values["ema_decay"], 0.9, rel_tol=1e-6)
    assert runlog.json_line(values).count("null") == 2  # loss and grad_norm


def test_durations_read_as_people_write_them():
    assert [runlog.duration(s) for s in (0.4, 42, 185, 3720, 90061)] == [
        "0s", "42s", "3m05s", "1h02m", "25h01m"
    ]  # fmt: skip


def _scalars(directory):
    """(tag, step, value) of every scalar in the TensorBoard event files under ``directory``,
    read as TFRecords (length, CRC, an Event protobuf, CRC)."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        raw = path.read_bytes()
        i = 0
        while i < len(raw):
            (length,) = struct.unpack("<Q", raw[i : i + 8])
            event = event_pb2.Event.FromString(raw[i + 12 : i + 12 + length])
            i += 12 + length + 4
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_tensorboard_gets_the_logged_numbers_and_a_resume_drops_the_rerun_steps(tmp_path):
    with runlog.MetricsLog(tmp_path, write=True, tensorboard=True, start_step=None) as log:
        for step in (2, 4, 6):
            log.write(step, {"loss": 1.0 / step, "grad_norm": math.nan})
    # stopped after the checkpoint of step 4: steps 5.. run and are logged again
    with runlog.MetricsLog(tmp_path, write=True, tensorboard=True, start_step=4) as log:
        log.write(6, {"loss": 0.5})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 2, "loss": 0.5, "grad_norm": None},
                    {"step": 4, "loss": 0.25, "grad_norm": None},
                    {"step": 6, "loss": 0.5}]  # fmt: skip
    got = _scalars(tmp_path / "tensorboard")
    # the non-finite grad norm is left out; the first run's step 6 comes before the purge
    assert [(t, s) for t, s, _ in got] == [("loss", 2), ("loss", 4), ("loss", 6), ("loss", 6)]
    assert [v for *_, v in got] == pytest.approx([0.5, 0.25, 1 / 6, 0.5])


def test_tensorboard_without_tensorboardx_names_the_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboardx(name, *args, **kwargs):
        if name.startswith("tensorboardX"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboardx)
    with pytest.raises(ValueError, match=r"pip install 'jaxdiff\[tensorboard\]'"):
        runlog.MetricsLog(tmp_path, write=True, tensorboard=True, start_step=None)
    assert not (tmp_path / "metrics.jsonl").exists()
