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
* :func:`check_output_dir`: an output that is, holds or lies inside an input, or exists non-empty, is refused;
  with ``--overwrite`` an existing one is replaced only if reap wrote everything in it (:func:`foreign_entries`).

What ``--overwrite`` may replace: an empty folder, or a previous reap output: a folder whose ``reap_report.json`` is
reap's (a JSON object with ``"tool": "reap"`` and its ``layers``) and every file of which reap wrote: a file the
report's ``files`` list names (every file of the output, listed when it was published), or one that ``reap report``
writes into a pruned folder later (the pictures, the summary, the card). Anything else (a file the list does not
name, a symbolic link, a folder holding none of reap's files, an empty folder reap did not make) is the user's, and
the whole output is refused, naming it: reap never deletes a file it did not write. A report of a reap before the
``files`` list: its fixed names, the shards its index names, and the files the source it names holds at the same
path (the tokenizer and side files it copied). The check runs when the options are checked, again under the lock,
and again on the old folder itself after it was renamed away from ``--out`` (so nothing can be added to it through
that name any more), before the new output takes its place; only then is the old one deleted.
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
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from reap.core.errors import UserError
from reap.core.names import CARD_NAME, GENERATED, REPORT_NAME, STATS_NAME

OWNER_NAME = ".reap-staging.json"
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
    ``overwrite`` absent, empty or a previous reap output (:func:`foreign_entries` finds nothing in it). An existing
    target is first renamed aside (``.NAME.old-*``) and checked once more there, then the staging folder takes its
    name, and only then is the old folder deleted; if the check fails the old folder goes back where it was and
    nothing is published. With ``durable``, the rename is flushed too (the caller flushes the contents before
    leaving the block).
    """
    target = Path(target)
    tmp = target.parent / f".{target.name}.incomplete-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old = None
    try:
        (tmp / OWNER_NAME).write_text(json.dumps(owner_record()) + "\n")
        yield tmp
        _check_still_replaceable(target, target, overwrite)
        (tmp / OWNER_NAME).unlink(missing_ok=True)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            try:  # again where nothing can be added through --out's name any more
                _check_still_replaceable(old, target, overwrite)
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


def _check_still_replaceable(folder: Path, target: Path, overwrite: bool) -> None:
    """UserError unless ``folder`` (the target, or the target renamed aside) is absent, empty, or with
    ``overwrite`` reap's own output: something may have been written there since --out was checked."""
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
        return
    if not overwrite:
        raise UserError(f"--out {target} appeared while reap was writing it (another program wrote it); "
                        "nothing was published: choose another --out or pass --overwrite")
    if folder.is_symlink() or not folder.is_dir():
        raise UserError(f"--out {target} became a file or a link while reap was writing it; nothing was published and "
                        "nothing deleted: choose another --out")
    found = foreign_entries(folder)
    if found:
        raise UserError(f"--out {target} changed while reap was writing it: it holds files reap did not write "
                        f"({_listing(found)}); nothing was published and nothing deleted: choose another --out or "
                        "remove them")


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


def check_output_dir(out: Path, inputs: Iterable[Path], overwrite: bool) -> Path:
    """Refuse an output that is, or is inside, or contains an input, or exists non-empty: without ``overwrite``
    always, with it unless reap wrote everything in it (:func:`foreign_entries`; the module docstring says the rule)."""
    out = Path(out).expanduser().resolve()
    for src in inputs:
        src = Path(src).resolve()
        if out == src or src in out.parents:
            raise UserError(f"--out {out} is the input model directory or inside it; choose a directory elsewhere")
        if out in src.parents:
            raise UserError(f"--out {out} contains the input model {src}; choose a directory that does not")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out} exists and is a file; choose a new directory")
        if any(out.iterdir()):
            foreign = foreign_entries(out)
            if foreign:
                raise UserError(
                    f"--out {out}{_cwd_note(out)} holds files reap did not write ({_listing(foreign)}); reap replaces "
                    "only its own output or an empty folder, even with --overwrite: choose another --out or remove them")
            if not overwrite:
                raise UserError(f"--out {out} exists and is not empty (a previous reap output); choose a new directory "
                                "or pass --overwrite to replace it")
    if not out.parent.exists():
        raise UserError(f"the parent of --out ({out.parent}) does not exist; create it first")
    return out


