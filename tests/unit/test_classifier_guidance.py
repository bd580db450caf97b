"""jaxdiff.guidance.classifier_cond_fn: classifier guidance from a noisy classifier's logits
(Dhariwal & Nichol 2021, Alg. 1 and 2), against hand-derived gradients and through the DDPM and
DDIM samplers. Parity with guided-diffusion's classifier_sample.py on imported networks is in
tests/parity/test_openai_sampling_parity.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import gaussian, schedules
from jaxdiff.guidance import classifier_cond_fn
from jaxdiff.samplers import classifier_cond_fn as reexported
from jaxdiff.samplers import ddim_sample, ddpm_grid, ddpm_sample

B, H, W, C, K = 2, 2, 2, 3, 4
D = H * W * C
RNG = np.random.default_rng(0)
WEIGHTS = RNG.standard_normal((D, K)).astype(np.float32)
BIAS = RNG.standard_normal(K).astype(np.float32)


def linear_logits(x, t):
    """logits = (x_flat W + b) (1 + t / 100): the time input matters."""
    flat = x.reshape(x.shape[0], -1)
    return (flat @ jnp.asarray(WEIGHTS) + jnp.asarray(BIAS)[None]) * (1.0 + t / 100.0)[:, None]


def hand_gradient(x, t, y, scale):
    """d/dx sum_b log softmax(z_b)[y_b] with z = (x W + b) g, g = 1 + t / 100:
    (onehot(y) - softmax(z)) W^T g, in float64."""
    x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
    g = 1.0 + t / 100.0
    z = (x.reshape(x.shape[0], -1) @ WEIGHTS.astype(np.float64) + BIAS) * g[:, None]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    onehot = np.eye(K)[np.asarray(y)]
    grad = ((onehot - p) @ WEIGHTS.T.astype(np.float64)) * g[:, None]
    return scale * grad.reshape(x.shape)


def _inputs():
    x = jnp.asarray(RNG.standard_normal((B, H, W, C)).astype(np.float32))
    t = jnp.asarray([3.0, 250.5], jnp.float32)
    y = jnp.asarray([1, 3], jnp.int32)
    return x, t, y


def test_gradient_matches_the_hand_derived_one():
    x, t, y = _inputs()
    for scale in (1.0, 2.5):
        got = classifier_cond_fn(linear_logits, scale)(x, t, y=y)
        assert got.shape == x.shape and got.dtype == x.dtype
        np.testing.assert_allclose(got, hand_gradient(x, t, y, scale), rtol=1e-5, atol=1e-6)
    # jitted, with traced labels and a traced scale
    jitted = jax.jit(lambda x, t, y, s: classifier_cond_fn(linear_logits, s)(x, t, y=y))
    got = jitted(x, t, y, jnp.float32(2.5))
    np.testing.assert_allclose(got, hand_gradient(x, t, y, 2.5), rtol=1e-5, atol=1e-6)
    assert reexported is classifier_cond_fn


def test_each_example_gets_the_gradient_of_its_own_label():
    x, t, _ = _inputs()
    cond_fn = classifier_cond_fn(linear_logits, 1.0)
    both = cond_fn(x, t, y=jnp.asarray([0, 2], jnp.int32))
    other = cond_fn(x, t, y=jnp.asarray([0, 1], jnp.int32))
    np.testing.assert_array_equal(both[0], other[0])
    assert float(jnp.max(jnp.abs(both[1] - other[1]))) > 1e-2


def test_scale_zero_gives_zeros_and_other_keywords_are_ignored():
    x, t, y = _inputs()
    got = classifier_cond_fn(linear_logits, 0.0)(x, t, y=y, low_res=jnp.zeros(3))
    np.testing.assert_array_equal(got, np.zeros(x.shape, np.float32))


def test_missing_or_malformed_labels_raise():
    x, t, y = _inputs()
    cond_fn = classifier_cond_fn(linear_logits, 1.0)
    with pytest.raises(ValueError, match=r"needs the labels.*model_kwargs=\{'y': labels\}"):
        cond_fn(x, t)
    with pytest.raises(ValueError, match=r"y must be \[B\] integer labels with B = 2"):
        cond_fn(x, t, y=jnp.asarray([1, 2, 3], jnp.int32))
    with pytest.raises(ValueError, match=r"y must be \[B\] integer labels"):
        cond_fn(x, t, y=jnp.asarray([1.0, 2.0], jnp.float32))
    with pytest.raises(ValueError, match=r"y values must be in \[0, 4\).*from 1 to 4"):
        cond_fn(x, t, y=jnp.asarray([1, 4], jnp.int32))
    with pytest.raises(ValueError, match=r"\[B, K\] logits"):
        classifier_cond_fn(lambda x, t: jnp.zeros((B, K, 1)))(x, t, y=y)
    with pytest.raises(ValueError, match="logits_fn must be callable"):
        classifier_cond_fn("classifier")


def _table():
    betas = schedules.get_named_beta_schedule("cosine", 100)
    return gaussian.make_coeffs(betas, respacing="5", rescale_timesteps=True)


def _zero_eps(x, time, **_):
    return jnp.zeros_like(x)


def test_ddpm_shifts_the_mean_by_variance_times_gradient_at_the_model_time():
    """Alg. 1 (guided-diffusion condition_mean): x_{t-1} moves by Sigma_t * cond_fn(x_t, time),
    time being what the network gets (the respaced table's rescaled model time)."""
    c = _table()
    x, _, y = _inputs()
    noise = jnp.asarray(RNG.standard_normal((5, B, H, W, C)).astype(np.float32))
    scale = 3.0
    kwargs = dict(noise=noise, clip_denoised=False, return_trajectory=True, grid=ddpm_grid(5, 1))
    guided = ddpm_sample(_zero_eps, c, x, cond_fn=classifier_cond_fn(linear_logits, scale),
                         model_kwargs={"y": y}, **kwargs)  # fmt: skip
    plain = ddpm_sample(_zero_eps, c, x, model_kwargs={"y": y}, **kwargs)
    # the one step of ddpm_grid(5, 1) is t = 0, the last: the fixed-small variance there is
    # beta-tilde_0 = 0 (as guided-diffusion's p_mean_var["variance"]), so guidance adds nothing
    np.testing.assert_array_equal(guided.sample, plain.sample)
    # a full chain: the first step, from x_T at the last (noisiest) table step, t = 4
    kwargs["grid"] = None
    guided = ddpm_sample(_zero_eps, c, x, cond_fn=classifier_cond_fn(linear_logits, scale),
                         model_kwargs={"y": y}, **kwargs)  # fmt: skip
    plain = ddpm_sample(_zero_eps, c, x, model_kwargs={"y": y}, **kwargs)
    time = np.full(B, float(c.model_times[4]))
    assert float(c.model_times[4]) == 990.0  # rescaled: step 99 of 100, times 1000 / 100
    variance = float(c.posterior_variance[4])
    expected = variance * hand_gradient(x, time, y, scale)
    assert float(np.max(np.abs(expected))) > 1e-3
    shift = guided.trajectory[0] - plain.trajectory[0]
    np.testing.assert_allclose(shift, expected, rtol=1e-4, atol=1e-6)


def test_ddim_uses_the_score_form():
    """Alg. 2 (guided-diffusion condition_score): eps' = eps - sqrt(1 - abar) cond_fn, x0 from
    eps', then the DDIM step (eta 0) from x0 and eps'."""
    c = _table()
    x, _, y = _inputs()
    scale = 3.0
    cond_fn = classifier_cond_fn(linear_logits, scale)
    out = ddim_sample(_zero_eps, c, x, cond_fn=cond_fn, model_kwargs={"y": y},
                      clip_denoised=False, return_trajectory=True)  # fmt: skip
    abar = np.asarray(c.alphas_cumprod, np.float64)
    a, a_next = abar[4], abar[3]
    g = hand_gradient(x, np.full(B, float(c.model_times[4])), y, scale)
    eps = -np.sqrt(1 - a) * g
    x0 = (np.asarray(x, np.float64) - np.sqrt(1 - a) * eps) / np.sqrt(a)
    expected = np.sqrt(a_next) * x0 + np.sqrt(1 - a_next) * eps
    np.testing.assert_allclose(out.pred_x0[0], x0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.trajectory[0], expected, rtol=1e-4, atol=1e-5)


def test_bad_labels_are_refused_inside_a_sampler():
    """Concrete labels are checked even where cond_fn runs inside the sampler's scan."""
    c = _table()
    x, _, _ = _inputs()
    with pytest.raises(ValueError, match=r"y values must be in \[0, 4\)"):
        ddim_sample(_zero_eps, c, x, cond_fn=classifier_cond_fn(linear_logits),
                    model_kwargs={"y": jnp.asarray([0, 7], jnp.int32)})  # fmt: skip
