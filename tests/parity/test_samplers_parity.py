"""Samplers against the upstream samplers, fed the same starting noise and the same per-step
noise, compared at every step of short chains with the deterministic tanh model."""

import functools
from fractions import Fraction

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import continuous, gaussian, samplers, schedules
from tests.parity._fixtures import (
    CHAIN,
    MODEL,
    TABLE,
    assert_close,
    load,
    nchw,
    nhwc,
    tanh_model,
)

ARR, META = load("samplers")
# Chains are compared at every step at CHAIN (see _fixtures): each step's float32 result feeds
# the next through the network and coefficients up to 1/sqrt(abar).


def cases(kind):
    return sorted(k for k, v in META.items() if v["kind"] == kind)


def params(case):
    names = ("W", "V", "b", "s") if f"{case}/V" in ARR else ("W", "b", "s")
    return {k: jnp.asarray(ARR[f"{case}/{k}"]) for k in names}


def model(case):
    p = params(case)
    if "V" not in p:
        return tanh_model(p)

    def self_cond_model(x, time, x_self_cond):
        """tanh(W x + V x_self_cond + b + s t), the reference's self-conditioning tanh model."""
        h = jnp.einsum("bhwc,oc->bhwo", x, p["W"]) + jnp.einsum(
            "bhwc,oc->bhwo", x_self_cond, p["V"]
        )
        h = h + p["b"][None, None, None, :]
        return jnp.tanh(h + p["s"][None, None, None, :] * time[:, None, None, None])

    return self_cond_model


@functools.cache
def coeffs(schedule, steps, convention, respacing=None, rescale=False):
    betas = schedules.get_named_beta_schedule(schedule, steps)
    return gaussian.make_coeffs(
        betas, convention=convention, respacing=respacing, rescale_timesteps=rescale
    )


def chain_close(actual, expected, name):
    assert_close(nchw_steps(actual), expected, CHAIN, err_msg=name)


def nchw_steps(x):
    return np.moveaxis(np.asarray(x), -1, 2)


def nhwc_steps(x):
    return jnp.asarray(np.moveaxis(np.asarray(x), 2, -1))


@pytest.mark.parametrize("case", cases("lucid_ddpm"))
def test_lucid_ddpm(case):
    m = META[case]
    c = coeffs(m["schedule"], m["T"], "lucidrains")
    out = samplers.ddpm_sample(
        model(case),
        c,
        nhwc(ARR[f"{case}/x_T"]),
        noise=nhwc_steps(ARR[f"{case}/step_noise"]),
        mean_type=m["objective"],
        clip_denoised=True,
        self_condition=m["self_condition"],
        return_trajectory=True,
    )
    chain_close(out.trajectory, ARR[f"{case}/imgs"][1:], "imgs")
    chain_close(out.pred_x0, ARR[f"{case}/x_start"], "x_start")


@pytest.mark.parametrize("case", cases("lucid_ddim"))
def test_lucid_ddim(case):
    m = META[case]
    c = coeffs(m["schedule"], m["T"], "lucidrains")
    grid = samplers.ddim_grid(m["T"], m["sampling_timesteps"], max_steps=m["sampling_timesteps"])
    pairs = np.stack([grid.t, grid.t_next], -1)[: m["sampling_timesteps"]]
    np.testing.assert_array_equal(pairs, ARR[f"{case}/time_pairs"])
    out = samplers.ddim_sample(
        model(case),
        c,
        nhwc(ARR[f"{case}/x_T"]),
        grid=grid,
        eta=m["ddim_sampling_eta"],
        noise=nhwc_steps(ARR[f"{case}/step_noise"]),
        mean_type=m["objective"],
        self_condition=m["self_condition"],
        return_trajectory=True,
    )
    chain_close(out.trajectory, ARR[f"{case}/imgs"][1:], "imgs")


@pytest.mark.parametrize("case", cases("lucid_ddim_time_pairs"))
def test_lucid_ddim_time_pairs_for_every_step_count(case):
    """Including the step counts (84 of 999 at T = 1000) where the reference's float32 linspace
    truncates differently from exact arithmetic."""
    num_timesteps = META[case]["T"]
    values, offsets, ns = (ARR[f"{case}/{k}"] for k in ("values", "offsets", "ns"))
    grid_of = jax_jit_grid(num_timesteps)
    for i, s in enumerate(ns):
        t, t_next = grid_of(int(s))
        got = np.stack([t, t_next], -1)[:s]
        np.testing.assert_array_equal(got, values[offsets[i] : offsets[i + 1]], err_msg=f"S={s}")
    # The float32 grid is not exact arithmetic: for these S, trunc(-1 + i T / S) differs.
    for s in ARR[f"{case}/exact_differs"][:5]:
        exact = [int(Fraction(-1) + Fraction(i * num_timesteps, int(s))) for i in range(s + 1)]
        t, _ = grid_of(int(s))
        assert list(t[:s][::-1]) != exact[1:], s


@functools.cache
def jax_jit_grid(num_timesteps):
    import jax

    @jax.jit
    def grid(s):
        g = samplers.ddim_grid(num_timesteps, s)
        return g.t, g.t_next

    return lambda s: tuple(np.asarray(a) for a in grid(jnp.int32(s)))


@pytest.mark.parametrize("case", cases("openai_ddpm"))
def test_openai_ddpm(case):
    m = META[case]
    c = coeffs(m["schedule"], m["T"], "openai", m["respacing"], m["rescale_timesteps"])
    out = samplers.ddpm_sample(
        model(case),
        c,
        nhwc(ARR[f"{case}/x_T"]),
        noise=nhwc_steps(ARR[f"{case}/step_noise"]),
        mean_type=m["mean_type"],
        var_type=m["var_type"],
        clip_denoised=m["clip_denoised"],
        return_trajectory=True,
    )
    chain_close(out.trajectory, ARR[f"{case}/sample"], "sample")
    chain_close(out.pred_x0, ARR[f"{case}/pred_xstart"], "pred_xstart")


