"""Test-wide JAX settings: strict dtype and rank promotion, so silent float64/float32 mixing or
accidental broadcasting fails in tests (the diffrax/equinox habit)."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
