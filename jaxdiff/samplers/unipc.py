"""UniPC (Zhao et al. 2023): a multistep predictor (UniP) and corrector (UniC) pair, orders 1
to 3, with the B(h) = h (``bh1``) and B(h) = e^h - 1 (``bh2``) variants, in data (x0) or noise
(eps) prediction.

Step i evaluates the network once at x_i; that prediction first corrects x_i (UniC, of the
previous step's order, from x_{i-1}), then the predictor of this step's order moves the
corrected x_i to x_{i+1}. The corrector needs no extra call: the prediction it uses is the
one the next predictor needs anyway, and none is applied to the final output. Orders follow
diffusers 0.42's ``UniPCMultistepScheduler``: warm-up from order 1, ``lower_order_final``
caps the order at the number of steps left, the order-2 predictor and the order-1 corrector
use rho = 1/2.

References: Zhao et al. 2023, "UniPC", Alg. 2-3 and App. B; diffusers
``UniPCMultistepScheduler``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from jaxdiff.samplers.core import Sampler

__all__ = ["unipc"]

VARIANTS = ("bh1", "bh2")


class UniPCState(NamedTuple):
    x: jnp.ndarray
    last: jnp.ndarray  # the corrected x of the previous step (the corrector's start)
    m: jnp.ndarray  # [K, *x.shape]: predictions of the previous steps, newest first
    lam: jnp.ndarray  # [K]: their lambdas
    alpha: jnp.ndarray  # [K]
    sigma: jnp.ndarray  # [K]
    order: jnp.ndarray  # the previous predictor's order (the corrector's), 0 before any


def _coefficients(h, rks, order: int, predict_x0: bool, variant: str):
    """The UniPC linear system (Zhao et al. 2023, Eq. 8): R [order, order] with rows
    rks^(k-1), b_k = h phi_{k}(h) k! / B(h), and hh, h_phi_1, B_h."""
    hh = -h if predict_x0 else h
    h_phi_1 = jnp.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    b_h = hh if variant == "bh1" else jnp.expm1(hh)
    rows, b = [], []
    factorial = 1.0
    for k in range(1, order + 1):
        rows.append(rks ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return jnp.stack(rows), jnp.stack(b), h_phi_1, b_h


def _base(x, m0, predict_x0, h_phi_1, pt, ps):
    alpha_t, sigma_t = pt
    alpha_s, sigma_s = ps
    if predict_x0:
        return (sigma_t / sigma_s) * x - alpha_t * h_phi_1 * m0, alpha_t
    # sigma_t (e^h - 1) -> alpha_t sigma_s / alpha_s at sigma_t = 0
    coef = jnp.where(sigma_t > 0, sigma_t * h_phi_1, alpha_t * sigma_s / alpha_s)
    return (alpha_t / alpha_s) * x - coef * m0, sigma_t


def unipc(
    order: int = 2,
    variant: str = "bh2",
    *,
    predict_x0: bool = True,
    lower_order_final: bool = True,
    disable_corrector: tuple[int, ...] = (),
) -> Sampler:
    """UniPC of ``order`` (1 to 3) with the ``variant`` B(h) (``"bh1"``: h, for few steps;
    ``"bh2"``: e^h - 1), predicting x0 (``predict_x0``, UniPC with DPM-Solver++) or eps;
    ``disable_corrector`` lists steps whose result is not corrected (diffusers' option)."""
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order!r}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown UniPC variant {variant!r}; choose one of {VARIANTS}")
    k_hist = max(order, 1)
    no_corr = tuple(int(j) for j in disable_corrector)

    def init(x, grid):
        zk = jnp.zeros((k_hist,), x.dtype)
        return UniPCState(x, x, jnp.zeros((k_hist, *x.shape), x.dtype), zk, zk, zk,
                          jnp.zeros((), jnp.int32))  # fmt: skip

    def update(x, m0, lam_s, ps, lam_t, pt, hist_m, hist_lam, p, extra):
        """x at t from x at s (prediction m0 there) with the history; ``extra`` is the
        corrector's new prediction at t (None for the predictor). Returns a candidate per
        order 1..order (index p - 1)."""
        h = lam_t - lam_s
        outs = []
        for q in range(1, order + 1):
            rks = [(hist_lam[j] - lam_s) / h for j in range(q - 1)] + [jnp.ones_like(h)]
            rks = jnp.stack(rks)
            r_mat, b, h_phi_1, b_h = _coefficients(h, rks, q, predict_x0, variant)
            base, scale = _base(x, m0, predict_x0, h_phi_1, pt, ps)
            d1s = [(hist_m[j] - m0) / rks[j] for j in range(q - 1)]
            if extra is None:
                if q == 1:
                    outs.append(base)
                    continue
                rhos = jnp.array([0.5], h.dtype) if q == 2 else jnp.linalg.solve(
                    r_mat[:-1, :-1], b[:-1])  # fmt: skip
                res = sum(rhos[j] * d1s[j] for j in range(q - 1))
                outs.append(base - scale * b_h * res)
            else:
                rhos = jnp.array([0.5], h.dtype) if q == 1 else jnp.linalg.solve(r_mat, b)
                res = sum(rhos[j] * d1s[j] for j in range(q - 1)) if q > 1 else 0.0
                outs.append(base - scale * b_h * (res + rhos[-1] * (extra - m0)))
        stacked = jnp.stack(outs)
        return stacked[jnp.clip(p - 1, 0, order - 1)]

    def step(denoise, state, grid, i, z):
        n = grid.num_steps
        x = state.x
        d = denoise(x, grid.t[i], grid.alpha[i], grid.sigma[i])
        m_now = d.x0 if predict_x0 else d.eps
        lam = grid.log_alpha_sigma
        # UniC: correct x_i from the previous step's start with the new prediction
        prev = (state.alpha[0], state.sigma[0])
        corrected = update(state.last, state.m[0], state.lam[0], prev, lam[i],
                           (grid.alpha[i], grid.sigma[i]), state.m[1:], state.lam[1:],
                           state.order, m_now)  # fmt: skip
        use_corr = (i > 0) & (state.order > 0)
        for j in no_corr:
            use_corr = use_corr & (i - 1 != j)
        x = jnp.where(use_corr, corrected, x)
        # history: this prediction first
        m = jnp.concatenate([m_now[None], state.m[:-1]])
        lams = jnp.concatenate([lam[i][None], state.lam[:-1]])
        alphas = jnp.concatenate([grid.alpha[i][None], state.alpha[:-1]])
        sigmas = jnp.concatenate([grid.sigma[i][None], state.sigma[:-1]])
        this = jnp.minimum(order, n - i) if lower_order_final else jnp.asarray(order)
        this = jnp.minimum(this, jnp.minimum(i, order) + 1).astype(jnp.int32)
        # an end at sigma 0 is reached with order 1 (higher orders divide by B(h) = inf there)
        this = jnp.where(grid.sigma[i + 1] == 0, 1, this)
        # UniP: predict x_{i+1}
        x_next = update(x, m_now, lam[i], (grid.alpha[i], grid.sigma[i]), lam[i + 1],
                        (grid.alpha[i + 1], grid.sigma[i + 1]), m[1:], lams[1:], this,
                        None)  # fmt: skip
        return UniPCState(x_next, x, m, lams, alphas, sigmas, this), d.x0

    return Sampler(f"unipc({variant}, order {order})", init, step, min_steps=order)
