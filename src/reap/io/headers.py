"""Safetensors headers and shards checked as they are read, before anything is written: pure bytes, no torch.

* :func:`check_header` (every shard, when a :class:`reap.io.checkpoint.Checkpoint` opens it): the header is what
  the safetensors library accepts: known dtypes, shapes of non-negative integers, each tensor's byte span equal
  to its element count x item size, spans inside the file, contiguous and non-overlapping, the data region
  ending where the file ends;
* :func:`check_shards` (the directory): no tensor name in two shards, the index listing exactly what the
  shards hold;
* :data:`DTYPE_BITS`, :func:`span_bytes` and :func:`torch_dtypes`: the dtypes the format defines.

Every failure is a :class:`reap.core.errors.UserError` naming the tensor and the shard.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reap.core.errors import UserError

if TYPE_CHECKING:
    import torch

#: bits per element of every dtype the safetensors format defines (0.8: sub-byte floats included)
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
              "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "I64": 64, "U64": 64, "F64": 64,
              "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
_REDOWNLOAD = "the shard is damaged or was not written by a safetensors writer: re-download it"
_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                 "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "I64": "int64", "I32": "int32", "I16": "int16",
                 "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool"}


def torch_dtypes() -> dict[str, "torch.dtype"]:
    """safetensors dtype name -> torch dtype, for the dtypes this torch has (imports torch: call it where tensors
    are made; ``reap.io.checkpoint.DTYPES`` is the same table)."""
    import torch

    return {k: getattr(torch, v) for k, v in _TORCH_DTYPES.items() if hasattr(torch, v)}


def span_bytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int | None:
    """Bytes a tensor of ``dtype`` and ``shape`` occupies, or None for a size that is no whole number of bytes."""
    bits = DTYPE_BITS[dtype]
    n = 1
    for d in shape:
        n *= d
    return n * bits // 8 if n * bits % 8 == 0 else None


def check_header(path: Path, header: Any, data_start: int, size: int) -> None:
    """A parsed safetensors header of the file ``path`` (``size`` bytes, data from ``data_start``), as the safetensors
    library checks it before it hands out a tensor; UserError naming the tensor otherwise."""
    if not isinstance(header, dict):
        raise UserError(f"{path}: the header is a JSON {type(header).__name__}, not an object; {_REDOWNLOAD}")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise UserError(f"{path}: __metadata__ must map names to strings; {_REDOWNLOAD}")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {name} in {path}"
        if not isinstance(info, dict):
            raise UserError(f"{where}: its header entry is not an object; {_REDOWNLOAD}")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_BITS:
            raise UserError(f"{where} has dtype {dtype!r}, which safetensors does not define (known: "
                            f"{', '.join(DTYPE_BITS)}); {_REDOWNLOAD}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            raise UserError(f"{where} has shape {shape!r}; a shape is a list of non-negative integers; {_REDOWNLOAD}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
            raise UserError(f"{where} has data_offsets {offsets!r}; they must be two byte offsets; {_REDOWNLOAD}")
        begin, end = offsets
        if end < begin:
            raise UserError(f"{where} has reversed data_offsets [{begin}, {end}]; {_REDOWNLOAD}")
        need = span_bytes(dtype, shape)
        if need != end - begin:
            raise UserError(f"{where} spans {end - begin} bytes but {dtype}{shape} needs "
                            f"{need if need is not None else 'a fractional number of'} bytes; {_REDOWNLOAD}")
        spans.append((begin, end, name))
    spans.sort()
    position, previous = 0, None
    for begin, end, name in spans:
        if begin < position:
            raise UserError(f"tensor {name} in {path} overlaps tensor {previous} (bytes {begin}..{end} of the data "
                            f"region, {previous} ends at {position}); {_REDOWNLOAD}")
        if begin > position:
            raise UserError(f"{path} leaves {begin - position} bytes unaccounted for before tensor {name} "
                            f"(safetensors refuses such files); {_REDOWNLOAD}")
        position, previous = end, name
    if data_start + position > size:
        raise UserError(f"{path} is truncated: its header needs {data_start + position} bytes but the file has "
                        f"{size}; re-download that shard")
    if data_start + position < size:
        raise UserError(f"{path} has {size - data_start - position} bytes after its last tensor (safetensors refuses "
                        f"such files); {_REDOWNLOAD}")


def check_shards(root: Path, weight_map: Mapping[str, str], names: Mapping[str, set[str]]) -> None:
    """The shards of a directory together: ``names`` maps each shard to the tensors its header holds. No name in
    two shards; the index (``weight_map``) lists exactly what every shard holds."""
    where: dict[str, str] = {}
    for shard, held in names.items():
        for name in held:
            other = where.setdefault(name, shard)
            if other != shard:
                raise UserError(f"tensor {name} is stored in two shards, {other} and {shard}, of {root}; the download "
                                "mixes files of two versions: re-download the model")
    for shard, held in names.items():
        missing = sorted(n for n, s in weight_map.items() if s == shard and n not in held)
        if missing:
            raise UserError(f"the index names {len(missing)} tensor(s) in {shard} that the shard does not hold "
                            f"(e.g. {missing[0]}); the index and shards are from different downloads: re-download "
                            "the model")
    for shard, held in names.items():
        extra = sorted(n for n in held if weight_map.get(n) != shard)
        if extra:
            raise UserError(f"{shard} holds {len(extra)} tensor(s) that {root.name}'s index does not list there "
                            f"(e.g. {extra[0]}); the index and shards are from different downloads: re-download "
                            "the model")
