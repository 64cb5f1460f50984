"""User-facing errors, interrupts and signals.

A :class:`UserError` is a mistake the user can fix (bad flag, missing file, unsupported model). The CLI
prints its message on one line and exits with code 2; it is never shown as a traceback. Messages say what
is wrong *and* how to fix it. An ``OSError`` (disk full, read-only file system, permissions) is the user's
environment too: :func:`describe_os_error` turns it into such a line.

SIGTERM (what SLURM and Kubernetes send at a time limit) and SIGHUP (a closed terminal) are handled like
Ctrl-C (:func:`signals_as_interrupts`): they raise :class:`Terminated`, a ``KeyboardInterrupt``, so the same
cleanup runs (staging folders removed, locks released) and the process exits with 128 + the signal number.
"""

from __future__ import annotations

import difflib
import errno
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """A problem with the user's input; ``str(err)`` is a one-line message that carries the fix."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class Terminated(KeyboardInterrupt):
    """A termination signal (SIGTERM, SIGHUP), raised where the program was, so cleanup runs as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def interrupt_exit_code(err: KeyboardInterrupt) -> int:
    return err.exit_code if isinstance(err, Terminated) else 128 + signal.SIGINT


@contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Terminated` in the main thread (once: a second one during
    the cleanup is ignored). Outside the main thread, or where signals cannot be set, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    fired: list[int] = []

    def handler(signum, _frame):
        if fired:
            return
        fired.append(signum)
        raise Terminated(signum)

    previous = {}
    for s in wanted:
        try:
            previous[s] = signal.signal(s, handler)
        except (ValueError, OSError):  # pragma: no cover - not settable here
            pass
    try:
        yield
    finally:
        for s, old in previous.items():
            try:
                signal.signal(s, old)
            except (ValueError, OSError):  # pragma: no cover
                pass


_OS_FIXES = {
    errno.ENOSPC: "the disk is full: free space there or choose another place",
    errno.EDQUOT: "the disk quota is exhausted: free space there or choose another place",
    errno.EROFS: "the file system is read-only: choose a writable place",
    errno.EACCES: "permission denied: check the permissions of that path (and its folder)",
    errno.EPERM: "the operation is not permitted: check the permissions, and immutable attributes (`lsattr`; "
                 "`chattr -i` clears them)",
    errno.EIO: "the disk or network file system failed: check it and run again",
    errno.ENOENT: "the path does not exist (was it removed while reap ran?)",
    errno.EMFILE: "too many open files: raise the limit (`ulimit -n`)",
}


def describe_os_error(err: OSError) -> str:
    """One line for an OSError: what failed where, and what helps."""
    where = err.filename if err.filename is not None else ""
    if err.filename2 is not None:
        where = f"{where} -> {err.filename2}"
    what = err.strerror or str(err) or type(err).__name__
    fix = _OS_FIXES.get(err.errno or -1, "check the path and the disk, then run again")
    return f"{what}{f' ({where})' if where else ''}: {fix}"


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 expert', '3 experts' (``many`` for irregular plurals)."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def did_you_mean(word: object, choices) -> str | None:
    """The one of ``choices`` that ``word`` most likely misspells (case and ``-``/``_`` ignored), or None."""
    def norm(text: object) -> str:
        return str(text).strip().lower().replace("_", "-")

    by_norm = {norm(c): c for c in choices}
    if norm(word) in by_norm:
        return by_norm[norm(word)]
    close = difflib.get_close_matches(norm(word), list(by_norm), n=1, cutoff=0.6)
    return by_norm[close[0]] if close else None


def suggestion(word: object, choices) -> str:
    """``"did you mean 'reap'? "`` for a misspelled choice, or ""; for the middle of a one-line message."""
    near = did_you_mean(word, choices)
    return f"did you mean {near!r}? " if near is not None and near != word else ""
