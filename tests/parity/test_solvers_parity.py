"""Fast samplers against diffusers 0.42.1's schedulers and k-diffusion 0.1.1's samplers, step by
step (fixtures ``solvers_diffusers.npz`` / ``solvers_kdiffusion.npz``, written by
``generate_solver_fixtures.py``; see PROVENANCE.md).

Every case runs the reference's own grid (its timesteps and sigmas) through jaxdiff's sampler
with the reference's random draws, and compares the state after every step and the final
sample; the grids themselves are compared with jaxdiff's grid builders separately. The network
is the fixtures' elementwise tanh net. Differences from the references (where jaxdiff is
right and the reference is not) are tested at the end of the file.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import gaussian, samplers, schedules
from jaxdiff.samplers import dpm_solver, karras, unipc
from tests.parity._fixtures import (
    SOLVER,
    SOLVER_EULER,
    SOLVER_K,
    SOLVER_UNIPC,
    TABLE,
    assert_close,
    load,
)

D_ARR, D_META = load("solvers_diffusers")
K_ARR, K_META = load("solvers_kdiffusion")
D_CASES = {c["name"]: c for c in D_META["cases"]}
K_CASES = {c["name"]: c for c in K_META["cases"]}


def nhwc(x):
    return jnp.asarray(np.moveaxis(np.asarray(x), -3, -1))


def nchw(x):
    return np.moveaxis(np.asarray(x), -1, -3)


@functools.cache
def _net(which: str):
    return tanh_net(D_ARR if which == "d" else K_ARR)


def tanh_net(arrays):
    a, bt, d = (jnp.asarray(arrays[f"net/{k}"])[None, None, None] for k in ("A", "Bt", "D"))

    def model_fn(x, time):
        t = time.astype(jnp.float32)[:, None, None, None]
        return jnp.tanh(((a * x) + ((bt * t) / 1000)) + d)

    return model_fn


@functools.cache
def table(alphas_cumprod_key: str, which: str = "d"):
    arrays = D_ARR if which == "d" else K_ARR
    ac = np.asarray(arrays[alphas_cumprod_key], np.float64)
    betas = 1 - ac / np.append(1.0, ac[:-1])
    return gaussian.make_coeffs(betas)


def d_cases(*schedulers, skip=()):
    return [
        n for n, c in D_CASES.items()
        if c["scheduler"] in schedulers and not c.get("grid_only")
        and not any(s in n for s in skip)
    ]  # fmt: skip


PRED = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def d_denoiser(case, **kw):
    m = D_CASES[case]
    cfg = m["config"]
    c = table(f"{m['tables']}/alphas_cumprod")
    thresh = (cfg["dynamic_thresholding_ratio"], cfg["sample_max_value"]) if cfg.get(
        "thresholding") else None  # fmt: skip
    return samplers.make_denoiser(
        tanh_net(D_ARR), c, prediction=PRED[cfg.get("prediction_type", "epsilon")],
        thresholding=thresh or False, **kw,
    )  # fmt: skip


def d_grid(case):
    m = D_CASES[case]
    c = table(f"{m['tables']}/alphas_cumprod")
    return samplers.sigma_grid(c, D_ARR[f"{case}/sigmas"], t=D_ARR[f"{case}/timesteps"])


def d_noise(case, shape):
    z = D_ARR.get(f"{case}/step_noise")
    return nhwc(z) if z is not None else jnp.zeros(shape)


_COMPILED = {}


def run(sampler, denoiser, x_T, grid, noise, key=None):
    """The sampler over the grid with the given draws, every state returned. Cases with the
    same ``key`` (sampler, denoiser and step count) share one compiled program: the grid's
    arrays are arguments, its step count is static."""
    n = int(grid.num_steps)

    def go(t, alpha, sigma, x, z):
        g = samplers.Grid(t, alpha, sigma, n)
        return samplers.sample(sampler, denoiser, x, g, noise=z, return_trajectory=True)

    if key is None:
        fn = jax.jit(go)
    else:
        fn = _COMPILED.setdefault((key, n), jax.jit(go))
    return fn(grid.t, grid.alpha, grid.sigma, x_T, noise)


def compare_steps(traj, expected, what, tol=SOLVER):
    assert_close(nchw(traj), expected, tol, err_msg=what)


# --------------------------------------------------------------------------------------------
# DPM-Solver(++) multistep and singlestep, UniPC (diffusers)
# --------------------------------------------------------------------------------------------


def dpm_sampler(case):
    m = D_CASES[case]
    cfg = m["config"]
    multistep = m["scheduler"] == "DPMSolverMultistepScheduler"
    common = dict(
        order=cfg["solver_order"], algorithm=cfg["algorithm_type"],
        solver_type=cfg["solver_type"], lower_order_final=cfg["lower_order_final"],
    )  # fmt: skip
    if multistep:
        return dpm_solver.dpm_solver_multistep(**common, euler_at_final=cfg["euler_at_final"])
    return dpm_solver.dpm_solver_singlestep(**common)


@pytest.mark.parametrize(
    "case",
    d_cases(
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        skip=("karras-fsigmamin", "sde-dpmpp-3m"),
    ),
)
def test_dpm_solver_matches_diffusers_at_every_step(case):
    x_T = nhwc(D_ARR["x_T_noise"])
    m = D_CASES[case]
    keys = ("solver_order", "algorithm_type", "solver_type", "lower_order_final",
            "euler_at_final", "prediction_type", "thresholding", "dynamic_thresholding_ratio",
            "sample_max_value")  # fmt: skip
    key = (m["scheduler"], m["tables"], *(str(m["config"].get(k)) for k in keys))
    noise = d_noise(case, (len(D_ARR[f"{case}/timesteps"]), *x_T.shape))
    out = run(dpm_sampler(case), d_denoiser(case), x_T, d_grid(case), noise, key)
    compare_steps(out.trajectory, D_ARR[f"{case}/sample"], case)


@pytest.mark.parametrize("case", d_cases("UniPCMultistepScheduler", skip=("karras-fsigmamin",)))
def test_unipc_matches_diffusers_at_every_step(case):
    cfg = D_CASES[case]["config"]
    sampler = unipc.unipc(
        cfg["solver_order"], cfg["solver_type"], predict_x0=cfg["predict_x0"],
        lower_order_final=cfg["lower_order_final"],
        disable_corrector=tuple(cfg["disable_corrector"]),
    )  # fmt: skip
    x_T = nhwc(D_ARR["x_T_noise"])
    out = run(sampler, d_denoiser(case), x_T, d_grid(case), jnp.zeros((64, *x_T.shape)))
    compare_steps(out.trajectory, D_ARR[f"{case}/sample"], case, SOLVER_UNIPC)


# --------------------------------------------------------------------------------------------
# DDIM, DDPM, Euler, Euler ancestral, Heun (diffusers)
# --------------------------------------------------------------------------------------------


def _ddim_consistent(case):
    """diffusers' DDIM steps from t to t - T // n whatever the spacing: only the leading spacing
    lands where the next step starts (see test_diffusers_ddim_linspace_steps_to_the_wrong_time)."""
    return "leading" in case


@pytest.mark.parametrize("case", [c for c in d_cases("DDIMScheduler") if _ddim_consistent(c)])
def test_ddim_matches_diffusers_at_every_step(case):
    m = D_CASES[case]
    cfg = m["config"]
    c = table(f"{m['tables']}/alphas_cumprod")
    timesteps, expected = D_ARR[f"{case}/timesteps"], D_ARR[f"{case}/sample"]
    final = "zero" if cfg["set_alpha_to_one"] else "sigma_min"
    if not cfg["set_alpha_to_one"] and timesteps[-1] == 0:
        # the reference's last step goes from t = 0 to abar_0 again: the identity (up to
        # rounding), which a grid cannot hold (its levels strictly decrease)
        assert_close(expected[-1], expected[-2], SOLVER, err_msg=f"{case}: identity step")
        final, expected = "none", expected[:-1]
    grid = samplers.timestep_grid(c, timesteps, final=final)
    denoiser = d_denoiser(case, clip_denoised=cfg["clip_sample"], rederive_eps=False)
    x_T = nhwc(D_ARR["x_T_noise"])
    sampler = samplers.ddim(m["step_kwargs"].get("eta", 0.0))
    out = run(sampler, denoiser, x_T, grid, d_noise(case, None))
    compare_steps(out.trajectory, expected, case, SOLVER_EULER)


@pytest.mark.parametrize("case", ["ddpm-eps-n10", "ddpm-v-trailing-n10"])
def test_ddpm_on_a_grid_is_ddim_with_eta_one_as_diffusers(case):
    m = D_CASES[case]
    c = table(f"{m['tables']}/alphas_cumprod")
    grid = samplers.timestep_grid(c, D_ARR[f"{case}/timesteps"])
    x_T = nhwc(D_ARR["x_T_noise"])
    out = run(samplers.ddim(1.0), d_denoiser(case), x_T, grid, d_noise(case, None))
    compare_steps(out.trajectory, D_ARR[f"{case}/sample"], case, SOLVER_EULER)


def test_ddpm_over_the_whole_table_matches_diffusers():
    case = "ddpm-eps-n1000"
    c = table(f"{D_CASES[case]['tables']}/alphas_cumprod")
    x_T = nhwc(D_ARR["x_T_noise"])
    out = samplers.ddpm_sample(tanh_net(D_ARR), c, x_T, noise=d_noise(case, None),
                               clip_denoised=False, return_trajectory=True)  # fmt: skip
    steps = D_ARR[f"{case}/sample_steps"]
    compare_steps(out.trajectory[steps], D_ARR[f"{case}/sample"], case, SOLVER_EULER)


def _ve_steps(traj, grid, n):
    """jaxdiff's variance-preserving states -> diffusers' / k-diffusion's x / alpha."""
    alpha = np.asarray(grid.alpha)[1 : n + 1]
    return np.asarray(traj) / alpha.reshape(-1, 1, 1, 1, 1)


