"""What ``metrics.jsonl`` logs: means over the logging window, the decay of the last EMA update."""

import math

import jax.numpy as jnp

from jaxdiff import runner


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
    window = runner._window_init(steps[0])
    for metrics in steps:
        window = runner._window_add(window, metrics)
    values = runner._window_values(window)
    assert values["loss"] == 2.0 and values["grad_norm"] == 4.0  # (1 + 3 + 2) / 3
    assert math.isclose(values["ema_decay"], 0.9, rel_tol=1e-6)  # not the 1.0 of the last step
    assert math.isclose(values["learning_rate"], 0.2, rel_tol=1e-6)

    # the next window starts afresh but remembers the last update's decay
    window = runner._window_init(steps[0], window)
    window = runner._window_add(window, _step(float("inf"), 1.0))
    values = runner._window_values(window)
    assert math.isnan(values["loss"])  # no finite step: written as null
    assert math.isclose(values["ema_decay"], 0.9, rel_tol=1e-6)
    assert runner._json_line(values).count("null") == 2  # loss and grad_norm


def test_durations_read_as_people_write_them():
    assert [runner._duration(s) for s in (0.4, 42, 185, 3720, 90061)] == [
        "0s", "42s", "3m05s", "1h02m", "25h01m"
    ]  # fmt: skip
