"""XLA compiler options for jaxdiff's programs, per backend.

``jax.jit(fn, compiler_options=compiler_options())`` compiles ``fn`` with the options below; the
train step (:func:`jaxdiff.train.make_train_step`) and the ``jaxdiff`` command's samplers and
bits/dim use them unless told otherwise. They change how XLA maps operations to kernels, never
what is computed (tests/unit/test_compilation.py checks the outputs against a default compile).

CPU: jaxlib 0.10 hands convolutions, reductions, dots and elementwise fusions to the YNNPACK
library by default. On this project's x86 test machine (2 cores, AVX-512), YNNPACK's
convolutions took about twice as long as XLA's own (Eigen) ones, while its reductions and dots
were the faster choice; keeping only those two in YNNPACK took the ``cifar-small`` U-Net's
forward+backward (batch 16, 32x32) from 484 ms to 367 ms (``experiments/profile_unet.py``
with ``--compiler-options none``, then without; BENCHMARKS.md).

Other backends get no options.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

__all__ = ["compiler_options", "resolve_compiler_options"]

CPU_OPTIONS: dict[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type": ("LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_DOT"),
}


@functools.cache
def _accepted(backend: str, items: tuple[tuple[str, str], ...]) -> bool:
    """Whether this jaxlib's compiler for ``backend`` accepts the options (names of XLA's
    experimental options change between releases; an unknown one must not break a run)."""
    try:
        x = jax.device_put(np.float32(0), jax.local_devices(backend=backend)[0])
        jax.jit(lambda x: x + 1, compiler_options=dict(items)).lower(x).compile()
    except Exception:  # noqa: BLE001 - any rejection means "do not use them"
        return False
    return True


def compiler_options(backend: str | None = None) -> dict[str, str]:
    """The options for ``backend`` (default: JAX's default backend) that this jaxlib accepts;
    ``{}`` where there are none."""
    backend = backend or jax.default_backend()
    if backend == "cpu" and _accepted(backend, tuple(sorted(CPU_OPTIONS.items()))):
        return dict(CPU_OPTIONS)
    return {}


def resolve_compiler_options(options: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``"auto"`` -> :func:`compiler_options`, ``None`` -> ``{}``, a mapping -> a copy of it."""
    if options is None:
        return {}
    if isinstance(options, str):
        if options != "auto":
            raise ValueError(
                f"compiler_options must be 'auto', None or a dict of XLA options, got {options!r}"
            )
        return compiler_options()
    if not isinstance(options, Mapping):
        raise ValueError(
            f"compiler_options must be 'auto', None or a dict of XLA options, got "
            f"{type(options).__name__}"
        )
    return dict(options)
