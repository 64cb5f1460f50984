"""Writing an output directory safely: one writer per target, a staging folder beside it, nothing half-written
ever published.

* :class:`OutputLock`: ``.OUT.lock`` beside the target, created exclusively (hard-linked into place, so it never
  exists half-written), holding the owner's process id, host and start time; released on exit. A lock whose owner
  is gone (same host, process id not running, or running but started later: a reused id) is stale and taken over.
* :func:`atomic_directory`: the output is built in ``.OUT.incomplete-<pid>-<random>`` beside the target, which
  holds an owner record (``.reap-staging.json``) until it is published; on any error or interrupt it is removed;
  just before the rename the target is checked again (it must not have appeared meanwhile, unless overwriting).
* :func:`clean_stale`: staging folders of runs that died (kill -9, a crash, a node lost) are removed at the next
  run beside the same target, and reported; leftovers of a running process or another host are reported only.
* :func:`check_free_space`, :func:`write_text`, :func:`check_complete`: bytes needed against bytes free before the
  first byte is written; side files written, flushed and size-checked; no empty or short file in an output.

What an existing ``--out`` holds and whether reap may replace it (``--overwrite``) is :mod:`reap.io.outputs`'s;
:func:`atomic_directory` asks it again just before publishing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from reap.core.errors import UserError
from reap.io.outputs import OWNER_NAME, check_still_replaceable

_BLOCK = 4096  # file systems allocate whole blocks: a per-file allowance in the space estimate


# -- who owns a lock or a staging folder ----------------------------------------------------------------------
def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def owner_record() -> dict[str, Any]:
    """This process: id, host, start time (for a reused id), when, and the command line."""
    import shlex

    return {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": shlex.join(["reap", *sys.argv[1:]])}


def owner_alive(record: Mapping[str, Any]) -> bool | None:
    """True if the recorded process still runs, False if it is gone, None if it cannot be told (another host)."""
    if record.get("host") not in (None, socket.gethostname()):
        return None
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it runs
    except OSError:
        return None
    start = record.get("proc_start")
    now = _proc_start(pid)
    return not (isinstance(start, int) and now is not None and now != start)  # a reused id is another process


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _who(record: Mapping[str, Any]) -> str:
    host = record.get("host")
    here = host in (None, socket.gethostname())
    return f"pid {record.get('pid')}" + ("" if here else f" on {host}") + f", started {record.get('since', '?')}"


# -- one writer per target --------------------------------------------------------------------------------------
class OutputLock:
    """An exclusive lock on an output path (a file beside it), released on exit; see the module docstring."""

    def __init__(self, target: Path, log: Callable[[str], None] | None = None):
        self.target = Path(target)
        self.path = self.target.parent / f".{self.target.name}.lock"
        self.log = log or (lambda _msg: None)
        self.record: dict[str, Any] | None = None

    def acquire(self) -> "OutputLock":
        record = owner_record()
        for _attempt in range(3):
            if self._create(record):
                self.record = record
                return self
            held = _read_record(self.path)
            if held is None:  # unreadable: written by something else, or emptied by a full disk
                age = time.time() - self.path.stat().st_mtime if self.path.exists() else 0.0
                if age < 10:
                    continue
                self.log(f"removed an unreadable lock {self.path} ({age:.0f} s old)")
            else:
                alive = owner_alive(held)
                if alive is None or alive:
                    raise UserError(
                        f"another reap ({_who(held)}: {held.get('command', '?')}) is writing --out {self.target}; "
                        "wait for it to finish or choose another --out"
                        + ("" if alive else f" (if no reap runs there any more, delete {self.path})"))
                self.log(f"removed a stale lock of {_who(held)}, which no longer runs: {self.path}")
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        raise UserError(f"could not take the lock {self.path} (it keeps changing); is another reap writing "
                        f"{self.target}? wait for it, or delete {self.path}")

    def _create(self, record: dict[str, Any]) -> bool:
        """Put the lock file in place atomically; False if one exists."""
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(record) + "\n")
        try:
            os.link(tmp, self.path)  # fails if the lock exists; never visible half-written
            return True
        except FileExistsError:
            return False
        except OSError as err:  # file systems without hard links: an exclusive create
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record) + "\n")
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if self.record is None:
            return
        held = _read_record(self.path)
        if held is not None and held.get("pid") == self.record["pid"] and held.get("host") == self.record["host"]:
            self.path.unlink(missing_ok=True)
        self.record = None

    def __enter__(self) -> "OutputLock":
        return self if self.record is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# -- staging folders --------------------------------------------------------------------------------------------
def staging_folders(target: Path) -> list[Path]:
    """Leftover staging (``.OUT.incomplete-*``) folders beside ``target``."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    return sorted(p for p in target.parent.glob(f".{target.name}.incomplete-*") if p.is_dir())


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def clean_stale(target: Path, log: Callable[[str], None]) -> list[Path]:
    """Remove the staging folders beside ``target`` whose owner is gone (reported); report the others. Returns the
    folders removed. Call it holding the target's :class:`OutputLock`."""
    from reap.core.humanize import human_bytes

    removed = []
    for folder in staging_folders(target):
        record = _read_record(folder / OWNER_NAME)
        if record is None:  # an older reap, or the record already removed on the way to publishing
            pid = folder.name.rpartition(".incomplete-")[2].partition("-")[0]
            record = {"pid": int(pid)} if pid.isdigit() else {}
        alive = owner_alive(record) if record else False
        if record.get("pid") == os.getpid() and record.get("host") in (None, socket.gethostname()):
            continue  # this process's own
        if alive is False:
            size = _size(folder)
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
            who = _who(record) if record.get("pid") else "an older reap"
            log(f"removed {folder} ({human_bytes(size)}), left by an interrupted run ({who})")
        else:
            log(f"note: {folder} belongs to " + (f"a running reap ({_who(record)})" if alive else
                                                f"a reap on another host ({_who(record)})")
                + "; left as it is (delete it once that run is over)")
    for old in sorted(Path(target).parent.glob(f".{Path(target).name}.old-*")):
        log(f"note: {old} is the previous {Path(target).name} of an --overwrite that was interrupted while swapping; "
            "delete it, or rename it back if the new output is missing")
    return removed


