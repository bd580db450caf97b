"""Mathematical properties of the core, independent of any reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import continuous, gaussian, likelihood, losses, schedules

# float32 round trips through sqrt(1/abar) amplify rounding by up to sqrt(1/abar) ~ 1e2..1e4.
ROUNDTRIP_ATOL = 2e-3
# Probabilities of 256 bins summed in float32; adjacent bin edges x_k + 1/255 and
# x_{k+1} - 1/255 round differently (~6e-8), an error the CDF scales by 1/sigma.
SUM_TO_ONE_ATOL = 1e-5
EDGE_ROUNDING = 1e-7


def _coeffs(name="cosine", steps=1000, **kw):
    return gaussian.make_coeffs(schedules.get_named_beta_schedule(name, steps), **kw)


def _batch(key, shape=(4, 4, 4, 3)):
    k1, k2 = jax.random.split(key)
    pixels = jax.random.randint(k1, shape, 0, 256)
    x0 = (pixels.astype(jnp.float32) / 127.5 - 1.0).at[0, 0, 0, 0].set(-1.0).at[0, 0, 0, 1].set(1.0)
    return x0, jax.random.normal(k2, shape)


def test_kl_of_a_distribution_with_itself_is_zero():
    key = jax.random.PRNGKey(0)
    mean = jax.random.normal(key, (64,)) * 3
    logvar = jax.random.normal(jax.random.fold_in(key, 1), (64,)) * 2
    np.testing.assert_allclose(likelihood.normal_kl(mean, logvar, mean, logvar), 0.0, atol=1e-6)
    other = likelihood.normal_kl(mean, logvar, mean + 0.5, logvar - 0.3)
    assert bool(jnp.all(other > 0))


@pytest.mark.parametrize("cdf", ["approx", "exact"])
@pytest.mark.parametrize("mean", [-1.0, -0.37, 0.0, 0.5, 1.0])
@pytest.mark.parametrize("log_scale", [math.log(1 / 255) - 1, math.log(0.05), 0.0, 1.0])
def test_discretized_likelihood_sums_to_one_over_256_bins(cdf, mean, log_scale):
    x = jnp.arange(256, dtype=jnp.float32) / 127.5 - 1.0
    ll = likelihood.discretized_gaussian_log_likelihood(
        x,
        means=jnp.full_like(x, mean),
        log_scales=jnp.full_like(x, log_scale),
        cdf=cdf,
    )
    total = jnp.sum(jnp.exp(ll))
    atol = max(SUM_TO_ONE_ATOL, EDGE_ROUNDING / math.exp(log_scale))
    np.testing.assert_allclose(total, 1.0, atol=atol)


def test_exact_cdf_is_more_accurate_than_tanh():
    x = jnp.linspace(-6.0, 6.0, 2001)
    exact = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in np.asarray(x, np.float64)])
    err_approx = np.max(np.abs(np.asarray(likelihood.approx_standard_normal_cdf(x)) - exact))
    err_exact = np.max(np.abs(np.asarray(likelihood.standard_normal_cdf(x)) - exact))
    assert 1.5e-4 < err_approx < 2e-4
    assert err_exact < 1e-6


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
def test_conversions_round_trip(name):
    c = _coeffs(name)
    x0, eps = _batch(jax.random.PRNGKey(1))
    t = jnp.array([0, 1, 500, 900], dtype=jnp.int32)
    x_t = gaussian.q_sample(c, x0, t, eps)
    np.testing.assert_allclose(
        gaussian.predict_x0_from_eps(c, x_t, t, eps), x0, atol=ROUNDTRIP_ATOL
    )
    np.testing.assert_allclose(
        gaussian.predict_eps_from_x0(c, x_t, t, x0), eps, atol=ROUNDTRIP_ATOL
    )
    v = gaussian.predict_v(c, x0, t, eps)
    np.testing.assert_allclose(gaussian.predict_x0_from_v(c, x_t, t, v), x0, atol=1e-5)
    np.testing.assert_allclose(gaussian.predict_eps_from_v(c, x_t, t, v), eps, atol=1e-5)
    mean, _, _ = gaussian.q_posterior_mean_variance(c, x0, x_t, t)
    np.testing.assert_allclose(
        gaussian.predict_x0_from_xprev(c, x_t, t, mean), x0, atol=ROUNDTRIP_ATOL
    )


def test_posterior_mean_at_t0_is_x0_and_tables_are_consistent():
    c = _coeffs("linear")
    np.testing.assert_allclose(c.posterior_mean_coef1[0], 1.0)
    np.testing.assert_allclose(c.posterior_mean_coef2[0], 0.0)
    np.testing.assert_allclose(np.sum(np.asarray(c.betas, np.float64)), 10.05, rtol=1e-6)
    openai = _coeffs("linear", convention="openai")
    lucid = _coeffs("linear", convention="lucidrains")
    np.testing.assert_allclose(
        openai.posterior_log_variance_clipped[0], openai.posterior_log_variance_clipped[1]
    )
    np.testing.assert_allclose(lucid.posterior_log_variance_clipped[0], math.log(1e-20), rtol=1e-6)
    np.testing.assert_array_equal(
        openai.posterior_log_variance_clipped[1:], lucid.posterior_log_variance_clipped[1:]
    )


def test_cosine_float64_build_keeps_last_steps_right():
    betas = schedules.cosine_beta_schedule(1000)
    assert betas.dtype == np.float64
    assert betas[-1] == 0.999 and np.all(betas[:-1] < 0.999)


def test_respacing_preserves_alpha_bar_at_kept_steps():
    betas = schedules.linear_beta_schedule(1000)
    kept = schedules.space_timesteps(1000, "ddim10")
    np.testing.assert_array_equal(kept, np.arange(0, 1000, 100))
    new_betas, timestep_map = schedules.respace_betas(betas, kept)
    np.testing.assert_allclose(np.cumprod(1 - new_betas), np.cumprod(1 - betas)[kept], rtol=1e-12)
    c = gaussian.make_coeffs(betas, respacing="ddim10", rescale_timesteps=True)
    np.testing.assert_allclose(c.model_times, kept.astype(np.float32))
    c = gaussian.make_coeffs(
        schedules.linear_beta_schedule(4000), respacing="10", rescale_timesteps=True
    )
    np.testing.assert_allclose(c.model_times[-1], 3999 * 1000 / 4000, rtol=1e-6)


def test_section_respacing_accumulates_its_stride():
    steps = schedules.space_timesteps(1000, "21")
    # round(10 * 49.95) = 500 but accumulating 49.95 ten times gives 499.4999.. -> 499.
    assert steps[10] == 499
    assert steps[0] == 0 and steps[-1] == 999


def _tanh_model(channels_out):
    w = jax.random.normal(jax.random.PRNGKey(7), (3, channels_out)) * 0.5

    def model_fn(x, time):
        return jnp.tanh(jnp.einsum("bhwc,co->bhwo", x, w) + 1e-3 * time[:, None, None, None])

    return model_fn


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
def test_bpd_of_an_x0_oracle_matches_the_closed_form(name, var_type):
    """With x0 predicted exactly, each KL is the variance mismatch only and the decoder term is
    -log2 of the central bin's mass."""
    c = _coeffs(name)
    x0 = jnp.zeros((1, 2, 2, 3))
    res = likelihood.calc_bpd_loop(
        lambda x, t: jnp.zeros_like(x),
        c,
        x0,
        key=jax.random.PRNGKey(0),
        mean_type="x0",
        var_type=var_type,
    )
    pv = np.asarray(schedules.get_named_beta_schedule(name, 1000), np.float64)
    abar = np.cumprod(1 - pv)
    abar_prev = np.append(1.0, abar[:-1])
    post = pv * (1 - abar_prev) / (1 - abar)
    model_var = post[1:] if var_type == "fixed_small" else pv[1:]
    kl = 0.5 * (-1 + np.log(model_var) - np.log(post[1:]) + post[1:] / model_var) / math.log(2)
    # At t = 0 both fixed variance types use beta-tilde_1.
    half_bin = (1 / 255) / math.sqrt(post[1])
    phi = lambda z: 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))  # noqa: E731
    decoder = -math.log2(phi(half_bin) - phi(-half_bin))
    prior = 0.5 * (-1 - math.log(1 - abar[-1]) + (1 - abar[-1])) / math.log(2)
    expected = decoder + kl.sum() + prior
    np.testing.assert_allclose(res.total_bpd, expected, rtol=1e-4)
    np.testing.assert_allclose(res.vb[0, 0], decoder, rtol=1e-4)


