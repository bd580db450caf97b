"""bfloat16 compute with jaxdiff's own Unet: the lowered train step runs its convolutions and
matmuls in bfloat16, whether the params arrive cast (``make_train_step(compute_dtype=...)``)
or the Unet is built with ``dtype="bfloat16"``; float32 stays float32; the bf16 loss is close to
the float32 one.

The HLO checks lower the real step (no compile, abstract state); the loss check compiles one
forward program holding the three variants.
"""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import gaussian, objectives, schedules, train
from jaxdiff.convert import torch_key_map, torch_state_dict_to_flax
from jaxdiff.models import unet_from_config
from jaxdiff.models.unet import Attention, LinearAttention

# "tiny" has a linear-attention stage and a full-attention one (plus the middle attention).
CONFIG = "tiny"
BATCH_SHAPE = (4, 8, 8, 3)
# |loss_bf16 - loss_f32| / loss_f32 on this configuration, measured over 16 draws of weights,
# batch and key: at most 1.1e-3 (bf16 params) and 1.0e-3 (dtype="bfloat16"); a 10x margin.
BF16_LOSS_RTOL = 1e-2

_OPS = ("convolution", "dot_general")
_TYPE = re.compile(r"[x<](bf16|f16|f32|f64)>")


def _op_dtypes(hlo: str) -> dict[str, collections.Counter]:
    """For each of convolution and dot_general, a count of (operand dtypes, result dtype)."""
    out = {op: collections.Counter() for op in _OPS}
    for line in hlo.splitlines():
        for op in _OPS:
            if f"stablehlo.{op}" in line:
                signature = line.rsplit(" : (", 1)[1]
                operands, result = signature.rsplit("->", 1)
                out[op][(tuple(_TYPE.findall(operands)), tuple(_TYPE.findall(result)))] += 1
    return out


def _coeffs():
    return gaussian.make_coeffs(schedules.get_named_beta_schedule("cosine", 50))


def _batch(seed=0):
    return np.random.default_rng(seed).integers(0, 256, BATCH_SHAPE).astype(np.uint8)


