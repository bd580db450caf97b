"""Sampler properties: one compilation for every step count, DDIM/DDPM identities, inversion,
constant memory, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import continuous, gaussian, samplers, schedules

# The reverse-then-forward DDIM round trip is a first-order ODE discretisation: its error shrinks
# about linearly with the step count. Measured on N(0, 0.25) data with the exact denoiser:
# ~0.1 at 50 steps, ~0.02 at 250, ~0.006 at 1000 (linear schedule).
ROUNDTRIP_ATOL_1000 = 1e-2


def _coeffs(name="linear", steps=1000, **kw):
    return gaussian.make_coeffs(schedules.get_named_beta_schedule(name, steps), **kw)


def _tanh_model(channels_out=3, seed=1):
    w = jax.random.normal(jax.random.PRNGKey(seed), (3, channels_out)) * 0.3

    def model_fn(x, time, **_):
        return 0.5 * jnp.tanh(jnp.einsum("bhwc,co->bhwo", x, w) + 1e-3 * time[:, None, None, None])

    return model_fn


def _gaussian_data_denoiser(name, var=0.25):
    """The exact eps predictor for data ~ N(0, var I), fed the original timestep."""
    abar = jnp.asarray(np.cumprod(1 - schedules.get_named_beta_schedule(name, 1000)), jnp.float32)

    def model_fn(x, time):
        a = abar[time.astype(jnp.int32)][:, None, None, None]
        return jnp.sqrt(1 - a) * x / (a * var + 1 - a)

    return model_fn


X_T = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))


def test_one_compilation_serves_every_ddim_step_count():
    c = _coeffs("cosine")
    traces = []

    @jax.jit
    def run(num_steps, key):
        traces.append(1)
        grid = samplers.ddim_grid(1000, num_steps)
        return samplers.ddim_sample(_tanh_model(), c, X_T, grid=grid, key=key).sample

    outs = [run(jnp.int32(n), jax.random.PRNGKey(2)) for n in (10, 50, 1000)]
    assert len(traces) == 1
    assert not np.allclose(outs[0], outs[1])


def test_one_compilation_serves_every_ddpm_and_continuous_step_count():
    c = _coeffs("cosine", 50)
    traces = []

    @jax.jit
    def run(num_steps):
        traces.append(1)
        grid = samplers.ddpm_grid(50, num_steps)
        ddpm = samplers.ddpm_sample(_tanh_model(), c, X_T, grid=grid, key=jax.random.PRNGKey(3))
        cont = continuous.continuous_sample(
            _tanh_model(),
            X_T,
            log_snr_fn=schedules.log_snr_schedule("cosine"),
            num_steps=num_steps,
            max_steps=50,
            key=jax.random.PRNGKey(4),
        )
        return ddpm.sample, cont.sample

    for n in (5, 20, 50):
        run(jnp.int32(n))
    assert len(traces) == 1


def test_ddim_with_eta_one_over_every_step_is_ddpm_with_small_variance():
    """sigma(eta=1)^2 is beta-tilde and the DDIM mean is then the posterior mean."""
    c = _coeffs("cosine", 100)
    noise = jax.random.normal(jax.random.PRNGKey(5), (100, *X_T.shape))
    ddim = samplers.ddim_sample(_tanh_model(), c, X_T, eta=1.0, noise=noise, return_trajectory=True)
    ddpm = samplers.ddpm_sample(_tanh_model(), c, X_T, noise=noise, return_trajectory=True)
    np.testing.assert_allclose(ddim.trajectory, ddpm.trajectory, rtol=1e-4, atol=1e-4)


def test_ddim_grid_matches_full_ddpm_grid_when_s_equals_t():
    grid = samplers.ddim_grid(37, 37)
    np.testing.assert_array_equal(grid.t, np.arange(36, -1, -1))
    np.testing.assert_array_equal(grid.t_next, np.arange(35, -2, -1))


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_reverse_ddim_then_ddim_returns_the_image(name):
    model_fn = _gaussian_data_denoiser(name)
    image = jnp.clip(0.5 * X_T, -1.0, 1.0)
    errors = {}
    for spec in ("ddim50", "ddim250", None):
        c = _coeffs(name, respacing=spec)
        latent = samplers.ddim_reverse_sample(model_fn, c, image, clip_denoised=False).sample
        back = samplers.ddim_sample(
            model_fn, c, latent, key=jax.random.PRNGKey(0), clip_denoised=False
        ).sample
        errors[spec] = float(jnp.max(jnp.abs(back - image)))
    assert errors[None] < ROUNDTRIP_ATOL_1000
    # First order: five times the steps, about five times smaller.
    assert 3.0 < errors["ddim50"] / errors["ddim250"] < 7.0


def test_memory_does_not_grow_with_the_number_of_steps():
    """Without a trajectory, 900 more steps add only the grid's int32 entries (a few kB), not
    one image per step; with it, every step keeps its image."""
    c100, c1000 = _coeffs("cosine", 100), _coeffs("cosine", 1000)
    x = jnp.zeros((2, 32, 32, 3))
    image_bytes = x.size * 4

    def temp_bytes(c, trajectory):
        def run(x):
            return samplers.ddim_sample(
                _tanh_model(), c, x, key=jax.random.PRNGKey(0), return_trajectory=trajectory
            )

        stats = jax.jit(run).lower(x).compile().memory_analysis()
        return stats.temp_size_in_bytes + stats.output_size_in_bytes

    assert temp_bytes(c1000, False) - temp_bytes(c100, False) < image_bytes
    assert temp_bytes(c1000, True) - temp_bytes(c100, True) > 900 * image_bytes


def test_trajectory_and_self_conditioning():
    c = _coeffs("cosine", 20)
    seen = []

    def model_fn(x, time, x_self_cond):
        seen.append(x_self_cond.shape)
        return jnp.tanh(x + 0.1 * x_self_cond)

    out = samplers.ddpm_sample(
        model_fn, c, X_T, key=jax.random.PRNGKey(0), self_condition=True, return_trajectory=True
    )
    assert out.trajectory.shape == (20, *X_T.shape) and out.pred_x0.shape == (20, *X_T.shape)
    np.testing.assert_array_equal(out.trajectory[-1], out.sample)
    assert seen and seen[0] == X_T.shape


def test_classifier_free_guidance_mixes_outputs():
    def model_fn(x, time, label):
        return x * label

    guided = samplers.guided_model_fn(model_fn, 3.0, {"label": 2.0}, {"label": 0.0})
    np.testing.assert_allclose(guided(X_T, jnp.zeros(2)), 6.0 * X_T, rtol=1e-6)


def test_interpolate_with_lam_zero_denoises_the_first_image_from_step_t():
    c = _coeffs("cosine", 50)
    x1, x2 = jnp.zeros_like(X_T), jnp.ones_like(X_T) * 0.5
    key = jax.random.PRNGKey(9)
    got = samplers.interpolate(_tanh_model(), c, x1, x2, t=10, lam=0.0, key=key)
    k1, _, k3 = jax.random.split(key, 3)
    x1_t = gaussian.q_sample(c, x1, jnp.full((2,), 10), jax.random.normal(k1, x1.shape))
    grid = samplers.ddpm_grid(50, 10)
    want = samplers.ddpm_sample(_tanh_model(), c, x1_t, key=k3, grid=grid).sample
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda c: samplers.ddim_grid(1000, 0), r"\[1, 1000\], got 0"),
        (lambda c: samplers.ddim_grid(1000, 1001), "got 1001"),
        (lambda c: samplers.ddpm_grid(50, 51), "got 51"),
        (
            lambda c: samplers.ddim_sample(
                _tanh_model(), c, X_T, eta=-0.1, key=jax.random.PRNGKey(0)
            ),
            "eta must be >= 0",
        ),
        (lambda c: samplers.ddpm_sample(_tanh_model(), c, X_T), "exactly one of key= or noise="),
        (
            lambda c: samplers.ddpm_sample(_tanh_model(), c, X_T, noise=jnp.zeros((3, *X_T.shape))),
            r"noise must have shape \[50",
        ),
        (
            lambda c: samplers.ddpm_sample(_tanh_model(6), c, X_T, key=jax.random.PRNGKey(0)),
            r"model output has shape \(2, 8, 8, 6\)",
        ),
        (
            lambda c: samplers.ddpm_sample(
                _tanh_model(3), c, X_T, key=jax.random.PRNGKey(0), var_type="learned_range"
            ),
            "6 channels",
        ),
        (
            lambda c: continuous.continuous_sample(
                _tanh_model(),
                X_T,
                log_snr_fn=schedules.log_snr_schedule("cosine"),
                num_steps=0,
                key=jax.random.PRNGKey(0),
            ),
            "max_steps must be >= 1",
        ),
    ],
)
def test_bad_sampler_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(_coeffs("cosine", 50))
