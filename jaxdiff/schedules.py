"""Noise schedules: discrete beta tables, continuous log-SNR functions and timestep respacing.

Discrete tables are built on the host in float64 NumPy, exactly as both references do, and cast
once to the compute dtype by :func:`jaxdiff.gaussian.make_coeffs`. Continuous log-SNR schedules are
JAX functions of ``t in [0, 1]`` so that they can be traced inside a loss or a sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

__all__ = [
    "BETA_SCHEDULES",
    "LOG_SNR_SCHEDULES",
    "alpha_cosine_log_snr",
    "beta_linear_log_snr",
    "betas_for_alpha_bar",
    "cosine_beta_schedule",
    "exponential_sigmas",
    "get_named_beta_schedule",
    "interpolated_log_snr",
    "karras_sigmas",
    "linear_beta_schedule",
    "log_snr_schedule",
    "resolution_shift",
    "respace_betas",
    "sigmoid_beta_schedule",
    "simple_cosine_log_snr",
    "space_timesteps",
    "spaced_timesteps",
    "table_sigmas",
]


def _check_num_timesteps(num_timesteps: int) -> int:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int | np.integer):
        raise ValueError(f"num_timesteps must be an int >= 1, got {num_timesteps!r}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    return int(num_timesteps)


def _betas_from_alphas_cumprod(alphas_cumprod: np.ndarray, max_beta: float) -> np.ndarray:
    """beta_t = 1 - abar(t_{i+1}) / abar(t_i), clipped to [0, max_beta]."""
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return np.clip(betas, 0.0, max_beta)


def linear_beta_schedule(num_timesteps: int) -> np.ndarray:
    """Linear betas of Ho et al. (2020), scaled so that any T has the same total noise.

    .. math:: \\beta_i = \\mathrm{linspace}(10^{-4} s, 0.02 s, T)_i, \\quad s = 1000 / T

    Args:
      num_timesteps: T >= 1.

    Returns:
      float64 array of shape [T].

    References: Ho et al. 2020, Sec. 4; improved-diffusion ``get_named_beta_schedule("linear")``;
    denoising-diffusion-pytorch ``linear_beta_schedule``.
    """
    num_timesteps = _check_num_timesteps(num_timesteps)
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_beta_schedule(num_timesteps: int, s: float = 0.008) -> np.ndarray:
    """Cosine schedule of Nichol & Dhariwal (2021), Eq. 17, with betas clipped at 0.999.

    .. math:: \\bar\\alpha(t) = \\cos^2\\Big(\\frac{t + s}{1 + s}\\frac{\\pi}{2}\\Big),\\quad
        \\beta_i = \\min\\Big(1 - \\frac{\\bar\\alpha((i+1)/T)}{\\bar\\alpha(i/T)}, 0.999\\Big)

    Computed in float64 (a float32 build visibly corrupts the last steps).

    Args:
      num_timesteps: T >= 1.
      s: small offset that keeps beta_0 away from zero.

    Returns:
      float64 array of shape [T].
    """
    num_timesteps = _check_num_timesteps(num_timesteps)
    t = np.linspace(0, num_timesteps, num_timesteps + 1, dtype=np.float64) / num_timesteps
    alphas_cumprod = np.cos((t + s) / (1 + s) * math.pi * 0.5) ** 2
    return _betas_from_alphas_cumprod(alphas_cumprod, 0.999)


def _float32_sigmoid(x: float) -> float:
    # The reference evaluates sigmoid(start / tau) on a float32 scalar tensor and then mixes the
    # result with float64 times; rounding it to float32 reproduces its tables bit for bit.
    return float(np.float32(1.0 / (1.0 + math.exp(-float(np.float32(x))))))


def sigmoid_beta_schedule(
    num_timesteps: int,
    start: float = -3.0,
    end: float = 3.0,
    tau: float = 1.0,
    clamp_min: float = 1e-5,
) -> np.ndarray:
    """Sigmoid schedule of Jabri et al. (2022, arXiv 2212.11972, Fig. 8), betas clipped at 0.999.

    .. math:: \\bar\\alpha(t) \\propto \\frac{v_{end} - \\sigma((t (e - s) + s)/\\tau)}
        {v_{end} - v_{start}},\\quad v_{start} = \\sigma(s/\\tau),\\ v_{end} = \\sigma(e/\\tau)

    As in denoising-diffusion-pytorch, ``v_start`` and ``v_end`` are rounded to float32 before
    they meet the float64 times; this moves the last alpha-bar by ~3e-5 relative and is kept so
    that the tables match the reference.

    Args:
      num_timesteps: T >= 1.
      start, end, tau: the sigmoid's input range and temperature.
      clamp_min: accepted so that denoising-diffusion-pytorch ``schedule_fn_kwargs`` can be
        passed unchanged; like the reference, it has no effect.

    Returns:
      float64 array of shape [T].
    """
    del clamp_min
    num_timesteps = _check_num_timesteps(num_timesteps)
    if tau <= 0:
        raise ValueError(f"sigmoid schedule needs tau > 0, got {tau}")
    if end <= start:
        raise ValueError(f"sigmoid schedule needs end > start, got start={start}, end={end}")
    t = np.linspace(0, num_timesteps, num_timesteps + 1, dtype=np.float64) / num_timesteps
    v_start = _float32_sigmoid(start / tau)
    v_end = _float32_sigmoid(end / tau)
    sig = 1.0 / (1.0 + np.exp(-((t * (end - start) + start) / tau)))
    alphas_cumprod = (v_end - sig) / (v_end - v_start)
    return _betas_from_alphas_cumprod(alphas_cumprod, 0.999)


def betas_for_alpha_bar(
    num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a continuous alpha-bar function into T betas.

    .. math:: \\beta_i = \\min\\big(1 - \\bar\\alpha((i+1)/T) / \\bar\\alpha(i/T),
        \\beta_{max}\\big)

    Args:
      num_timesteps: T >= 1.
      alpha_bar: function from t in [0, 1] to the cumulative product of (1 - beta).
      max_beta: upper clip, 0.999 in improved-diffusion to avoid a singular last step.

    Returns:
      float64 array of shape [T].
    """
    num_timesteps = _check_num_timesteps(num_timesteps)
    betas = [
        min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.asarray(betas, dtype=np.float64)


BETA_SCHEDULES: dict[str, Callable[..., np.ndarray]] = {
    "linear": linear_beta_schedule,
    "cosine": cosine_beta_schedule,
    "sigmoid": sigmoid_beta_schedule,
}


def get_named_beta_schedule(name: str, num_timesteps: int, **kwargs) -> np.ndarray:
    """Betas of a named schedule: ``"linear"``, ``"cosine"`` or ``"sigmoid"``.

    Keyword arguments go to the schedule function (``s`` for cosine; ``start``, ``end``,
    ``tau`` for sigmoid), like denoising-diffusion-pytorch's ``schedule_fn_kwargs``.
    """
    if name not in BETA_SCHEDULES:
        raise ValueError(
            f"unknown beta schedule {name!r}; choose one of {sorted(BETA_SCHEDULES)} "
            "or build betas with betas_for_alpha_bar"
        )
    return BETA_SCHEDULES[name](num_timesteps, **kwargs)


# --------------------------------------------------------------------------------------------
# Timestep respacing (improved-diffusion's ``space_timesteps`` semantics)
# --------------------------------------------------------------------------------------------


def _ddim_stride_steps(num_timesteps: int, count: int) -> np.ndarray:
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == count:
            return np.arange(0, num_timesteps, stride, dtype=np.int64)
    valid = sorted({len(range(0, num_timesteps, stride)) for stride in range(1, num_timesteps)})
    below = [n for n in valid if n < count]
    above = [n for n in valid if n > count]
    near = ([below[-1]] if below else []) + ([above[0]] if above else [])
    raise ValueError(
        f"'ddim{count}' cannot be met for num_timesteps={num_timesteps}: no integer stride "
        f"gives exactly {count} steps; the nearest counts that work are {near}, or use the "
        f"section syntax '{count}'"
    )


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> np.ndarray:
    """The original timesteps kept by a respaced process, as improved-diffusion chooses them.

    ``section_counts`` is either ``"ddimN"`` (DDIM's fixed integer stride: the first stride i
    with ``len(range(0, T, i)) == N``; it never reaches T-1) or comma-separated counts such as
    ``"10,15,20"`` (or a list of ints): T is split into that many near-equal sections (the first
    ``T % n`` one step longer) and each section of ``size`` steps keeps ``count`` steps at
    ``start + round(cur)``, where ``cur`` grows by ``(size - 1) / (count - 1)`` through repeated
    addition and ``round`` is Python's round-half-to-even. Accumulating (rather than multiplying
    i * stride) changes the rounding for hundreds of counts; it is kept for parity. An empty
    string keeps every step.

    Args:
      num_timesteps: T of the original process.
      section_counts: the spacing specification.

    Returns:
      sorted int64 array of kept timesteps.

    References: Nichol & Dhariwal 2021, Sec. 4; improved-diffusion ``respace.space_timesteps``.
    """
    num_timesteps = _check_num_timesteps(num_timesteps)
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec == "":
            return np.arange(num_timesteps, dtype=np.int64)
        if spec.startswith("ddim"):
            try:
                count = int(spec[len("ddim") :])
            except ValueError:
                raise ValueError(
                    f"bad respacing {section_counts!r}: expected 'ddimN' with an integer N"
                ) from None
            return _ddim_stride_steps(num_timesteps, count)
        try:
            counts = [int(x) for x in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"bad respacing {section_counts!r}: expected 'ddimN', a comma-separated list "
                "of step counts such as '10,15,20', or ''"
            ) from None
    else:
        counts = [int(x) for x in section_counts]
    if not counts or any(c < 0 for c in counts):
        raise ValueError(f"bad respacing {section_counts!r}: counts must be >= 0")
    size_per, extra = divmod(num_timesteps, len(counts))
    if size_per == 0:
        raise ValueError(
            f"bad respacing {section_counts!r}: {len(counts)} sections for only "
            f"{num_timesteps} timesteps"
        )
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(
                f"bad respacing {section_counts!r}: section {i} has {size} timesteps, "
                f"cannot take {count} from it"
            )
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    steps = np.unique(np.asarray(kept, dtype=np.int64))
    if steps.size == 0:
        raise ValueError(f"bad respacing {section_counts!r}: it keeps no timestep")
    return steps


def respace_betas(
    betas: np.ndarray, use_timesteps: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Betas of the chain that visits only ``use_timesteps``, keeping alpha-bar there exactly.

    .. math:: \\beta'_j = 1 - \\bar\\alpha_{k_j} / \\bar\\alpha_{k_{j-1}},\\quad
        \\bar\\alpha_{k_{-1}} = 1

    Args:
      betas: float64 [T] betas of the original process.
      use_timesteps: original indices to keep (any order; duplicates ignored).

    Returns:
      ``(new_betas, timestep_map)``: float64 [T'] and int64 [T'] with the original index of each
      new step.

    References: improved-diffusion ``SpacedDiffusion``.
    """
    betas = np.asarray(betas, dtype=np.float64)
    steps = np.unique(np.asarray(use_timesteps, dtype=np.int64))
    if steps.size == 0 or steps[0] < 0 or steps[-1] >= betas.shape[0]:
        raise ValueError(
            f"use_timesteps must be a non-empty subset of [0, {betas.shape[0]}), got {steps}"
        )
    alphas_cumprod = np.cumprod(1.0 - betas)[steps]
    prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
    return 1.0 - alphas_cumprod / prev, steps


# --------------------------------------------------------------------------------------------
# Sampler grids: timestep spacings and noise levels (host NumPy, float64)
# --------------------------------------------------------------------------------------------

SPACINGS: tuple[str, ...] = ("linspace", "leading", "trailing")


def spaced_timesteps(
    num_timesteps: int,
    num_steps: int,
    spacing: str = "linspace",
    *,
    steps_offset: int = 0,
    skip_last: bool = False,
    rounded: bool = True,
) -> np.ndarray:
    """Descending sampling timesteps of a T-step table, by the spacings of Lin et al. 2024,
    Table 2 (diffusers' ``timestep_spacing``).

    * ``linspace``: ``linspace(0, T - 1, n)`` (its ends included);
    * ``leading``: ``k * (T // n)`` for k < n, plus ``steps_offset`` (DDIM's and Stable
      Diffusion's spacing: it never reaches T - 1);
    * ``trailing``: ``round(T - k T / n) - 1`` for k < n (it starts at T - 1).

    ``skip_last`` takes n + 1 points of the linspace or leading spacing and drops the smallest
    (diffusers' DPM-Solver and UniPC schedulers, which end at sigma 0 instead of at t = 0).
    ``rounded`` rounds half to even (NumPy's ``round``); unrounded timesteps are fractional
    (diffusers' Euler and Heun schedulers with the linspace spacing).

    Returns:
      float64 [n], descending.
    """
    _check_num_timesteps(num_timesteps)
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {list(SPACINGS)}")
    n = int(num_steps)
    if not 1 <= n <= num_timesteps:
        raise ValueError(f"the number of steps must be in [1, {num_timesteps}], got {num_steps}")
    points = n + 1 if skip_last and spacing != "trailing" else n
    if spacing == "linspace":
        ts = np.linspace(0, num_timesteps - 1, points)
    elif spacing == "leading":
        ts = np.arange(points) * (num_timesteps // points) + float(steps_offset)
    else:
        ts = np.arange(num_timesteps, 0, -num_timesteps / n)
        ts = np.round(ts) - 1 if rounded else ts - 1
    if rounded:
        ts = np.round(ts)
    ts = np.sort(ts)[::-1].astype(np.float64)
    return ts[:n]


def table_sigmas(alphas_cumprod) -> np.ndarray:
    """k-diffusion's noise levels of a table, sqrt((1 - abar) / abar) (increasing in t)."""
    abar = np.asarray(alphas_cumprod, np.float64)
    return np.sqrt((1 - abar) / abar)


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0):
    """Karras et al. 2022, Eq. 5: sigma_i = (max^(1/rho) + i / (n - 1) (min^(1/rho) -
    max^(1/rho)))^rho for i < n, then 0 (k-diffusion ``get_sigmas_karras``). float64 [n + 1]."""
    n = int(num_steps)
    if n < 1:
        raise ValueError(f"the number of steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return np.append((hi + ramp * (lo - hi)) ** rho, 0.0)


def exponential_sigmas(num_steps: int, sigma_min: float, sigma_max: float):
    """Noise levels uniform in log sigma, i.e. uniform in log-SNR (k-diffusion
    ``get_sigmas_exponential``; DPM-Solver's ``logSNR`` skip type), then 0. float64 [n + 1]."""
    n = int(num_steps)
    if n < 1:
        raise ValueError(f"the number of steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    return np.append(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)), 0.0)


# --------------------------------------------------------------------------------------------
# Continuous-time log-SNR schedules (functions of t in [0, 1], traceable)
# --------------------------------------------------------------------------------------------


def _floored_log(x: jnp.ndarray, eps: float) -> jnp.ndarray:
    return jnp.log(jnp.maximum(x, eps))


def beta_linear_log_snr(t: jnp.ndarray) -> jnp.ndarray:
    """log-SNR of the continuous linear-beta process (VDM, Kingma et al. 2021, App. H).

    .. math:: \\lambda(t) = -\\log(\\mathrm{expm1}(10^{-4} + 10 t^2))

    The argument of the log is floored at 1e-20 as in denoising-diffusion-pytorch.
    """
    return -_floored_log(jnp.expm1(1e-4 + 10.0 * t**2), 1e-20)


def alpha_cosine_log_snr(t: jnp.ndarray, s: float = 0.008) -> jnp.ndarray:
    """log-SNR of the cosine schedule in continuous time.

    .. math:: \\lambda(t) = -\\log\\big(\\cos^{-2}(\\tfrac{t + s}{1 + s}\\tfrac{\\pi}{2}) - 1\\big)

    The argument of the log is floored at 1e-5, which caps the log-SNR at -log(1e-5) ~ 11.5,
    as in denoising-diffusion-pytorch.
    """
    return -_floored_log(jnp.cos((t + s) / (1 + s) * math.pi * 0.5) ** -2 - 1.0, 1e-5)


def simple_cosine_log_snr(
    t: jnp.ndarray, logsnr_min: float = -15.0, logsnr_max: float = 15.0
) -> jnp.ndarray:
    """Truncated cosine log-SNR of simple diffusion (Hoogeboom et al. 2023, Eq. 6).

    .. math:: \\lambda(t) = -2 \\log\\tan(a + t (b - a)),\\quad a = \\arctan e^{-\\lambda_{max}/2},
        \\ b = \\arctan e^{-\\lambda_{min}/2}
    """
    t_min = math.atan(math.exp(-0.5 * logsnr_max))
    t_max = math.atan(math.exp(-0.5 * logsnr_min))
    return -2.0 * _floored_log(jnp.tan(t_min + t * (t_max - t_min)), 1e-20)


def resolution_shift(image_d: float, noise_d: float) -> float:
    """The log-SNR shift of simple diffusion for a resolution change: 2 log(noise_d / image_d)."""
    if image_d <= 0 or noise_d <= 0:
        raise ValueError(f"image_d and noise_d must be > 0, got {image_d}, {noise_d}")
    return 2.0 * math.log(noise_d / image_d)


def interpolated_log_snr(
    fn: Callable[[jnp.ndarray], jnp.ndarray],
    image_d: float,
    noise_d_low: float,
    noise_d_high: float,
) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """Simple diffusion's interpolated schedule: t * shifted_low(t) + (1 - t) * shifted_high(t)."""
    low = resolution_shift(image_d, noise_d_low)
    high = resolution_shift(image_d, noise_d_high)

    def log_snr(t: jnp.ndarray) -> jnp.ndarray:
        base = fn(t)
        return t * (base + low) + (1 - t) * (base + high)

    return log_snr


LOG_SNR_SCHEDULES: dict[str, Callable[..., jnp.ndarray]] = {
    "linear": beta_linear_log_snr,
    "cosine": alpha_cosine_log_snr,
    "simple_cosine": simple_cosine_log_snr,
}


def log_snr_schedule(
    name: str, *, shift: float = 0.0, **kwargs
) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """A continuous log-SNR schedule ``t -> lambda(t) + shift`` by name.

    Args:
      name: ``"linear"`` (VDM's continuous linear beta), ``"cosine"`` (the alpha-cosine
        schedule of denoising-diffusion-pytorch's continuous-time classes) or ``"simple_cosine"``
        (simple diffusion's truncated cosine).
      shift: added to the log-SNR, e.g. ``resolution_shift(64, 32)`` for simple diffusion's
        shifted schedule.
      **kwargs: forwarded to the schedule (``s``, ``logsnr_min``, ``logsnr_max``).
    """
    if name not in LOG_SNR_SCHEDULES:
        raise ValueError(
            f"unknown log-SNR schedule {name!r}; choose one of {sorted(LOG_SNR_SCHEDULES)}"
        )
    fn = LOG_SNR_SCHEDULES[name]
    shift = float(shift)

    def log_snr(t: jnp.ndarray) -> jnp.ndarray:
        out = fn(t, **kwargs)
        return out + shift if shift else out

    return log_snr