def _cwd_note(path: Path) -> str:
    try:
        return " (the current directory)" if Path.cwd().resolve() == path else ""
    except OSError:  # the current directory was deleted
        return ""


def _listing(names: list[str], most: int = 6) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


# -- what --overwrite may replace -------------------------------------------------------------------------------
def reap_report(folder: Path) -> dict[str, Any] | None:
    """``folder``'s ``reap_report.json`` if reap wrote it (a regular file holding a JSON object with
    ``"tool": "reap"`` and a ``layers`` object), else None."""
    path = Path(folder) / REPORT_NAME
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("tool") != "reap" or not isinstance(data.get("layers"), dict):
        return None
    return data


def output_files(folder: Path) -> list[str]:
    """Every file under ``folder`` (relative POSIX paths, sorted), the staging owner record left out: what a pruned
    output records as its ``files`` in ``reap_report.json``."""
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*")
                  if p.is_file() and p.name != OWNER_NAME)


class _Owned:
    """Which paths of a previous output reap wrote, from its report (see the module docstring)."""

    def __init__(self, folder: Path, report: Mapping[str, Any]):
        later = {REPORT_NAME, CARD_NAME, *GENERATED}  # what `reap report DIR` (re)writes into a pruned folder
        files = report.get("files")
        self.source: Path | None = None
        if isinstance(files, list) and all(isinstance(f, str) for f in files):
            self.files = later | set(files)
        else:  # a reap before the list: the names it always writes, the shards its index names, copies of the source
            self.files = later | {"config.json", "model.safetensors.index.json", "hf_quant_config.json", STATS_NAME}
            try:
                weight_map = json.loads((folder / "model.safetensors.index.json").read_text(encoding="utf-8"))["weight_map"]
                self.files |= {v for v in weight_map.values() if isinstance(v, str)}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass
            source = report.get("source")
            if isinstance(source, str) and source and Path(source).is_dir():
                self.source = Path(source)
        self.dirs = {"/".join(parts[:i]) for f in self.files for parts in [f.split("/")] for i in range(1, len(parts))}

    def file(self, rel: str) -> bool:
        return rel in self.files or (self.source is not None and (self.source / rel).is_file()
                                     and not (self.source / rel).is_symlink())

    def may_hold(self, rel: str) -> bool:
        return rel in self.dirs or (self.source is not None and (self.source / rel).is_dir())


def foreign_entries(folder: Path) -> list[str]:
    """What in ``folder`` reap did not write (relative paths, folders with a trailing ``/``): [] for an empty folder
    or a previous reap output, which ``--overwrite`` may replace; everything in it when it has no reap report. A
    folder holding none of reap's files is named as a whole, symbolic links are never reap's."""
    folder = Path(folder)
    report = reap_report(folder)
    if report is None:
        return sorted(e.name + ("/" if e.is_dir(follow_symlinks=False) else "") for e in os.scandir(folder))
    owned = _Owned(folder, report)
    found: list[str] = []

    def visit(path: str, prefix: str) -> bool:
        """Add the foreign entries under path to found; whether it holds any of reap's files."""
        own = False
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            rel = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                if owned.may_hold(rel):
                    mark = len(found)
                    if visit(entry.path, rel + "/"):
                        own = True
                        continue
                    del found[mark:]  # none of reap's files in it: named as a whole
                found.append(rel + "/")
            elif entry.is_file(follow_symlinks=False) and owned.file(rel):
                own = True
            else:
                found.append(rel)
        return own

    visit(str(folder), "")
    return found