def _euler_family_run(case, sampler):
    m = D_CASES[case]
    grid = d_grid(case) if m["scheduler"] != "HeunDiscreteScheduler" else _heun_grid(case)
    x_ve = nhwc(D_ARR["x_T_noise"]) * float(D_ARR[f"{case}/init_noise_sigma"].reshape(()))
    x_T = x_ve * grid.alpha[0]
    out = run(sampler, d_denoiser(case, clip_denoised=m["config"].get("clip_sample", False)),
              x_T, grid, d_noise(case, None))  # fmt: skip
    return _ve_steps(out.trajectory, grid, grid.num_steps)


@pytest.mark.parametrize(
    "case", d_cases("EulerDiscreteScheduler", skip=("churn", "loglinear", "fsigmamin"))
)
def test_euler_matches_diffusers_at_every_step(case):
    got = _euler_family_run(case, karras.euler())
    compare_steps(got, D_ARR[f"{case}/sample"], case, SOLVER_EULER)


@pytest.mark.parametrize("case", d_cases("EulerAncestralDiscreteScheduler"))
def test_euler_ancestral_matches_diffusers_at_every_step(case):
    got = _euler_family_run(case, karras.euler_ancestral())
    compare_steps(got, D_ARR[f"{case}/sample"], case, SOLVER_EULER)