@pytest.mark.parametrize("case", cases("openai_ddim"))
def test_openai_respaced_ddim(case):
    m = META[case]
    c = coeffs(m["schedule"], m["T"], "openai", m["respacing"], m["rescale_timesteps"])
    np.testing.assert_array_equal(
        np.asarray(c.model_times) * m["T"] / 1000, ARR[f"{case}/timestep_map"]
    )
    out = samplers.ddim_sample(
        model(case),
        c,
        nhwc(ARR[f"{case}/x_T"]),
        eta=m["eta"],
        noise=nhwc_steps(ARR[f"{case}/step_noise"]),
        mean_type=m["mean_type"],
        var_type=m["var_type"],
        clip_denoised=m["clip_denoised"],
        return_trajectory=True,
    )
    chain_close(out.trajectory, ARR[f"{case}/sample"], "sample")
    chain_close(out.pred_x0, ARR[f"{case}/pred_xstart"], "pred_xstart")


@pytest.mark.parametrize("case", cases("openai_ddim_reverse"))
def test_openai_ddim_reverse_steps(case):
    m = META[case]
    c = coeffs(m["schedule"], m["T"], "openai", m["respacing"], m["rescale_timesteps"])
    x = nhwc(ARR[f"{case}/x"])
    for k, t in enumerate(ARR[f"{case}/t"]):
        # A forward grid (t + 1 -> t -> t - 1) whose inversion is the single step t -> t + 1.
        grid = samplers.TimeGrid(jnp.array([t + 1, t]), jnp.array([t, t - 1]), jnp.int32(2))
        out = samplers.ddim_reverse_sample(
            model(case),
            c,
            x,
            grid=grid,
            mean_type=m["mean_type"],
            var_type=m["var_type"],
            clip_denoised=m["clip_denoised"],
            return_trajectory=True,
        )
        assert_close(nchw(out.sample), ARR[f"{case}/sample"][k], MODEL, err_msg=f"t={t}")
        assert_close(nchw(out.pred_x0[0]), ARR[f"{case}/pred_xstart"][k], MODEL, err_msg="x0")


def guided_cond_fn(case):
    target, scale = nhwc(ARR[f"{case}/target"]), float(np.ravel(ARR[f"{case}/scale"])[0])

    def cond_fn(x, time):
        return -scale * (x - target) * (1 + 0.001 * time)[:, None, None, None]

    return cond_fn


@pytest.mark.parametrize("case", cases("guided_cond_mean") + cases("guided_cond_score"))
def test_guided_diffusion_classifier_guidance(case):
    m = META[case]
    c = coeffs(m["schedule"], m["T"], "openai", m["respacing"], m["rescale_timesteps"])
    assert_close(
        np.asarray(c.model_times)[ARR[f"{case}/steps"]], ARR[f"{case}/cond_t"][:, 0], TABLE
    )
    kwargs = dict(
        noise=nhwc_steps(ARR[f"{case}/step_noise"]),
        mean_type=m["mean_type"],
        var_type=m["var_type"],
        clip_denoised=m["clip_denoised"],
        cond_fn=guided_cond_fn(case),
        return_trajectory=True,
    )
    x_T = nhwc(ARR[f"{case}/x_T"])
    if m["guidance"] == "condition_mean":
        out = samplers.ddpm_sample(model(case), c, x_T, **kwargs)
    else:
        out = samplers.ddim_sample(model(case), c, x_T, eta=m["eta"], **kwargs)
    chain_close(out.trajectory, ARR[f"{case}/sample"], "sample")
    chain_close(out.pred_x0, ARR[f"{case}/pred_xstart"], "pred_xstart")


@pytest.mark.parametrize("case", cases("lucid_continuous"))
def test_lucid_continuous_time(case):
    for prefix in [case] + ([f"{case}/noclip"] if f"{case}/noclip/x_T" in ARR else []):
        m = META[case]
        objective = "v" if m["cls"].startswith("VParam") else "eps"
        clip = not prefix.endswith("noclip")
        out = continuous.continuous_sample(
            tanh_model({k: jnp.asarray(ARR[f"{prefix}/{k}"]) for k in ("W", "b", "s")}),
            nhwc(ARR[f"{prefix}/x_T"]),
            log_snr_fn=schedules.log_snr_schedule(m["noise_schedule"]),
            num_steps=m["num_sample_steps"],
            objective=objective,
            clip_denoised=clip,
            noise=nhwc_steps(ARR[f"{prefix}/step_noise"]),
            return_trajectory=True,
        )
        chain_close(out.trajectory, ARR[f"{prefix}/imgs"][1:], f"{prefix} imgs")
        assert_close(nchw((out.sample + 1) / 2), ARR[f"{prefix}/out"], CHAIN, err_msg="out")


@pytest.mark.parametrize("case", cases("lucid_interpolate"))
def test_lucid_interpolate(case):
    m = META[case]
    c = coeffs(m["schedule"], m["T"], "lucidrains")
    got = samplers.interpolate(
        model(case),
        c,
        nhwc(ARR[f"{case}/x1"]),
        nhwc(ARR[f"{case}/x2"]),
        t=m["t"],
        lam=m["lam"],
        q_noise=nhwc_steps(ARR[f"{case}/q_noise"]),
        noise=nhwc_steps(ARR[f"{case}/step_noise"]),
        mean_type=m["objective"],
    )
    assert_close(nchw(got), ARR[f"{case}/out"], CHAIN, err_msg="interpolate")
