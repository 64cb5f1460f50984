"""Tiny checkpoints rewritten in the quantized formats large MoEs ship in, for the tests and the benchmarks.

Each ``convert_to_*`` copies a checkpoint (a tiny one of :mod:`reap.testing.tiny`) tensor by tensor into a released layout
with its ``quantization_config`` (:func:`_rewrite_tensors`): FP8 128x128 blocks with ``weight_scale_inv`` (MiniMax-M2,
DeepSeek-V3, Qwen3-MoE-FP8; router and bias in float32), gpt-oss's MXFP4 ``_blocks`` / ``_scales``,
compressed-tensors' schemes quantized and packed by compressed-tensors itself (the Kimi-K2-Thinking INT4 layout by
default; FP8, INT8, NVFP4...) and ModelOpt's NVFP4 export (with ``hf_quant_config.json``). The ``quantize_*``
functions are the per-weight quantizers they use; the dequantizers they test are reap's own (:mod:`reap.formats`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from reap.io.checkpoint import DTYPE_NAMES, Checkpoint
from reap.io.writer import Entry, tensor_bytes, write_json, write_safetensors

# linear layers stored in FP8 by the released checkpoints: experts, shared experts, dense MLPs and attention
FP8_PATTERN = re.compile(r"(experts\.\d+\.w[123]|self_attn\.[qkvo]_proj|self_attn\.(q_a|q_b|kv_a|kv_b)_proj\w*"
                         r"|linear_attn\.(in_proj_qkvz|in_proj_ba|out_proj)"
                         r"|mlp\.(experts\.\d+\.|shared_experts?\.)?(gate|up|down)_proj)\.weight$")
FLOAT32_PATTERN = re.compile(r"(\.gate\.weight|e_score_correction_bias)$")


def quantize_fp8(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [O, I] -> (float8_e4m3fn [O, I], scale_inv float32 [ceil(O/b), ceil(I/b)]), per-block absmax."""
    out_f, in_f = weight.shape
    so, si = -(-out_f // block), -(-in_f // block)
    padded = torch.zeros(so * block, si * block, dtype=torch.float32)
    padded[:out_f, :in_f] = weight.float()
    blocks = padded.view(so, block, si, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [so, si]
    scale = amax / torch.finfo(torch.float8_e4m3fn).max
    q = (blocks / scale.view(so, 1, si, 1)).to(torch.float8_e4m3fn).view(so * block, si * block)
    return q[:out_f, :in_f].contiguous(), scale


def _rewrite_tensors(src: str | Path, dst: str | Path, convert, shard_name, quantization: dict, **config) -> Path:
    """Copy a checkpoint tensor by tensor through ``convert(name, tensor) -> [(name, tensor), ...]``, into shards named
    ``shard_name(i, n)`` (released checkpoints' zero-based names), with ``quantization_config`` (and ``config``
    fields) set in config.json and every other file copied."""
    ckpt = Checkpoint(src)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    names = {s: shard_name(i, len(ckpt.shards)) for i, s in enumerate(ckpt.shards)}
    weight_map: dict[str, str] = {}
    total = 0
    for shard in ckpt.shards:
        entries = []
        for info in ckpt.shard_tensors(shard):
            for name, tensor in convert(info.name, ckpt.tensor(info.name)):
                data = tensor_bytes(tensor)
                entries.append(Entry(name, DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), len(data), lambda d=data: d))
                weight_map[name] = names[shard]
        total += write_safetensors(dst / names[shard], entries, {"format": "pt"})
    write_json(dst / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(dst / "config.json", {**ckpt.config, "quantization_config": quantization, **config})
    for p in ckpt.path.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name not in ("config.json", "model.safetensors.index.json"):
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def convert_to_fp8(src: str | Path, dst: str | Path) -> Path:
    """Rewrite a checkpoint in the released FP8 layout of MiniMax-M2 (and DeepSeek-V3, Qwen3-MoE-FP8): 128x128
    block-quantized linear weights with ``weight_scale_inv``, router and bias in float32, the rest bf16 (same
    shards, zero-based file names)."""

    def convert(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if FP8_PATTERN.search(name):
            q, s = quantize_fp8(t)
            return [(name, q), (name + "_scale_inv", s)]
        return [(name, t.float() if FLOAT32_PATTERN.search(name) else t.to(torch.bfloat16))]

    quantization = {"activation_scheme": "dynamic", "fmt": "float8_e4m3fn", "quant_method": "fp8",
                    "weight_block_size": [128, 128], "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]}
    return _rewrite_tensors(src, dst, convert, lambda i, n: f"model-{i:05d}-of-{n + 2:05d}.safetensors", quantization)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., R, C] (C a multiple of 32) -> (blocks uint8 [..., R, C/32, 16], scales uint8 [..., R, C/32]):
    per group of 32 a power-of-two scale 2^(s-127) with the group's absmax at most 6, values rounded to the nearest
    FP4 e2m1 code, two codes per byte (low nibble first). The inverse of :func:`reap.formats.dequantize_mxfp4`
    up to rounding."""
    from reap.formats import FP4_E2M1_VALUES

    *prefix, rows, cols = weight.shape
    w = weight.float().reshape(*prefix, rows, cols // 32, 32)
    amax = w.abs().amax(dim=-1).clamp(min=2.0 ** -100)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)  # [..., R, G]
    scaled = w / torch.pow(2.0, exp).unsqueeze(-1)
    lut = torch.tensor(FP4_E2M1_VALUES[:8])
    mag = (scaled.abs().unsqueeze(-1) - lut).abs().argmin(dim=-1)  # nearest magnitude code 0..7
    codes = (mag + 8 * (scaled < 0)).to(torch.uint8)  # sign bit 3
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exp + 127).to(torch.uint8).contiguous()


def convert_to_mxfp4(src: str | Path, dst: str | Path) -> Path:
    """Rewrite a gpt-oss checkpoint in the released MXFP4 layout: every ``mlp.experts.{gate_up,down}_proj`` [E, in,
    out] becomes ``_blocks`` [E, out, in/32, 16] + ``_scales`` [E, out, in/32] (uint8), the rest bf16 (same shards,
    zero-based file names), ``quantization_config: {quant_method: mxfp4}``."""

    def convert(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if re.search(r"mlp\.experts\.(gate_up|down)_proj$", name):
            blocks, scales = quantize_mxfp4(t.transpose(1, 2))
            return [(name + "_blocks", blocks), (name + "_scales", scales)]
        return [(name, t.to(torch.bfloat16))]

    quantization = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    return _rewrite_tensors(src, dst, convert, lambda i, n: f"model-{i:05d}-of-{n - 1:05d}.safetensors", quantization,
                            dtype="bfloat16")


# -- compressed-tensors and ModelOpt checkpoints ---------------------------------------------------------------------
#: the released Kimi-K2-Thinking / K2.5 / K2.6 INT4 layout: routed experts only, everything else bf16
KIMI_INT4_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]
KIMI_INT4_EXPERTS = r"\.mlp\.experts\.\d+\.(gate|up|down)_proj$"
#: every linear layer but the router and the LM head (llm-compressor's usual recipe for FP8 / NVFP4 MoEs)
LINEAR_BUT_ROUTER = (r"(self_attn\.[a-z_]+_proj|mlp\.(experts\.\d+\.|shared_experts?\.)?(gate|up|down)_proj"
                     r"|block_sparse_moe\.experts\.\d+\.w[123])$")


def _ct_qparams(w: torch.Tensor, args):
    """compressed-tensors' own scale and zero point of one weight (min/max observed per tensor, channel, group or
    block, as its minmax observer; the NVFP4 global scale from ``generate_gparam``)."""
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    out_f, in_f = w.shape
    strategy = str(getattr(args.strategy, "value", args.strategy))
    if strategy in ("group", "tensor_group"):
        g = w.unflatten(-1, (in_f // args.group_size, args.group_size))
        lo, hi = g.amin(-1), g.amax(-1)
    elif strategy == "channel":
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    elif strategy == "block":
        bo, bi = args.block_structure
        so, si = -(-out_f // bo), -(-in_f // bi)
        padded = torch.zeros(so * bo, si * bi, dtype=w.dtype)
        padded[:out_f, :in_f] = w
        blocks = padded.view(so, bo, si, bi)
        lo, hi = blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))
    else:
        lo, hi = w.amin().reshape(1), w.amax().reshape(1)
    global_scale = generate_gparam(w.amin(), w.amax()) if strategy == "tensor_group" else None
    scale, zero = calculate_qparams(lo, hi, args, global_scale=global_scale)
    return scale, zero, global_scale


def convert_to_compressed_tensors(src: str | Path, dst: str | Path, preset: str = "W4A16",
                                  quantize: str = KIMI_INT4_EXPERTS, ignore: list[str] | None = None,
                                  **weights) -> Path:
    """Rewrite a checkpoint as compressed-tensors quantizes it, with compressed-tensors itself (``pip install
    compressed-tensors``): every 2-d ``X.weight`` whose module matches the regex ``quantize`` gets compressed-tensors'
    own min/max scales (:func:`_ct_qparams`) and is compressed by its compressor for the scheme (the preset, e.g.
    ``W4A16``, ``W4A16_ASYM``, ``FP8``, ``FP8_DYNAMIC``, ``FP8_BLOCK``, ``NVFP4``, with ``weights`` overriding its
    weight arguments, e.g. ``group_size=32``); static activation scales are written as 1.0. The rest stays bf16.
    Defaults: the released Kimi-K2-Thinking INT4 layout (experts only, group 32, symmetric, its ignore list)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    preset_args = PRESET_SCHEMES[preset]
    if preset == "W4A16" and not weights:
        weights = {"group_size": 32}
    wargs = QuantizationArgs(**{**preset_args["weights"].model_dump(), **weights})
    acts = preset_args.get("input_activations")
    kind, bits = str(getattr(wargs.type, "value", wargs.type)), wargs.num_bits
    fmt = ("pack-quantized" if kind == "int" and (bits < 8 or acts is None) else "int-quantized" if kind == "int"
           else "nvfp4-pack-quantized" if bits == 4 else "float-quantized")
    scheme = QuantizationScheme(targets=["Linear"], weights=wargs, input_activations=acts, format=fmt)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    pattern = re.compile(quantize)

    def convert(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        module = name[: -len(".weight")]
        if not (name.endswith(".weight") and t.dim() == 2 and pattern.search(module)):
            return [(name, t.float() if FLOAT32_PATTERN.search(name) else t.to(torch.bfloat16))]
        w = t.to(torch.bfloat16)
        scale, zero, global_scale = _ct_qparams(w, wargs)
        state = {"weight": w, "weight_scale": scale, "weight_zero_point": zero}
        if global_scale is not None:
            state["weight_global_scale"] = global_scale
        out = compressor.compress(state, scheme)
        if acts is not None and not acts.dynamic:
            out["input_scale"] = torch.ones(1, dtype=torch.bfloat16)
        if acts is not None and acts.dynamic == "local":  # NVFP4 activations: a static global scale
            out["input_global_scale"] = torch.ones(1, dtype=torch.float32)
        return [(f"{module}.{k}", v.contiguous()) for k, v in sorted(out.items())]

    config = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, quantization_status="compressed",
                                ignore=KIMI_INT4_IGNORE if ignore is None else ignore).model_dump()
    return _rewrite_tensors(src, dst, convert, lambda i, n: f"model-{i + 1:05d}-of-{n:06d}.safetensors", config)


def quantize_nvfp4_modelopt(weight: torch.Tensor, group: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [O, I] -> (uint8 [O, I/2] FP4 pairs, float8_e4m3fn [O, I/group] scales, float32 [] scale_2), as ModelOpt's
    ``NVFP4QTensor.quantize`` does (byte for byte, tests/test_formats.py): scale_2 = amax / (6 x 448), block scale =
    block amax / (6 x scale_2) in FP8 (0 -> 1, clamped to [2^-9, 448]), values rounded to the nearest FP4 code of
    w / (scale x scale_2) (ties to even)."""
    from reap.formats.kernels import fp4_codes, pack_fp4

    scale_2 = weight.abs().amax().float() / (6.0 * 448.0)
    blocks = weight.unflatten(-1, (weight.shape[-1] // group, group))
    scale = blocks.abs().amax(-1).float() / (6.0 * scale_2)
    scale[scale == 0] = 1.0
    scale = scale.clamp(min=2.0 ** -9, max=448.0).to(torch.float8_e4m3fn)
    codes = fp4_codes(blocks / (scale.to(torch.float32) * scale_2).unsqueeze(-1), signed_zero=False).flatten(-2)
    return pack_fp4(codes), scale, scale_2.reshape(())


def convert_to_nvfp4_modelopt(src: str | Path, dst: str | Path, quantize: str = LINEAR_BUT_ROUTER) -> Path:
    """Rewrite a checkpoint in ModelOpt's NVFP4 export layout: ``X.weight`` uint8, ``X.weight_scale`` FP8 per 16,
    ``X.weight_scale_2`` and ``X.input_scale`` float32 scalars for every linear layer matching ``quantize`` (all but
    the router and LM head), the rest bf16; ``hf_quant_config.json`` and config.json's ``quantization_config`` as
    ModelOpt writes them (``exclude_modules`` naming the router and LM head)."""
    pattern = re.compile(quantize)

    def convert(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        module = name[: -len(".weight")]
        if not (name.endswith(".weight") and t.dim() == 2 and pattern.search(module)):
            return [(name, t.float() if FLOAT32_PATTERN.search(name) else t.to(torch.bfloat16))]
        packed, scale, scale_2 = quantize_nvfp4_modelopt(t.to(torch.bfloat16))
        return [(name, packed), (module + ".weight_scale", scale), (module + ".weight_scale_2", scale_2),
                (module + ".input_scale", torch.tensor(1.0, dtype=torch.float32))]

    details = {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
               "exclude_modules": ["lm_head", "*.mlp.gate", "*.shared_expert_gate", "*.mlp.router"]}
    hf_quant = {"producer": {"name": "modelopt", "version": "0.47.0"}, "quantization": details}
    quantization = {"config_groups": {"group_0": {
        "input_activations": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
        "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}, "targets": ["Linear"]}},
        "ignore": details["exclude_modules"], "quant_algo": "NVFP4", "producer": hf_quant["producer"],
        "quant_method": "modelopt"}
    out = _rewrite_tensors(src, dst, convert, lambda i, n: f"model-{i + 1:05d}-of-{n:05d}.safetensors", quantization)
    write_json(out / "hf_quant_config.json", hf_quant)
    return out
