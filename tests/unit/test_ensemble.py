"""Vmapped training: K members in one compiled program, each equal to its own single run (seeds,
per-member learning rates and loss weights, non-finite isolation, data parallelism, bad input)."""

import functools
import inspect
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff import ensemble, gaussian, objectives, schedules, train
from jaxdiff.models import Unet

# Member i of the vmapped step against make_train_step on member i alone, same keys and batches.
# The batched kernels of vmap (a matmul with a member axis) sum in another order than the
# unbatched ones: float32 round-off of values of size ~1. Measured on this CPU, 20 Adam steps of
# the MLP below: max |diff| 1.2e-7 (params, EMA, optimiser state) and 4.8e-7 (loss metrics).
MEMBER_ATOL = 1e-6
MEMBER_RTOL = 1e-5
# The real diffusion loss on a U-Net, 3 steps of clipped SGD with momentum: the same round-off,
# through a deeper network. Measured on this CPU, 3 seeds: max |diff| 7.0e-7 (params,
# EMA, momentum, metrics).
UNET_ATOL = 1e-5
# Why not Adam for the U-Net: gradients agree to 6e-7 (norm 2.4), but Adam normalises every
# component, g / (|g| + 1e-8), and a component whose exact value cancels to ~0 (|g| ~ 1e-8, e.g.
# an upsampling kernel's) turns its round-off into a different fraction of a +-lr step: measured
# 0.09 lr at one component after one step and a 2.3e-4 params difference at lr 1e-3 after 3.
# The MLP tests check Adam (the default optimiser) with MEMBER_ATOL.
# The ensemble sharded over 2 'data' devices (and a 2 x 2 members x data mesh) against the same
# ensemble on one device: the gradient all-reduce adds in another order. Measured: max |diff|
# 6.0e-8 (state) and 2.4e-7 (metrics).
DATA_PARALLEL_ATOL = 2e-6


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.tanh(nn.Dense(16)(x)))


TRACES = {"count": 0}


def _loss(params, batch, key, weight=1.0):
    """A noisy regression: the key matters (each step draws new targets' noise)."""
    TRACES["count"] += 1
    noise = 0.1 * jax.random.normal(key, batch["y"].shape)
    pred = MLP().apply(params, batch["x"])
    mse = jnp.mean(jnp.square(pred - batch["y"] - noise))
    return weight * mse, {"mse": mse}


def _init(key):
    return MLP().init(key, jnp.zeros((1, 4)))


def _batch(i, size=16, seed=0):
    x = np.random.default_rng([seed, i]).normal(size=(size, 4)).astype(np.float32)
    return {"x": x, "y": np.sin(x.sum(-1, keepdims=True))}


def _max_abs_diff(a, b):
    """Max |a - b| over the leaves, NaN when any leaf has one (so ``err <= tol`` fails)."""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    err = 0.0
    for x, y in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape
        d = np.abs(x - y)
        if np.isnan(d).any():
            return float("nan")
        err = max(err, float(d.max(initial=0.0)))
    return err


def _run(step, state, batches):
    history = []
    for batch in batches:
        state, metrics = step(state, batch)
        history.append(metrics)
    return state, jax.tree.map(lambda *xs: np.stack(xs), *history)


def _assert_member_equals_single(stacked, history, i, single, single_history, atol):
    mine = ensemble.member(stacked, i)
    for field in ("params", "ema_params", "opt_state", "step", "key"):
        err = _max_abs_diff(getattr(mine, field), getattr(single, field))
        assert err <= atol, (i, field, err)
    assert set(history) == set(single_history)
    for name, values in history.items():
        # a metric may be NaN by design (a loss quartile no t fell in): then on both sides
        mine_values, theirs = np.asarray(values[:, i]), np.asarray(single_history[name])
        assert np.array_equal(np.isnan(mine_values), np.isnan(theirs)), (i, name)
        finite = ~np.isnan(theirs)
        assert finite.all() or name not in ("loss", "grad_norm"), (i, name)
        err = _max_abs_diff(mine_values[finite], theirs[finite])
        scale = np.abs(theirs[finite]).max(initial=0.0)
        assert err <= atol + MEMBER_RTOL * scale, (i, name, err)