def _heun_grid(case):
    """diffusers' Heun lists every inner level twice; the grid is the distinct levels."""
    m = D_CASES[case]
    c = table(f"{m['tables']}/alphas_cumprod")
    first = D_ARR[f"{case}/heun_first_order"]
    sigmas = np.append(D_ARR[f"{case}/sigmas"][:-1][first], 0.0)
    return samplers.sigma_grid(c, sigmas, t=D_ARR[f"{case}/timesteps"][first])


@pytest.mark.parametrize("case", d_cases("HeunDiscreteScheduler"))
def test_heun_matches_diffusers_at_every_step(case):
    got = _euler_family_run(case, karras.heun())
    first = D_ARR[f"{case}/heun_first_order"]
    # a step is complete after its second call, or after the last (first-order) call
    done = [k for k in range(first.size) if not first[k] or k == first.size - 1]
    compare_steps(got, D_ARR[f"{case}/sample"][done], case, SOLVER_EULER)


# --------------------------------------------------------------------------------------------
# k-diffusion
# --------------------------------------------------------------------------------------------

K_SAMPLERS = {
    "sample_euler": lambda kw: karras.euler(**kw),
    "sample_euler_ancestral": lambda kw: karras.euler_ancestral(**kw),
    "sample_heun": lambda kw: karras.heun(**kw),
    "sample_dpm_2": lambda kw: karras.dpm_2(**kw),
    "sample_dpm_2_ancestral": lambda kw: karras.dpm_2_ancestral(**kw),
    "sample_dpmpp_2s_ancestral": lambda kw: karras.dpmpp_2s_ancestral(**kw),
    "sample_lms": lambda kw: karras.lms(**kw),
    "sample_dpmpp_2m": lambda kw: dpm_solver.dpm_solver_multistep(2, lower_order_final=False),
    "sample_dpmpp_2m_sde": lambda kw: dpm_solver.dpm_solver_multistep(
        2, solver_type=kw.get("solver_type", "midpoint"), eta=kw.get("eta", 1.0),
        lower_order_final=False),
    "sample_dpmpp_3m_sde": lambda kw: dpm_solver.dpm_solver_multistep(
        3, solver_type="heun", eta=kw.get("eta", 1.0), lower_order_final=False),
}  # fmt: skip


