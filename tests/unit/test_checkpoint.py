"""Checkpoints: resume equals an uninterrupted run, keep-K, no overwrite, other configurations
and damaged files are refused without touching the good checkpoints."""

import hashlib
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding

from jaxdiff import checkpoint, data, gaussian, losses, schedules, train

CONFIG = {"model": {"dim": 8, "dim_mults": (1, 2)}, "lr": 1e-4, "data": "digits"}


class TinyNet(nn.Module):
    """Per-pixel MLP with a time embedding (the train step's test model, kept small)."""

    @nn.compact
    def __call__(self, x, time, *, train=False):
        del train
        freqs = jnp.arange(1, 5, dtype=jnp.float32)[None, :] / 100.0
        emb = jnp.sin(time.astype(jnp.float32)[:, None] * freqs)
        h = nn.Dense(8)(x) + nn.Dense(8)(emb)[:, None, None, :]
        return nn.Dense(1)(nn.silu(h))


def _params(size=8):
    return TinyNet().init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 1)), jnp.zeros((1,)))


def _state(step=0, shift=0.0):
    state = train.create_train_state(_params(), train.default_optimizer(), jax.random.PRNGKey(1))
    params = jax.tree.map(lambda p: p + shift, state.params)
    return state.replace(step=jnp.int32(step), params=params)


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _snapshot(root: pathlib.Path) -> dict[str, str]:
    """Every file under root with the SHA-256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_resume_equals_uninterrupted_run(tmp_path):
    digits = data.load_digits(8)
    coeffs = gaussian.make_coeffs(schedules.get_named_beta_schedule("cosine", 20))
    optimizer = train.default_optimizer(lr=1e-2)
    # Importance sampling puts a loss state in the TrainState; an EMA that starts averaging at
    # once makes the EMA params differ from the params.
    step_fn = train.make_train_step(
        train.diffusion_loss_fn(TinyNet().apply, coeffs),
        optimizer,
        ema=train.ema_pytorch_decay(update_after_step=1, update_every=1),
        grad_accum_steps=2,
    )

    def fresh():
        history = losses.loss_second_moment_init(20, 1)
        return train.create_train_state(
            _params(), optimizer, jax.random.PRNGKey(7), loss_state=history
        )

    def run(state, start, stop, ckpt=None):
        for step, batch in enumerate(data.batches(digits, 8, seed=3, start_step=start), start):
            if step == stop:
                return state
            state, _ = step_fn(state, batch)
            if ckpt is not None:
                ckpt.save(state)
        return state

    with checkpoint.Checkpoints(tmp_path, config=CONFIG, save_every=2, keep=2) as ckpt:
        uninterrupted = run(fresh(), 0, 7, ckpt)
        assert ckpt.all_steps() == [4, 6]
    assert checkpoint.latest_step(tmp_path) == 6

    restored = checkpoint.restore(tmp_path, fresh(), step=4, config=CONFIG)
    assert int(restored.step) == 4
    assert int(jnp.sum(restored.loss_state.counts)) > 0
    resumed = run(restored, 4, 7)
    _assert_same(resumed, uninterrupted)
    assert not np.array_equal(
        resumed.params["params"]["Dense_0"]["kernel"], _params()["params"]["Dense_0"]["kernel"]
    )


def test_keep_k_and_existing_steps_are_never_overwritten(tmp_path):
    with checkpoint.Checkpoints(tmp_path, config=CONFIG, save_every=1, keep=2) as ckpt:
        for step in range(1, 5):
            assert ckpt.save(_state(step, shift=float(step)))
        ckpt.wait()
        assert ckpt.all_steps() == [3, 4]
        assert not ckpt.save(_state(4, shift=100.0))
    # A save that crashed half-way leaves only Orbax's temporary directory, which is not a step.
    (tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
    assert checkpoint.latest_step(tmp_path) == 4
    restored = checkpoint.restore(tmp_path, _state())
    _assert_same(restored, _state(4, shift=4.0))


def test_save_every_skips_other_steps(tmp_path):
    with checkpoint.Checkpoints(tmp_path, save_every=10, keep=None) as ckpt:
        assert not ckpt.save(_state(5))
        assert ckpt.save(_state(5), force=True)
        assert ckpt.save(_state(10))
    assert checkpoint.latest_step(tmp_path) == 10


def test_other_configuration_is_refused_and_nothing_is_touched(tmp_path):
    good = _state(3, shift=0.5)
    assert checkpoint.save(tmp_path, good, config=CONFIG)
    before = _snapshot(tmp_path)
    other = {**CONFIG, "model": {"dim": 16, "dim_mults": (1, 2)}, "seed": 1}

    with pytest.raises(ValueError, match=r"another configuration.*model\.dim: 8 .* 16.*seed"):
        checkpoint.Checkpoints(tmp_path, config=other)
    with pytest.raises(ValueError, match=r"differing keys: model\.dim"):
        checkpoint.restore(tmp_path, _state(), config=other)
    with pytest.raises(ValueError, match="another configuration"):
        checkpoint.save(tmp_path, _state(9), config=other)

    assert _snapshot(tmp_path) == before
    _assert_same(checkpoint.restore(tmp_path, _state(), config=CONFIG), good)


def test_config_fingerprint_and_diff():
    assert checkpoint.config_fingerprint(CONFIG) == checkpoint.config_fingerprint(
        {"lr": 1e-4, "data": "digits", "model": {"dim_mults": [1, 2], "dim": 8}}
    )
    assert checkpoint.config_diff(CONFIG, {**CONFIG, "lr": 2e-4, "extra": 1}) == {
        "extra": ("<absent>", 1),
        "lr": (1e-4, 2e-4),
    }


def test_damaged_checkpoint_names_its_path_and_the_fix(tmp_path):
    assert checkpoint.save(tmp_path, _state(1, shift=1.0), config=CONFIG)
    assert checkpoint.save(tmp_path, _state(2, shift=2.0), config=CONFIG)
    damaged = tmp_path / "checkpoints" / "2"
    for path in (damaged / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"not a checkpoint")
    before = _snapshot(tmp_path)

    with pytest.raises(ValueError, match=rf"{damaged}.*cannot be read.*fall back to step 1"):
        checkpoint.restore(tmp_path, _state())

    assert _snapshot(tmp_path) == before  # nothing deleted or rewritten
    _assert_same(checkpoint.restore(tmp_path, _state(), step=1), _state(1, shift=1.0))


def test_restore_places_arrays_on_the_mesh(tmp_path):
    assert checkpoint.save(tmp_path, _state(2))
    mesh = train.make_mesh()
    like = jax.eval_shape(lambda: _state())
    restored = checkpoint.restore(tmp_path, like, mesh=mesh)
    leaf = restored.params["params"]["Dense_0"]["kernel"]
    assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh
    _assert_same(restored, _state(2))


def test_empty_workdir(tmp_path):
    assert checkpoint.latest_step(tmp_path / "nowhere") is None
    assert checkpoint.latest_step(tmp_path) is None
    with pytest.raises(ValueError, match="holds no checkpoint"):
        checkpoint.restore(tmp_path, _state())
    assert checkpoint.save(tmp_path, _state(1))
    with pytest.raises(ValueError, match=r"no checkpoint of step 5.*\[1\]"):
        checkpoint.restore(tmp_path, _state(), step=5)
    with pytest.raises(ValueError, match="save_every"):
        checkpoint.Checkpoints(tmp_path, save_every=0)
    with pytest.raises(ValueError, match="keep"):
        checkpoint.Checkpoints(tmp_path, keep=0)


def test_plain_optax_state_round_trips(tmp_path):
    state = train.create_train_state(_params(), optax.sgd(0.1, momentum=0.9), jax.random.key(3))
    assert checkpoint.save(tmp_path, state)
    _assert_same(checkpoint.restore(tmp_path, state), state)
