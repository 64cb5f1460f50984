"""Dequantization (and, for the tiny test checkpoints, packing) of every stored weight format, in plain torch.

Each dequantizer repeats the arithmetic of the format's reference implementation operation for operation, in the
same dtypes, so that its result is bit for bit the reference's (checked in tests/test_formats.py):

* FP8 128x128 blocks (``weight_scale_inv``) and MXFP4: transformers' own dequantizers;
* compressed-tensors ``pack-quantized`` (INT2/4/8 in int32 words), ``float-quantized`` / ``int-quantized`` /
  ``naive-quantized`` (FP8 or INT8 with channel, tensor, group or block scales) and ``nvfp4-pack-quantized``:
  compressed-tensors' ``decompress`` (``x.to(scale.dtype) [- zero_point] * scale``, then the caller's dtype);
* ModelOpt NVFP4 (``weight`` uint8, ``weight_scale`` FP8 per 16, ``weight_scale_2``): ModelOpt's
  ``NVFP4QTensor.dequantize`` (``fp4 * (scale.float() * scale_2)``).

Legend: O output features, I input features, G groups, E experts (any leading dims are kept).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reap.core.errors import UserError

if TYPE_CHECKING:
    import torch

#: the 16 FP4 (e2m1) values, indexed by the 4-bit code (sign bit 3)
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


# -- FP8 blocks and MXFP4 (transformers' formats) ---------------------------------------------------------------
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


def quantize_blocks(weight: "torch.Tensor", block_size: tuple[int, int] = (128, 128),
                    dtype: "torch.dtype | None" = None) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The inverse of :func:`dequantize_blocks` as DeepSeek-V3 and MiniMax-M2 quantize: weight [..., O, I] ->
    (FP8 values [..., O, I], float32 scale_inv [..., ceil(O/bo), ceil(I/bi)]), each block's scale its largest
    magnitude over the FP8 maximum (448 for e4m3), so the block's largest value is exact up to FP8 rounding; an
    all-zero block gets scale 1."""
    import torch

    dtype = dtype or torch.float8_e4m3fn
    *lead, out_f, in_f = weight.shape
    bo, bi = (int(b) for b in block_size)
    so, si = -(-out_f // bo), -(-in_f // bi)
    w = torch.nn.functional.pad(weight.float(), (0, si * bi - in_f, 0, so * bo - out_f))  # whole blocks
    blocks = w.view(*lead, so, bo, si, bi)
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., so, si]
    scale = torch.where(amax > 0, amax / torch.finfo(dtype).max, torch.ones_like(amax))
    q = (blocks / scale.view(*lead, so, 1, si, 1)).clamp(torch.finfo(dtype).min, torch.finfo(dtype).max)
    q = q.reshape(*lead, so * bo, si * bi)[..., :out_f, :in_f].to(dtype)
    return q.contiguous(), scale.float().contiguous()


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


# -- integers packed in int32 words (compressed-tensors pack-quantized) --------------------------------------------
def unpack_int32(packed: "torch.Tensor", bits: int, count: int) -> "torch.Tensor":
    """int32 words [..., W] -> int8 values [..., count]: value i at bits i*b..i*b+b-1 of word i*b // 32, stored with
    the offset 2^(b-1) (compressed-tensors' ``pack_to_int32``, for b dividing 32: 2, 4 or 8)."""
    import torch

    if packed.dtype != torch.int32:
        raise UserError(f"packed integer weights must be int32, got {packed.dtype}")
    per = 32 // bits
    if count > packed.shape[-1] * per:
        raise UserError(f"{packed.shape[-1]} int32 words hold at most {packed.shape[-1] * per} {bits}-bit values, "
                        f"not {count}")
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    values = values.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :count]
    return (values - (1 << (bits - 1))).to(torch.int8)


def pack_int32(values: "torch.Tensor", bits: int) -> "torch.Tensor":
    """The inverse of :func:`unpack_int32`: int8 values [..., N] in [-2^(b-1), 2^(b-1)) -> int32 [..., ceil(N*b/32)]."""
    import torch

    per = 32 // bits
    n = values.shape[-1]
    words = -(-n // per)
    v = torch.zeros(*values.shape[:-1], words * per, dtype=torch.int64, device=values.device)
    v[..., :n] = values.to(torch.int64) + (1 << (bits - 1))
    v = v.reshape(*values.shape[:-1], words, per) << torch.arange(0, 32, bits, device=values.device)
    word = v.sum(-1)  # the fields do not overlap: the sum is their bitwise or, < 2^32
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)