@pytest.mark.parametrize(
    "share_batch, grad_accum_steps", [(True, 1), (False, 2)], ids=["shared", "own-accum"]
)
def test_k_seeds_equal_their_single_runs_in_one_compiled_program(share_batch, grad_accum_steps):
    k, num_steps = 3, 20
    optimizer = train.default_optimizer(lr=1e-2)
    stacked = ensemble.create_ensemble_state(_init, optimizer, [0, 1, 2])
    assert ensemble.num_members(stacked) == k
    singles = ensemble.unstack_states(stacked)
    # seeds give different initial params and keys
    assert _max_abs_diff(singles[0].params, singles[1].params) > 1e-2
    assert not np.array_equal(singles[0].key, singles[1].key)

    if share_batch:
        batches = [_batch(s) for s in range(num_steps)]
        member_batches = [batches] * k
    else:
        member_batches = [[_batch(s, seed=i) for s in range(num_steps)] for i in range(k)]
        batches = [
            jax.tree.map(lambda *xs: np.stack(xs), *(mb[s] for mb in member_batches))
            for s in range(num_steps)
        ]
    kwargs = dict(ema=0.9, grad_accum_steps=grad_accum_steps)
    TRACES["count"] = 0
    step = ensemble.make_ensemble_train_step(
        _loss, optimizer, num_models=k, share_batch=share_batch, **kwargs
    )
    stacked, history = _run(step, stacked, batches)
    # one trace of the loss for all K members and all steps, one compiled executable
    assert TRACES["count"] == 1
    assert step.jitted._cache_size() == 1
    assert {v.shape for v in history.values()} == {(num_steps, k)}
    np.testing.assert_array_equal(np.asarray(stacked.step), [num_steps] * k)

    single_step = train.make_train_step(_loss, optimizer, **kwargs)
    errors = []
    for i in range(k):
        single, single_history = _run(single_step, singles[i], member_batches[i])
        errors.append(_max_abs_diff(ensemble.member(stacked, i), single))
        _assert_member_equals_single(stacked, history, i, single, single_history, MEMBER_ATOL)
    print(f"max |ensemble - single| per member: {errors}")
    # the members really trained apart
    assert _max_abs_diff(ensemble.member(stacked, 0).params, ensemble.member(stacked, 1).params)


def test_per_member_learning_rate_from_the_optimiser_state():
    lrs = [1e-3, 1e-2, 3e-2]
    optimizer = train.default_optimizer(lr=1e-4)  # its lr is overridden by every member's state
    stacked = ensemble.create_ensemble_state(
        _init, optimizer, [7, 7, 7], hyperparams={"learning_rate": lrs}
    )
    step = ensemble.make_ensemble_train_step(_loss, optimizer, num_models=3, ema=0.9)
    batches = [_batch(s) for s in range(8)]
    stacked, history = _run(step, stacked, batches)
    assert step.jitted._cache_size() == 1
    np.testing.assert_allclose(history["learning_rate"][-1], lrs, rtol=1e-7)
    start = ensemble.create_ensemble_state(_init, optimizer, [7])
    for i, lr in enumerate(lrs):
        own = train.default_optimizer(lr=lr)
        single = train.create_train_state(
            ensemble.member(start, 0).params, own, ensemble.member(start, 0).key
        )
        single, single_history = _run(train.make_train_step(_loss, own, ema=0.9), single, batches)
        _assert_member_equals_single(stacked, history, i, single, single_history, MEMBER_ATOL)
    # same seed, different lr: different results
    assert _max_abs_diff(ensemble.member(stacked, 0).params, ensemble.member(stacked, 2).params)


def test_per_member_loss_weight_through_member_args():
    weights = np.asarray([0.5, 1.0, 2.0], np.float32)
    optimizer = optax.sgd(0.05)
    stacked = ensemble.create_ensemble_state(_init, optimizer, [3, 3, 3])
    step = ensemble.make_ensemble_train_step(
        _loss, optimizer, num_models=3, ema=0.9, member_args={"weight": weights}
    )
    batches = [_batch(s) for s in range(8)]
    stacked, history = _run(step, stacked, batches)
    initial = ensemble.member(ensemble.create_ensemble_state(_init, optimizer, [3]), 0)
    for i, w in enumerate(weights):
        single_step = train.make_train_step(
            functools.partial(_loss, weight=jnp.float32(w)), optimizer, ema=0.9
        )
        fresh = jax.tree.map(jnp.copy, initial)  # the step donates its input
        single, single_history = _run(single_step, fresh, batches)
        _assert_member_equals_single(stacked, history, i, single, single_history, MEMBER_ATOL)
    # the loss is weighted, the aux mse is not: at step 0 (same params) mse agrees, loss scales
    np.testing.assert_allclose(history["loss"][0], weights * history["mse"][0, 0], rtol=1e-6)


