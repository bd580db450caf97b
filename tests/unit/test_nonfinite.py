"""The train step's non-finite guard: a NaN or Inf loss or gradient skips the update (counted in
the ``skipped`` metric) and changes nothing but the step; ``train.nonfinite_leaves`` names
the bad arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff import train


def _loss_fn(params, batch, key):
    # batch["poison"] is 0 (a finite step), NaN (a NaN loss) or inf (an infinite gradient)
    del key
    pred = batch["x"] @ params["w"] + params["b"][None, :]
    loss = jnp.mean(jnp.square(pred - batch["y"])) + batch["poison"][0] * params["b"][0]
    return loss, {}


def _batch(poison):
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    return {"x": x, "y": x.sum(-1, keepdims=True), "poison": np.full((4,), poison, np.float32)}


def _state(optimizer):
    params = {"w": jnp.full((3, 1), 0.5, jnp.float32), "b": jnp.zeros((1,), jnp.float32)}
    return train.create_train_state(params, optimizer, jax.random.PRNGKey(0))


def _leaves(state):
    return [
        np.asarray(x) for x in jax.tree.leaves((state.params, state.ema_params, state.opt_state))
    ]


@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_a_nonfinite_step_is_skipped_and_counted(poison):
    optimizer = optax.adam(1e-2)
    step = train.make_train_step(_loss_fn, optimizer, ema=0.5, donate=False)
    state, m0 = step(_state(optimizer), _batch(0.0))
    before = _leaves(state)
    skipped, m1 = step(state, _batch(poison))
    assert float(m0["skipped"]) == 0.0 and float(m1["skipped"]) == 1.0
    assert not np.isfinite(float(m1["loss"])) or not np.isfinite(float(m1["grad_norm"]))
    assert int(skipped.step) == 2  # the step advances, so the next batch and key are new
    for a, b in zip(before, _leaves(skipped), strict=True):
        np.testing.assert_array_equal(a, b)
    # the next finite step updates from the state before the skip, as if it never happened
    after, m2 = step(skipped, _batch(0.0))
    direct, _ = step(state.replace(step=jnp.asarray(2, jnp.int32)), _batch(0.0))
    assert float(m2["skipped"]) == 0.0
    for a, b in zip(_leaves(after), _leaves(direct), strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(np.isfinite(x).all() for x in _leaves(after))


def test_without_the_guard_nan_reaches_the_params():
    optimizer = optax.adam(1e-2)
    step = train.make_train_step(_loss_fn, optimizer, skip_nonfinite=False, donate=False)
    state, metrics = step(_state(optimizer), _batch(np.nan))
    assert float(metrics["skipped"]) == 0.0
    assert train.nonfinite_leaves(state.params) == ["['b']"]


def test_the_guard_inside_several_steps_per_call():
    optimizer = optax.sgd(0.1)
    step = train.make_train_step(_loss_fn, optimizer, steps_per_call=3, donate=False)
    batches = jax.tree.map(lambda *xs: np.stack(xs), _batch(0.0), _batch(np.nan), _batch(0.0))
    state, metrics = step(_state(optimizer), batches)
    np.testing.assert_array_equal(np.asarray(metrics["skipped"]), [0.0, 1.0, 0.0])
    assert int(state.step) == 3 and not train.nonfinite_leaves(state)


def test_nonfinite_leaves_names_each_bad_array():
    tree = {"a": np.ones(3), "b": {"c": np.array([1.0, np.inf])}, "d": np.arange(3)}
    assert train.nonfinite_leaves(tree) == ["['b']['c']"]
    assert train.nonfinite_leaves({"a": jnp.ones(2)}) == []
