"""Test-wide JAX settings: strict dtype and rank promotion, so silent float64/float32 mixing or
accidental broadcasting fails in tests (the diffrax/equinox habit); and true float32 products
on a GPU, where JAX's default is TF32 (the tests check the numerics, not the speed mode).
The ``jaxdiff`` commands that tests run keep no compilation cache unless a test asks for one."""

import os

import jax

os.environ.setdefault("JAXDIFF_COMPILATION_CACHE", "none")

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
if jax.default_backend() == "gpu":
    jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests first (a stable sort): with ``--maxschedchunk 1`` the two
    xdist workers take one test at a time, so the long tests spread over both workers first and
    the short ones fill in behind them, instead of a few long tests ending the run on one."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