def test_a_non_finite_member_is_skipped_alone():
    weights = np.asarray([1.0, np.nan, 2.0], np.float32)
    optimizer = train.default_optimizer(lr=1e-2)
    stacked = ensemble.create_ensemble_state(_init, optimizer, [0, 1, 2])
    before = ensemble.unstack_states(stacked)
    step = ensemble.make_ensemble_train_step(
        _loss, optimizer, num_models=3, ema=0.9, member_args={"weight": weights}
    )
    batches = [_batch(s) for s in range(5)]
    stacked, history = _run(step, stacked, batches)
    np.testing.assert_array_equal(history["skipped"], [[0.0, 1.0, 0.0]] * 5)
    assert np.isnan(history["loss"][:, 1]).all()
    # the NaN member kept its params, EMA and optimiser state, and only its step advanced
    nan_member = ensemble.member(stacked, 1)
    for field in ("params", "ema_params", "opt_state"):
        assert _max_abs_diff(getattr(nan_member, field), getattr(before[1], field)) == 0.0
    assert int(nan_member.step) == 5
    # the others are exactly what they are without it
    for i in (0, 2):
        single_step = train.make_train_step(
            functools.partial(_loss, weight=jnp.float32(weights[i])), optimizer, ema=0.9
        )
        single, single_history = _run(single_step, before[i], batches)
        _assert_member_equals_single(stacked, history, i, single, single_history, MEMBER_ATOL)
    assert not train.nonfinite_leaves(stacked)


@pytest.mark.slow  # about 2 minutes on the 2-core test machine: several U-Net compiles
def test_diffusion_loss_on_a_unet_equals_single_runs():
    k, num_steps = 3, 3
    coeffs = gaussian.make_coeffs(schedules.get_named_beta_schedule("cosine", 50))
    unet = Unet(dim=8, dim_mults=(1, 2), channels=1)
    loss_fn = objectives.diffusion_loss_fn(unet.apply, coeffs)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
    stacked = ensemble.create_ensemble_state(
        lambda key: unet.init(key, jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,))), optimizer, range(k)
    )
    singles = ensemble.unstack_states(stacked)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8) for _ in range(num_steps)]
    # XLA's default options compile faster; the step's numbers are the same program either way
    options = dict(ema=0.9, compiler_options=None)
    step = ensemble.make_ensemble_train_step(loss_fn, optimizer, num_models=k, **options)
    stacked, history = _run(step, stacked, batches)
    assert step.jitted._cache_size() == 1
    single_step = train.make_train_step(loss_fn, optimizer, **options)
    errors = []
    for i in range(k):
        single, single_history = _run(single_step, singles[i], batches)
        errors.append(_max_abs_diff(ensemble.member(stacked, i), single))
        _assert_member_equals_single(stacked, history, i, single, single_history, UNET_ATOL)
    print(f"U-Net max |ensemble - single| per member: {errors}")


