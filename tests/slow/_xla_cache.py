"""One persistent XLA compilation cache for the `jaxdiff` subprocesses of the slow tests: they
run the same tiny programs again and again, and a program loaded from the cache gives the same
numbers bit for bit (tests/slow/test_cli_end_to_end.py checks it), so each compiles once."""

import atexit
import os
import shutil
import tempfile

CACHE = tempfile.mkdtemp(prefix="jaxdiff-test-xla-")
atexit.register(shutil.rmtree, CACHE, ignore_errors=True)


def env() -> dict[str, str]:
    """The environment of a `jaxdiff` subprocess: the shared cache, for programs of any size."""
    return {
        **os.environ,
        "JAXDIFF_COMPILATION_CACHE": CACHE,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
