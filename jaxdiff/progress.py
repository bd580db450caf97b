"""Progress of the command's long loops: a tqdm bar (elapsed time, time left, rate and the
caller's numbers) when the stream is a terminal, plain lines otherwise (a log file, a pipe, a
notebook cell), at most one per ``every`` seconds and always the last, so that a log stays
short and readable."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from jaxdiff.runlog import duration

__all__ = ["Progress", "interactive"]


def interactive(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stderr) is a terminal a bar can redraw."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """``total`` units of work (None: unknown), ``initial`` of them done already.

    ``update(n, **numbers)`` adds ``n`` units and shows ``numbers`` (loss, img/s) beside the
    count; ``write(message)`` prints a line without breaking the bar. ``bar=None`` picks a bar
    for a terminal and plain lines otherwise. The clock (elapsed time, rate, time left) starts
    at the first unit done: the compilation before it counts as neither."""

    def __init__(
        self,
        total: int | None,
        *,
        desc: str,
        unit: str = "step",
        initial: int = 0,
        stream: TextIO | None = None,
        bar: bool | None = None,
        every: float = 10.0,
    ):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.desc, self.unit = total, desc, unit
        self.done, self.every = initial, every
        self.start = self._last = time.perf_counter()
        self.initial = initial
        self.numbers: dict[str, str] = {}
        self._started = False
        self._bar = None
        if interactive(self.stream) if bar is None else bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                file=self.stream,
                dynamic_ncols=True,
                leave=True,
            )

    def update(self, n: int = 1, **numbers) -> None:
        if n and not self._started:  # the clock starts here: compiling is not progress
            self._started = True
            self.start = self._last = time.perf_counter()
            self.initial = self.done + n  # the rate counts the units after the clock started
            if self._bar is not None:
                self._bar.unpause()
        self.done += n
        if numbers:
            self.numbers = {k: _fmt(v) for k, v in numbers.items()}
        if self._bar is not None:
            if numbers:
                self._bar.set_postfix(self.numbers, refresh=False)
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last >= self.every or self.done == self.total:
            self._last = now
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        of = f"/{self.total}" if self.total is not None else ""
        parts = [f"{self.desc}: {self.done}{of} {self.unit}s"]
        parts += [f"{k} {v}" for k, v in self.numbers.items()]
        parts.append(f"{duration(elapsed)} elapsed")
        if self.total is not None and self.done > self.initial:
            rate = (self.done - self.initial) / max(elapsed, 1e-9)
            parts.append(f"{duration((self.total - self.done) / rate)} left")
        print(", ".join(parts), file=self.stream, flush=True)

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