def test_bad_ensemble_input_is_rejected():
    optimizer = optax.sgd(0.1)
    stacked = ensemble.create_ensemble_state(_init, optimizer, [0, 1])
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_models must be an int >= 1"):
            ensemble.make_ensemble_train_step(_loss, optimizer, num_models=bad)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        ensemble.make_ensemble_train_step(_loss, optimizer, num_models=2, grad_accum_steps=0)
    with pytest.raises(ValueError, match=r"member_args\['weight'\].*num_models=2.*\[3\]"):
        ensemble.make_ensemble_train_step(
            _loss, optimizer, num_models=2, member_args={"weight": jnp.ones(3)}
        )
    step = ensemble.make_ensemble_train_step(_loss, optimizer, num_models=3, donate=False)
    with pytest.raises(ValueError, match=r"leading member axis of num_models=3.*\[2\]"):
        step(stacked, _batch(0))
    own = ensemble.make_ensemble_train_step(
        _loss, optimizer, num_models=2, share_batch=False, donate=False
    )
    with pytest.raises(ValueError, match=r"share_batch=False.*num_models=2.*\[16\]"):
        own(stacked, _batch(0))
    with pytest.raises(ValueError, match="not divisible by the device count|does not split"):
        ensemble.make_ensemble_train_step(
            _loss, optimizer, num_models=2, grad_accum_steps=3, donate=False
        )(stacked, _batch(0))
    with pytest.raises(ValueError, match="at least one"):
        ensemble.stack_states([])
    with pytest.raises(ValueError, match="at least one seed"):
        ensemble.create_ensemble_state(_init, optimizer, [])
    other = train.create_train_state(
        _init(jax.random.PRNGKey(0)), optax.adam(0.1), jax.random.PRNGKey(0)
    )
    with pytest.raises(ValueError, match="differ in structure"):
        ensemble.stack_states([ensemble.member(stacked, 0), other])
    wide = MLP().init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))
    with pytest.raises(ValueError, match=r"member 1's leaf .*Dense_1.*kernel.*\[5, 16\]"):
        ensemble.stack_states(
            [
                ensemble.member(stacked, 0),
                train.create_train_state(wide, optimizer, jax.random.PRNGKey(0)),
            ]
        )
    with pytest.raises(ValueError, match="out of range for an ensemble of 2"):
        ensemble.member(stacked, 2)
    with pytest.raises(ValueError, match="no injected hyperparameter"):
        ensemble.with_hyperparams(stacked, learning_rate=[0.1, 0.2])
    adam = train.default_optimizer()
    injected = ensemble.create_ensemble_state(_init, adam, [0, 1])
    with pytest.raises(ValueError, match=r"one value per member, shape \[2\].*\[3\]"):
        ensemble.with_hyperparams(injected, learning_rate=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="needs a mesh"):
        ensemble.make_ensemble_train_step(_loss, optimizer, num_models=2, member_axis="members")
    mesh = train.make_mesh(jax.devices()[:1])
    with pytest.raises(ValueError, match="member_axis must name a mesh axis"):
        ensemble.make_ensemble_train_step(
            _loss, optimizer, num_models=2, mesh=mesh, member_axis="members"
        )


DATA_PARALLEL_SCRIPT = """
import json
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
from jaxdiff import ensemble, train

{model}
{loss}
{init}
{batch}

assert jax.device_count() == 4, jax.devices()
k = 2
optimizer = train.default_optimizer(lr=1e-2)
weights = {{"weight": jnp.asarray([1.0, 0.5])}}


def run(share_batch, mesh=None, member_axis=None):
    state = ensemble.create_ensemble_state(
        _init, optimizer, [0, 1], mesh=mesh, member_axis=member_axis
    )
    step = ensemble.make_ensemble_train_step(
        _loss, optimizer, num_models=k, ema=0.9, grad_accum_steps=2, mesh=mesh,
        member_axis=member_axis, share_batch=share_batch, member_args=weights,
    )
    for s in range(4):
        batch = _batch(s) if share_batch else jax.tree.map(
            lambda *xs: np.stack(xs), *(_batch(s, seed=i) for i in range(k))
        )
        state, metrics = step(state, batch)
    leaf = state.params["params"]["Dense_0"]["kernel"]
    return state, metrics, leaf.sharding


def diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


out = {{}}
data = train.make_mesh(jax.devices()[:2])
grid = Mesh(np.asarray(jax.devices()).reshape(2, 2), ("members", "data"))
for share_batch in (True, False):
    alone, alone_metrics, _ = run(share_batch)
    for name, mesh, member_axis in (("data", data, None), ("grid", grid, "members")):
        state, metrics, sharding = run(share_batch, mesh, member_axis)
        out[f"{{name}}-{{share_batch}}"] = {{
            "state": diff(state, alone),
            "metrics": diff(metrics, alone_metrics),
            "spec": list(sharding.spec),
            "devices": len(sharding.device_set),
        }}
print(json.dumps(out))
"""


def test_data_parallel_ensemble_matches_one_device():
    script = DATA_PARALLEL_SCRIPT.format(
        model=inspect.getsource(MLP),
        loss=inspect.getsource(_loss).replace('    TRACES["count"] += 1\n', ""),
        init=inspect.getsource(_init),
        batch=inspect.getsource(_batch),
    )
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    root = str(pathlib.Path(__file__).resolve().parents[2])
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(out)
    assert set(out) == {"data-True", "data-False", "grid-True", "grid-False"}
    for name, result in out.items():
        assert result["state"] <= DATA_PARALLEL_ATOL, (name, result)
        assert result["metrics"] <= DATA_PARALLEL_ATOL, (name, result)
        if name.startswith("data"):
            assert result["spec"] == [] and result["devices"] == 2, result
        else:  # members split over the grid's first axis, replicated along 'data'
            assert result["spec"] == ["members"], result
            assert result["devices"] == 4, result