def k_cases():
    return [n for n, c in K_CASES.items() if not c.get("grid_only")]


@pytest.mark.parametrize("case", k_cases())
def test_k_diffusion_sampler_matches_at_every_step(case):
    m = K_CASES[case]
    c = table("alphas_cumprod", "k")
    process = samplers.Discrete(c, quantize=m["quantize"])
    prediction = "v" if "VDDPM" in m["denoiser"] else "eps"
    denoiser = samplers.make_denoiser(tanh_net(K_ARR), process, prediction=prediction)
    grid = samplers.sigma_grid(process, K_ARR[f"{case}/sigmas"])
    n = grid.num_steps
    sampler = K_SAMPLERS[m["sampler"]](m["sampler_kwargs"])
    noise = np.zeros((n, *K_ARR["x_T_noise"].shape), np.float32)
    draws = K_ARR.get(f"{case}/noise")
    draws = None if draws is None or draws.size == 0 else draws
    if draws is not None and m["noise_source"] == "noise_sampler":
        noise[: draws.shape[0]] = draws  # one draw per step that ends above sigma 0
    elif draws is not None:
        noise[:] = draws[:n]  # torch.randn_like: one draw per step, churned or not
    x_ve = nhwc(K_ARR["x_T_noise"]) * grid.sigma_ve[0]
    key = (m["sampler"], json.dumps(m["sampler_kwargs"], sort_keys=True), m["quantize"],
           m["denoiser"])  # fmt: skip
    out = run(sampler, denoiser, x_ve * grid.alpha[0], grid, nhwc(noise), key)
    got = _ve_steps(out.trajectory, grid, n)
    assert_close(nchw(out.pred_x0), K_ARR[f"{case}/cb_denoised"], SOLVER_K, err_msg=f"{case} D")
    assert_close(nchw(got[-1]), K_ARR[f"{case}/sample"], SOLVER_K, err_msg=f"{case} sample")
    churned = np.any(K_ARR[f"{case}/cb_sigma_hat"] != K_ARR[f"{case}/cb_sigma"])
    if not churned:
        compare_steps(got[:-1], K_ARR[f"{case}/cb_x"][1:], case, SOLVER_K)


