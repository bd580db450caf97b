"""Bad static input raises a ValueError that names the value and what is allowed."""

import jax
import jax.numpy as jnp
import pytest

from jaxdiff import continuous, gaussian, likelihood, losses, schedules


def _c(steps=100):
    return gaussian.make_coeffs(schedules.get_named_beta_schedule("cosine", steps))


def _data(channels=3):
    x = jnp.zeros((2, 4, 4, channels))
    return x, jnp.array([0, 5], jnp.int32), jnp.zeros_like(x)


def _identity(x, t):
    return x


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: schedules.get_named_beta_schedule("quadratic", 10), r"'quadratic'.*'cosine'"),
        (lambda: schedules.get_named_beta_schedule("cosine", 0), "num_timesteps must be >= 1"),
        (lambda: schedules.get_named_beta_schedule("cosine", -3), "got -3"),
        (lambda: schedules.get_named_beta_schedule("cosine", 2.5), "must be an int"),
        (lambda: schedules.sigmoid_beta_schedule(10, tau=0), "tau > 0"),
        (lambda: schedules.log_snr_schedule("laplace"), r"'laplace'.*'linear'"),
        (lambda: schedules.space_timesteps(1000, "ddim37"), r"'ddim37' cannot be met.*\[36, 38\]"),
        (lambda: schedules.space_timesteps(1000, "ddimx"), "ddimN"),
        (lambda: schedules.space_timesteps(37, "40"), "cannot take 40"),
        (lambda: schedules.space_timesteps(10, "a,b"), "comma-separated"),
        (lambda: gaussian.make_coeffs([0.1, 1.5]), r"\(0, 1\]"),
        (lambda: gaussian.make_coeffs([]), "non-empty"),
        (lambda: gaussian.make_coeffs([0.1], convention="torch"), r"'torch'.*'openai'"),
        (lambda: gaussian.canonical_mean_type("score"), r"'score'.*'eps'"),
        (lambda: gaussian.canonical_var_type("large"), r"'large'.*'fixed_large'"),
        (
            lambda: likelihood.discretized_gaussian_log_likelihood(
                jnp.zeros(3), means=jnp.zeros(3), log_scales=jnp.zeros(3), cdf="erfc"
            ),
            r"'erfc'",
        ),
        (lambda: losses.loss_weight(jnp.ones(3), "eps", min_snr_gamma=0.0), "min_snr_gamma"),
        (
            lambda: losses.training_losses(_identity, _c(), *_data(), loss_type="hybrid"),
            r"'hybrid'.*'rescaled_mse'",
        ),
        (lambda: losses.simple_loss(_identity, _c(), *_data(), objective="pred_eps"), "pred_eps"),
        (
            lambda: continuous.continuous_loss(
                _identity,
                jnp.zeros((2, 4, 4, 3)),
                jnp.zeros(2),
                jnp.zeros((2, 4, 4, 3)),
                log_snr_fn=schedules.log_snr_schedule("cosine"),
                objective="x0",
            ),
            r"'x0'.*'eps'",
        ),
    ],
)
def test_bad_static_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("var_type", ["learned", "learned_range"])
def test_learned_variance_output_with_wrong_channel_count(var_type):
    c = _c()
    x, t, noise = _data()
    with pytest.raises(ValueError, match=r"expected \(2, 4, 4, 6\).*6 channels"):
        gaussian.p_mean_variance(c, jnp.zeros((2, 4, 4, 3)), x, t, var_type=var_type)
    with pytest.raises(ValueError, match="6 channels"):
        losses.training_losses(_identity, c, x, t, noise, var_type=var_type)


def test_fixed_variance_output_with_wrong_channel_count():
    x, t, _ = _data()
    with pytest.raises(ValueError, match="3 channels"):
        gaussian.p_mean_variance(_c(), jnp.zeros((2, 4, 4, 6)), x, t, var_type="fixed_small")


def test_shapes_of_noise_t_and_bpd_noise_are_checked():
    c = _c()
    x, t, noise = _data()
    with pytest.raises(ValueError, match="noise must have the shape"):
        losses.simple_loss(_identity, c, x, t, noise[:1])
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        losses.simple_loss(_identity, c, x, t[:1], noise)
    with pytest.raises(ValueError, match="offset_noise of shape"):
        losses.simple_loss(_identity, c, x, t, noise, offset_noise_strength=0.1)
    with pytest.raises(ValueError, match="exactly one of key= or noise="):
        likelihood.calc_bpd_loop(_identity, c, x)
    with pytest.raises(ValueError, match=r"\[T, \*x0.shape\]"):
        likelihood.calc_bpd_loop(_identity, c, x, noise=jnp.zeros((3, *x.shape)))
    with pytest.raises(ValueError, match="model output has shape"):
        losses.simple_loss(lambda x, t: x[..., :1], c, x, t, noise)


def test_denoised_fn_runs_before_the_clip():
    c = _c()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3)) * 0.3
    t = jnp.array([3, 50], jnp.int32)
    out = gaussian.p_mean_variance(
        c, x, x, t, mean_type="x0", denoised_fn=lambda x0: 10.0 * x0, clip_denoised=True
    )
    assert bool(jnp.allclose(out.pred_x0, jnp.clip(10.0 * x, -1.0, 1.0)))
