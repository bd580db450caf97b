"""k-diffusion's samplers on noise levels (Karras et al. 2022): Euler, Euler ancestral, Heun
(Algorithm 2, with churn), DPM-2 and its ancestral form, DPM-Solver++(2S) ancestral, LMS.

They integrate the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma in k-diffusion's
variable x / alpha with sigma = sigma_vp / alpha (the grid's ``sigma_ve``); the state stays the
variance-preserving x, converted at each step. A second network call of a step is skipped
(``lax.cond``) on the step to sigma 0, as k-diffusion does, so a grid of n steps costs 2n - 1
calls for Heun and DPM-2.

References: Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", Alg. 1-2; k-diffusion 0.1.1 ``sampling.py``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.samplers.core import Sampler

__all__ = ["dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "euler", "euler_ancestral",
           "heun", "lms"]  # fmt: skip


class State(NamedTuple):
    x: jnp.ndarray


def _init(x, grid):
    return State(x)


def _ve(x, alpha):
    return x / alpha


def _denoise(denoise, x_ve, s):
    """D(x, sigma) for k-diffusion's x (the network sees x / sqrt(1 + sigma^2))."""
    return denoise.at_sigma(x_ve * jax.lax.rsqrt(1.0 + s**2), s).x0


def _to_vp(x_ve, grid, i):
    return x_ve * grid.alpha[i + 1]


def _churn(s_churn, s_tmin, s_tmax, s_noise):
    def hat(x_ve, s, n, z):
        rate = jnp.minimum(s_churn / jnp.asarray(n, jnp.float32), math.sqrt(2.0) - 1.0)
        gamma = jnp.where((s_tmin <= s) & (s <= s_tmax), rate, 0.0)
        s_hat = s * (gamma + 1.0)
        x_ve = x_ve + z * s_noise * jnp.sqrt(jnp.maximum(s_hat**2 - s**2, 0.0))
        return x_ve, s_hat

    return hat


def _churned(name, update, s_churn, s_tmin, s_tmax, s_noise, calls=1) -> Sampler:
    """A sampler whose step churns (raises sigma to sigma_hat with fresh noise), evaluates
    D(x, sigma_hat) and moves x with ``update(denoise, x, d, sigma_hat, sigma_next)``, d the
    ODE's slope (x - D) / sigma_hat."""
    if s_churn < 0 or s_noise < 0:
        raise ValueError(f"s_churn and s_noise must be >= 0, got {s_churn}, {s_noise}")
    hat = _churn(s_churn, s_tmin, s_tmax, s_noise)

    def step(denoise, state, grid, i, z):
        s, s_next = grid.sigma_ve[i], grid.sigma_ve[i + 1]
        x, s_hat = hat(_ve(state.x, grid.alpha[i]), s, grid.num_steps, z)
        den = _denoise(denoise, x, s_hat)
        x = update(denoise, x, (x - den) / s_hat, s_hat, s_next)
        return State(_to_vp(x, grid, i)), den

    return Sampler(name, _init, step, stochastic=s_churn > 0, calls=calls)


def euler(s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
          s_noise: float = 1.0) -> Sampler:  # fmt: skip
    """Euler steps of the ODE (Karras et al. 2022, Alg. 2 without the Heun correction); churn
    ``s_churn`` > 0 first raises sigma to sigma (1 + gamma) with fresh noise (k-diffusion
    ``sample_euler``)."""

    def update(denoise, x, d, s_hat, s_next):
        return x + d * (s_next - s_hat)

    return _churned("euler", update, s_churn, s_tmin, s_tmax, s_noise)


def heun(s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
         s_noise: float = 1.0) -> Sampler:  # fmt: skip
    """Heun's second-order method (Karras et al. 2022, Alg. 2, with churn); Euler on the step
    to sigma 0 (k-diffusion ``sample_heun``; diffusers' ``HeunDiscreteScheduler`` without
    churn)."""

    def update(denoise, x, d, s_hat, s_next):
        dt = s_next - s_hat
        x_euler = x + d * dt

        def correct(_):
            d2 = (x_euler - _denoise(denoise, x_euler, s_next)) / s_next
            return x + (d + d2) / 2 * dt

        return jax.lax.cond(s_next > 0, correct, lambda _: x_euler, None)

    return _churned("heun", update, s_churn, s_tmin, s_tmax, s_noise, calls=2)


def dpm_2(s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
          s_noise: float = 1.0) -> Sampler:  # fmt: skip
    """DPM-Solver-2 in sigma (k-diffusion ``sample_dpm_2``): an Euler half step to the
    geometric midpoint of sigma and sigma_next, whose slope then takes the whole step."""

    def update(denoise, x, d, s_hat, s_next):
        return jax.lax.cond(s_next > 0, lambda _: _midpoint(denoise, x, d, s_hat, s_next),
                            lambda _: x + d * (s_next - s_hat), None)  # fmt: skip

    return _churned("dpm_2", update, s_churn, s_tmin, s_tmax, s_noise, calls=2)


def _midpoint(denoise, x, d, s, s_to):
    s_mid = jnp.exp(0.5 * (jnp.log(s) + jnp.log(jnp.maximum(s_to, 1e-30))))
    x2 = x + d * (s_mid - s)
    d2 = (x2 - _denoise(denoise, x2, s_mid)) / s_mid
    return x + d2 * (s_to - s)


