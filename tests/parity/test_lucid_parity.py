"""denoising-diffusion-pytorch 2.3.4 against jaxdiff: GaussianDiffusion (every schedule x
objective x min-SNR x offset noise), LearnedGaussianDiffusion and its likelihood helpers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import gaussian, likelihood, losses, schedules
from tests.parity._fixtures import (
    CDF,
    CONVERT,
    GRAD,
    LOGLIK_F64,
    MEAN_FLAT,
    MODEL,
    TABLE,
    assert_close,
    assert_close_to_reference,
    assert_grad_close,
    load,
    nchw,
    nhwc,
    params_of,
    tanh_model,
)

ARR, META = load("gaussian_lucid")
PROCESSES = sorted(k for k, v in META.items() if v["kind"] == "process")
OBJECTIVE_CASES = sorted(k for k, v in META.items() if v["kind"] == "objective_case")
LEARNED_CASES = sorted(k for k, v in META.items() if v["kind"] == "learned_case")
GAMMAS = {"off": None, "g5": 5.0}


@functools.cache
def coeffs(process):
    meta = META[process]
    betas = schedules.get_named_beta_schedule(meta["schedule"], meta["T"])
    return gaussian.make_coeffs(betas, convention="lucidrains")


def inputs(process):
    x0 = nhwc(ARR[f"{process}/inputs/x0"])
    noise = nhwc(ARR[f"{process}/inputs/noise"])
    return x0, noise, jnp.asarray(ARR[f"{process}/inputs/t"], jnp.int32)


@pytest.mark.parametrize("process", PROCESSES)
def test_process(process):
    c = coeffs(process)
    x0, noise, t = inputs(process)
    x_t = nhwc(ARR[f"{process}/q_sample"])
    assert_close(nchw(gaussian.q_sample(c, x0, t, noise)), ARR[f"{process}/q_sample"], TABLE)
    # These multiply by sqrt(1/abar) (up to ~2e4) or divide by sqrt(1/abar - 1).
    checks = {
        "predict_start_from_noise": gaussian.predict_x0_from_eps(c, x_t, t, noise),
        "predict_noise_from_start": gaussian.predict_eps_from_x0(c, x_t, t, x0),
        "predict_v": gaussian.predict_v(c, x0, t, noise),
        "predict_start_from_v": gaussian.predict_x0_from_v(
            c, x_t, t, nhwc(ARR[f"{process}/predict_v"])
        ),
    }
    for name, got in checks.items():
        assert_close(nchw(got), ARR[f"{process}/{name}"], CONVERT, err_msg=name)
    for name, got in zip(
        ["mean", "variance", "log_variance_clipped"],
        gaussian.q_posterior_mean_variance(c, x0, x_t, t),
        strict=True,
    ):
        assert_close(nchw(got), ARR[f"{process}/q_posterior/{name}"], TABLE, err_msg=name)


@pytest.mark.parametrize("case", OBJECTIVE_CASES)
def test_objective_case(case):
    meta = META[case]
    process, objective = meta["process"], meta["objective"]
    c = coeffs(process)
    x0, noise, t = inputs(process)
    x_t = nhwc(ARR[f"{process}/q_sample"])
    out = nhwc(ARR[f"{case}/model_output"])
    params = params_of(ARR, case)
    assert_close(
        nchw(tanh_model(params)(x_t, c.model_times[t])),
        ARR[f"{case}/model_output"],
        MODEL,
        err_msg="model_output",
    )

    for tag, clip, rederive in [
        ("clip", True, True),
        ("noclip", False, True),
        ("clip_norederive", True, False),
    ]:
        eps, x0_hat = gaussian.model_predictions(
            c, out, x_t, t, mean_type=objective, clip_denoised=clip, rederive_eps=rederive
        )
        prefix = f"{case}/model_predictions/{tag}"
        assert_close(nchw(eps), ARR[f"{prefix}/pred_noise"], MODEL, err_msg=f"{prefix}/eps")
        assert_close(nchw(x0_hat), ARR[f"{prefix}/pred_x_start"], MODEL, err_msg=f"{prefix}/x0")
    for tag, clip in [("clip", True), ("noclip", False)]:
        pmv = gaussian.p_mean_variance(
            c, out, x_t, t, mean_type=objective, var_type="fixed_small", clip_denoised=clip
        )
        for name, got in zip(["mean", "variance", "log_variance", "x_start"], pmv, strict=True):
            key = f"{case}/p_mean_variance/{tag}/{name}"
            assert_close(nchw(got), ARR[key], MODEL, err_msg=key)

    for gamma_tag, gamma in GAMMAS.items():
        for strength in (0.0, 0.1):
            prefix = f"{case}/p_losses/{gamma_tag}/off{strength:g}"
            offset = jnp.asarray(ARR[f"{prefix}/offset_noise"]) if strength else None

            def total(p, gamma=gamma, strength=strength, offset=offset):
                per_example = losses.simple_loss(
                    tanh_model(p),
                    c,
                    x0,
                    t,
                    noise,
                    objective=objective,
                    min_snr_gamma=gamma,
                    offset_noise=offset,
                    offset_noise_strength=strength,
                )
                return jnp.sum(per_example), per_example

            (_, per_example), grads = jax.value_and_grad(total, has_aux=True)(params)
            assert_close(per_example, ARR[f"{prefix}/loss"], MEAN_FLAT, err_msg=prefix)
            for name in ("W", "b", "s"):
                assert_grad_close(
                    grads[name], ARR[f"{prefix}/grad_{name}"], f"{prefix}/grad_{name}", GRAD
                )


@pytest.mark.parametrize("case", LEARNED_CASES)
def test_learned_variance_case(case):
    meta = META[case]
    process = meta["process"]
    c = coeffs(process)
    x0, noise, t = inputs(process)
    x_t = nhwc(ARR[f"{process}/q_sample"])
    out = nhwc(ARR[f"{case}/model_output"])
    for tag, clip in [("clip", True), ("noclip", False)]:
        pmv = gaussian.p_mean_variance(
            c, out, x_t, t, mean_type="eps", var_type="learned_range", clip_denoised=clip
        )
        for name, got in zip(["mean", "variance", "log_variance", "x_start"], pmv, strict=True):
            key = f"{case}/p_mean_variance/{tag}/{name}"
            assert_close(nchw(got), ARR[key], MODEL, err_msg=key)

    params = params_of(ARR, case)

    def total(p):
        terms = losses.training_losses(
            tanh_model(p),
            c,
            x0,
            t,
            noise,
            mean_type="eps",
            var_type="learned_range",
            loss_type="mse",
            vb_weight=meta["vb_loss_weight"],
            log_floor=1e-15,
        )
        return jnp.sum(terms["loss"]), terms

    (_, terms), grads = jax.value_and_grad(total, has_aux=True)(params)
    prefix = f"{case}/p_losses"
    assert_close(terms["mse"], ARR[f"{prefix}/pieces/mse"], MEAN_FLAT, err_msg="mse")
    vb_ref = np.where(
        np.asarray(t) == 0, ARR[f"{prefix}/pieces/decoder_nll"], ARR[f"{prefix}/pieces/kl"]
    )
    # The hybrid weight 0.001 shrinks the decoder term's float32 tail error (see _fixtures) below
    # the loss tolerance; the VB term on its own is compared where it is a KL (t > 0).
    kl_steps = np.asarray(t) > 0
    assert_close(
        np.asarray(terms["vb"])[kl_steps] / meta["vb_loss_weight"],
        vb_ref[kl_steps],
        MEAN_FLAT,
        err_msg="vb at t > 0",
    )
    assert_close_to_reference(
        terms["loss"],
        ARR[f"{prefix}/loss"],
        ARR[f"{case}/f64/p_losses/loss"],
        MEAN_FLAT,
        err_msg="loss",
    )
    # At t = 0 the VB term is the decoder NLL: bound its float32 tail error element by element.
    out_ref = nhwc(ARR[f"{case}/model_output"])
    pmv = gaussian.p_mean_variance(
        c, out_ref, x_t, t, mean_type="eps", var_type="learned_range", clip_denoised=False
    )
    ll = likelihood.discretized_gaussian_log_likelihood(
        x0, means=pmv.mean, log_scales=0.5 * pmv.log_variance, log_floor=1e-15
    )
    p = np.exp(np.asarray(ll, np.float64))
    tail = np.mean(8 * 6e-8 / np.maximum(p, 1e-15), axis=(1, 2, 3)) / np.log(2.0)
    allowed = MEAN_FLAT.atol + MEAN_FLAT.rtol * np.abs(vb_ref) + tail
    decoder_ours = np.asarray(terms["vb"]) / meta["vb_loss_weight"]
    assert np.all((np.abs(decoder_ours - vb_ref) <= allowed)[~kl_steps]), (
        decoder_ours,
        vb_ref,
        allowed,
    )
    for name in ("W", "b", "s"):
        key = f"grad_{name}"
        assert_close_to_reference(
            grads[name],
            ARR[f"{prefix}/{key}"],
            ARR[f"{case}/f64/p_losses/{key}"],
            GRAD,
            err_msg=f"{prefix}/{key}",
            grad=True,
        )


def test_likelihood_helpers():
    kl = {
        k: jnp.asarray(ARR[f"likelihood/normal_kl/{k}"])
        for k in ("mean1", "logvar1", "mean2", "logvar2")
    }
    assert_close(likelihood.normal_kl(**kl), ARR["likelihood/normal_kl/out"], MODEL, err_msg="kl")
    x = jnp.asarray(ARR["likelihood/approx_cdf/x"])
    assert_close(
        likelihood.approx_standard_normal_cdf(x),
        ARR["likelihood/approx_cdf/out"],
        CDF,
        err_msg="approx_cdf",
    )
    x, means, log_scales = (
        ARR[f"likelihood/discretized/{k}"] for k in ("x", "means", "log_scales")
    )
    ll = likelihood.discretized_gaussian_log_likelihood(
        jnp.asarray(x),
        means=jnp.asarray(means),
        log_scales=jnp.asarray(log_scales),
        log_floor=1e-15,
    )
    check_log_likelihood(ll, ARR["likelihood/discretized/out"], x, means, log_scales, 1e-15)


# float32 resolves a CDF value near 1 to ~6e-8; a few such roundings enter each bin mass.
CDF_NEAR_ONE_ERROR = 8 * 6e-8


def float64_log_likelihood(x, means, log_scales, floor):
    """The same discretised likelihood in float64 NumPy: the yardstick for the float32 error."""
    x, means, log_scales = (np.asarray(a, np.float64) for a in (x, means, log_scales))

    def phi(z):  # 0.5 (1 + tanh(u)) written as 1 / (1 + exp(-2u)): no cancellation in the tail
        with np.errstate(over="ignore"):  # exp overflows to inf, and 1 / inf = 0 is right
            return 1.0 / (1.0 + np.exp(-2.0 * np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3)))

    inv = np.exp(-log_scales)
    plus, minus = inv * (x - means + 1 / 255), inv * (x - means - 1 / 255)
    delta = np.where(minus > 0, phi(-minus) - phi(-plus), phi(plus) - phi(minus))
    return np.where(
        x < -0.999,
        np.log(np.maximum(phi(plus), floor)),
        np.where(
            x > 0.999, np.log(np.maximum(phi(-minus), floor)), np.log(np.maximum(delta, floor))
        ),
    )


def check_log_likelihood(ours, ref, x, means, log_scales, floor):
    """jaxdiff keeps float32's relative accuracy in the tails (it matches a float64 evaluation);
    the reference differs from it by its own float32 error, ~CDF_NEAR_ONE_ERROR / p in log p,
    and floors to log(floor) only where the true p is within that error of zero."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    truth = float64_log_likelihood(x, means, log_scales, floor)
    assert_close(ours, truth, LOGLIK_F64, err_msg="log-likelihood against float64")
    p = np.exp(truth)
    floored = ref <= np.log(floor) + 1e-6
    assert np.isfinite(ours).all() and np.isfinite(ref).all(), "non-finite log-likelihood"
    allowed = MODEL.atol + MODEL.rtol * np.abs(ref) + CDF_NEAR_ONE_ERROR / p
    assert np.all((np.abs(ours - ref) <= allowed) | floored), "reference and jaxdiff disagree"
    assert np.all(p[floored] < 10 * CDF_NEAR_ONE_ERROR), (
        "the reference floored a probability it should not"
    )