def _finite_tree(tree):
    return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("mean_type", ["eps", "x0", "v", "prev_x"])
@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large", "learned", "learned_range"])
def test_losses_and_gradients_are_finite_at_the_edges(name, mean_type, var_type):
    c = _coeffs(name)
    learned = var_type in ("learned", "learned_range")
    cout = 6 if learned else 3
    x0 = jnp.concatenate(
        [-jnp.ones((1, 4, 4, 3)), jnp.ones((1, 4, 4, 3)), _batch(jax.random.PRNGKey(3))[0][:2]]
    )
    noise = jax.random.normal(jax.random.PRNGKey(4), x0.shape)
    t = jnp.array([0, c.num_timesteps - 1, 0, c.num_timesteps - 1], dtype=jnp.int32)

    def loss(w, loss_type):
        def model_fn(x, time):
            return jnp.tanh(jnp.einsum("bhwc,co->bhwo", x, w) + 1e-3 * time[:, None, None, None])

        out = losses.training_losses(
            model_fn, c, x0, t, noise, mean_type=mean_type, var_type=var_type, loss_type=loss_type
        )
        return jnp.mean(out["loss"]), out

    w = jax.random.normal(jax.random.PRNGKey(5), (3, cout)) * 0.5
    for loss_type in losses.LOSS_TYPES:
        (value, terms), grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
            w, loss_type
        )
        assert _finite_tree(terms) and bool(jnp.isfinite(value)), (loss_type, terms)
        assert _finite_tree(grad), loss_type

    def bpd(w):
        def model_fn(x, time):
            return jnp.tanh(jnp.einsum("bhwc,co->bhwo", x, w) + 1e-3 * time[:, None, None, None])

        small = gaussian.make_coeffs(schedules.get_named_beta_schedule(name, 50))
        res = likelihood.calc_bpd_loop(
            model_fn, small, x0, key=jax.random.PRNGKey(6), mean_type=mean_type, var_type=var_type
        )
        return jnp.mean(res.total_bpd)

    value, grad = jax.value_and_grad(bpd)(w)
    assert bool(jnp.isfinite(value)) and _finite_tree(grad)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_simple_loss_gradients_finite_with_cosine_last_beta(objective, gamma):
    c = _coeffs("cosine")
    x0, noise = _batch(jax.random.PRNGKey(8))
    t = jnp.array([0, 1, 998, 999], dtype=jnp.int32)

    def loss(w):
        def model_fn(x, time):
            return jnp.tanh(jnp.einsum("bhwc,co->bhwo", x, w))

        return jnp.mean(
            losses.simple_loss(model_fn, c, x0, t, noise, objective=objective, min_snr_gamma=gamma)
        )

    value, grad = jax.value_and_grad(loss)(jnp.eye(3))
    assert bool(jnp.isfinite(value)) and _finite_tree(grad)


