"""Bits/dim against improved-diffusion's calc_bpd_loop, fed the noise it drew at every step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import gaussian, likelihood, schedules
from tests.parity._fixtures import (
    F64_TOTAL,
    MEAN_FLAT,
    TOTAL,
    assert_close,
    assert_close_to_reference,
    load,
    nhwc,
    params_of,
    tanh_model,
)

ARR, META = load("bpd_openai")
ORACLE = sorted(k for k, v in META.items() if v["kind"] == "oracle")
TANH = sorted(k for k, v in META.items() if v["kind"] == "tanh")
NAN_CASES = {k for k in TANH if META[k]["schedule"] == "linear" and META[k]["T"] == 20}


@functools.cache
def coeffs(schedule, steps, respacing, rescale):
    betas = schedules.get_named_beta_schedule(schedule, steps)
    return gaussian.make_coeffs(betas, respacing=respacing, rescale_timesteps=rescale)


def noise_by_timestep(meta):
    noise, order = ARR[meta["noise_key"]], ARR[meta["t_order_key"]]
    by_t = np.empty_like(noise)
    by_t[order] = noise
    return jnp.asarray(np.moveaxis(by_t, 2, -1))


def check(case, result, order):
    def nan(key):
        # Linear T = 20 has beta = 1 at its last step: there the reference's terms are NaN, and
        # jaxdiff's must be NaN in exactly the same places; anywhere else a NaN fails.
        return {"expect_nan": case in NAN_CASES and bool(np.isnan(ARR[key]).any())}

    # The reference stacks per-step terms in loop order (T-1 .. 0); jaxdiff indexes them by t.
    for name in ("xstart_mse", "mse"):
        ours = np.asarray(getattr(result, name))[:, order]
        assert_close(
            ours,
            ARR[f"{case}/{name}"],
            MEAN_FLAT,
            err_msg=f"{case}/{name}",
            **nan(f"{case}/{name}"),
        )
    assert_close(result.prior_bpd, ARR[f"{case}/prior_bpd"], MEAN_FLAT, err_msg="prior_bpd")
    vb, total = np.asarray(result.vb)[:, order], result.total_bpd
    if f"{case}/f64/vb" in ARR:
        # The decoder term of a poor model sits in the CDF's tails (see _fixtures).
        assert_close_to_reference(
            vb,
            ARR[f"{case}/vb"],
            ARR[f"{case}/f64/vb"],
            MEAN_FLAT,
            err_msg="vb",
            **nan(f"{case}/vb"),
        )
        assert_close_to_reference(
            total,
            ARR[f"{case}/total_bpd"],
            ARR[f"{case}/f64/total_bpd"],
            TOTAL,
            err_msg="total",
            f64=F64_TOTAL,
            **nan(f"{case}/total_bpd"),
        )
    else:
        assert_close(vb, ARR[f"{case}/vb"], MEAN_FLAT, err_msg=f"{case}/vb", **nan(f"{case}/vb"))
        assert_close(
            total, ARR[f"{case}/total_bpd"], TOTAL, err_msg="total", **nan(f"{case}/total_bpd")
        )


@pytest.mark.parametrize("case", ORACLE)
def test_x0_oracle_bits_per_dim(case):
    """Acceptance: a model that predicts x0 exactly, on a constant image, gives upstream's bpd
    for fixed-small and fixed-large variance, linear and cosine schedules."""
    meta = META[case]
    c = coeffs(meta["schedule"], meta["T"], None, meta["rescale_timesteps"])
    x0 = nhwc(ARR[f"{case}/x0"])
    result = jax.jit(
        lambda x0, noise: likelihood.calc_bpd_loop(
            lambda x, t: x0,
            c,
            x0,
            noise=noise,
            mean_type="x0",
            var_type=meta["var_type"].lower(),
            clip_denoised=meta["clip_denoised"],
        )
    )(x0, noise_by_timestep(meta))
    check(case, result, ARR[meta["t_order_key"]])


@pytest.mark.parametrize("case", TANH)
def test_tanh_model_bits_per_dim(case):
    meta = META[case]
    c = coeffs(meta["schedule"], meta["T"], meta["respacing"], meta["rescale_timesteps"])
    x0 = nhwc(ARR[f"{case}/x0"])
    result = likelihood.calc_bpd_loop(
        tanh_model(params_of(ARR, case)),
        c,
        x0,
        noise=noise_by_timestep(meta),
        mean_type=meta["mean_type"].lower(),
        var_type=meta["var_type"].lower(),
        clip_denoised=meta["clip_denoised"],
    )
    # Where the reference is NaN (linear T=20 has beta = 1 at its last step), so is jaxdiff.
    check(case, result, ARR[meta["t_order_key"]])


def test_bpd_with_a_key_is_deterministic_and_jits_once():
    c = coeffs("cosine", 50, None, False)
    x0 = jnp.zeros((2, 4, 4, 3))
    traces = []

    @jax.jit
    def run(key):
        traces.append(1)
        return likelihood.calc_bpd_loop(lambda x, t: x0, c, x0, key=key, mean_type="x0").total_bpd

    a = run(jax.random.PRNGKey(0))
    b = run(jax.random.PRNGKey(0))
    run(jax.random.PRNGKey(1))
    np.testing.assert_array_equal(a, b)
    assert len(traces) == 1
