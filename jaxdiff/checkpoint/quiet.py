"""Orbax's background threads log every failure with a traceback; these filters drop those
reports, which the checkpoint module raises once, as a clear error, instead."""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

# --------------------------------------------------------------------------------------------
# Orbax plumbing: quiet logs, clear errors
# --------------------------------------------------------------------------------------------

_ORBAX_PARTS = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorstore{os.sep}")
_TENSORSTORE_ERRORS = ("[tensorstore_spec=", "in OCDBT database")


class _QuietOrbax(logging.Filter):
    """Drops the records Orbax logs through absl (its background threads log every failure
    with a traceback, which this module raises once, as a clear error, instead), and asyncio's
    "exception was never retrieved" reports of Orbax's failed tasks."""

    def filter(self, record: logging.LogRecord) -> bool:
        if any(part in record.pathname for part in _ORBAX_PARTS):
            return False
        if record.name == "asyncio" and record.exc_info:
            # a tensorstore write that failed inside Orbax's save: the exception comes from
            # tensorstore's C++ future, often with no Python frame of Orbax to recognise
            if any(part in str(record.exc_info[1]) for part in _TENSORSTORE_ERRORS):
                return False
            tb = record.exc_info[2]
            while tb is not None:
                if any(part in tb.tb_frame.f_code.co_filename for part in _ORBAX_PARTS):
                    return False
                tb = tb.tb_next
        return True


_QUIET = _QuietOrbax()
_QUIET_LOCK = threading.Lock()
_QUIET_LOGGERS = ("absl", "asyncio")


def _late_callback(args: Any) -> bool:
    """Whether an unraisable exception is a tensorstore write that completed after Orbax closed
    the event loop of a failed save (its callback finds the loop closed)."""
    tb = args.exc_traceback
    return (
        args.object is None
        and isinstance(args.exc_value, RuntimeError)
        and str(args.exc_value) == "Event loop is closed"
        and tb is not None
        and tb.tb_frame.f_code.co_name == "call_soon_threadsafe"
    )


def _unraisable_hook(args: Any) -> None:
    if not _late_callback(args):
        _previous_unraisable_hook(args)


_previous_unraisable_hook = sys.unraisablehook


def _quiet_orbax() -> None:
    """Silence Orbax's failure reports (once, for the rest of the process: its background
    threads may report a failure after the call that raised it returned, even after ``close``)."""
    global _previous_unraisable_hook
    with _QUIET_LOCK:
        for name in _QUIET_LOGGERS:
            logger = logging.getLogger(name)
            if _QUIET not in logger.filters:
                logger.addFilter(_QUIET)
        if sys.unraisablehook is not _unraisable_hook:
            _previous_unraisable_hook = sys.unraisablehook
            sys.unraisablehook = _unraisable_hook
