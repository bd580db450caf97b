"""Checkpoints: resume equals an uninterrupted run, keep-K, no overwrite, other configurations
and damaged files are refused without touching the good checkpoints, bytes zeroed in place are
caught by the checksums, and a non-finite state is never saved."""

import hashlib
import logging
import pathlib
import shutil

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

    with pytest.raises(ValueError, match=rf"step 2, '{damaged}', is corrupt.*cannot be read"):
        checkpoint.restore(tmp_path, _state())
    with pytest.raises(checkpoint.CorruptCheckpointError) as info:
        checkpoint.restore(tmp_path, _state())
    assert (info.value.step, info.value.remaining, info.value.path) == (2, [1], damaged)
    assert "steps [1] remain: restore one of them with step=N" in str(info.value)
    assert "resume from step 1" in str(info.value) and "Traceback" not in str(info.value)

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


def _random_finite(seed: int, shape) -> np.ndarray:
    """float32 with uniformly random bits (exponent 255, NaN or infinity, excluded): zstd cannot
    compress them, so Orbax stores their bytes as they are and the test can find them."""
    bits = np.random.default_rng(seed).integers(0, 2**32, size=shape, dtype=np.uint32)
    bits[(bits >> 23) & 0xFF == 0xFF] &= ~np.uint32(1 << 30)
    return bits.view(np.float32)


def _random_state(step: int) -> train.TrainState:
    w, ema = _random_finite(step, (128, 128)), _random_finite(step + 100, (128, 128))
    state = train.create_train_state(
        {"w": jnp.asarray(w), "b": jnp.zeros(3)}, train.default_optimizer(), jax.random.key(1)
    )
    return state.replace(step=jnp.int32(step), ema_params={"w": jnp.asarray(ema), "b": jnp.ones(3)})


def test_zeroed_bytes_inside_an_array_are_detected(tmp_path):
    assert checkpoint.save(tmp_path, _random_state(2))
    assert checkpoint.save(tmp_path, _random_state(4))
    step_dir = tmp_path / "checkpoints" / "4"
    # The state item's arrays live in OCDBT data files, state/**/d/*; find the one holding a
    # run of bytes from the middle of params['w'].
    w = np.asarray(_random_state(4).params["w"])
    run = w.tobytes()[40_000:40_256]
    data_files = [
        p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"
    ]
    (holder,) = [p for p in data_files if run in p.read_bytes()]
    blob = bytearray(holder.read_bytes())
    assert blob.count(run) == 1
    at = blob.find(run)
    blob[at : at + 64] = bytes(64)
    holder.write_bytes(bytes(blob))

    with pytest.raises(checkpoint.CorruptCheckpointError) as info:
        checkpoint.restore(tmp_path, _random_state(0))
    err = info.value
    assert (err.step, err.remaining, err.path) == (4, [2], step_dir)
    assert "the array .params['w'] (shape (128, 128), float32) differs from the checksum" in str(
        err
    )
    assert "steps [2] remain" in str(err) and str(err).count("\n") <= 2
    _assert_same(checkpoint.restore(tmp_path, _random_state(0), step=2), _random_state(2))

    # Without the checksums (a checkpoint from before them), the same bytes restore silently.
    shutil.rmtree(step_dir / "integrity")
    wrong = checkpoint.restore(tmp_path, _random_state(0))
    changed = np.asarray(wrong.params["w"]).view(np.uint32) != w.view(np.uint32)
    assert int(changed.sum()) == 64 // 4
    _assert_same(wrong.ema_params, _random_state(4).ema_params)


@pytest.mark.parametrize("damage", ["truncate", "delete_data", "delete_metadata"])
def test_truncated_or_missing_files_are_corrupt_checkpoints(tmp_path, damage):
    assert checkpoint.save(tmp_path, _random_state(2))
    assert checkpoint.save(tmp_path, _random_state(4))
    state_dir = tmp_path / "checkpoints" / "4" / "state"
    data_files = [p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    largest = max(data_files, key=lambda p: p.stat().st_size)
    if damage == "truncate":
        largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    elif damage == "delete_data":
        largest.unlink()
    else:
        (state_dir / "_METADATA").unlink()
    with pytest.raises(checkpoint.CorruptCheckpointError, match="step 4.*is corrupt") as info:
        checkpoint.restore(tmp_path, _random_state(0))
    assert info.value.remaining == [2] and "Traceback" not in str(info.value)


def test_a_nonfinite_state_is_never_saved(tmp_path):
    with checkpoint.Checkpoints(tmp_path, save_every=2, keep=1) as ckpt:
        assert ckpt.save(_state(2, shift=1.0))
        ckpt.wait()
        before = _snapshot(tmp_path)
        bad = _state(4)
        bad = bad.replace(ema_params=jax.tree.map(lambda p: p.at[..., 0].set(jnp.inf), bad.params))
        with pytest.raises(checkpoint.NonFiniteStateError) as info:
            ckpt.save(bad)
        assert (info.value.step, info.value.leaf) == (4, ".ema_params['params']['Dense_0']['bias']")
        assert "step 4 holds NaN or infinite values (first in .ema_params" in str(info.value)
        half = _state(6).replace(params=jax.tree.map(lambda p: p * jnp.nan, _state().params))
        with pytest.raises(checkpoint.NonFiniteStateError, match=r"step 6.*\.params\["):
            ckpt.save(
                half.replace(params=jax.tree.map(lambda p: p.astype(jnp.bfloat16), half.params))
            )
        assert ckpt.all_steps() == [2]
    # keep=1 did not rotate the finite step 2 out; nothing was written.
    assert _snapshot(tmp_path) == before
    _assert_same(checkpoint.restore(tmp_path, _state()), _state(2, shift=1.0))


def test_error_classes():
    for cls in (
        checkpoint.WorkdirLockedError,
        checkpoint.CorruptCheckpointError,
        checkpoint.CheckpointWriteError,
        checkpoint.NonFiniteStateError,
    ):
        assert issubclass(cls, checkpoint.CheckpointError)
    assert issubclass(checkpoint.CheckpointError, ValueError)


def test_reading_logs_no_read_only_warning(tmp_path, caplog, monkeypatch):
    # With this module's filter of Orbax's logs off, a reader must still not claim that the
    # directory is read only (Orbax logs that for every manager made with read_only=True).
    monkeypatch.setattr(checkpoint, "_quiet_orbax", lambda: None)
    monkeypatch.setattr(logging.getLogger("absl"), "filters", [])
    assert checkpoint.save(tmp_path, _state(2))
    with caplog.at_level(logging.WARNING, logger="absl"):
        assert checkpoint.latest_step(tmp_path) == 2
        checkpoint.restore(tmp_path, _state())
    assert not [r for r in caplog.records if "read only" in r.getMessage()]