# --------------------------------------------------------------------------------------------
# Grids: jaxdiff's builders against the schedulers' own timesteps and sigmas
# --------------------------------------------------------------------------------------------

GRID_FAMILY = {"dpmms": "skip", "dpmss": "skip", "unipc": "skip", "ddim": "plain",
               "ddpm": "plain", "euler": "euler", "euler-a": "euler", "heun": "euler"}  # fmt: skip


def _grid_case_args(case):
    m = D_CASES[case]
    cfg = m["config"]
    family = case[len("grid-") :].split("-linspace")[0].split("-leading")[0].split("-trailing")[0]
    spacing = cfg.get("timestep_spacing", "linspace")
    return m, cfg, family, spacing


@pytest.mark.parametrize(
    "case",
    [
        n
        for n, c in D_CASES.items()
        if c.get("grid_only") and "loglinear" not in n and n != "grid-dpmms-linspace-n13-karras-cos"
    ],
)
def test_make_grid_gives_the_schedulers_timesteps_and_sigmas(case):
    m, cfg, family, spacing = _grid_case_args(case)
    c = table(f"{m['tables']}/alphas_cumprod")
    n = m["num_inference_steps"]
    timesteps, sigmas = D_ARR[f"{case}/timesteps"], D_ARR.get(f"{case}/sigmas")
    kind = GRID_FAMILY[family]
    offset = cfg.get("steps_offset", 0)
    if family == "heun":  # every inner level twice
        first = np.r_[True, np.arange(1, timesteps.size) % 2 == 1]
        timesteps, sigmas = timesteps[first], np.append(sigmas[:-1][first], 0.0)
    if cfg.get("use_lu_lambdas"):
        grid = samplers.make_grid(c, n, "exponential")
    elif cfg.get("use_karras_sigmas") and kind == "skip":
        grid = samplers.make_grid(c, n, "karras")
    elif cfg.get("use_karras_sigmas"):
        # diffusers' Euler and Heun take the Karras range from the spacing's own levels
        spaced = samplers.make_grid(c, n, spacing, steps_offset=offset, skip_last=False,
                                    round_t=spacing != "linspace")  # fmt: skip
        levels = np.asarray(spaced.sigma_ve)[:n]
        grid = samplers.make_grid(c, n, "karras", round_t=False, sigma_min=float(levels.min()),
                                  sigma_max=float(levels.max()))  # fmt: skip
    else:
        grid = samplers.make_grid(
            c, n, spacing, steps_offset=offset, skip_last=kind == "skip",
            round_t=not (kind == "euler" and spacing == "linspace"),
        )  # fmt: skip
    t = np.asarray(grid.t)[:n]
    if kind == "euler":
        np.testing.assert_allclose(t, timesteps, rtol=2e-6, atol=2e-4, err_msg=case)
    else:
        np.testing.assert_array_equal(t, timesteps, err_msg=case)
    if sigmas is not None:
        assert_close(np.asarray(grid.sigma_ve), sigmas, TABLE, err_msg=f"{case} sigmas")


@pytest.mark.parametrize("case", ["grid-karras-n3", "grid-karras-n13", "grid-karras-n25",
                                  "grid-karras-n99", "grid-exponential-n3",
                                  "grid-exponential-n13", "grid-exponential-n25",
                                  "grid-exponential-n99"])  # fmt: skip
def test_karras_and_exponential_sigmas_match_k_diffusion(case):
    n = K_CASES[case]["n"]
    lo, hi = float(K_ARR["sigma_min"].reshape(())), float(K_ARR["sigma_max"].reshape(()))
    fn = schedules.karras_sigmas if "karras" in case else schedules.exponential_sigmas
    assert_close(fn(n, lo, hi), K_ARR[f"{case}/sigmas"], TABLE, err_msg=case)


