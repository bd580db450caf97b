"""improved-diffusion's GaussianDiffusion / SpacedDiffusion against jaxdiff, every combination of
schedule x T (1000, 4000, 37, respaced) x mean type x variance type x clipping x loss type, on the
tanh model, for t = 0, 1, T//2, T-1 and batch 4 and 1."""

import functools

import jax
import jax.numpy as jnp
import pytest

from jaxdiff import gaussian, likelihood, losses, schedules
from tests.parity._fixtures import (
    CONVERT,
    GRAD,
    MEAN_FLAT,
    MODEL,
    TABLE,
    assert_close,
    assert_close_to_reference,
    load,
    nchw,
    nhwc,
    params_of,
    tanh_model,
)

ARR, META = load("gaussian_openai")
PROCESSES = sorted(k for k, v in META.items() if v["kind"] == "process")
MODEL_CASES = sorted(k for k, v in META.items() if v["kind"] == "model_case")
MEAN_TYPES = {"EPSILON": "epsilon", "START_X": "start_x", "PREVIOUS_X": "previous_x"}


@functools.cache
def coeffs(process):
    meta = META[process]
    betas = schedules.get_named_beta_schedule(meta["schedule"], meta["T"])
    return gaussian.make_coeffs(
        betas, respacing=meta["respacing"], rescale_timesteps=meta["rescale_timesteps"]
    )


def inputs(process):
    x0 = nhwc(ARR[f"{process}/inputs/x0"])
    noise = nhwc(ARR[f"{process}/inputs/noise"])
    t = jnp.asarray(ARR[f"{process}/inputs/t"], jnp.int32)
    return x0, noise, t


@pytest.mark.parametrize("process", PROCESSES)
def test_process(process):
    c = coeffs(process)
    x0, noise, t = inputs(process)
    x_t = gaussian.q_sample(c, x0, t, noise)
    # q_sample and q_posterior mean are two-term sums; the tables themselves match at RTOL.
    assert_close(nchw(x_t), ARR[f"{process}/q_sample"], TABLE, err_msg="q_sample")
    for name, got in zip(
        ["mean", "variance", "log_variance"], gaussian.q_mean_variance(c, x0, t), strict=True
    ):
        assert_close(nchw(got), ARR[f"{process}/q_mean_variance/{name}"], TABLE, err_msg=name)
    x_t_ref = nhwc(ARR[f"{process}/q_sample"])
    for name, got in zip(
        ["mean", "variance", "log_variance_clipped"],
        gaussian.q_posterior_mean_variance(c, x0, x_t_ref, t),
        strict=True,
    ):
        assert_close(nchw(got), ARR[f"{process}/q_posterior/{name}"], TABLE, err_msg=name)
    # x0 from eps multiplies by sqrt(1/abar), up to ~2e4 (CONVERT).
    assert_close(
        nchw(gaussian.predict_x0_from_eps(c, x_t_ref, t, noise)),
        ARR[f"{process}/predict_xstart_from_eps"],
        CONVERT,
        err_msg="predict_xstart_from_eps",
    )
    assert_close(
        nchw(gaussian.predict_eps_from_x0(c, x_t_ref, t, x0)),
        ARR[f"{process}/predict_eps_from_xstart"],
        CONVERT,
        err_msg="predict_eps_from_xstart",
    )
    assert_close(
        likelihood.prior_bpd(c, x0), ARR[f"{process}/prior_bpd"], MEAN_FLAT, err_msg="prior"
    )
    assert_close(c.model_times[t], ARR[f"{process}/model_time"], TABLE, err_msg="model_time")


@pytest.mark.parametrize("case", MODEL_CASES)
def test_model_case(case):
    meta = META[case]
    process = meta["process"]
    c = coeffs(process)
    x0, noise, t = inputs(process)
    params = params_of(ARR, case)
    model_fn = tanh_model(params)
    mean_type, var_type = meta["mean_type"].lower(), meta["var_type"].lower()
    x_t = gaussian.q_sample(c, x0, t, noise)
    out = model_fn(x_t, c.model_times[t])
    assert_close(nchw(out), ARR[f"{case}/model_output"], MODEL, err_msg="model_output")

    # From here on the reference's own model output and x_t are fed in, so that any difference
    # comes from the diffusion math alone.
    out_ref = nhwc(ARR[f"{case}/model_output"])
    x_t_ref = nhwc(ARR[f"{process}/q_sample"])
    for clip in (True, False):
        tag = "clip" if clip else "noclip"
        pmv = gaussian.p_mean_variance(
            c, out_ref, x_t_ref, t, mean_type=mean_type, var_type=var_type, clip_denoised=clip
        )
        for name, got in zip(["mean", "variance", "log_variance"], pmv[:3], strict=True):
            key = f"{case}/p_mean_variance/{tag}/{name}"
            assert_close(nchw(got), ARR[key], MODEL, err_msg=key)
        key = f"p_mean_variance/{tag}/pred_xstart"
        assert_close_to_reference(
            nchw(pmv.pred_x0), ARR[f"{case}/{key}"], ARR[f"{case}/f64/{key}"], MODEL, err_msg=key
        )
        vb, pred = likelihood.vb_terms_bpd(
            c, out_ref, x0, x_t_ref, t, mean_type=mean_type, var_type=var_type, clip_denoised=clip
        )
        key = f"vb_terms_bpd/{tag}/output"
        assert_close_to_reference(
            vb, ARR[f"{case}/{key}"], ARR[f"{case}/f64/{key}"], MEAN_FLAT, err_msg=key
        )
        assert_close_to_reference(
            nchw(pred),
            ARR[f"{case}/vb_terms_bpd/{tag}/pred_xstart"],
            ARR[f"{case}/f64/p_mean_variance/{tag}/pred_xstart"],
            MODEL,
            err_msg="vb_terms_bpd pred_xstart",
        )

    for loss_type, keys in meta["training_loss_keys"].items():

        def total(p, loss_type=loss_type):
            terms = losses.training_losses(
                tanh_model(p),
                c,
                x0,
                t,
                noise,
                mean_type=mean_type,
                var_type=var_type,
                loss_type=loss_type.lower(),
            )
            return jnp.sum(terms["loss"]), terms

        (_, terms), grads = jax.value_and_grad(total, has_aux=True)(params)
        prefix = f"{case}/training_losses/{loss_type}"
        assert set(terms) == set(keys), (set(terms), keys)
        f64 = f"{case}/f64/training_losses/{loss_type}"
        for name in keys:
            key = f"{prefix}/{name}"
            if name in ("loss", "vb"):
                assert_close_to_reference(
                    terms[name], ARR[key], ARR[f"{f64}/{name}"], MEAN_FLAT, err_msg=key
                )
            else:
                assert_close(terms[name], ARR[key], MEAN_FLAT, err_msg=key)
        for name in ("W", "b", "s"):
            key = f"grad_{name}"
            assert_close_to_reference(
                grads[name],
                ARR[f"{prefix}/{key}"],
                ARR[f"{f64}/{key}"],
                GRAD,
                err_msg=f"{prefix}/{key}",
                grad=True,
            )
