"""The model-call protocol (every batch entry besides the image reaches the network under its own
name), label dropout, per-quartile loss metrics, classifier-free guidance in one batched call,
the optimiser and loss built from the typed configuration, and its cross-field validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxdiff import config as cfg
from jaxdiff import data, objectives, samplers, train
from jaxdiff import workdir as wd


class _NNXNet(nnx.Module):
    """A plain Flax NNX model with a class embedding: x [B, H, W, C], time [B], label [B]."""

    def __init__(self, channels: int, num_classes: int, rngs: nnx.Rngs):
        self.conv = nnx.Conv(channels, channels, (3, 3), rngs=rngs)
        self.embed = nnx.Embed(num_classes + 1, channels, rngs=rngs)

    def __call__(self, x, time, label):
        h = self.conv(x) + self.embed(label + 1)[:, None, None, :]
        return h * (time[:, None, None, None] / 1000.0 + 1.0)


def test_an_nnx_model_trains_on_labelled_batches_through_the_protocol():
    graphdef, params = nnx.split(_NNXNet(1, 10, nnx.Rngs(0)))
    seen = []

    def apply_fn(state, x, time, label):
        seen.append(label)
        return nnx.merge(graphdef, state)(x, time, label)

    coeffs = wd.build_coeffs(cfg.DiffusionConfig(timesteps=50))
    loss_fn = objectives.diffusion_loss_fn(apply_fn, coeffs, cond_drop_prob=0.5, train=False)
    opt = train.default_optimizer(1e-2)
    state = train.create_train_state(params, opt, jax.random.PRNGKey(0))
    step = train.make_train_step(loss_fn, opt, donate=False)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (8, 4, 4, 1), dtype=np.uint8),
        "label": rng.integers(0, 10, (8,)).astype(np.int32),
    }
    first = float(step(state, batch)[1]["loss"])
    for _ in range(20):
        state, metrics = step(state, batch)
    assert np.isfinite(first) and float(metrics["loss"]) < first
    assert seen and seen[0].shape == (8,)  # the label reached the network


def test_label_dropout_replaces_labels_with_the_null_class_at_its_rate():
    got = []

    def apply_fn(params, x, time, label):
        got.append(label)
        return x * params

    coeffs = wd.build_coeffs(cfg.DiffusionConfig(timesteps=50))
    labels = jnp.arange(4000, dtype=jnp.int32) % 10
    batch = {"image": jnp.zeros((4000, 2, 2, 1)), "label": labels}
    for p in (0.0, 0.2, 1.0):
        got.clear()
        fn = objectives.diffusion_loss_fn(apply_fn, coeffs, cond_drop_prob=p, train=False)
        fn(jnp.float32(1.0), batch, jax.random.PRNGKey(1))
        (seen,) = got
        dropped = np.asarray(seen) == -1
        kept = ~dropped
        np.testing.assert_array_equal(np.asarray(seen)[kept], np.asarray(labels)[kept])
        assert abs(dropped.mean() - p) < 0.03
    with pytest.raises(ValueError, match="cond_drop_prob"):
        objectives.diffusion_loss_fn(apply_fn, coeffs, cond_drop_prob=1.5)
    bad = {"image": jnp.zeros((4, 2, 2, 1)), "label": jnp.zeros((3,), jnp.int32)}
    with pytest.raises(ValueError, match="batch size 4"):
        objectives.diffusion_loss_fn(apply_fn, coeffs, train=False)(1.0, bad, jax.random.key(0))


def test_quartile_losses_average_the_examples_of_each_quarter_of_the_timesteps():
    def apply_fn(params, x, time):
        return x * 0  # eps prediction 0: the per-example loss is mean(noise^2)

    coeffs = wd.build_coeffs(cfg.DiffusionConfig(timesteps=40))
    fn = objectives.diffusion_loss_fn(apply_fn, coeffs, train=False)
    loss, aux = fn(None, jnp.zeros((512, 4, 4, 1)), jax.random.PRNGKey(0))
    quarters = [float(aux[f"loss_q{q}"]) for q in range(4)]
    assert all(abs(q - 1.0) < 0.1 for q in quarters)  # E[noise^2] = 1 in every quarter
    assert abs(np.mean(quarters) - float(loss)) < 0.05
    _, aux = fn(None, jnp.zeros((1, 4, 4, 1)), jax.random.PRNGKey(0))
    assert sum(np.isnan(float(aux[f"loss_q{q}"])) for q in range(4)) == 3  # one example


def test_batched_guidance_equals_two_calls_and_the_reference_formula():
    def model_fn(x, time, label):
        return (
            x * (label[:, None, None, None].astype(x.dtype) + 2.0) + time[:, None, None, None] / 100
        )

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 4, 4, 2)), jnp.float32)
    time = jnp.asarray([1.0, 5.0, 9.0])
    y = jnp.asarray([0, 3, 7])
    null = jnp.full_like(y, -1)
    for phi in (0.0, 0.7):
        one = samplers.guided_model_fn(
            model_fn, 3.0, {"label": y}, {"label": null}, rescaled_phi=phi, batched=True
        )(x, time)
        two = samplers.guided_model_fn(
            model_fn, 3.0, {"label": y}, {"label": null}, rescaled_phi=phi
        )(x, time)
        np.testing.assert_allclose(np.asarray(one), np.asarray(two), rtol=1e-6, atol=1e-6)
        c, u = np.asarray(model_fn(x, time, y)), np.asarray(model_fn(x, time, null))
        g = u + 3.0 * (c - u)
        if phi:
            std = lambda a: a.reshape(3, -1).std(axis=1, ddof=1)[:, None, None, None]  # noqa: E731
            g = phi * g * std(c) / std(g) + (1 - phi) * g
        np.testing.assert_allclose(np.asarray(one), g, rtol=1e-5, atol=1e-5)
    # the reference's default removes the update's part parallel to c: guidance.guided_output
    removed = samplers.guided_model_fn(
        model_fn, 3.0, {"label": y}, {"label": null}, remove_parallel_component=True, batched=True
    )(x, time)
    from jaxdiff import guidance

    want = guidance.guided_output(c, u, 3.0, remove_parallel_component=True)
    np.testing.assert_allclose(np.asarray(removed), np.asarray(want), rtol=1e-5, atol=1e-5)
    # learned variance: only the mean channels are guided
    out = samplers.guided_model_fn(
        model_fn, 3.0, {"label": y}, {"label": null}, channels=1, batched=True
    )(x, time)
    np.testing.assert_allclose(np.asarray(out[..., 1:]), c[..., 1:], rtol=1e-6)


def test_the_optimiser_follows_the_config():
    base = cfg.PRESETS["digits"]

    def lrs(optim, steps=10):
        config = dataclasses.replace(
            base, optim=optim, run=dataclasses.replace(base.run, lr=1.0, steps=steps)
        )
        config = wd.resolve_schedule(cfg.validate(config))
        opt = wd.build_optimizer(config)
        params = {"w": jnp.zeros(3)}
        with jax.numpy_dtype_promotion("standard"):
            state, out = opt.init(params), []
        for _ in range(steps):  # the rate each update used (what the train step logs)
            with jax.numpy_dtype_promotion("standard"):  # optax's, as in make_train_step
                _, state = opt.update({"w": jnp.ones(3)}, state, params)
            out.append(float(train._learning_rate(state)))
        return out

    assert lrs(cfg.OptimConfig()) == [1.0] * 10
    warm = lrs(cfg.OptimConfig(warmup_steps=4))
    assert warm[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0]) and warm[-1] == 1.0
    cosine = lrs(cfg.OptimConfig(lr_decay="cosine", warmup_steps=2, end_lr_ratio=0.1))
    assert cosine[2] == pytest.approx(1.0) and cosine[-1] == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 7 / 8))
    )
    linear = lrs(cfg.OptimConfig(lr_decay="linear"))
    assert linear == pytest.approx([1.0 - i / 10 for i in range(10)])
    # AdamW's decoupled decay shrinks weights that get no gradient; Adam's state has no decay
    config = dataclasses.replace(base, optim=cfg.OptimConfig(optimizer="adamw", weight_decay=0.5))
    opt = wd.build_optimizer(config)
    params = {"w": jnp.ones(2)}
    with jax.numpy_dtype_promotion("standard"):
        updates, _ = opt.update({"w": jnp.zeros(2)}, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(new["w"]), 1 - 1e-3 * 0.5, rtol=1e-6)


def test_the_loss_follows_the_config():
    """Each diffusion config builds the objective it names (checked against a direct call)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 256, (4, 4, 4, 1)), jnp.uint8)

    def apply_fn(params, x, time, **kwargs):
        out = x * params + time[:, None, None, None] / 1000
        return jnp.concatenate([out, out * 0.5], axis=-1) if learned else out

    for d, direct in [
        (cfg.DiffusionConfig(timesteps=30), {"loss": "simple"}),
        (
            cfg.DiffusionConfig(
                timesteps=30, loss="openai", var_type="learned_range", loss_type="rescaled_mse"
            ),
            {"loss": "openai", "var_type": "learned_range", "loss_type": "rescaled_mse"},
        ),
        (
            cfg.DiffusionConfig(loss="continuous", objective="v", log_snr_shift=0.5),
            {"loss": "continuous", "objective": "v"},
        ),
    ]:
        learned = d.var_type == "learned_range"
        config = cfg.validate(dataclasses.replace(cfg.Config(), diffusion=d))
        got = objectives.loss_fn_from_config(apply_fn, config)(
            jnp.float32(0.5), x, jax.random.PRNGKey(3)
        )[0]
        if d.loss == "continuous":
            direct["log_snr_fn"] = objectives.log_snr_fn_of(d)
            coeffs = None
        else:
            convention = "openai" if d.loss == "openai" else "lucidrains"
            coeffs = wd.build_coeffs(d, convention)
        want = objectives.diffusion_loss_fn(apply_fn, coeffs, **direct)(
            jnp.float32(0.5), x, jax.random.PRNGKey(3)
        )[0]
        assert float(got) == float(want) and np.isfinite(float(got))
    assert objectives.initial_loss_state(cfg.PRESETS["digits-vlb"].diffusion) is not None
    assert objectives.initial_loss_state(cfg.PRESETS["digits"].diffusion) is None


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("diffusion", {"var_type": "learned_range"}, "--loss openai"),
        ("diffusion", {"loss": "openai", "objective": "v"}, "v needs --loss simple"),
        ("diffusion", {"loss": "simple", "objective": "prev_x"}, "prev_x needs --loss openai"),
        ("diffusion", {"loss": "continuous", "objective": "x0"}, "eps or v"),
        ("diffusion", {"vb_weight": 0.5}, "learned variance"),
        ("diffusion", {"loss": "openai", "offset_noise_strength": 0.1}, "--loss simple"),
        ("optim", {"weight_decay": 0.1}, "--optimizer adamw"),
        ("optim", {"max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
        ("optim", {"warmup_steps": 5, "decay_steps": 5}, "must exceed warmup_steps"),
        ("optim", {"grad_accum_steps": 5}, "not divisible by grad_accum_steps 5"),
        ("model", {"num_classes": 0}, "num_classes must be >= 1"),
        ("model", {"num_classes": 3, "dropout": 0.1}, "no dropout"),
        ("model", {"cond_drop_prob": 2.0}, "cond_drop_prob must be in [0, 1]"),
    ],
)
def test_inconsistent_fields_are_named(section, values, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cfg.config_from_dict({section: values})


def test_new_options_leave_old_workdirs_identity_unchanged():
    old = {
        "model": {"dim": 16, "dim_mults": [1, 2, 2], "dropout": 0.0, "attn_heads": 4,
                  "attn_dim_head": 32},
        "diffusion": {"schedule": "cosine", "timesteps": 1000, "objective": "eps",
                      "min_snr_gamma": None},
        "data": {"dataset": "digits", "image_size": 16, "folder": None, "channels": 1,
                 "flip": False},
        "run": {"batch_size": 64, "lr": 0.001, "seed": 0},
    }  # fmt: skip
    got = cfg.Config().identity()
    assert {k: {n: list(v) if isinstance(v, tuple) else v for n, v in s.items()}
            for k, s in got.items()} == old  # fmt: skip
    hybrid = cfg.PRESETS["digits-hybrid"].identity()["diffusion"]
    assert hybrid["var_type"] == "learned_range" and hybrid["loss"] == "openai"


def test_folder_labels_come_from_subfolders(tmp_path):
    from PIL import Image

    for name, n in (("cat", 2), ("dog", 3)):
        (tmp_path / "f" / name).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / "f" / name / f"{i}.png")
    folder = data.ImageFolder(tmp_path / "f", 8, channels=1)
    assert folder.class_names == ("cat", "dog")
    np.testing.assert_array_equal(folder.labels, [0, 0, 1, 1, 1])
    batch = data.batch_at(folder.load(), 0, 4, seed=0, labels=True)
    assert batch["image"].shape == (4, 8, 8, 1) and batch["label"].dtype == np.int32
    Image.new("L", (8, 8)).save(tmp_path / "f" / "loose.png")
    loose = data.ImageFolder(tmp_path / "f", 8, channels=1)
    assert loose.labels is None
    with pytest.raises(ValueError, match="subfolder named after its class"):
        data.batch_at(loose.load(), 0, 4, seed=0, labels=True)
