"""The training step: end to end on digits, EMA against ema-pytorch, gradient accumulation,
mixed precision, 8-device data parallelism, bad input."""

import dataclasses
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

from jaxdiff import checkpoint, data, gaussian, schedules, train
from jaxdiff import workdir as wd

# Means over a batch and the gradient all-reduce sum in another order on 8 devices than on one:
# float32 round-off of sums of ~1e3 terms of size ~1.
DATA_PARALLEL_RTOL = 1e-5
DATA_PARALLEL_ATOL = 1e-6
# Mean of 4 micro-batch gradients vs one gradient over the batch: a different summation order.
ACCUM_ATOL = 1e-6
# bfloat16 keeps 8 significant bits: a loss computed with a bf16 network agrees with the
# float32 one to a few percent.
BF16_LOSS_RTOL = 5e-2
# ema-pytorch computes in float64 here, jaxdiff in float32 (weights up to ~1e3).
EMA_RTOL = 1e-6

NUM_STEPS = 50


class TinyNet(nn.Module):
    """Per-pixel MLP with a time embedding and an optional self-conditioning input.

    It takes ``train`` and ``rngs`` as jaxdiff's Unet does; no dropout, whose random bits would
    cost compile time and test nothing of the train step.
    """

    @nn.compact
    def __call__(self, x, time, x_self_cond=None, *, train=False):
        del train
        freqs = jnp.arange(1, 5, dtype=jnp.float32)[None, :] / 100.0
        emb = jnp.sin(time.astype(jnp.float32)[:, None] * freqs)
        if x_self_cond is not None:
            x = jnp.concatenate([x, x_self_cond], axis=-1)
        h = nn.Dense(8)(x)
        h = h + nn.Dense(8)(emb.astype(h.dtype))[:, None, None, :]
        return nn.Dense(1)(nn.silu(h))


def _coeffs(steps=NUM_STEPS):
    return gaussian.make_coeffs(schedules.get_named_beta_schedule("cosine", steps))


def _init(size=16, self_condition=False):
    x = jnp.zeros((1, size, size, 1))
    cond = x if self_condition else None
    return TinyNet().init(jax.random.PRNGKey(0), x, jnp.zeros((1,)), cond)


@pytest.fixture(scope="module")
def digits():
    return data.load_digits(16)


@pytest.mark.parametrize(
    "loss_kwargs",
    [
        {"loss": "simple", "objective": "v", "min_snr_gamma": 5.0},
        {"loss": "openai", "loss_type": "rescaled_mse", "var_type": "fixed_large"},
        {"loss": "continuous", "log_snr_fn": schedules.log_snr_schedule("cosine")},
    ],
    ids=["simple", "openai", "continuous"],
)
def test_one_step_end_to_end_on_digits(digits, loss_kwargs):
    params = _init()
    optimizer = train.default_optimizer()
    state = train.create_train_state(params, optimizer, jax.random.PRNGKey(1))
    loss_fn = train.diffusion_loss_fn(TinyNet().apply, _coeffs(), **loss_kwargs)
    step = train.make_train_step(loss_fn, optimizer)
    batch = data.batch_at(digits, 0, 8, seed=0)
    assert batch.dtype == np.uint8 and batch.shape == (8, 16, 16, 1)

    state, metrics = step(state, batch)

    assert int(state.step) == 1
    assert {"loss", "grad_norm", "learning_rate", "ema_decay"} <= set(metrics)
    if loss_kwargs["loss"] == "openai":
        assert "mse" in metrics
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["loss"]) > 0 and float(metrics["grad_norm"]) > 0
    np.testing.assert_allclose(float(metrics["learning_rate"]), 1e-4, rtol=1e-6)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, params)
    assert all(jax.tree.leaves(moved))
    # ema-pytorch copies the weights at its first update.
    assert float(metrics["ema_decay"]) == 0.0
    for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_loss_is_a_pure_function_of_the_step_key(digits):
    loss_fn = jax.jit(train.diffusion_loss_fn(TinyNet().apply, _coeffs()))
    batch = data.batch_at(digits, 0, 8, seed=0)
    key = jax.random.PRNGKey(3)
    first, _ = loss_fn(_init(), batch, key)
    again, _ = loss_fn(_init(), batch, key)
    other, _ = loss_fn(_init(), batch, jax.random.fold_in(key, 1))
    scaled, _ = loss_fn(_init(), data.to_unit_range(batch), key)
    assert float(first) == float(again) != float(other)
    np.testing.assert_allclose(float(scaled), float(first), rtol=1e-6)


