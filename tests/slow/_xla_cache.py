"""The environment of the `jaxdiff` subprocesses of the slow tests.

* One persistent XLA compilation cache: they run the same tiny programs again and again, and a
  program loaded from the cache gives the same numbers bit for bit
  (tests/slow/test_cli_end_to_end.py checks it), so each compiles once.
* XLA's backend optimisation level 0 (:data:`FAST_COMPILE`): these tests check what the
  command does (resumption, faults, files, messages), not its speed or its numerics against a
  reference, and their tiny programs spend far longer compiling than running. Level 0 halves
  the compile time of the tiny train step on the 2-core test machine (34 s to 23 s under load,
  first step of ``jaxdiff train`` with the TINY flags). Every run a slow test compares with
  another runs under the same flags, so bit-for-bit comparisons are unaffected.
"""

import atexit
import os
import shutil
import tempfile

CACHE = tempfile.mkdtemp(prefix="jaxdiff-test-xla-")
atexit.register(shutil.rmtree, CACHE, ignore_errors=True)
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(extra: str = "") -> str:
    """``XLA_FLAGS`` for a subprocess: the caller's, :data:`FAST_COMPILE` and ``extra``."""
    return " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), FAST_COMPILE, extra) if f)


def env() -> dict[str, str]:
    """The environment of a `jaxdiff` subprocess: the shared cache, for programs of any size,
    compiled at :data:`FAST_COMPILE`."""
    return {
        **os.environ,
        "JAXDIFF_COMPILATION_CACHE": CACHE,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "XLA_FLAGS": xla_flags(),
    }
