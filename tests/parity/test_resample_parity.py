"""The loss-second-moment timestep sampler against improved-diffusion's resample.py."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import losses
from tests.parity._fixtures import TABLE, assert_close, load

ARR, META = load("resample_openai")


@pytest.mark.parametrize("case", sorted(k for k in META if k.startswith("second_moment/")))
def test_second_moment_weights_after_every_update(case):
    meta = META[case]
    state = losses.loss_second_moment_init(meta["T"], meta["history_per_term"])
    weights = ARR[f"{case}/weights"]
    assert_close(losses.loss_second_moment_weights(state, meta["uniform_prob"]), weights[0], TABLE)
    for i, (ts, batch_losses) in enumerate(
        zip(ARR[f"{case}/ts"], ARR[f"{case}/losses"], strict=True)
    ):
        state = losses.loss_second_moment_update(
            state, jnp.asarray(ts, jnp.int32), jnp.asarray(batch_losses, jnp.float32)
        )
        got = losses.loss_second_moment_weights(state, meta["uniform_prob"])
        # The reference keeps its history in float64; jaxdiff's is float32.
        assert_close(got, weights[i + 1], TABLE, err_msg=f"after call {i}")
        warm = bool(np.all(np.asarray(state.counts) == meta["history_per_term"]))
        assert warm == bool(ARR[f"{case}/warmed_up"][i + 1])


def test_uniform_weights():
    state = losses.loss_second_moment_init(8)
    assert_close(losses.loss_second_moment_weights(state), ARR["uniform/T8/weights"], TABLE)
