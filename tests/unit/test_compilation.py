"""XLA compiler options: they change kernels, never results; bad values are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff import compilation, train
from jaxdiff.models import PRESETS, unet_from_config

# Two compiles of the same float32 program whose convolutions, dots and reductions run in
# other kernels (other summation orders): round-off relative to the largest value.
KERNEL_RTOL = 1e-5


def _unet_inputs():
    unet = unet_from_config(PRESETS["tiny"])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
    t = jnp.asarray([3, 700], jnp.int32)
    variables = unet.init(jax.random.PRNGKey(0), x, t)
    return unet, variables, x, t


def _rel_max_error(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_cpu_options_are_accepted_and_other_backends_get_none():
    if jax.default_backend() == "cpu":
        assert compilation.compiler_options() == compilation.CPU_OPTIONS
    assert compilation.compiler_options("tpu") == {}
    assert compilation.compiler_options("gpu") == {}


def test_unknown_option_value_is_not_used():
    assert not compilation._accepted("cpu", (("xla_cpu_experimental_ynn_fusion_type", "bogus"),))


def test_options_change_no_result_of_the_unet_gradient():
    unet, variables, x, t = _unet_inputs()

    def loss(v):
        return jnp.mean(jnp.square(unet.apply(v, x, t) - x))

    grad = jax.value_and_grad(loss)
    default = jax.jit(grad)(variables)
    tuned = jax.jit(grad, compiler_options=compilation.compiler_options())(variables)
    for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(default), strict=True):
        assert _rel_max_error(np.asarray(a), np.asarray(b)) < KERNEL_RTOL


def test_train_step_with_and_without_options_agree():
    unet, variables, x, t = _unet_inputs()
    del t

    def loss_fn(params, batch, key):
        noise = jax.random.normal(key, batch.shape)
        times = jnp.full((batch.shape[0],), 10, jnp.int32)
        return jnp.mean(jnp.square(unet.apply(params, batch + noise, times) - noise)), {}

    optimizer = optax.sgd(0.1)  # Adam would turn round-off in tiny gradients into +-lr
    states = []
    for options in ("auto", None):
        state = train.create_train_state(variables, optimizer, jax.random.PRNGKey(1))
        step = train.make_train_step(loss_fn, optimizer, compiler_options=options, donate=False)
        state, _ = step(state, x)
        states.append(state)
    for a, b in zip(
        jax.tree.leaves(states[0].params), jax.tree.leaves(states[1].params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", ["fast", 3, ["xla_cpu_foo"]])
def test_bad_compiler_options_raise(bad):
    with pytest.raises(ValueError, match="compiler_options must be"):
        compilation.resolve_compiler_options(bad)
    with pytest.raises(ValueError, match="compiler_options must be"):
        train.make_train_step(lambda p, b, k: (0.0, {}), optax.sgd(0.1), compiler_options=bad)
