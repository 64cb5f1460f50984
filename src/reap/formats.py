"""Weight formats: how a logical tensor is stored, and how to get it back for compute.

A checkpoint stores each logical tensor (a *base*, named as transformers would name the unquantized weight on
disk) as one or more stored tensors: the base itself, or quantized values plus companions (scales). A
:class:`Format` says which stored names belong to a base (its *parts*), how many parameters a stored tensor
holds, and how to dequantize the parts on the compute device. Surgery never dequantizes: it slices every part
of an expert with the same rule (see :mod:`reap.arch`), so quantized bytes and scales are copied as stored.

Formats known here (the registry :data:`FORMATS`, one object each):

* ``dense``      bf16 / fp16 / fp32 tensors (every checkpoint has some: norms, embeddings);
* ``fp8-block``  ``X.weight`` float8_e4m3fn + ``X.weight_scale_inv`` float32, one scale per block of
                 ``quantization_config.weight_block_size`` (128x128 in MiniMax-M2, DeepSeek-V3, Qwen3-FP8);
* ``mxfp4``      ``X_blocks`` uint8 [..., G, 16] (two FP4 e2m1 codes per byte) + ``X_scales`` uint8 [..., G]
                 (a power of two per group of 32), the base ``X`` itself is not stored (gpt-oss experts).

Legend: O output features, I input features, E experts, G groups of 32 values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reap.errors import UserError

if TYPE_CHECKING:
    import torch

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


@dataclass(frozen=True)
class Format:
    """One way of storing a logical tensor. ``parts`` maps a stored-name suffix to the part it holds ("values"
    for the quantized payload, else a companion); ``base_suffix`` is what the base name ends with where the
    payload replaces it (MXFP4 stores ``X_blocks`` for the base ``X``)."""

    name: str
    parts: tuple[tuple[str, str], ...]  # (suffix appended to the base name, part)
    description: str

    def split(self, stored: str) -> tuple[str, str] | None:
        """``stored`` -> (base name, part) when it is a part of this format, else None."""
        for suffix, part in self.parts:
            if suffix and stored.endswith(suffix):
                return stored[: -len(suffix)], part
        return None


DENSE = Format("dense", (("", "values"),), "unquantized bf16/fp16/fp32")
FP8_BLOCK = Format("fp8-block", (("_scale_inv", "scale"), ("", "values")),
                   "FP8 e4m3 with one float32 scale per weight_block_size block (weight_scale_inv)")
MXFP4 = Format("mxfp4", (("_blocks", "values"), ("_scales", "scale")),
               "MXFP4: FP4 e2m1 pairs in uint8 _blocks, a power-of-two _scales byte per 32 values")

#: Every format reap reads. A new one is one entry here plus its dequantization in :func:`dequantize`.
FORMATS: tuple[Format, ...] = (FP8_BLOCK, MXFP4, DENSE)

#: ``quantization_config.quant_method`` values reap reads, and the format they store experts in.
QUANT_METHODS = {"fp8": FP8_BLOCK, "mxfp4": MXFP4}


def checkpoint_format(config: dict[str, Any]) -> Format:
    """The quantized format a ``config.json`` declares (dense when it declares none); UserError for one reap
    cannot read, naming what it reads."""
    quant = config.get("quantization_config")
    if not quant:
        return DENSE
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method not in QUANT_METHODS:
        known = ", ".join(f"{k} ({v.description})" for k, v in QUANT_METHODS.items())
        raise UserError(f"config.json declares quantization {method!r}, which reap cannot read; reap reads "
                        f"unquantized checkpoints and {known}")
    if method == "fp8" and quant.get("fmt", "float8_e4m3fn") not in ("float8_e4m3fn", "e4m3"):
        raise UserError(f"config.json declares FP8 format {quant.get('fmt')!r}; reap reads float8_e4m3fn blocks")
    return QUANT_METHODS[method]


def group_parts(names, fmt: Format) -> dict[str, dict[str, str]]:
    """Stored tensor names -> {base name: {part: stored name}}. A stored name that is no companion of ``fmt`` is
    the values of its own base (a bf16 norm in an FP8 checkpoint is a base without a scale)."""
    groups: dict[str, dict[str, str]] = {}
    for name in names:
        hit = fmt.split(name) if fmt is not DENSE else None
        if hit is None:  # FP8 values keep the base name itself
            groups.setdefault(name, {})["values"] = name
        else:
            groups.setdefault(hit[0], {})[hit[1]] = name
    if fmt is MXFP4:
        # a base with only a scale would be a broken checkpoint; a plain tensor ending in _scales stays itself
        for base in [b for b, p in groups.items() if set(p) == {"scale"}]:
            groups[base + "_scales"] = {"values": groups.pop(base)["scale"]}
    return groups


def stored_params(name: str, dtype: str, numel: int, fmt: Format) -> int:
    """Parameters a stored tensor holds: scales hold none, MXFP4 blocks two per byte, the rest one per element."""
    hit = fmt.split(name) if fmt is not DENSE else None
    if hit is not None and hit[1] == "scale":
        return 0
    if fmt is MXFP4 and hit is not None and hit[1] == "values" and dtype == "U8":
        return 2 * numel
    return numel


def dequantize(parts: dict[str, "torch.Tensor"], fmt: Format, dtype: "torch.dtype", config: dict[str, Any],
               name: str = "") -> "torch.Tensor":
    """The logical tensor from its stored parts (already on the compute device), in ``dtype``."""
    import torch

    values = parts["values"]
    if "scale" not in parts:
        return values.to(dtype)
    if fmt is FP8_BLOCK:
        if values.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise UserError(f"{name}: a weight_scale_inv companion on a {values.dtype} tensor; the checkpoint is broken")
        block = (config.get("quantization_config") or {}).get("weight_block_size") or (128, 128)
        return dequantize_blocks(values, parts["scale"], dtype, (int(block[0]), int(block[1])))
    if fmt is MXFP4:
        return dequantize_mxfp4(values, parts["scale"], dtype)
    raise AssertionError(f"no dequantization for format {fmt.name}")  # pragma: no cover - registry error


def dequantize_blocks(weight: "torch.Tensor", scale_inv: "torch.Tensor", dtype: "torch.dtype",
                      block_size: tuple[int, int] = (128, 128)) -> "torch.Tensor":
    """FP8 weight [..., O, I] x per-block scale [..., ceil(O/bo), ceil(I/bi)] -> dequantized weight in dtype.

    ``block_size`` is (bo, bi), the config's ``quantization_config.weight_block_size``. It cannot be inferred from
    the shapes when O or I is not a multiple of it. Leading dims (fused experts [E, O, I]) are kept.
    """
    import torch

    *lead, out_f, in_f = weight.shape
    bo, bi = (int(b) for b in block_size)
    so, si = -(-out_f // bo), -(-in_f // bi)
    if tuple(scale_inv.shape) != (*lead, so, si):
        raise UserError(
            f"FP8 scale of shape {list(scale_inv.shape)} does not fit a weight of shape {list(weight.shape)} with "
            f"{bo}x{bi} blocks (expected {[*lead, so, si]}); check weight_block_size in config.json"
        )
    w = weight.to(torch.float32)
    if out_f % bo == 0 and in_f % bi == 0:
        w = w.view(*lead, so, bo, si, bi) * scale_inv.float().view(*lead, so, 1, si, 1)
        return w.reshape(*lead, out_f, in_f).to(dtype)
    scale = scale_inv.float().repeat_interleave(bo, -2)[..., :out_f, :].repeat_interleave(bi, -1)[..., :in_f]
    return (w * scale).to(dtype)


#: the 16 FP4 (e2m1) values, indexed by the 4-bit code (sign bit 3)
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: "torch.Tensor", scales: "torch.Tensor", dtype: "torch.dtype") -> "torch.Tensor":
    """MXFP4 (the released gpt-oss experts) -> dense weights, as transformers' ``convert_moe_packed_tensors``.

    blocks uint8 [E, R, G, 16] (two FP4 e2m1 codes per byte, low nibble first: 32 values per group) and scales
    uint8 [E, R, G] (a shared power of two 2^(s - 127) per group of 32) -> [E, G*32, R] in ``dtype``: the stored
    [E, out, in] weight transposed to the [E, in, out] layout of GptOssExperts (gate_up_proj [E, H, 2I],
    down_proj [E, I, H]). Exact in float32 and bfloat16 (FP4 values times powers of two).
    """
    import torch

    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise UserError(f"MXFP4 blocks {list(blocks.shape)} {blocks.dtype} and scales {list(scales.shape)} "
                        f"{scales.dtype} do not fit (expected uint8 [..., G, 16] and [..., G])")
    lut = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    *prefix, groups, nbytes = blocks.shape
    out = torch.empty(*prefix, groups, nbytes * 2, dtype=torch.float32, device=blocks.device)
    out[..., 0::2] = lut[(blocks & 0x0F).long()]
    out[..., 1::2] = lut[(blocks >> 4).long()]
    out = torch.ldexp(out, (scales.to(torch.int32) - 127).unsqueeze(-1).float())
    return out.reshape(*prefix, groups * nbytes * 2).transpose(1, 2).to(dtype).contiguous()