# ema-pytorch 0.8.3 on torch 2.13.0+cpu in float64: EMA(Linear(1, 1), beta=0.995,
# update_every=10) (the Trainer's arguments), weight set to n + 1 before the n-th ema.update()
# (n = 0, 1, ...); decay inferred from each update as 1 - (after - before) / (w - before).
EMA_PYTORCH_DECAYS = {
    0: 0.0,
    1: 1.0,
    9: 1.0,
    10: 0.0,
    99: 1.0,
    100: 0.0,
    101: 1.0,
    110: 0.7978199917664256,
    111: 1.0,
    120: 0.8686226582675659,
    200: 0.9538909949722393,
    1000: 0.9892802792352049,
    2000: 0.9934835371743463,
    2990: 0.995,
}
# The EMA weight after the n-th update in that run.
EMA_PYTORCH_WEIGHTS = {
    0: 1.0,
    10: 11.0,
    100: 101.0,
    110: 103.02180008233574,
    120: 105.38372819665274,
    200: 129.95210288146333,
    1000: 506.7822783887938,
}


def test_ema_decay_matches_ema_pytorch():
    decay = train.ema_pytorch_decay()
    steps = jnp.asarray(list(EMA_PYTORCH_DECAYS), jnp.int32)
    np.testing.assert_allclose(
        jax.vmap(decay)(steps), list(EMA_PYTORCH_DECAYS.values()), rtol=EMA_RTOL
    )
    # The same formula by hand at s = 110: epoch 10, 1 - (1 + 10)^(-2/3).
    np.testing.assert_allclose(float(decay(jnp.int32(110))), 1 - 11 ** (-2 / 3), rtol=EMA_RTOL)


def test_ema_trajectory_matches_ema_pytorch():
    decay = train.ema_pytorch_decay()

    def body(ema, n):
        ema = train.ema_update(ema, (n + 1).astype(jnp.float32), decay(n))
        return ema, ema

    _, trajectory = jax.lax.scan(body, jnp.float32(0.0), jnp.arange(1001, dtype=jnp.int32))
    got = [float(trajectory[n]) for n in EMA_PYTORCH_WEIGHTS]
    np.testing.assert_allclose(got, list(EMA_PYTORCH_WEIGHTS.values()), rtol=EMA_RTOL)


def test_constant_ema_and_exact_copy_and_keep():
    ema, params = jnp.array([1.0, 3.0]), jnp.array([2.0, 5.0])
    np.testing.assert_allclose(train.ema_update(ema, params, jnp.float32(0.75)), [1.25, 3.5])
    np.testing.assert_array_equal(train.ema_update(ema, params, jnp.float32(0.0)), params)
    np.testing.assert_array_equal(train.ema_update(ema, params, jnp.float32(1.0)), ema)
    assert float(train.constant_ema_decay(0.9)(jnp.int32(7))) == np.float32(0.9)


def _regression_loss(params, batch, key):
    """A batch mean with no randomness, so that micro-batching changes only summation order."""
    del key
    pred = TinyNet().apply(params, batch["x"], batch["t"])
    return jnp.mean(jnp.square(pred - batch["y"])), {"pred_mean": jnp.mean(pred)}


def test_gradient_accumulation_equals_the_big_batch():
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.normal(size=(16, 4, 4, 1)).astype(np.float32),
        "t": rng.uniform(0, 50, size=(16,)).astype(np.float32),
        "y": rng.normal(size=(16, 4, 4, 1)).astype(np.float32),
    }
    params = _init(4)
    optimizer = optax.sgd(0.1)
    results = []
    for accum in (1, 4):
        step = train.make_train_step(_regression_loss, optimizer, grad_accum_steps=accum, ema=0.5)
        state = train.create_train_state(params, optimizer, jax.random.PRNGKey(0))
        for _ in range(2):
            state, metrics = step(state, batch)
        results.append((state, metrics))
    (big, big_metrics), (accum, accum_metrics) = results
    for a, b in zip(jax.tree.leaves(big), jax.tree.leaves(accum), strict=True):
        np.testing.assert_allclose(a, b, atol=ACCUM_ATOL)
    for name in ("loss", "grad_norm", "pred_mean"):
        np.testing.assert_allclose(big_metrics[name], accum_metrics[name], atol=ACCUM_ATOL)
    assert "learning_rate" not in big_metrics  # plain sgd has no injected hyperparameter