# --------------------------------------------------------------------------------------------
# Where the references are wrong, and jaxdiff differs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["sde-dpmpp-3m-eps-n7", "sde-dpmpp-3m-eps-n20"])
def test_diffusers_third_order_sde_dpmsolver_has_a_wrong_sign(case):
    """diffusers 0.42's third-order ``sde-dpmsolver++`` update weighs D2 by
    alpha ((1 - e^{-2h} - 2h) / (2h)^2 - 0.5), which tends to -alpha as h -> 0: a correction
    term that does not vanish. k-diffusion's ``sample_dpmpp_3m_sde`` (and jaxdiff) use
    alpha (1/2 - (e^{-2h} - 1 + 2h) / (2h)^2) -> alpha h / 3, the ODE solver's coefficient
    with h -> 2h. jaxdiff agrees with diffusers until the first third-order step and with
    k-diffusion everywhere (test_k_diffusion_sampler_matches_at_every_step, dpmpp-3m-sde)."""
    x_T = nhwc(D_ARR["x_T_noise"])
    out = run(dpm_sampler(case), d_denoiser(case), x_T, d_grid(case), d_noise(case, None))
    expected = D_ARR[f"{case}/sample"]
    order = D_ARR[f"{case}/step_order"]
    third = int(np.argmax(order == 3))
    compare_steps(out.trajectory[:third], expected[:third], case)
    err = np.abs(nchw(out.trajectory[third]) - expected[third]).max()
    assert err > 10 * (SOLVER.atol + SOLVER.rtol * np.abs(expected[third]).max()), err


def test_diffusers_ddim_with_linspace_spacing_steps_to_the_wrong_time():
    """diffusers' DDIM goes from t to t - T // n whatever the spacing; with the linspace and
    trailing spacings that is not where the next step starts (999 -> 899, then the network is
    called at 888), so each step lands at a noise level other than the one it is evaluated
    at. jaxdiff's grid steps between consecutive timesteps; its parity is tested on the
    leading spacing, where both agree."""
    case = "ddim-linspace-a1-eps-n10-eta0"
    timesteps = D_ARR[f"{case}/timesteps"]
    step = 1000 // 10
    assert any(t - step != t_next for t, t_next in zip(timesteps[:-1], timesteps[1:], strict=True))
    m = D_CASES[case]
    c = table(f"{m['tables']}/alphas_cumprod")
    grid = samplers.timestep_grid(c, timesteps)
    out = run(samplers.ddim(), d_denoiser(case, rederive_eps=False), nhwc(D_ARR["x_T_noise"]),
              grid, None)  # fmt: skip
    expected = D_ARR[f"{case}/sample"]
    assert np.abs(nchw(out.trajectory[0]) - expected[0]).max() > 1e-2


def test_diffusers_karras_timesteps_of_the_cosine_schedule_are_truncated():
    """diffusers' DPM-Solver does not round the Karras timesteps of ``squaredcos_cap_v2`` and
    casts them to int64: levels 0-2 all become 998 (and its sampling loop then crashes with an
    IndexError, PROVENANCE.md). jaxdiff rounds: 999, 999, 999, 998, ..."""
    case = "grid-dpmms-linspace-n13-karras-cos"
    ts = D_ARR[f"{case}/timesteps"]
    assert np.unique(ts).size < ts.size
    c = table(f"{D_CASES[case]['tables']}/alphas_cumprod")
    grid = samplers.make_grid(c, 13, "karras")
    exact = np.asarray(c.alphas_cumprod.shape[0] - 1 - 0 * ts)  # t of sigma_max is T - 1
    assert np.asarray(grid.t)[0] == exact[0]
    assert_close(np.asarray(grid.sigma_ve), D_ARR[f"{case}/sigmas"], TABLE, err_msg=case)


def test_a_repeated_noise_level_is_refused():
    """diffusers' DPM-Solver and UniPC with Karras sigmas and ``final_sigmas_type="sigma_min"``
    repeat the smallest level (their last step is the identity, one wasted network call);
    jaxdiff refuses a grid whose levels do not strictly decrease."""
    case = "dpm-2m-eps-n10-karras-fsigmamin"
    with pytest.raises(ValueError, match="must decrease along the grid"):
        d_grid(case)
