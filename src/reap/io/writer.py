"""Writing checkpoints: safetensors files streamed one tensor at a time, JSON, the files copied as they are.

Memory stays bounded by the largest tensor: a tensor to write is an :class:`Entry` whose bytes are fetched when
the writer reaches it, or byte ranges of a stored file (a kept expert, rows of a router) copied kernel-side
(``copy_file_range``), ranges that continue each other merged into one copy. Finished files are flushed to disk
on a background thread (:class:`BackgroundSync`) while the next ones are written. Where the files go (a staging
folder beside the target, renamed into place) is :mod:`reap.io.staging`'s. No torch, except :func:`tensor_bytes`.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reap.io.checkpoint import WEIGHT_SUFFIXES, TensorInfo
from reap.core.errors import UserError
from reap.io.staging import write_text
from reap.io.headers import span_bytes

if TYPE_CHECKING:
    import torch


def tensor_bytes(t: torch.Tensor) -> bytes:
    """A CPU tensor's raw bytes (any dtype, including bf16 and fp8)."""
    import torch

    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


Ranges = tuple[tuple[int, int], ...]  # (file offset, length) byte ranges, concatenated in order


@dataclass(frozen=True)
class Entry:
    """One tensor to write: its bytes come from ``fetch()`` when the writer reaches it, or, when ``source`` is
    set, are the concatenated byte ranges of that file, copied kernel-side (no trip through Python)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    fetch: Callable[[], bytes] | None = None
    source: tuple[Path, Ranges] | None = None

    @classmethod
    def copy_of(cls, info: TensorInfo, root: Path, name: str | None = None) -> "Entry":
        return cls(name or info.name, info.dtype, info.shape, info.nbytes,
                   source=(root / info.shard, ((info.start, info.nbytes),)))

    @classmethod
    def rows_of(cls, info: TensorInfo, root: Path, rows: Sequence[int], name: str | None = None,
                axis: int = 0) -> "Entry":
        """The tensor's indices ``rows`` along ``axis`` (in that order) as a new tensor, straight from the stored
        bytes: router rows, correction-bias entries (``[1, E]`` along axis 1), experts of a fused [E, ...] tensor.
        Runs of consecutive byte ranges become one range."""
        if not info.shape:
            raise ValueError(f"{info.name} is a scalar; it has no rows to select")
        if not 0 <= axis < len(info.shape):
            raise ValueError(f"{info.name} has {len(info.shape)} dimensions; cannot select along axis {axis}")
        n = info.shape[axis]
        if any(not 0 <= r < n for r in rows):
            raise ValueError(f"{info.name} has {n} rows along axis {axis}; cannot select {list(rows)}")
        outer = 1
        for d in info.shape[:axis]:
            outer *= d
        row = info.nbytes // (outer * n)  # bytes of one index along axis (everything after it)
        ranges: list[list[int]] = []
        for o in range(outer):
            for r in rows:
                offset = info.start + (o * n + r) * row
                if ranges and ranges[-1][0] + ranges[-1][1] == offset:
                    ranges[-1][1] += row
                else:
                    ranges.append([offset, row])
        shape = (*info.shape[:axis], len(rows), *info.shape[axis + 1:])
        return cls(name or info.name, info.dtype, shape, row * len(rows) * outer,
                   source=(root / info.shard, tuple((o, k) for o, k in ranges)))


def _write_all(f, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[f.write(view):]


def _copy_range(src, offset: int, nbytes: int, dst) -> None:
    """Append nbytes of the open file src, starting at offset, to the open file dst."""
    left = nbytes
    if hasattr(os, "copy_file_range"):
        try:
            while left:
                n = os.copy_file_range(src.fileno(), dst.fileno(), left, offset + nbytes - left)
                if n == 0:
                    break
                left -= n
        except OSError:
            pass  # filesystem without support: the buffered copy below does the rest
    if left:
        src.seek(offset + nbytes - left)
        while left:
            chunk = src.read(min(left, 64 << 20))
            if not chunk:
                raise UserError(f"{src.name} ended early while copying; re-download that shard")
            _write_all(dst, chunk)
            left -= len(chunk)


def write_safetensors(path: Path, entries: Iterable[Entry], metadata: dict[str, str] | None = None,
                      fsync: bool = True) -> int:
    """Stream entries into a safetensors file, one tensor in memory at a time. Returns the data size.

    Byte ranges that continue each other in the same source file (kept experts stored side by side) are
    copied as one range. ``fsync=False`` leaves flushing to the caller (e.g. a :class:`BackgroundSync`).
    """
    entries = list(entries)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for e in entries:
        expected = span_bytes(e.dtype, e.shape)
        if expected != e.nbytes or (e.source is not None and sum(n for _, n in e.source[1]) != e.nbytes):
            raise ValueError(f"{e.name}: {e.nbytes} bytes for {e.dtype}{list(e.shape)} (expected {expected})")
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    sources: dict[Path, Any] = {}  # each source file opened once
    try:
        with open(path, "wb", buffering=0) as f:  # unbuffered: copy_file_range and write share the fd offset
            _write_all(f, struct.pack("<Q", len(blob)) + blob)
            run: list[Any] = []  # [source path, offset, length]: the byte range being extended

            def flush_run() -> None:
                if run:
                    src = run[0]
                    if src not in sources:
                        sources[src] = open(src, "rb")
                    _copy_range(sources[src], run[1], run[2], f)
                    run.clear()

            for e in entries:
                if e.source is not None:
                    for start, n in e.source[1]:
                        if run and run[0] == e.source[0] and run[1] + run[2] == start:
                            run[2] += n
                        else:
                            flush_run()
                            run.extend((e.source[0], start, n))
                    continue
                flush_run()
                data = e.fetch()
                if len(data) != e.nbytes:
                    raise ValueError(f"{e.name}: fetched {len(data)} bytes, header says {e.nbytes}")
                _write_all(f, data)
            flush_run()
            if fsync:
                os.fsync(f.fileno())
    except OSError as err:
        if err.filename is None:  # a failed write says which file (a full disk, a failing disk)
            raise OSError(err.errno, err.strerror or str(err), str(path)) from None
        raise
    finally:
        for src in sources.values():
            src.close()
    return offset


class BackgroundSync:
    """Flushes finished files to disk on a worker thread while the next ones are written (``fsync`` waits for
    the disk; overlapping it with the copying costs far less than a flush after each file).

    ``submit(path)`` queues a file (or directory); ``wait()`` returns once everything queued is on disk and
    re-raises the first failure. Use as a context manager; without ``enabled`` it does nothing (``--no-fsync``).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="reap-fsync", daemon=True) if enabled else None
        if self._thread is not None:
            self._thread.start()

    def _work(self) -> None:
        while (path := self._queue.get()) is not None:
            try:
                if self._error is None:
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            except BaseException as err:  # noqa: BLE001 - handed to the caller by wait()
                self._error = err
            finally:
                self._queue.task_done()

    def submit(self, path: Path) -> None:
        if self.enabled:
            self._queue.put(Path(path))

    def submit_tree(self, root: Path) -> None:
        """Every file below root, then the directories themselves (deepest first), so new names are durable."""
        if not self.enabled:
            return
        dirs = [Path(root)]
        for p in sorted(Path(root).rglob("*")):
            if p.is_dir():
                dirs.append(p)
            else:
                self.submit(p)
        for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
            self.submit(d)

    def wait(self) -> None:
        if self.enabled:
            self._queue.join()
            if self._error is not None:
                err, self._error = self._error, None
                raise UserError(f"flushing the output to disk failed ({err}); check the disk and run again") from None

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "BackgroundSync":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_json(path: Path, data: Any) -> None:
    """JSON written and flushed, its size checked (a full disk raises instead of leaving a short file)."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def other_files(model_dir: Path, skip: set[str]) -> list[Path]:
    """Files of the model directory to copy as they are (tokenizer, templates, code, license...).

    Skips names in ``skip`` (relative posix paths), weight files of any format, and VCS/cache folders.
    """
    found = []
    for p in sorted(model_dir.rglob("*")):
        rel = p.relative_to(model_dir)
        if any(part in (".git", ".cache", "__pycache__") for part in rel.parts):
            continue
        if p.is_dir() or rel.as_posix() in skip or p.name.endswith(WEIGHT_SUFFIXES):
            continue
        found.append(p)
    return found
