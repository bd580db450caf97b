"""improved-diffusion's losses.py (normal_kl, the tanh CDF, the discretised Gaussian
log-likelihood, including probabilities that underflow to its 1e-12 floors)."""

import jax.numpy as jnp

from jaxdiff import likelihood
from tests.parity._fixtures import CDF, MODEL, assert_close, load
from tests.parity.test_lucid_parity import check_log_likelihood

ARR, META = load("likelihood_openai")


def test_normal_kl():
    args = {k: jnp.asarray(ARR[f"normal_kl/{k}"]) for k in ("mean1", "logvar1", "mean2", "logvar2")}
    # A sum of four terms of order exp(9) that cancel: compare at the model tolerance.
    assert_close(likelihood.normal_kl(**args), ARR["normal_kl/out"], MODEL, err_msg="normal_kl")


def test_approx_cdf():
    x = jnp.asarray(ARR["approx_standard_normal_cdf/x"])
    assert_close(
        likelihood.approx_standard_normal_cdf(x),
        ARR["approx_standard_normal_cdf/out"],
        CDF,
        err_msg="approx_cdf",
    )


def test_discretized_log_likelihood():
    for name in (
        "discretized_gaussian_log_likelihood",
        "discretized_gaussian_log_likelihood_underflow",
    ):
        x, means, log_scales = (ARR[f"{name}/{k}"] for k in ("x", "means", "log_scales"))
        ll = likelihood.discretized_gaussian_log_likelihood(
            jnp.asarray(x), means=jnp.asarray(means), log_scales=jnp.asarray(log_scales)
        )
        check_log_likelihood(ll, ARR[f"{name}/out"], x, means, log_scales, 1e-12)
