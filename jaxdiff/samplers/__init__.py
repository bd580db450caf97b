"""Samplers as single compiled programs on one API (see :mod:`jaxdiff.samplers.core`).

``sample(sampler, denoiser, x_T, grid, key=..., noise=..., callback=...)`` runs any sampler:

* :mod:`.ancestral`: DDPM, DDIM (any eta) and DDIM inversion, and the table-based helpers
  ``ddpm_sample``, ``ddim_sample``, ``ddim_reverse_sample``, ``interpolate``;
* :mod:`.dpm_solver`: DPM-Solver and DPM-Solver++ (orders 1 to 3, multistep and singlestep,
  the SDE variants);
* :mod:`.unipc`: UniPC (bh1, bh2, orders 1 to 3);
* :mod:`.karras`: k-diffusion's Euler, Euler ancestral, Heun (with churn), DPM-2, LMS.

Grids: :func:`make_grid` by name (linspace, leading, trailing, karras, exponential);
:func:`timestep_grid` (table timesteps, e.g. from
:func:`jaxdiff.schedules.spaced_timesteps`), :func:`sigma_grid` (noise levels, e.g.
:func:`jaxdiff.schedules.karras_sigmas`), :func:`ddim_grid` / :func:`ddpm_grid` (table-index
grids with a possibly traced step count).
"""

from jaxdiff.guidance import classifier_cond_fn, guided_model_fn
from jaxdiff.samplers import dpm_solver, karras, unipc
from jaxdiff.samplers.ancestral import (
    TimeGrid,
    ddim,
    ddim_grid,
    ddim_reverse,
    ddim_reverse_sample,
    ddim_sample,
    ddpm,
    ddpm_grid,
    ddpm_sample,
    index_grid,
    interpolate,
    torch_linspace,
)
from jaxdiff.samplers.core import (
    Continuous,
    Denoised,
    Denoiser,
    Discrete,
    Grid,
    SampleOutput,
    Sampler,
    dynamic_threshold,
    make_denoiser,
    make_grid,
    noise_source,
    sample,
    sigma_grid,
    timestep_grid,
)

__all__ = [
    "Continuous",
    "Denoised",
    "Denoiser",
    "Discrete",
    "Grid",
    "SampleOutput",
    "Sampler",
    "TimeGrid",
    "classifier_cond_fn",
    "ddim",
    "ddim_grid",
    "ddim_reverse",
    "ddim_reverse_sample",
    "ddim_sample",
    "ddpm",
    "ddpm_grid",
    "ddpm_sample",
    "dpm_solver",
    "dynamic_threshold",
    "guided_model_fn",
    "index_grid",
    "interpolate",
    "karras",
    "make_denoiser",
    "make_grid",
    "noise_source",
    "sample",
    "sigma_grid",
    "timestep_grid",
    "torch_linspace",
    "unipc",
]