def test_several_steps_per_call_equal_single_steps(digits):
    params = _init()
    optimizer = train.default_optimizer(1e-3)
    loss_fn = train.diffusion_loss_fn(TinyNet().apply, _coeffs())
    batches = np.stack([data.batch_at(digits, i, 8, seed=0) for i in range(3)])
    single = train.make_train_step(loss_fn, optimizer)
    multi = train.make_train_step(loss_fn, optimizer, steps_per_call=3)
    state = train.create_train_state(params, optimizer, jax.random.PRNGKey(4))
    losses = []
    for batch in batches:
        state, metrics = single(state, batch)
        losses.append(metrics["loss"])
    state_multi, metrics_multi = multi(
        train.create_train_state(params, optimizer, jax.random.PRNGKey(4)), batches
    )
    assert metrics_multi["loss"].shape == (3,)
    np.testing.assert_allclose(metrics_multi["loss"], np.stack(losses), rtol=1e-6)
    assert int(state_multi.step) == 3
    for a, b in zip(jax.tree.leaves(state_multi), jax.tree.leaves(state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="leading axis of 3"):
        multi(state_multi, batches[:2])
    with pytest.raises(ValueError, match="steps_per_call must be"):
        train.make_train_step(loss_fn, optimizer, steps_per_call=0)


def test_bf16_compute_keeps_float32_state_and_self_conditioning_runs(digits):
    params = _init(self_condition=True)
    optimizer = train.default_optimizer()
    batch = data.batch_at(digits, 0, 8, seed=0)
    loss_fn = train.diffusion_loss_fn(TinyNet().apply, _coeffs(), self_condition=True)
    key = jax.random.PRNGKey(2)
    state = train.create_train_state(params, optimizer, key)
    step = train.make_train_step(loss_fn, optimizer, compute_dtype=jnp.bfloat16)
    state, metrics = step(state, batch)
    leaves = jax.tree.leaves((state.params, state.ema_params, state.opt_state))
    dtypes = {x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.float32)}, dtypes
    assert metrics["loss"].dtype == jnp.float32
    step_key = jax.random.fold_in(jax.random.fold_in(key, 0), 0)
    full, _ = jax.jit(loss_fn)(params, batch, step_key)
    np.testing.assert_allclose(float(metrics["loss"]), float(full), rtol=BF16_LOSS_RTOL)


def test_cli_model_dtype_and_remat_reach_the_unet():
    from jaxdiff import cli

    parser = cli.build_parser()
    default = wd.build_model(
        cli._train_config(parser.parse_args(["train", "--preset", "digits"]))[0]
    )
    assert default.dtype is None and default.remat is False
    args = parser.parse_args(["train", "--preset", "digits", "--dtype", "bfloat16", "--remat"])
    unet = wd.build_model(cli._train_config(args)[0])
    assert unet.compute_dtype == jnp.bfloat16 and unet.remat is True
    with pytest.raises(SystemExit):  # argparse names the allowed values
        parser.parse_args(["train", "--preset", "digits", "--dtype", "int8"])
    with pytest.raises(ValueError, match="floating dtype"):  # the library checks it too
        cfg = cli._train_config(parser.parse_args(["train", "--preset", "digits"]))[0]
        wd.build_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="int8")))
    # remat and the default dtype do not change a run's identity; bfloat16 does
    identity = cli._train_config(parser.parse_args(["train", "--preset", "digits"]))[0].identity()
    assert (
        cli._train_config(parser.parse_args(["train", "--preset", "digits", "--remat"]))[
            0
        ].identity()
        == identity
    )
    assert "dtype" not in identity["model"] and "remat" not in identity["model"]
    assert cli._train_config(args)[0].identity()["model"]["dtype"] == "bfloat16"


