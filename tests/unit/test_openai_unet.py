"""openai's UNetModel execution options: ``remat`` (the references' ``use_checkpoint``)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models import UNetModel, openai_model_from_config

TINY = dict(
    in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
    attention_resolutions=(2,), dropout=0.1, channel_mult=(1, 2), num_classes=3, num_heads=2,
    use_scale_shift_norm=True, resblock_updown=True,
)  # fmt: skip


def test_remat_changes_neither_parameters_nor_values_nor_gradients():
    plain, remat = UNetModel(**TINY), UNetModel(**TINY, remat=True)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
    t, y = jnp.array([3.0, 700.0]), jnp.array([0, 2])
    variables = plain.init(jax.random.PRNGKey(0), x, t, y)
    remat_variables = remat.init(jax.random.PRNGKey(0), x, t, y)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(remat_variables)
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, remat_variables)
    # off the initial values: the zero-initialised output layers would make everything zero
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    moved = [v + 0.05 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=True)]
    variables = jax.tree_util.tree_unflatten(tree, moved)

    def loss(net):
        def f(v):
            out = net.apply(v, x, t, y, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
            return jnp.sum(jnp.square(out))

        return f

    value, grads = jax.jit(jax.value_and_grad(loss(plain)))(variables)
    value_r, grads_r = jax.jit(jax.value_and_grad(loss(remat)))(variables)
    assert np.isfinite(value) and float(value) > 0
    np.testing.assert_allclose(value_r, value, rtol=1e-6)
    # the recomputed forward is the same program fused differently: float32 round-off,
    # relative to the largest gradient (some are zero but for round-off: the bias of a
    # convolution that a GroupNorm follows)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(grads))
    pairs = zip(jax.tree_util.tree_leaves(grads_r), jax.tree_util.tree_leaves(grads), strict=True)
    worst = max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs)
    print(worst, scale, worst / scale)
    assert worst <= 1e-6 * scale, (worst, scale)


def test_use_checkpoint_is_remat():
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}
    assert openai_model_from_config({**config, "use_checkpoint": True}).remat is True
    assert openai_model_from_config({**config, "use_checkpoint": False}).remat is False
    assert openai_model_from_config({**config, "use_checkpoint": True}, remat=False).remat is False