@contextmanager
def atomic_directory(target: Path, durable: bool = True, overwrite: bool = True) -> Iterator[Path]:
    """Yield a staging directory beside target; on success it replaces target, on error it is removed.

    The staging name starts with a dot and says ``incomplete`` and the owner's process id, so an interrupted run
    never leaves a directory that looks like a finished model, and the next run can tell it is stale. Just before
    the rename the target is checked again: without ``overwrite`` it must still be absent or empty, with
    ``overwrite`` absent, empty or a previous reap output (:func:`reap.io.outputs.foreign_entries` finds nothing
    in it). An existing target is first renamed aside (``.NAME.old-*``) and checked once more there, then the
    staging folder takes its name, and only then is the old folder deleted; if the check fails the old folder goes
    back where it was and nothing is published. With ``durable``, the rename is flushed too (the caller flushes the
    contents before leaving the block).
    """
    target = Path(target)
    tmp = target.parent / f".{target.name}.incomplete-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old = None
    try:
        (tmp / OWNER_NAME).write_text(json.dumps(owner_record()) + "\n")
        yield tmp
        check_still_replaceable(target, target, overwrite)
        (tmp / OWNER_NAME).unlink(missing_ok=True)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            try:  # again where nothing can be added through --out's name any more
                check_still_replaceable(old, target, overwrite)
            except BaseException:
                os.replace(old, target)
                old = None
                raise
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None and not target.exists():
                os.replace(old, target)  # the previous output back where it was
                old = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if durable:
        fsync_dir(target.parent)  # the rename itself survives a crash (a no-op where directories cannot be synced)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- space, side files, completeness ------------------------------------------------------------------------------
def check_free_space(folder: Path, need: int, what: str) -> None:
    """UserError unless the file system holding ``folder`` has ``need`` bytes free (for the user running reap)."""
    from reap.core.humanize import human_bytes

    free = shutil.disk_usage(folder).free
    if need > free:
        raise UserError(f"{what} needs about {human_bytes(need)} but the file system of {folder} has "
                        f"{human_bytes(free)} free; free {human_bytes(need - free)} or more, or choose another place")


def estimate_bytes(sizes: list[int]) -> int:
    """Disk space for files of these sizes (each rounded up to whole blocks)."""
    return sum(-(-s // _BLOCK) * _BLOCK + _BLOCK for s in sizes)


def write_text(path: Path, text: str, durable: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path``, flushed (and with ``durable`` synced), then check the size on disk: a
    full disk raises instead of leaving a short or empty file."""
    data = text.encode("utf-8")
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
    except OSError as err:
        if err.filename is None:  # say which file could not be written
            raise OSError(err.errno, err.strerror or str(err), str(path)) from None
        raise
    check_size(path, len(data))
    return path


def check_size(path: Path, expected: int) -> None:
    size = Path(path).stat().st_size
    if size != expected:
        raise OSError(errno.EIO, f"wrote {size} of {expected} bytes (is the disk full?)", str(path))


def check_complete(folder: Path, copied: Mapping[str, int]) -> None:
    """Every file of ``folder`` is whole before it is published: a copied file (relative path -> source size) as
    large as its source, every other file non-empty. OSError otherwise (a full disk or a failing file system)."""
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name == OWNER_NAME:
            continue
        rel = p.relative_to(folder).as_posix()
        size = p.stat().st_size
        if rel in copied and size != copied[rel]:
            raise OSError(errno.EIO, f"copied {size} of {copied[rel]} bytes (is the disk full?)", str(p))
        if rel not in copied and size == 0:
            raise OSError(errno.EIO, "the file is empty after writing it (is the disk full?)", str(p))