def test_bad_static_configuration():
    apply_fn = TinyNet().apply
    with pytest.raises(ValueError, match=r"'l1'.*'simple'"):
        train.diffusion_loss_fn(apply_fn, _coeffs(), loss="l1")
    with pytest.raises(ValueError, match="needs the coefficient table"):
        train.diffusion_loss_fn(apply_fn, loss="openai")
    with pytest.raises(ValueError, match="needs log_snr_fn"):
        train.diffusion_loss_fn(apply_fn, loss="continuous")
    with pytest.raises(ValueError, match=r"'x0'.*'eps'"):
        train.diffusion_loss_fn(apply_fn, loss="continuous", log_snr_fn=jnp.sin, objective="x0")
    with pytest.raises(ValueError, match="grad_accum_steps"):
        train.make_train_step(_regression_loss, optax.sgd(0.1), grad_accum_steps=0)
    with pytest.raises(ValueError, match="compute_dtype"):
        train.make_train_step(_regression_loss, optax.sgd(0.1), compute_dtype=jnp.int32)
    with pytest.raises(ValueError, match="ema must be"):
        train.make_train_step(_regression_loss, optax.sgd(0.1), ema="fast")
    with pytest.raises(ValueError, match=r"EMA decay must be in \[0, 1\], got 1.5"):
        train.make_train_step(_regression_loss, optax.sgd(0.1), ema=1.5)
    with pytest.raises(ValueError, match="beta"):
        train.ema_pytorch_decay(beta=1.2)
    with pytest.raises(ValueError, match="lr must be > 0"):
        train.default_optimizer(lr=0.0)


def test_batch_that_does_not_split_into_micro_batches_is_rejected():
    batch = {
        "x": np.zeros((6, 4, 4, 1), np.float32),
        "t": np.zeros((6,), np.float32),
        "y": np.zeros((6, 4, 4, 1), np.float32),
    }
    optimizer = optax.sgd(0.1)
    state = train.create_train_state(_init(4), optimizer, jax.random.PRNGKey(0))
    step = train.make_train_step(_regression_loss, optimizer, grad_accum_steps=4)
    with pytest.raises(ValueError, match=r"global batch size 6 does not split into.*4"):
        step(state, batch)
    ragged = dict(batch, t=np.zeros((5,), np.float32))
    with pytest.raises(ValueError, match="same leading"):
        step(state, ragged)


DATA_PARALLEL_SCRIPT = """
import json, sys
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
from jaxdiff import checkpoint, data, gaussian, schedules, train

{model}

workdir, saved_on_one = sys.argv[1], sys.argv[2]
assert jax.device_count() == 8, jax.devices()
digits = data.load_digits(8)
apply_fn = TinyNet().apply
params = TinyNet().init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))
coeffs = gaussian.make_coeffs(schedules.get_named_beta_schedule("cosine", 50))
loss_fn = train.diffusion_loss_fn(apply_fn, coeffs)
optimizer = train.default_optimizer(lr=1e-3)
ema = train.ema_pytorch_decay(update_after_step=0, update_every=1)
out = {{}}
for devices in (8, 1):
    mesh = train.make_mesh(jax.devices()[:devices])
    step = train.make_train_step(loss_fn, optimizer, ema=ema, grad_accum_steps=2, mesh=mesh)
    state = train.create_train_state(params, optimizer, jax.random.PRNGKey(1), mesh=mesh)
    for i in range(3):
        batch = train.shard_batch(data.batch_at(digits, i, 16, seed=0), mesh)
        state, metrics = step(state, batch)
    out[devices] = {{
        "metrics": {{k: float(v) for k, v in metrics.items()}},
        "leaves": [np.asarray(x).tolist() for x in jax.tree.leaves(state)],
        "batch_sharded": batch.sharding.spec == jax.sharding.PartitionSpec("data"),
        "devices": len(state.params["params"]["Dense_0"]["kernel"].sharding.device_set),
    }}
    if devices == 8:
        # the same three steps in one call, the batch [3, 16, ...] sharded along its axis 1
        multi = train.make_train_step(
            loss_fn, optimizer, ema=ema, grad_accum_steps=2, mesh=mesh, steps_per_call=3
        )
        stacked = np.stack([data.batch_at(digits, i, 16, seed=0) for i in range(3)])
        start = train.create_train_state(params, optimizer, jax.random.PRNGKey(1), mesh=mesh)
        in_one_call, _ = multi(start, stacked)
        out["multi_max_diff"] = max(
            float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
            for a, b in zip(jax.tree.leaves(in_one_call), jax.tree.leaves(state), strict=True)
        )
        checkpoint.save(workdir, state, config={{"devices": "any"}})
        errors = []
        for call in (
            lambda: train.shard_batch(data.batch_at(digits, 0, 12, seed=0), mesh),
            lambda: step(state, data.batch_at(digits, 0, 12, seed=0)),
        ):
            try:
                call()
            except ValueError as err:
                errors.append(str(err))
        out["errors"] = errors
        # A checkpoint written by one device restores replicated onto the eight.
        like = train.create_train_state(params, optimizer, jax.random.PRNGKey(1), mesh=mesh)
        expected = [np.asarray(x) for x in jax.tree.leaves(like.replace(step=jnp.int32(5)))]
        restored = checkpoint.restore(saved_on_one, like, config={{"devices": "any"}})
        out["from_one"] = {{
            "equal": all(
                np.array_equal(np.asarray(a), b)
                for a, b in zip(jax.tree.leaves(restored), expected, strict=True)
            ),
            "devices": {{len(x.sharding.device_set) for x in jax.tree.leaves(restored)}} == {{8}},
        }}
print(json.dumps(out))
"""


