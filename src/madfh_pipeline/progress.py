"""Progress for long work: a tqdm bar on a terminal, log lines (done, rate, ETA) everywhere else.

Why both: a bar is what a person at a terminal wants, but under CI, nohup, a scheduler or a notebook's captured
output, tqdm either prints nothing (``disable=None`` off a TTY) or floods the log with carriage returns. There, one
log line every ``interval`` seconds — with the logger's time stamp, level and handlers, so it lands in ``info.log`` —
says that a 20-minute fit is still alive and when it will end.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

logger = logging.getLogger("madfh_pipeline.progress")

T = TypeVar("T")

#: Seconds between two progress lines in the log (the first after this long; the last when the work is done).
DEFAULT_INTERVAL = 30.0


def _on_terminal() -> bool:
    if os.environ.get("TQDM_DISABLE"):
        return False
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


class LogProgress:
    """A tqdm-like counter that reports through :mod:`logging` (``update``, ``close``, iteration)."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.desc = desc
        self.unit = unit
        self.interval = interval
        self.n = 0
        self.started = time.monotonic()
        self.last = self.started
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("LogProgress was created without an iterable.")
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:  # tqdm API; nothing to show between lines
        return None

    def _line(self, done: bool) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.n / elapsed
        if done:
            return f"{self.desc}: done, {self.n} {self.unit} in {elapsed:.0f} s ({rate:.2f} {self.unit}/s)"
        if self.total:
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            return (
                f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f} %), "
                f"{rate:.2f} {self.unit}/s, ETA {eta:.0f} s"
            )
        return f"{self.desc}: {self.n} {self.unit}, {rate:.2f} {self.unit}/s"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            logger.info("%s", self._line(done=False))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n:
                logger.info("%s", self._line(done=True))


def progress(
    iterable: Iterable[T] | None = None,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    leave: bool = True,
    interval: float = DEFAULT_INTERVAL,
) -> Any:
    """A tqdm bar when stderr is a terminal, else a :class:`LogProgress` that logs every ``interval`` seconds."""
    if _on_terminal():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, interval=interval)
