"""The model directory as files, for reading: config, index, shard headers, tensors and their raw bytes.

Knows nothing about experts. Reading is lazy: shard headers are parsed (and checked against the file
size and the index) up front, tensors are read one at a time. The index is the truth about shard names:
they are never derived from a pattern (released checkpoints have zero-based names with a wrong
"-of-N"). Every shard header is validated as it is read (:mod:`reap.model.validate`). Writing is
:mod:`reap.io.writer`'s.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reap.core.errors import UserError
from reap.io.headers import DTYPE_BITS, check_header, check_shards, torch_dtypes

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# weight files of other formats: never copied into a pruned output (they would hold unpruned weights)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")

#: bytes per element of the whole-byte safetensors dtypes (reap.model.validate.DTYPE_BITS has every dtype)
ITEMSIZE = {k: v // 8 for k, v in DTYPE_BITS.items() if v % 8 == 0}


def __getattr__(name: str) -> Any:
    """``DTYPES`` (safetensors name -> torch dtype) and ``DTYPE_NAMES`` (the reverse), built on first use so that
    copying a checkpoint (``reap prune --keep``, ``reap inspect``) never pays for importing torch."""
    if name in ("DTYPES", "DTYPE_NAMES"):
        dtypes = torch_dtypes()
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
    safetensors library checks it (:func:`reap.io.headers.check_header`: dtypes, byte spans, the file size)."""
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