def _lower_step(dtype, compute_dtype):
    """The StableHLO text of the real train step, and its abstract output state."""
    unet = unet_from_config(CONFIG, dtype=dtype)
    x = jax.ShapeDtypeStruct((1, *BATCH_SHAPE[1:]), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    params = jax.eval_shape(unet.init, jax.random.PRNGKey(0), x, t)
    optimizer = train.default_optimizer()
    state = jax.eval_shape(
        lambda p: train.create_train_state(p, optimizer, jax.random.PRNGKey(1)), params
    )
    loss_fn = objectives.diffusion_loss_fn(unet.apply, _coeffs())
    step = train.make_train_step(loss_fn, optimizer, compute_dtype=compute_dtype, donate=False)
    batch = jax.ShapeDtypeStruct(BATCH_SHAPE, jnp.uint8)
    lowered = step.jitted.lower(state, batch)
    return lowered.as_text(), lowered.out_info[0], params


@pytest.fixture(scope="module")
def float32_step():
    return _lower_step(None, None)


def _conv_kernel_count(params):
    """The number of spatial convolution kernels (4-D ``kernel`` leaves; 1x1 convolutions are
    Dense layers)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return sum(1 for path, leaf in leaves if path[-1].key == "kernel" and leaf.ndim == 4)


def test_float32_step_runs_only_float32_convolutions_and_matmuls(float32_step):
    hlo, _, params = float32_step
    ops = _op_dtypes(hlo)
    assert set(ops["convolution"]) == {(("f32", "f32"), ("f32",))}, ops["convolution"]
    assert set(ops["dot_general"]) == {(("f32", "f32"), ("f32",))}, ops["dot_general"]
    # every 3x3 / 7x7 kernel is a forward convolution and two backward ones (input and kernel
    # gradients), except the input gradient of the first layer: the lowered step is the Unet's
    assert sum(ops["convolution"].values()) == 3 * _conv_kernel_count(params) - 1


@pytest.mark.parametrize(
    ("dtype", "compute_dtype"),
    [(None, jnp.bfloat16), ("bfloat16", None)],
    ids=["bf16-params", "unet-dtype-bf16"],
)
def test_bf16_step_runs_every_convolution_and_matmul_in_bf16(float32_step, dtype, compute_dtype):
    hlo, out_state, _ = _lower_step(dtype, compute_dtype)
    ops = _op_dtypes(hlo)
    f32_ops = _op_dtypes(float32_step[0])
    for op in _OPS:
        # the same operations as the float32 step, every one on bf16 operands
        assert sum(ops[op].values()) == sum(f32_ops[op].values()), (op, ops[op])
        assert set(ops[op]) == {(("bf16", "bf16"), ("bf16",))}, (op, ops[op])
    # parameters, EMA and optimiser state stay float32
    floating = {
        leaf.dtype
        for leaf in jax.tree.leaves(out_state)
        if jnp.issubdtype(leaf.dtype, jnp.floating)
    }
    assert floating == {jnp.dtype(jnp.float32)}
    # the norms' statistics stay float32: every square root of the step is float32
    sqrt_types = {_TYPE.findall(line)[-1] for line in hlo.splitlines() if "stablehlo.sqrt" in line}
    assert sqrt_types == {"f32"}, sqrt_types


@pytest.mark.parametrize("full", [True, False], ids=["full", "linear"])
def test_attention_in_bf16_takes_its_softmax_in_float32(full):
    layer = (Attention if full else LinearAttention)(heads=2, dim_head=4, num_mem_kv=3)
    x = jax.ShapeDtypeStruct((2, 4, 4, 8), jnp.bfloat16)
    variables = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)
    variables = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, jnp.bfloat16), variables)
    lowered = jax.jit(layer.apply).lower(variables, x)
    assert lowered.out_info.dtype == jnp.bfloat16
    hlo = lowered.as_text()
    ops = _op_dtypes(hlo)
    assert set(ops["dot_general"]) == {(("bf16", "bf16"), ("bf16",))}, ops["dot_general"]
    exp_types = [
        _TYPE.findall(line)[-1] for line in hlo.splitlines() if "stablehlo.exponential" in line
    ]
    assert exp_types and set(exp_types) == {"f32"}, exp_types


def _random_params(config, seed=0):
    """Weights drawn with numpy in PyTorch's default ranges (U(+-1/sqrt(fan_in)) for kernels
    and biases, N(0, 1) memory slots; cheaper than compiling ``Unet.init``), with norm gains
    1 + N(0, 0.1^2) rather than ones, so that their bf16 rounding shows."""
    rng = np.random.default_rng(seed)
    shapes = {key: entry.torch_shape for key, entry in torch_key_map(config).items()}
    state = {}
    for key, shape in shapes.items():
        if key.endswith(".g"):
            value = 1 + 0.1 * rng.standard_normal(shape)
        elif key.endswith(".weight") or key.endswith(".bias"):
            fan_in = np.prod(shapes[key.rsplit(".", 1)[0] + ".weight"][1:])
            value = rng.uniform(-1, 1, shape) / np.sqrt(fan_in)
        else:
            value = rng.standard_normal(shape)
        state[key] = value.astype(np.float32)
    return torch_state_dict_to_flax(state, config)


def test_bf16_loss_is_finite_and_close_to_the_float32_loss():
    plain = unet_from_config(CONFIG)
    half = unet_from_config(CONFIG, dtype="bfloat16")
    coeffs = _coeffs()
    plain_loss = objectives.diffusion_loss_fn(plain.apply, coeffs)
    half_loss = objectives.diffusion_loss_fn(half.apply, coeffs)
    params = _random_params(plain.config())

    @jax.jit
    def losses(params, batch, key):
        cast = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
        return (
            plain_loss(params, batch, key)[0],
            plain_loss(cast, batch, key)[0],
            half_loss(params, batch, key)[0],
        )

    want, cast, half_dtype = (float(v) for v in losses(params, _batch(), jax.random.PRNGKey(3)))
    assert np.isfinite(want) and want > 0
    for got in (cast, half_dtype):
        assert np.isfinite(got)
        # bf16 really changed the numbers, and by no more than bf16 round-off
        assert 0 < abs(got - want) < BF16_LOSS_RTOL * want, (got, want)