def test_hybrid_vb_term_trains_only_the_variance_channels():
    c = _coeffs("linear")
    x0, noise = _batch(jax.random.PRNGKey(9))
    t = jnp.array([0, 5, 500, 999], dtype=jnp.int32)

    def vb(w):
        def model_fn(x, time):
            return jnp.tanh(jnp.einsum("bhwc,co->bhwo", x, w))

        out = losses.training_losses(
            model_fn, c, x0, t, noise, var_type="learned_range", loss_type="rescaled_mse"
        )
        return jnp.sum(out["vb"])

    grad = jax.grad(vb)(jax.random.normal(jax.random.PRNGKey(10), (3, 6)))
    np.testing.assert_array_equal(grad[:, :3], 0.0)
    assert bool(jnp.any(grad[:, 3:] != 0))


@pytest.mark.parametrize("objective", ["eps", "v"])
@pytest.mark.parametrize("schedule", ["linear", "cosine", "simple_cosine"])
def test_continuous_loss_finite_at_both_ends(objective, schedule):
    x0, noise = _batch(jax.random.PRNGKey(11))
    times = jnp.array([0.0, 1e-6, 0.5, 1.0])
    fn = schedules.log_snr_schedule(schedule)

    def loss(w):
        def model_fn(x, log_snr):
            return jnp.tanh(jnp.einsum("bhwc,co->bhwo", x, w) + 0.01 * log_snr[:, None, None, None])

        gamma = 5.0 if objective == "eps" else None
        return jnp.mean(
            continuous.continuous_loss(
                model_fn, x0, times, noise, log_snr_fn=fn, objective=objective, min_snr_gamma=gamma
            )
        )

    value, grad = jax.value_and_grad(loss)(jnp.eye(3))
    assert bool(jnp.isfinite(value)) and _finite_tree(grad)


def test_importance_sampler_is_uniform_until_warm_then_follows_loss_second_moment():
    state = losses.loss_second_moment_init(4, history_per_term=2)
    np.testing.assert_allclose(losses.loss_second_moment_weights(state), 1.0)
    for _ in range(2):
        state = losses.loss_second_moment_update(
            state, jnp.array([0, 1, 2, 3]), jnp.array([1.0, 2.0, 3.0, 4.0])
        )
    w = losses.loss_second_moment_weights(state, uniform_prob=0.0)
    np.testing.assert_allclose(w, np.array([1, 2, 3, 4]) / 10, rtol=1e-6)
    t, iw = losses.sample_timesteps(jax.random.PRNGKey(0), w, 4096)
    freq = np.bincount(np.asarray(t), minlength=4) / 4096
    np.testing.assert_allclose(freq, np.asarray(w), atol=0.03)
    np.testing.assert_allclose(iw, 1.0 / (4 * np.asarray(w)[np.asarray(t)]), rtol=1e-6)