def _expand(scale: "torch.Tensor", strategy: str, shape: tuple[int, ...], group: int | None,
            block: tuple[int, int] | None, name: str) -> "torch.Tensor":
    """A scale (or zero point) broadcastable against values of ``shape`` [..., O, I], per compressed-tensors
    strategy: tensor (one value), channel ([..., O, 1]), group ([..., O, I/g], each over g columns), block
    ([..., ceil(O/bo), ceil(I/bi)])."""
    *lead, rows, cols = shape
    if strategy in ("tensor", "tensor_group") and scale.numel() == 1:
        return scale.reshape([1] * len(shape))
    if strategy == "channel" or (strategy == "tensor" and scale.shape[-2:] == (rows, 1)):
        if scale.numel() == rows * _prod(lead) and scale.shape[-1:] in ((1,), (rows,)):
            return scale.reshape(*lead, rows, 1)
    elif strategy in ("group", "tensor_group"):
        if group and cols % group == 0 and tuple(scale.shape[-2:]) == (rows, cols // group):
            return scale.reshape(*lead, rows, cols // group, 1)
    elif strategy == "block" and block is not None:
        bo, bi = block
        if tuple(scale.shape[-2:]) == (-(-rows // bo), -(-cols // bi)):
            return scale.repeat_interleave(bo, -2)[..., :rows, :].repeat_interleave(bi, -1)[..., :cols]
    raise UserError(f"{name}: a scale of shape {list(scale.shape)} does not fit a weight of shape {list(shape)} with "
                    f"the {strategy} strategy (group {group}, block {block}) config.json declares; the checkpoint and "
                    "its quantization_config disagree")


def _prod(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _scaled(x: "torch.Tensor", scale: "torch.Tensor", zero: "torch.Tensor | None", strategy: str,
            group: int | None, block: tuple[int, int] | None, name: str) -> "torch.Tensor":
    """compressed-tensors' ``_dequantize`` after its strategy reshape: ``x.to(scale.dtype) [- zero] * scale``."""
    shape = tuple(x.shape)
    s = _expand(scale, strategy, shape, group, block, name)
    z = _expand(zero, strategy, shape, group, block, name) if zero is not None else None
    grouped = strategy in ("group", "tensor_group") and s.dim() == x.dim() + 1
    if grouped:
        x = x.unflatten(-1, (shape[-1] // group, group))
    out = x.to(s.dtype)
    if z is not None:
        out = out - z.to(s.dtype)
    out = out * s
    return out.flatten(-2) if grouped else out


def dequantize_int_packed(packed: "torch.Tensor", scale: "torch.Tensor", zero: "torch.Tensor | None",
                          shape: tuple[int, ...] | None, bits: int, strategy: str, group: int | None,
                          dtype: "torch.dtype", name: str = "") -> "torch.Tensor":
    """compressed-tensors ``pack-quantized``: ``weight_packed`` int32 [..., O, ceil(I*b/32)], ``weight_scale``
    [..., O, G] / [..., O, 1] / [1] (group, channel, tensor), asymmetric ``weight_zero_point`` packed the same way
    along O ([..., ceil(O*b/32), G]), ``weight_shape`` the unpacked [..., O, I] -> the weight in ``dtype``."""
    import torch

    cols = int(shape[-1]) if shape is not None else (
        scale.shape[-1] * group if strategy == "group" and group else packed.shape[-1] * (32 // bits))
    x = unpack_int32(packed, bits, cols)
    if zero is not None and zero.dtype == torch.int32 and strategy in ("group", "channel"):
        rows = packed.shape[-2]
        zero = unpack_int32(zero.transpose(-1, -2), bits, rows).transpose(-1, -2)
    return _scaled(x, scale, zero, strategy, group, None, name).to(dtype)


def dequantize_scaled(values: "torch.Tensor", scale: "torch.Tensor", zero: "torch.Tensor | None", strategy: str,
                      group: int | None, block: tuple[int, int] | None, dtype: "torch.dtype",
                      name: str = "") -> "torch.Tensor":
    """compressed-tensors ``float-quantized`` / ``int-quantized`` / ``naive-quantized``: FP8 (or INT8) ``weight``
    with ``weight_scale`` per tensor, channel, group or block (and ``weight_zero_point`` if asymmetric)."""
    return _scaled(values, scale, zero, strategy, group, block, name).to(dtype)


# -- NVFP4: FP4 codes two per byte, an FP8 scale per 16, a float32 global scale ------------------------------------
def unpack_fp4(packed: "torch.Tensor", dtype: "torch.dtype") -> "torch.Tensor":
    """uint8 [..., N/2] (low nibble first) -> the FP4 e2m1 values [..., N] in ``dtype`` (exact in any float dtype)."""
    import torch

    if packed.dtype != torch.uint8:
        raise UserError(f"packed FP4 weights must be uint8, got {packed.dtype}")
    lut = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32, device=packed.device)
    out = torch.stack((lut[(packed & 0x0F).long()], lut[(packed >> 4).long()]), dim=-1)
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * 2).to(dtype)


def pack_fp4(codes: "torch.Tensor") -> "torch.Tensor":
    """4-bit codes uint8 [..., N] -> uint8 [..., N/2], the even-indexed code in the low nibble."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()


def fp4_codes(x: "torch.Tensor", signed_zero: bool = True) -> "torch.Tensor":
    """The nearest FP4 e2m1 code (ties to the even code, as round-to-nearest-even) of each value of ``x``,
    clamped to [-6, 6]; the sign bit is set for negative values (and -0.0 when ``signed_zero``, as compressed-tensors
    packs; ModelOpt does not)."""
    import torch

    bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float32, device=x.device)
    a = x.float().abs().clamp(max=6.0)
    code = torch.bucketize(a, bounds, right=False)  # a <= bound goes down: ties to the lower code ...
    tie_up = torch.isin(a, bounds[[1, 3, 5]])  # ... except 0.75, 1.75, 3.5, whose even neighbour is above
    code = code + tie_up.to(code.dtype)
    sign = torch.signbit(x.float()) if signed_zero else x.float() < 0
    return (code | (sign.to(code.dtype) << 3)).to(torch.uint8)


def dequantize_nvfp4_ct(packed: "torch.Tensor", scale: "torch.Tensor", global_scale: "torch.Tensor", group: int,
                        dtype: "torch.dtype", name: str = "") -> "torch.Tensor":
    """compressed-tensors ``nvfp4-pack-quantized``, as its ``NVFP4PackedCompressor.decompress``: the FP4 values and
    the FP8 scale in bfloat16, the scale divided by ``weight_global_scale`` (float32), multiplied, rounded to
    bfloat16; then ``dtype``."""
    import torch

    x = unpack_fp4(packed, torch.bfloat16)
    shape = tuple(x.shape)
    s = _expand(scale.to(torch.bfloat16), "tensor_group", shape, group, None, name) / _per_lead(global_scale, shape)
    out = x.unflatten(-1, (shape[-1] // group, group)).to(s.dtype) * s
    return out.to(torch.bfloat16).flatten(-2).to(dtype)


def _per_lead(scalar: "torch.Tensor", shape: tuple[int, ...]) -> "torch.Tensor":
    """A global scale (one value, or one per expert of fused [E, O, I] values) broadcastable against the grouped
    [..., O, G, g] values; a single value keeps its own shape (the reference divides by it as stored)."""
    if scalar.numel() == 1:
        return scalar
    return scalar.reshape(*shape[:-2], 1, 1, 1)


def dequantize_nvfp4_modelopt(packed: "torch.Tensor", scale: "torch.Tensor", scale_2: "torch.Tensor", group: int,
                              dtype: "torch.dtype", name: str = "") -> "torch.Tensor":
    """ModelOpt NVFP4, as ``NVFP4QTensor.dequantize``: ``fp4 * (weight_scale.float() * weight_scale_2)`` in float32
    per group of 16, then ``dtype``."""
    import torch

    x = unpack_fp4(packed, torch.float32)
    shape = tuple(x.shape)
    s = scale.to(torch.float32).unsqueeze(-1) * _per_lead(scale_2.to(torch.float32), shape)
    s = _expand(s.squeeze(-1), "tensor_group", shape, group, None, name)
    return (x.unflatten(-1, (shape[-1] // group, group)) * s).reshape(shape).to(dtype)
