"""Progress for people and for log files.

On a terminal, a tqdm bar (one per level: the calibration's layers, the streamer's tokens within a layer). When
stderr is a file or a pipe (a batch job's log), no bar: a plain line now and then (every 10% or 30 seconds, and at
the end), so logs never fill with carriage returns or cursor-movement codes.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any


def use_bars() -> bool:
    """True when stderr is an interactive terminal that can draw bars."""
    try:
        return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


#: the log lines ``--quiet`` still shows: warnings, and notices of what reap did or chose on its own (leftovers of an
#: interrupted run removed, a stale lock taken over, a criterion's fallback, modules left out of the output). A line
#: is one of them when it starts with one of these; everything else (plans, progress, status) is dropped.
NOTICES = ("warning:", "note:", "removed ", "greedy-rerouted:", "left out ", "expert-id tables")


def quiet_log(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` for ``--quiet``: only warnings and notices (:data:`NOTICES`) pass; errors and the command's result do
    not go through a log at all."""

    def notices(msg: str) -> None:
        if msg.lstrip().lower().startswith(NOTICES):
            log(msg)

    return notices


class Progress:
    """A counter towards ``total`` shown as a bar on a terminal, as occasional lines elsewhere, or not at all.

    ``scale`` divides the counted amount for display (bytes shown as MiB: ``scale=2**20, unit="MiB"``).
    """

    def __init__(self, total: float, desc: str, unit: str = "", enabled: bool = True, scale: float = 1.0,
                 log: Callable[[str], None] | None = None, every: float = 30.0, leave: bool = True):
        self.total, self.desc, self.unit, self.scale = total, desc, unit, scale
        self.enabled = enabled
        self.log = log or _say
        self.every = every
        self.done = 0.0
        self.postfix = ""
        self._bar = None
        self._start = self._last = time.monotonic()
        self._last_frac = 0.0
        if enabled and use_bars():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total / scale, desc=desc, unit=unit, file=sys.stderr, leave=leave,
                             bar_format=None if scale == 1 else
                             "{l_bar}{bar}| {n:.1f}/{total:.1f} " + unit + " [{elapsed}<{remaining}, {rate_fmt}{postfix}]")

    def update(self, n: float = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n / self.scale)
            return
        if not self.enabled:
            return
        now = time.monotonic()
        frac = self.done / self.total if self.total else 1.0
        if (frac - self._last_frac >= 0.1 and now - self._last >= min(5.0, self.every)) or now - self._last >= self.every:
            self._line()
            self._last, self._last_frac = now, frac

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{v} {k}" for k, v in values.items())
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def _line(self) -> None:
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        amount = f"{self.done / self.scale:.1f}/{self.total / self.scale:.1f} {self.unit}" if self.scale != 1 else \
            f"{self.done:g}/{self.total:g}"
        self.log(f"{self.desc}: {amount}{pct}, {time.monotonic() - self._start:.1f} s"
                 + (f", {self.postfix}" if self.postfix else ""))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self._last_frac < 1.0 and self.done:
            self._line()
            self._last_frac = 1.0

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
