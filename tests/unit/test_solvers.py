"""The sampler API and the fast solvers: one compilation for every step count, the scan length
of a static grid, accuracy against the exact ODE solution of Gaussian data, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import gaussian, samplers, schedules
from jaxdiff.samplers import dpm_solver, karras, unipc

C = gaussian.make_coeffs(schedules.get_named_beta_schedule("linear", 1000))
X_T = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
VAR = 0.25


def gaussian_eps(x, time):
    """The exact eps predictor of data ~ N(0, VAR I) (time = the table index)."""
    abar = C.alphas_cumprod[jnp.clip(jnp.round(time), 0, 999).astype(jnp.int32)]
    abar = abar[:, None, None, None]
    return jnp.sqrt(1 - abar) * x / (abar * VAR + 1 - abar)


def exact_x0(grid):
    """The probability-flow ODE of Gaussian data scales x: x_0 = sqrt(VAR / (a^2 VAR + s^2)) x_T."""
    a, s = float(grid.alpha[0]), float(grid.sigma[0])
    return X_T * np.sqrt(VAR / (a**2 * VAR + s**2))


SOLVERS = {
    "ddim": samplers.ddim(),
    "dpmpp_2m": dpm_solver.dpm_solver_multistep(2),
    "dpmpp_3m": dpm_solver.dpm_solver_multistep(3),
    "dpm_2m": dpm_solver.dpm_solver_multistep(2, "dpmsolver"),
    "dpmpp_2s": dpm_solver.dpm_solver_singlestep(2),
    "dpmpp_3s": dpm_solver.dpm_solver_singlestep(3),
    "unipc_bh1": unipc.unipc(2, "bh1"),
    "unipc_bh2": unipc.unipc(3, "bh2"),
    "euler": karras.euler(),
    "heun": karras.heun(),
    "dpm_2": karras.dpm_2(),
    "lms": karras.lms(),
}


def _denoiser():
    # integer timesteps keep the exact predictor exact
    return samplers.make_denoiser(gaussian_eps, C)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_one_compiled_program_serves_every_step_count(name):
    sampler, traces = SOLVERS[name], []

    @jax.jit
    def run(grid):
        traces.append(1)
        return samplers.sample(sampler, _denoiser(), X_T, grid).sample

    outs = [run(samplers.make_grid(C, n, "trailing", max_steps=20)) for n in (5, 7, 20)]
    assert len(traces) == 1
    assert all(np.all(np.isfinite(o)) for o in outs)
    # the padded run equals the unpadded one
    want = samplers.sample(sampler, _denoiser(), X_T, samplers.make_grid(C, 7, "trailing"))
    np.testing.assert_allclose(outs[1], want.sample, rtol=1e-5, atol=1e-5)


def _scan_lengths(fn, *args):
    lengths = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                lengths.append(eqn.params["length"])
            for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else ():
                visit(sub)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return lengths


def test_a_static_ddim_50_is_a_50_iteration_scan():
    def run(x):
        grid = samplers.ddim_grid(1000, 50)
        return samplers.ddim_sample(gaussian_eps, C, x, grid=grid).sample

    assert _scan_lengths(run, X_T) == [50]
    grid = samplers.make_grid(C, 10, "karras")
    assert _scan_lengths(lambda x: samplers.sample(karras.heun(), _denoiser(), x, grid).sample,
                         X_T) == [10]  # fmt: skip


def test_higher_order_solvers_are_closer_to_the_exact_ode_solution():
    """20 steps on Gaussian data with its exact denoiser (max error of x0, measured: DDIM
    0.18, DPM-Solver++ 2M 0.061, 3M 0.056, UniPC bh1 0.029, bh2 0.054; Euler 0.19, Heun
    0.066, DPM-2 0.037, LMS 0.051)."""
    errors = {}
    for name in SOLVERS:
        kind = "karras" if name in ("euler", "heun", "dpm_2", "lms") else "linspace"
        grid = samplers.make_grid(C, 20, kind)
        out = samplers.sample(SOLVERS[name], _denoiser(), X_T, grid).sample
        errors[name] = float(jnp.max(jnp.abs(out - exact_x0(grid))))
    for name in ("dpmpp_2m", "dpmpp_3m", "unipc_bh1", "unipc_bh2"):
        assert errors[name] < errors["ddim"] / 2.5, errors
    for name in ("heun", "dpm_2", "lms"):
        assert errors[name] < errors["euler"] / 2.5, errors


def test_callback_sees_every_step():
    seen = []
    grid = samplers.make_grid(C, 6, "linspace")
    samplers.sample(SOLVERS["dpmpp_2m"], _denoiser(), X_T, grid,
                    callback=lambda info: seen.append(int(info["i"])))  # fmt: skip
    jax.effects_barrier()
    assert sorted(seen) == list(range(6))


def test_guidance_and_learned_variance_work_with_every_solver():
    def two_headed(x, time, label):
        eps = gaussian_eps(x, time) + 0.01 * label[:, None, None, None].astype(x.dtype)
        return jnp.concatenate([eps, jnp.zeros_like(eps)], axis=-1)

    labels = jnp.array([1, 2], jnp.int32)
    null = {"label": jnp.full_like(labels, -1)}
    fn = samplers.guided_model_fn(two_headed, 3.0, {"label": labels}, null, channels=3,
                                  batched=True)  # fmt: skip
    denoiser = samplers.make_denoiser(fn, C, learned_variance=True)
    for name, sampler in SOLVERS.items():
        grid = samplers.make_grid(C, 6, "karras")
        out = samplers.sample(sampler, denoiser, X_T, grid).sample
        assert np.all(np.isfinite(out)), name


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: samplers.sample(dpm_solver.dpm_solver_multistep(3), _denoiser(), X_T,
                                 samplers.make_grid(C, 2, "linspace")),
         "needs at least 3 steps"),
        (lambda: samplers.sigma_grid(C, np.array([10.0, 20.0, 0.0])), "must decrease"),
        (lambda: samplers.sample(dpm_solver.dpm_solver_multistep(2, "sde-dpmsolver++"),
                                 _denoiser(), X_T, samplers.make_grid(C, 5, "linspace")),
         "needs exactly one of key= or noise="),
        (lambda: samplers.sample(karras.euler_ancestral(), _denoiser(), X_T,
                                 samplers.make_grid(C, 5, "karras")),
         "needs exactly one of key= or noise="),
        (lambda: samplers.sample(
            dpm_solver.dpm_solver_multistep(2, "sde-dpmsolver"), _denoiser(), X_T,
            samplers.make_grid(C, 5, "linspace"), key=jax.random.PRNGKey(0)),
         "cannot end at sigma 0"),
        (lambda: samplers.sample(karras.euler(), samplers.make_denoiser(
            gaussian_eps, C, prediction="prev_x"), X_T, samplers.make_grid(C, 5, "karras")),
         "sample it with ddpm or ddim"),
        (lambda: samplers.sample(dpm_solver.dpm_solver_multistep(2), samplers.make_denoiser(
            gaussian_eps, C, prediction="prev_x"), X_T, samplers.make_grid(C, 5, "linspace")),
         r"dpm_solver.*previous-x network"),
        (lambda: samplers.sample(samplers.ddim(), samplers.make_denoiser(
            gaussian_eps, schedules.log_snr_schedule("cosine"), prediction="prev_x"), X_T,
            samplers.make_grid(schedules.log_snr_schedule("cosine"), 5, "linspace")),
         "no prediction on a continuous-time process"),
        (lambda: samplers.make_denoiser(gaussian_eps, C, prediction="score"),
         "unknown prediction type 'score'"),
        (lambda: samplers.sample(samplers.ddim(), samplers.make_denoiser(
            lambda x, t: jnp.concatenate([x, x], -1), C), X_T,
            samplers.make_grid(C, 5, "linspace")), "learned_variance=True"),
        (lambda: dpm_solver.dpm_solver_multistep(4), "order must be 1, 2 or 3"),
        (lambda: dpm_solver.dpm_solver_multistep(3, "sde-dpmsolver"), "orders 1 and 2 only"),
        (lambda: unipc.unipc(2, "bh3"), "unknown UniPC variant"),
        (lambda: samplers.make_grid(C, 10, "uniform"), "unknown grid 'uniform'"),
        (lambda: schedules.spaced_timesteps(1000, 10, "middle"), "unknown timestep spacing"),
        (lambda: samplers.make_grid(C, 10, "karras", final="sigma_min"), "ends at sigma 0"),
    ],
)  # fmt: skip
def test_bad_solver_input_is_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_fast_solvers_on_a_continuous_time_process():
    """The same solvers on a continuous log-SNR schedule (the network gets the log-SNR): with
    the exact denoiser of Gaussian data they approach the exact ODE solution."""
    log_snr = schedules.log_snr_schedule("cosine")

    def exact_eps(x, lam):
        a2 = jax.nn.sigmoid(lam)[:, None, None, None]
        return jnp.sqrt(1 - a2) * x / (a2 * VAR + 1 - a2)

    denoiser = samplers.make_denoiser(exact_eps, log_snr)
    errors = {}
    for name in ("ddim", "dpmpp_2m", "unipc_bh2", "euler", "heun"):
        kind = "karras" if name in ("euler", "heun") else "linspace"
        grid = samplers.make_grid(log_snr, 20, kind)
        out = samplers.sample(SOLVERS[name], denoiser, X_T, grid).sample
        errors[name] = float(jnp.max(jnp.abs(out - exact_x0(grid))))
    assert errors["dpmpp_2m"] < errors["ddim"] / 2, errors
    assert errors["unipc_bh2"] < errors["ddim"] / 2, errors
    assert errors["heun"] < errors["euler"] / 2, errors


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_of_a_previous_x_network_equals_ddim_of_its_eps_network(clip):
    """A prev_x network that outputs the posterior mean of the exact eps predictor's x0 is the
    same model: DDIM over it (x0 from improved-diffusion's _predict_xstart_from_xprev, eps from
    x0) follows the eps network's DDIM path."""

    def prev_x(x, time):
        t = jnp.round(time).astype(jnp.int32)
        x0 = gaussian.predict_x0_from_eps(C, x, t, gaussian_eps(x, time))
        return gaussian.q_posterior_mean_variance(C, x0, x, t)[0]

    grid = samplers.make_grid(C, 7, "linspace")
    outs = [
        samplers.sample(samplers.ddim(), samplers.make_denoiser(
            fn, C, prediction=kind, clip_denoised=clip), X_T, grid).sample
        for fn, kind in ((gaussian_eps, "eps"), (prev_x, "prev_x"))
    ]  # fmt: skip
    assert np.all(np.isfinite(outs[1]))
    # float32 x0 = (x_prev - c2 x_t) / c1 with c1 = 1.3e-4 at t = T - 1 amplifies rounding:
    # measured 1.3e-5 on samples of magnitude 0.85
    np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=5e-5)