def test_eight_devices_match_one_device_and_checkpoints_move_between_them(tmp_path):
    optimizer = train.default_optimizer(lr=1e-3)
    params = TinyNet().init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))
    on_one = train.create_train_state(params, optimizer, jax.random.PRNGKey(1))
    checkpoint.save(tmp_path / "one", on_one.replace(step=jnp.int32(5)), config={"devices": "any"})
    script = DATA_PARALLEL_SCRIPT.format(model=inspect.getsource(TinyNet))
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
    )
    root = str(pathlib.Path(__file__).resolve().parents[2])
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), str(tmp_path), str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    eight, one = out["8"], out["1"]
    assert eight["devices"] == 8 and one["devices"] == 1
    assert eight["batch_sharded"] and one["batch_sharded"]
    for name in eight["metrics"]:
        np.testing.assert_allclose(
            eight["metrics"][name],
            one["metrics"][name],
            rtol=DATA_PARALLEL_RTOL,
            atol=DATA_PARALLEL_ATOL,
            err_msg=name,
        )
    for a, b in zip(eight["leaves"], one["leaves"], strict=True):
        np.testing.assert_allclose(a, b, rtol=DATA_PARALLEL_RTOL, atol=DATA_PARALLEL_ATOL)
    assert out["multi_max_diff"] < DATA_PARALLEL_ATOL
    first, second = out["errors"]
    assert "global batch size 12 is not divisible by the device count 8" in first
    assert "global batch size 12 is not divisible by the device count 8" in second

    assert out["from_one"] == {"equal": True, "devices": True}

    # The 8-device checkpoint restores onto this process's single device.
    restored = checkpoint.restore(tmp_path, on_one, config={"devices": "any"})
    assert int(restored.step) == 3
    for a, b in zip(jax.tree.leaves(restored), eight["leaves"], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b, dtype=np.asarray(a).dtype))
        assert a.sharding.device_set == {jax.devices()[0]}


def test_quality_during_training_is_due_at_multiples_and_at_a_late_last_step():
    from jaxdiff import runner

    q = object.__new__(runner._TrainingEval)
    q.every = 500
    assert [s for s in range(1, 1501) if q.due(s, last=s == 1500)] == [500, 1000, 1500]
    assert [s for s in range(1, 1201) if q.due(s, last=s == 1200)] == [500, 1000, 1200]
    assert [s for s in range(1, 301) if q.due(s, last=s == 300)] == []  # shorter than every
    q.every = 0
    assert not any(q.due(s, last=s == 10) for s in range(1, 11))
