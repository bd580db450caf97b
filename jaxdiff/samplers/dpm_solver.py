"""DPM-Solver (Lu et al. 2022a) and DPM-Solver++ (Lu et al. 2022b), multistep and singlestep,
orders 1 to 3, with the SDE variants, as samplers of :mod:`jaxdiff.samplers.core`.

With lambda = log(alpha / sigma) and h = lambda_next - lambda, the data-prediction solver
(DPM-Solver++) integrates the ODE in x0 and the noise-prediction one (DPM-Solver) in eps. The
multistep update of order k reuses the k - 1 previous predictions (one network call per
step); the singlestep solver groups k steps and updates each from the group's start. Step
orders follow diffusers 0.42's schedulers: warm-up from order 1, and lower orders at the end
(``lower_order_final``: the last step is first order on a grid that ends at the clean image,
and below 15 steps the last two steps drop to orders 1 and 2).

The SDE variants: ``eta`` > 0 on DPM-Solver++ (``eta = 1`` is diffusers'
``sde-dpmsolver++`` and k-diffusion's ``sample_dpmpp_2m_sde``; k-diffusion's eta is the same
parameter) and ``algorithm="sde-dpmsolver"`` (orders 1 and 2, as the reference).

References: Lu et al. 2022, "DPM-Solver" (Alg. 1-2) and "DPM-Solver++" (Alg. 2, App. B);
diffusers ``DPMSolverMultistepScheduler`` / ``DPMSolverSinglestepScheduler``; k-diffusion
``sample_dpmpp_2m``, ``sample_dpmpp_2m_sde``, ``sample_dpmpp_3m_sde``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from jaxdiff.samplers.core import Sampler, _static

__all__ = ["ALGORITHMS", "dpm_solver_multistep", "dpm_solver_singlestep"]

ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")
SOLVER_TYPES = ("midpoint", "heun")


def _check(order, algorithm, solver_type, eta):
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown DPM-Solver algorithm {algorithm!r}; choose one of {ALGORITHMS}")
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"unknown solver_type {solver_type!r}; choose one of {SOLVER_TYPES}")
    data = algorithm.endswith("++")
    if algorithm == "sde-dpmsolver++":
        eta = 1.0 if eta is None else eta
    eta = 0.0 if eta is None else eta
    eta_value = _static(eta, float)
    eta = eta if eta_value is None else eta_value
    if eta_value is not None and eta_value < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if algorithm == "dpmsolver" and eta_value != 0.0:
        raise ValueError("eta > 0 with noise prediction is algorithm='sde-dpmsolver' (eta 1)")
    if algorithm == "sde-dpmsolver":
        if order == 3:
            raise ValueError(
                "sde-dpmsolver has orders 1 and 2 only (diffusers 0.42 crashes at order 3); use "
                "order <= 2, or 'sde-dpmsolver++' for a third-order SDE solver"
            )
        eta = 1.0
    return data, eta


def _stochastic(eta) -> bool:
    value = _static(eta, float)
    return value is None or value > 0


def _sigma_expm1(sigma_t, h, alpha_t, alpha_s, sigma_s):
    """sigma_t (e^h - 1), finite at sigma_t = 0 (h = inf), where it is alpha_t sigma_s /
    alpha_s (the noise-prediction step to the clean image then returns alpha_t x0)."""
    safe = jnp.where(sigma_t > 0, h, 0.0)
    return jnp.where(sigma_t > 0, sigma_t * jnp.expm1(safe), alpha_t * sigma_s / alpha_s)


def _first_order(x, m0, data, eta, sde_eps, pt, ps, h, z):
    """x at t from x at s with one prediction; returns (x_t without noise, noise scale)."""
    alpha_t, sigma_t = pt
    alpha_s, sigma_s = ps
    if data:
        # (sigma_t / sigma_s) e^{-eta h} x + alpha_t (1 - e^{-(1 + eta) h}) x0; eta = 0 is
        # kept out of eta * h, which is NaN on the step to sigma 0 (h = inf)
        ode = isinstance(eta, float) and eta == 0.0
        decay = 1.0 if ode else jnp.exp(-eta * h)
        x_t = (sigma_t / sigma_s) * decay * x - alpha_t * jnp.expm1(-(1 + eta) * h) * m0
        noise = 0.0 if ode else sigma_t * jnp.sqrt(jnp.maximum(-jnp.expm1(-2 * eta * h), 0.0))
    else:
        k = 2.0 if sde_eps else 1.0
        x_t = (alpha_t / alpha_s) * x - k * _sigma_expm1(sigma_t, h, alpha_t, alpha_s, sigma_s) * m0
        noise = sigma_t * jnp.sqrt(jnp.maximum(jnp.expm1(2 * h), 0.0)) if sde_eps else 0.0
    return x_t, noise


def _phi(data, eta, sde_eps, h, pt):
    """The coefficients of D1 (midpoint and heun forms) and D2 of the order-2/3 updates."""
    alpha_t, sigma_t = pt
    if data:
        he = (1 + eta) * h
        e = jnp.expm1(-he)
        mid = -0.5 * alpha_t * e
        heun = alpha_t * (e / he + 1.0)
        d2 = -alpha_t * ((e + he) / he**2 - 0.5)
    else:
        k = 2.0 if sde_eps else 1.0
        e = jnp.expm1(h)
        mid = -0.5 * k * sigma_t * e
        heun = -k * sigma_t * (e / h - 1.0)
        d2 = -sigma_t * ((e - h) / h**2 - 0.5)
    return mid, heun, d2


class MultistepState(NamedTuple):
    x: jnp.ndarray
    m: jnp.ndarray  # [2, *x.shape]: the predictions of the two previous steps, newest first
    lam: jnp.ndarray  # [2]: their lambdas


def _convert(d, data):
    return d.x0 if data else d.eps


def dpm_solver_multistep(
    order: int = 2,
    algorithm: str = "dpmsolver++",
    *,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    euler_at_final: bool = False,
    eta: float | None = None,
) -> Sampler:
    """Multistep DPM-Solver(++) of ``order`` (diffusers' ``DPMSolverMultistepScheduler``).

    ``solver_type`` picks the second-order correction (``"midpoint"`` or ``"heun"``; also the
    warm-up step of order 3, where k-diffusion's ``sample_dpmpp_3m_sde`` uses heun).
    ``lower_order_final`` and ``euler_at_final`` as in diffusers; an end at sigma 0 always
    takes a first-order last step. ``eta`` (DPM-Solver++ only) adds the SDE noise.
    """
    data, eta = _check(order, algorithm, solver_type, eta)
    sde_eps = algorithm == "sde-dpmsolver"
    stochastic = sde_eps or _stochastic(eta)

    def init(x, grid):
        return MultistepState(x, jnp.zeros((2, *x.shape), x.dtype), jnp.zeros((2,), x.dtype))

    def step(denoise, state, grid, i, z):
        x = state.x
        n = grid.num_steps
        d = denoise(x, grid.t[i], grid.alpha[i], grid.sigma[i])
        m0 = _convert(d, data)
        lam = grid.log_alpha_sigma
        pt, ps = (grid.alpha[i + 1], grid.sigma[i + 1]), (grid.alpha[i], grid.sigma[i])
        h = lam[i + 1] - lam[i]
        x1, noise = _first_order(x, m0, data, eta, sde_eps, pt, ps, h, z)
        m1, m2 = state.m[0], state.m[1]
        r0 = (lam[i] - state.lam[0]) / h
        r1 = (state.lam[0] - state.lam[1]) / h
        mid, heun, c2 = _phi(data, eta, sde_eps, h, pt)
        d1 = (m0 - m1) / r0
        x2 = x1 + (mid if solver_type == "midpoint" else heun) * d1
        d1_0, d1_1 = d1, (m1 - m2) / r1
        x3 = x1 + heun * (d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)) + c2 * (d1_0 - d1_1) / (r0 + r1)
        final = i == n - 1
        short = lower_order_final & (n < 15)
        lower_final = final & (euler_at_final | short | (grid.sigma[i + 1] == 0))
        lower_second = (i == n - 2) & short
        use1 = (order == 1) | (i < 1) | lower_final
        use2 = (order == 2) | (i < 2) | lower_second
        x_next = jnp.where(use1, x1, jnp.where(use2, x2, x3)) + noise * z
        m = jnp.stack([m0, m1])
        lams = jnp.stack([lam[i], state.lam[0]])
        return MultistepState(x_next, m, lams), d.x0

    return Sampler(f"dpm_solver_multistep({algorithm}, order {order})", init, step,
                   stochastic=stochastic, check=_refuse_clean_end if sde_eps else None,
                   min_steps=order)  # fmt: skip


def _refuse_clean_end(grid, last_sigma):
    if last_sigma == 0.0:
        raise ValueError(
            "sde-dpmsolver cannot end at sigma 0 (its noise does not vanish there); end the grid "
            "at the smallest table noise instead (timestep_grid(..., final='sigma_min'))"
        )


class SinglestepState(NamedTuple):
    x: jnp.ndarray
    x_start: jnp.ndarray  # the sample at the start of the current group
    m: jnp.ndarray  # [2, *x.shape]: the group's earlier predictions, newest first
    lam: jnp.ndarray  # [2]
    alpha: jnp.ndarray  # [2] alpha and sigma of the group's earlier points (newest first)
    sigma: jnp.ndarray


def singlestep_orders(num_steps, order: int, lower_order_final: bool, clean_end):
    """The order of every step (diffusers' ``get_order_list``), as a function of the step index
    (traceable): 1, 2, ..., order repeated; with ``lower_order_final`` (always taken when the
    step count is not a multiple of the order, as diffusers does) or a clean end, a last step
    that would close a full group is first order."""

    def of(i):
        base = (i % order) + 1
        last = i == num_steps - 1
        lof = lower_order_final | (num_steps % order != 0)
        drop = last & ((lof & (num_steps % order == 0)) | clean_end)
        return jnp.where(drop, 1, base)

    return of


def dpm_solver_singlestep(
    order: int = 2,
    algorithm: str = "dpmsolver++",
    *,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    eta: float | None = None,
) -> Sampler:
    """Singlestep DPM-Solver(++) (diffusers' ``DPMSolverSinglestepScheduler``): steps come in
    groups of orders 1, 2, ..., k; every step of a group updates from the group's first sample
    with the group's predictions so far (one network call per step)."""
    data, eta = _check(order, algorithm, solver_type, eta)
    if algorithm == "sde-dpmsolver":
        raise ValueError("the singlestep solver has no sde-dpmsolver variant (diffusers neither)")
    stochastic = _stochastic(eta)

    def init(x, grid):
        z2 = jnp.zeros((2,), x.dtype)
        return SinglestepState(x, x, jnp.zeros((2, *x.shape), x.dtype), z2, z2, z2)

    def step(denoise, state, grid, i, z):
        x = state.x
        d = denoise(x, grid.t[i], grid.alpha[i], grid.sigma[i])
        m0 = _convert(d, data)
        lam = grid.log_alpha_sigma
        o = singlestep_orders(grid.num_steps, order, lower_order_final,
                              grid.sigma[grid.num_steps] == 0)(i)  # fmt: skip
        pt = (grid.alpha[i + 1], grid.sigma[i + 1])
        # order 1: from x at point i
        x1, noise = _first_order(x, m0, data, eta, False, pt, (grid.alpha[i], grid.sigma[i]),
                                 lam[i + 1] - lam[i], z)  # fmt: skip
        # order 2: from the group start at point i - 1 (s1), with m1 there and m0 at point i
        m1, lam1, ps1 = state.m[0], state.lam[0], (state.alpha[0], state.sigma[0])
        h = lam[i + 1] - lam1
        r0 = (lam[i] - lam1) / h
        base2, noise2 = _first_order(state.x_start, m1, data, eta, False, pt, ps1, h, z)
        mid, heun, _ = _phi(data, eta, False, h, pt)
        d1 = (m0 - m1) / r0
        x2 = base2 + (mid if solver_type == "midpoint" else heun) * d1
        # order 3: from the group start at point i - 2 (s2), with m2, m1, m0
        m2, lam2, ps2 = state.m[1], state.lam[1], (state.alpha[1], state.sigma[1])
        h3 = lam[i + 1] - lam2
        q0, q1 = (lam[i] - lam2) / h3, (lam1 - lam2) / h3
        base3, noise3 = _first_order(state.x_start, m2, data, eta, False, pt, ps2, h3, z)
        _, heun3, c23 = _phi(data, eta, False, h3, pt)
        d1_0, d1_1 = (m1 - m2) / q1, (m0 - m2) / q0
        if solver_type == "midpoint":
            x3 = base3 + heun3 * d1_1
        else:
            dd1 = (q0 * d1_0 - q1 * d1_1) / (q0 - q1)
            dd2 = 2.0 * (d1_1 - d1_0) / (q0 - q1)
            x3 = base3 + heun3 * dd1 + c23 * dd2
        x_next = jnp.where(o == 1, x1 + noise * z,
                           jnp.where(o == 2, x2 + noise2 * z, x3 + noise3 * z))  # fmt: skip
        start = jnp.where(o == 1, x, state.x_start)

        # keep the group's predictions: reset to this one at a group start
        def push(new, old):  # newest first; a group start forgets the previous group
            return jnp.stack([new, jnp.where(o == 1, jnp.zeros_like(old), old)])

        new = SinglestepState(
            x_next, start, push(m0, m1), push(lam[i], lam1),
            push(grid.alpha[i], state.alpha[0]), push(grid.sigma[i], state.sigma[0]),
        )  # fmt: skip
        return new, d.x0

    return Sampler(f"dpm_solver_singlestep({algorithm}, order {order})", init, step,
                   stochastic=stochastic, min_steps=order)  # fmt: skip