def ancestral_step(s, s_next, eta):
    """k-diffusion ``get_ancestral_step``: (sigma_down, sigma_up) with sigma_up^2 =
    eta^2 sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 (at most sigma_next) and
    sigma_down^2 = sigma_next^2 - sigma_up^2."""
    up = jnp.minimum(
        s_next, eta * jnp.sqrt(jnp.maximum(s_next**2 * (s**2 - s_next**2), 0.0) / s**2)
    )
    return jnp.sqrt(jnp.maximum(s_next**2 - up**2, 0.0)), up


def _ancestral(name, update, eta, s_noise, calls=1) -> Sampler:
    """A sampler whose step evaluates D(x, sigma), moves x to sigma_down with ``update(denoise,
    x, den, sigma, sigma_down)`` and adds noise up to sigma_next (none on the step to 0)."""
    if eta < 0 or s_noise < 0:
        raise ValueError(f"eta and s_noise must be >= 0, got {eta}, {s_noise}")

    def step(denoise, state, grid, i, z):
        s, s_next = grid.sigma_ve[i], grid.sigma_ve[i + 1]
        x = _ve(state.x, grid.alpha[i])
        den = _denoise(denoise, x, s)
        down, up = ancestral_step(s, s_next, eta)
        x = update(denoise, x, den, s, down)
        x = x + jnp.where(s_next > 0, z * s_noise * up, 0.0)
        return State(_to_vp(x, grid, i)), den

    return Sampler(name, _init, step, stochastic=eta > 0, calls=calls)


def euler_ancestral(eta: float = 1.0, s_noise: float = 1.0) -> Sampler:
    """Euler to sigma_down, then noise up to sigma_next (k-diffusion
    ``sample_euler_ancestral``; diffusers' ``EulerAncestralDiscreteScheduler``)."""

    def update(denoise, x, den, s, down):
        return x + (x - den) / s * (down - s)

    return _ancestral("euler_ancestral", update, eta, s_noise)


def dpm_2_ancestral(eta: float = 1.0, s_noise: float = 1.0) -> Sampler:
    """DPM-Solver-2 to sigma_down, then noise up (k-diffusion ``sample_dpm_2_ancestral``)."""

    def update(denoise, x, den, s, down):
        d = (x - den) / s
        return jax.lax.cond(down > 0, lambda _: _midpoint(denoise, x, d, s, down),
                            lambda _: x + d * (down - s), None)  # fmt: skip

    return _ancestral("dpm_2_ancestral", update, eta, s_noise, calls=2)


def dpmpp_2s_ancestral(eta: float = 1.0, s_noise: float = 1.0) -> Sampler:
    """DPM-Solver++(2S) to sigma_down, then noise up (k-diffusion
    ``sample_dpmpp_2s_ancestral``): the second call sits at the log-SNR midpoint."""

    def update(denoise, x, den, s, down):
        def two_stage(_):
            t, t_next = -jnp.log(s), -jnp.log(down)
            h = t_next - t
            s_mid = jnp.exp(-(t + 0.5 * h))
            x2 = (s_mid / s) * x - jnp.expm1(-0.5 * h) * den
            den2 = _denoise(denoise, x2, s_mid)
            return (down / s) * x - jnp.expm1(-h) * den2

        return jax.lax.cond(down > 0, two_stage, lambda _: x + (x - den) / s * (down - s), None)

    return _ancestral("dpmpp_2s_ancestral", update, eta, s_noise, calls=2)


class LMSState(NamedTuple):
    x: jnp.ndarray
    d: jnp.ndarray  # [order, *x.shape]: the slopes of the previous steps, newest first
    s: jnp.ndarray  # [order]: their sigmas


# Gauss-Legendre nodes and weights on [-1, 1]: exact for the cubic Lagrange bases of order 4;
# NumPy: importing jaxdiff starts no JAX backend (jax.distributed.initialize must come first)
_GL_X, _GL_W = (a.astype(np.float32) for a in np.polynomial.legendre.leggauss(4))


def lms(order: int = 4) -> Sampler:
    """Linear multistep in sigma (k-diffusion ``sample_lms``): the slope is extrapolated by the
    Lagrange polynomial through the last min(i + 1, order) slopes and integrated exactly over
    [sigma_i, sigma_{i+1}] (k-diffusion integrates it with ``scipy.integrate.quad``)."""
    if order not in (1, 2, 3, 4):
        raise ValueError(f"LMS order must be 1 to 4, got {order!r}")

    def init(x, grid):
        return LMSState(x, jnp.zeros((order, *x.shape), x.dtype), jnp.ones((order,), x.dtype))

    def step(denoise, state, grid, i, z):
        s, s_next = grid.sigma_ve[i], grid.sigma_ve[i + 1]
        x = _ve(state.x, grid.alpha[i])
        den = _denoise(denoise, x, s)
        d = (x - den) / s
        ds = jnp.concatenate([d[None], state.d[:-1]])
        sig = jnp.concatenate([s[None], state.s[:-1]])
        p = jnp.minimum(i + 1, order)
        # tau in [s, s_next] at the quadrature nodes
        tau = 0.5 * (s_next - s) * _GL_X + 0.5 * (s_next + s)
        coeffs = []
        for j in range(order):
            basis = jnp.ones_like(tau)
            for k in range(order):
                if k == j:
                    continue
                term = (tau - sig[k]) / (sig[j] - sig[k])
                basis = basis * jnp.where(k < p, term, 1.0)
            coeffs.append(jnp.where(j < p, 0.5 * (s_next - s) * jnp.sum(_GL_W * basis), 0.0))
        x = x + sum(coeffs[j] * ds[j] for j in range(order))
        return LMSState(_to_vp(x, grid, i), ds, sig), den

    return Sampler(f"lms(order {order})", init, step)
