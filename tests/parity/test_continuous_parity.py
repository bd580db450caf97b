"""Continuous-time diffusion against denoising-diffusion-pytorch's ContinuousTimeGaussianDiffusion
(linear and cosine log-SNR, min-SNR off and on) and VParamContinuousTimeGaussianDiffusion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import continuous, schedules
from tests.parity._fixtures import (
    CONTINUOUS,
    GRAD,
    LOG_SNR,
    MEAN_FLAT,
    assert_close,
    assert_grad_close,
    load,
    nchw,
    nhwc,
    params_of,
    tanh_model,
)

ARR, META = load("continuous_lucid")


def setup(case):
    meta = META[case]
    objective = "v" if meta["cls"].startswith("VParam") else "eps"
    fn = schedules.log_snr_schedule(meta["noise_schedule"])
    return meta, objective, fn


@pytest.mark.parametrize("case", sorted(META))
def test_case(case):
    meta, objective, fn = setup(case)
    x0 = nhwc(ARR[f"{case}/inputs/x0"])
    noise = nhwc(ARR[f"{case}/inputs/noise"])
    times = jnp.asarray(ARR[f"{case}/inputs/times"])
    params = params_of(ARR, case)
    log_snr = fn(times)
    # log-SNR near t = 0 is log(expm1(~1e-4)) (see LOG_SNR in _fixtures).
    assert_close(log_snr, ARR[f"{case}/q_sample/log_snr"], LOG_SNR, err_msg="log_snr")
    x_t = continuous.continuous_q_sample(x0, log_snr, noise)
    assert_close(nchw(x_t), ARR[f"{case}/q_sample/x"], CONTINUOUS, err_msg="q_sample")

    def total(p):
        per_example = continuous.continuous_loss(
            tanh_model(p),
            x0,
            times,
            noise,
            log_snr_fn=fn,
            objective=objective,
            min_snr_gamma=meta["min_snr_gamma"],
        )
        return jnp.sum(per_example), per_example

    (_, per_example), grads = jax.value_and_grad(total, has_aux=True)(params)
    assert_close(per_example, ARR[f"{case}/p_losses/loss"], MEAN_FLAT, err_msg="loss")
    for name in ("W", "b", "s"):
        assert_grad_close(grads[name], ARR[f"{case}/p_losses/grad_{name}"], f"grad_{name}", GRAD)

    x = nhwc(ARR[f"{case}/q_sample/x"])
    model_fn = tanh_model(params)
    for i, (time, time_next) in enumerate(ARR[f"{case}/p_mean_variance/time_pairs"]):
        lam, lam_next = fn(jnp.float32(time)), fn(jnp.float32(time_next))
        out = model_fn(x, jnp.full((x.shape[0],), lam))
        for tag, clip in [("clip", True), ("noclip", False)]:
            mean, var = continuous.continuous_p_mean_variance(
                out, x, lam, lam_next, objective=objective, clip_denoised=clip
            )
            prefix = f"{case}/p_mean_variance/{tag}/{i}"
            assert_close(nchw(mean), ARR[f"{prefix}/mean"], CONTINUOUS, err_msg=prefix)
            var_ref = np.ravel(ARR[f"{prefix}/variance"])[0]
            assert_close(jnp.ravel(var)[0], var_ref, CONTINUOUS, err_msg=prefix)
