"""The model directory as files: config, index, shards, tensors and their raw bytes; atomic writing.

Knows nothing about experts. Reading is lazy: shard headers are parsed (and checked against the file
size and the index) up front, tensors are read one at a time. The index is the truth about shard names:
they are never derived from a pattern (released checkpoints have zero-based names with a wrong
"-of-N"). Writing streams one tensor at a time into a safetensors file, so memory stays bounded by the
largest tensor: stored tensors (or rows of them) are copied as byte ranges kernel-side, ranges that continue
each other merged into one copy; finished files are flushed on a background thread (:class:`BackgroundSync`);
a whole output directory is built beside its target and renamed into place (:mod:`reap.staging`). Every shard
header is validated as it is read (:mod:`reap.validate`).
"""

from __future__ import annotations

import json
import os
import queue
import re
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reap.errors import UserError
from reap.staging import atomic_directory, write_text  # noqa: F401 - atomic_directory: part of this module's API
from reap.validate import DTYPE_BITS, check_header, check_shards, span_bytes

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# weight files of other formats: never copied into a pruned output (they would hold unpruned weights)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")

#: bytes per element of the whole-byte safetensors dtypes (reap.validate.DTYPE_BITS has every dtype)
ITEMSIZE = {k: v // 8 for k, v in DTYPE_BITS.items() if v % 8 == 0}


_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                 "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "I64": "int64", "I32": "int32", "I16": "int16",
                 "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool"}


def __getattr__(name: str) -> Any:
    """``DTYPES`` (safetensors name -> torch dtype) and ``DTYPE_NAMES`` (the reverse), built on first use so that
    copying a checkpoint (``reap prune --keep``, ``reap inspect``) never pays for importing torch."""
    if name in ("DTYPES", "DTYPE_NAMES"):
        import torch

        dtypes = {k: getattr(torch, v) for k, v in _TORCH_DTYPES.items() if hasattr(torch, v)}
        globals().update(DTYPES=dtypes, DTYPE_NAMES={v: k for k, v in dtypes.items()})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: shard file, dtype name (safetensors spelling), shape, byte range in the file."""

    name: str
    shard: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header; returns (header dict, offset of the data section). The header is checked as the
    safetensors library checks it (:func:`reap.validate.check_header`: dtypes, byte spans, the file size)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ValueError("file shorter than 8 bytes")
            (hlen,) = struct.unpack("<Q", raw_len)
            if hlen > min(size - 8, 100_000_000):
                raise ValueError(f"header length {hlen} exceeds the file")
            header = json.loads(f.read(hlen))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({err}); re-download that shard") from None
    data_start = 8 + hlen
    check_header(path, header, data_start, size)
    return header, data_start


def hub_id(path: str | os.PathLike[str]) -> str | None:
    """'org/name' when ``path`` is (inside) a Hugging Face cache snapshot (``models--org--name/snapshots/<hash>``)."""
    m = re.search(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots(?:[/\\]|$)", str(path))
    return f"{m[1]}/{m[2]}" if m else None


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """A local directory, or a Hugging Face id resolved from the local cache (never downloads)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise UserError(f"{model} is a file, not a model directory; pass the directory that holds config.json")
    text = str(model)
    looks_like_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and " " not in text
    if looks_like_id:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, local_files_only=True))
        except Exception:  # noqa: BLE001 - any failure here means "not in the cache"
            pass
        raise UserError(
            f"model {text!r} is not a local directory and is not in the local Hugging Face cache "
            f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}); download it first with "
            f"`hf download {text}` or pass the path of a model directory"
        )
    raise UserError(f"model directory {text} does not exist; pass the directory that holds config.json")


