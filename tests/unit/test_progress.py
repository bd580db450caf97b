"""Progress output: plain lines off a terminal, a tqdm bar on one, and sampling's per-call
progress, which must not change the samples."""

from __future__ import annotations

import dataclasses
import io

import jax
import numpy as np
import pytest

from jaxdiff import config as cfg
from jaxdiff import progress
from jaxdiff import workdir as wd


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_are_rate_limited_and_always_end_with_the_last():
    out = io.StringIO()
    with progress.Progress(10, desc="sample", unit="network call", stream=out, every=3600) as p:
        for _ in range(10):
            p.update(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, lines  # nothing before the hour is up, then the last
    assert lines[0].startswith("sample: 10/10 network calls, ")
    assert "elapsed" in lines[0] and "0s left" in lines[0]


def test_plain_lines_show_the_numbers_and_the_time_left():
    out = io.StringIO()
    p = progress.Progress(4, desc="train", stream=out, every=0.0, initial=1)
    p.update(1, loss=0.123456, img_s=250)  # the clock starts: no rate, no time left yet
    p.update(1)
    first, second = out.getvalue().splitlines()
    assert first.startswith("train: 2/4 steps, loss 0.1235, img_s 250, ") and "left" not in first
    assert second.startswith("train: 3/4 steps, loss 0.1235") and second.endswith("s left")
    unknown = io.StringIO()
    progress.Progress(None, desc="x", stream=unknown, every=0.0).update(3)
    assert unknown.getvalue().startswith("x: 3 steps, ") and "left" not in unknown.getvalue()


def test_a_terminal_gets_a_bar_and_messages_above_it():
    assert progress.interactive(_Terminal()) and not progress.interactive(io.StringIO())
    out = _Terminal()
    with progress.Progress(3, desc="train", stream=out) as p:
        p.write("compiling the train step")
        for _ in range(3):
            p.update(1, loss=0.5)
    text = out.getvalue()
    assert "compiling the train step\n" in text
    assert "3/3" in text and "loss=0.5" in text and "\r" in text


def _tiny():
    base = cfg.PRESETS["digits"]
    config = cfg.validate(
        dataclasses.replace(
            base,
            model=dataclasses.replace(base.model, dim=8, dim_mults=(1, 2), attn_dim_head=8),
            diffusion=dataclasses.replace(base.diffusion, timesteps=40),
        )
    )
    config = wd.resolve_schedule(config)
    model = wd.build_model(config)
    optimizer = wd.build_optimizer(config)
    state = wd.initial_state(config, model, optimizer, None)
    return config, model, state


@pytest.mark.parametrize(
    "sampler, steps, respacing",
    [("ddpm", 8, None), ("ddim", 5, "10"), ("heun", 3, None)],
)
def test_sampling_progress_counts_every_network_call_and_changes_no_sample(
    sampler, steps, respacing
):
    config, model, state = _tiny()
    calls = []
    key = jax.random.PRNGKey(3)
    quiet = wd.sample_fn(config, model, 4, steps, 0.0, sampler, respacing=respacing)
    shown = wd.sample_fn(
        config, model, 4, steps, 0.0, sampler, respacing=respacing, on_call=lambda: calls.append(1)
    )
    a = np.asarray(quiet(state.ema_params, key))
    b = np.asarray(jax.block_until_ready(shown(state.ema_params, key)))
    jax.effects_barrier()
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(a).all()
    expected = {"ddim": steps if respacing is None else 10, "ddpm": steps, "heun": 2 * steps - 1}
    assert len(calls) == expected[sampler]
    assert shown.calls >= len(calls) >= shown.calls - 1  # Heun skips its last correction
