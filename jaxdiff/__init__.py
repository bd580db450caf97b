"""jaxdiff: denoising diffusion models in JAX with a functional API and reference parity.

The pure core (no Flax, Optax, Orbax or torch):

* :mod:`jaxdiff.schedules` - beta tables, log-SNR schedules, timestep respacing;
* :mod:`jaxdiff.gaussian` - the coefficient table and the closed-form process math;
* :mod:`jaxdiff.likelihood` - KL, discretised Gaussian likelihood, VB terms, bits/dim;
* :mod:`jaxdiff.losses` - training losses of both references, importance sampling of t;
* :mod:`jaxdiff.continuous` - continuous-time (log-SNR) diffusion.
"""

from jaxdiff import continuous, gaussian, likelihood, losses, schedules

__version__ = "0.1.0"

__all__ = ["continuous", "gaussian", "likelihood", "losses", "schedules"]