class Checkpoint:
    """A sharded (or single-file) safetensors model directory, validated on open, read lazily."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = resolve_model(path)
        self.config = self._read_config()
        self.weight_map = self._read_weight_map()
        # shards in first-appearance order of the index
        self.shards: list[str] = list(dict.fromkeys(self.weight_map.values()))
        self.infos: dict[str, TensorInfo] = {}
        self._shard_meta: dict[str, dict[str, str]] = {}
        missing = [shard for shard in self.shards if not (self.path / shard).is_file()]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise UserError(f"{len(missing)} of the {len(self.shards)} shards named by the index are missing from "
                            f"{self.path} ({', '.join(missing[:3])}{more}); the download is incomplete: download them "
                            "again")
        held = {shard: self._index_shard(shard) for shard in self.shards}
        check_shards(self.path, self.weight_map, held)
        self._handles: dict[str, Any] = {}

    @property
    def name(self) -> str:
        """How logs name the model: ``org/name`` for a Hugging Face cache snapshot, else the directory's name."""
        return hub_id(self.path) or self.path.name

    # -- opening -----------------------------------------------------------------------------------
    def _read_config(self) -> dict[str, Any]:
        cfg = self.path / CONFIG_NAME
        if not cfg.is_file():
            raise UserError(f"{self.path} has no config.json; pass a Hugging Face model directory")
        try:
            config = json.loads(cfg.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise UserError(f"{cfg} is not valid JSON ({err}); restore the original config.json") from None
        if not isinstance(config, dict):
            raise UserError(f"{cfg} is not a JSON object; restore the original config.json")
        return config

    def _read_weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                data = json.loads(index.read_text())
                weight_map = data["weight_map"]
                assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
            except (ValueError, KeyError, AssertionError, TypeError):
                raise UserError(f"{index} is not a valid safetensors index (no weight_map); re-download it") from None
            for shard in set(weight_map.values()):
                if "/" in shard or "\\" in shard or shard.startswith("."):
                    raise UserError(f"{index} names shard {shard!r} outside the model directory; fix the index")
            return dict(weight_map)
        single = self.path / SINGLE_NAME
        if single.is_file():
            header, _ = read_header(single)
            return {k: SINGLE_NAME for k in header if k != "__metadata__"}
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
            raise UserError(
                f"{self.path} holds only pickle weights (.bin/.pt); reap reads safetensors only: convert the "
                "model with transformers (`save_pretrained(..., safe_serialization=True)`) first"
            )
        raise UserError(f"{self.path} has neither {INDEX_NAME} nor {SINGLE_NAME}; pass a safetensors model directory")

    def _index_shard(self, shard: str) -> set[str]:
        """Read one shard's (validated) header; returns the tensor names it holds."""
        header, data_start = read_header(self.path / shard)
        self._shard_meta[shard] = header.get("__metadata__") or {}
        names = set()
        for name, info in header.items():
            if name == "__metadata__":
                continue
            names.add(name)
            if self.weight_map.get(name) == shard:
                begin, end = info["data_offsets"]
                self.infos[name] = TensorInfo(name, shard, info["dtype"], tuple(info["shape"]), data_start + begin,
                                              data_start + end)
        return names

    # -- reading -----------------------------------------------------------------------------------
    def shard_tensors(self, shard: str) -> list[TensorInfo]:
        """The index's tensors of one shard, in file order."""
        return sorted((i for i in self.infos.values() if i.shard == shard), key=lambda i: i.start)

    def shard_metadata(self, shard: str) -> dict[str, str]:
        return dict(self._shard_meta.get(shard, {}))

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor as stored (dtype kept), read via a memory map of its shard."""
        from safetensors import safe_open

        info = self.infos[name]
        handle = self._handles.get(info.shard)
        if handle is None:
            handle = safe_open(str(self.path / info.shard), framework="pt", device="cpu")
            self._handles[info.shard] = handle
        return handle.get_tensor(name)

    def integers(self, name: str):
        """An integer tensor's values (numpy, flat) read from its stored bytes, without torch (expert-id tables,
        compressed-tensors ``weight_shape``); UserError for a non-integer dtype."""
        import numpy as np

        info = self.infos[name]
        dtype = {"I64": np.int64, "I32": np.int32, "I16": np.int16, "U8": np.uint8, "I8": np.int8}.get(info.dtype)
        if dtype is None:
            raise UserError(f"{name} is an expert-id table stored as {info.dtype}; reap renumbers integer tables")
        with open(self.path / info.shard, "rb") as f:
            f.seek(info.start)
            return np.frombuffer(f.read(info.nbytes), dtype=dtype)

    def load(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """A weight ready for compute: FP8 block-quantized weights are dequantized with their scale."""
        import torch

        from reap.formats import FP8_BLOCK, dequantize

        t = self.tensor(name).to(device, non_blocking=True)
        scale_name = name + "_scale_inv"
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and scale_name in self.infos:
            scale = self.tensor(scale_name).to(device, non_blocking=True)
            return dequantize({"values": t, "scale": scale}, FP8_BLOCK, dtype or torch.bfloat16, self.config, name)
        return t.to(dtype) if dtype is not None else t

    def close(self) -> None:
        self._handles.clear()

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())


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


def check_output_dir(out: Path, inputs: Iterable[Path], overwrite: bool) -> Path:
    """Refuse an output that is, or is inside, or contains an input, or exists non-empty (unless overwrite)."""
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
        if any(out.iterdir()) and not overwrite:
            raise UserError(f"--out {out} exists and is not empty; choose a new directory or pass --overwrite")
    if not out.parent.exists():
        raise UserError(f"the parent of --out ({out.parent}) does not exist; create it first")
    return out


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
