"""Tiny generated checkpoints: the built-in default model of ``reap demo`` and the tests.

A random model of a supported family (MiniMax-M2 by default; ``family="qwen3_moe"``, ``"mixtral"``,
``"deepseek_v3"``, ``"kimi_k2"``, ``"glm4_moe"``, ``"qwen3_next"`` or ``"gpt_oss"``) made with transformers' own
classes and ``save_pretrained`` into several shards, with a spread-out router and, where the family has one, a
non-zero ``e_score_correction_bias`` so routing depends on it. Kimi-K2 is a DeepSeek-V3 model saved under the
released config's ``model_type`` ("kimi_k2") and remote-code ``auto_map``. Models can be rewritten in the released
FP8 format (128x128 block-quantized ``float8_e4m3fn`` with ``weight_scale_inv``, router and bias in float32);
gpt-oss models in the released MXFP4 layout (``convert_to_mxfp4``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from reap.checkpoint import DTYPE_NAMES, Checkpoint
from reap.writer import Entry, tensor_bytes, write_json, write_safetensors

# linear layers stored in FP8 by the released checkpoints: experts, shared experts, dense MLPs and attention
FP8_PATTERN = re.compile(r"(experts\.\d+\.w[123]|self_attn\.[qkvo]_proj|self_attn\.(q_a|q_b|kv_a|kv_b)_proj\w*"
                         r"|linear_attn\.(in_proj_qkvz|in_proj_ba|out_proj)"
                         r"|mlp\.(experts\.\d+\.|shared_experts?\.)?(gate|up|down)_proj)\.weight$")
FLOAT32_PATTERN = re.compile(r"(\.gate\.weight|e_score_correction_bias)$")


def make_byte_tokenizer(path: str | Path) -> None:
    """Save a byte-level tokenizer (256 byte tokens + <|endoftext|>=256, <|pad|>=257) to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   bos_token="<|endoftext|>")
    fast.save_pretrained(str(path))


def tiny_config(**overrides):
    """A MiniMaxM2Config small enough for a CPU test, shaped like the released model's config."""
    from transformers import MiniMaxM2Config

    kwargs = dict(
        vocab_size=258,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=16,
        num_experts_per_tok=4,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        bos_token_id=256,
        eos_token_id=256,
        pad_token_id=257,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return MiniMaxM2Config(**kwargs)


def tiny_family_config(family: str = "minimax_m2", **overrides):
    """A config of ``family`` small enough for a CPU test (dense layers included where the family has them)."""
    common = dict(vocab_size=258, hidden_size=64, num_attention_heads=4, max_position_embeddings=512,
                  bos_token_id=256, eos_token_id=256, pad_token_id=257, tie_word_embeddings=False)
    if family == "minimax_m2":
        return tiny_config(**overrides)
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        kwargs = dict(common, intermediate_size=48, moe_intermediate_size=32, num_hidden_layers=4,
                      num_key_value_heads=2, head_dim=16, num_experts=16, num_experts_per_tok=4, norm_topk_prob=False,
                      decoder_sparse_step=1, mlp_only_layers=[1], rope_parameters={"rope_type": "default",
                                                                                  "rope_theta": 10000.0})
        return Qwen3MoeConfig(**{**kwargs, **overrides})
    if family == "mixtral":
        from transformers import MixtralConfig

        kwargs = dict(common, intermediate_size=32, num_hidden_layers=3, num_key_value_heads=2, head_dim=16,
                      num_local_experts=8, num_experts_per_tok=2,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        return MixtralConfig(**{**kwargs, **overrides})
    if family == "deepseek_v3":
        from transformers import DeepseekV3Config

        kwargs = dict(common, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                      num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                      n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                      q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        return DeepseekV3Config(**{**kwargs, **overrides})
    if family == "kimi_k2":  # DeepSeek-V3 shaped as the Kimi-K2 release: no expert groups, one dense layer
        return tiny_family_config("deepseek_v3", **{"n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.827,
                                                     **overrides})
    if family == "glm4_moe":
        from transformers import Glm4MoeConfig

        # shaped like GLM-4.5: q/k norms, attention bias, partial rotary 0.5, no expert groups, scaling 2.5
        kwargs = dict(common, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                      num_key_value_heads=2, head_dim=16, n_routed_experts=16, num_experts_per_tok=4, n_group=1,
                      topk_group=1, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
                      norm_topk_prob=True, use_qk_norm=True, attention_bias=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
        return Glm4MoeConfig(**{**kwargs, **overrides})
    if family == "qwen3_next":
        from transformers import Qwen3NextConfig

        # both attention kinds (linear, full, linear, full) and one dense layer among the MoE layers
        kwargs = dict(common, intermediate_size=48, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                      num_hidden_layers=4, num_key_value_heads=2, head_dim=16, num_experts=16, num_experts_per_tok=4,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[2], full_attention_interval=2,
                      linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
                      linear_value_head_dim=32, linear_conv_kernel_dim=4,
                      # in_proj_qkvz is [384, 64]: whole 128-row FP8 blocks (transformers' CPU dequantization
                      # infers the block from the scale grid, wrong for a partial block after a full one)
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
        return Qwen3NextConfig(**{**kwargs, **overrides})
    if family == "gpt_oss":
        from transformers import GptOssConfig

        # alternating sliding-window (8 tokens, so test sequences exceed it) and full attention layers
        kwargs = dict(common, intermediate_size=32, num_hidden_layers=3, num_key_value_heads=2, head_dim=16,
                      num_local_experts=16, num_experts_per_tok=4, sliding_window=8,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        return GptOssConfig(**{**kwargs, **overrides})
    raise ValueError(f"no tiny config for family {family!r}; use minimax_m2, qwen3_moe, mixtral, deepseek_v3, "
                     "kimi_k2, glm4_moe, qwen3_next or gpt_oss")


HAND_SHAPED = ("minimax_m2", "qwen3_moe", "mixtral", "deepseek_v3", "kimi_k2", "glm4_moe", "qwen3_next", "gpt_oss")


def _make_generic(path: Path, model_type: str, dtype: torch.dtype, shard_size: str, **overrides) -> Path:
    """A tiny random checkpoint of any MoE model type (:func:`reap.tiny_configs.tiny_config`): routers spread so
    that routing depends on the input, experts non-trivial, expert-id tables (hash routing) filled with distinct
    random experts per token; saved by transformers in several shards with the byte-level tokenizer."""
    from reap.model_layout import derive_model
    from reap.tiny_configs import causal_lm_class, tiny_config

    cfg = tiny_config(model_type, **overrides)
    model = causal_lm_class(model_type)._from_config(cfg, dtype=torch.float32)
    layout, _, _ = derive_model(model.config.to_dict(), type(model))
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for moe in layout.moe.values():
            for name in moe.tensors:
                t = state[name]
                if not t.is_floating_point():
                    continue
                if name.startswith(moe.experts + "."):
                    t.normal_(0.0, 0.1, generator=g)
                elif t.dim() >= 2:  # router rows: scores spread out
                    t.normal_(0.0, 0.5, generator=g)
                else:  # correction biases, per-expert scales: real values around their defaults
                    t.add_(torch.randn(t.shape, generator=g) * 0.1)
            for name in moe.id_tables:
                t = state[name]
                rows = torch.stack([torch.randperm(layout.num_experts, generator=g)[: t.shape[-1]]
                                    for _ in range(t.numel() // t.shape[-1])])
                t.copy_(rows.reshape(t.shape))
    model.to(dtype).save_pretrained(path, max_shard_size=shard_size)
    make_byte_tokenizer(path)
    return path


def make_tiny_model(
    path: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shard_size: str = "60KB",
    family: str = "minimax_m2",
    **config_overrides,
) -> Path:
    """Write a random tiny checkpoint of ``family`` (several shards) to ``path`` and return it.

    ``family`` is one of the hand-shaped families of :func:`tiny_family_config` (shaped like their releases, the
    fixtures of most tests) or any MoE model type of the installed transformers (:mod:`reap.tiny_configs`)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    torch.manual_seed(seed)
    if family not in HAND_SHAPED:
        return _make_generic(path, family, dtype, shard_size, **config_overrides)
    model = AutoModelForCausalLM.from_config(tiny_family_config(family, **config_overrides)).to(dtype)
    with torch.no_grad():
        if family == "minimax_m2":
            # scale the router so that scores are spread, and give the correction bias real values
            for layer in model.model.layers:
                layer.mlp.gate.weight.normal_(0.0, 0.5)
                layer.mlp.e_score_correction_bias.copy_(torch.randn_like(layer.mlp.e_score_correction_bias) * 0.1)
                layer.mlp.experts.gate_up_proj.normal_(0.0, 0.1)
                layer.mlp.experts.down_proj.normal_(0.0, 0.1)
        else:
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight", "mlp.router.weight")):  # routers: spread scores
                    t.normal_(0.0, 0.5)
                elif name.endswith("mlp.router.bias"):  # gpt-oss: a real bias in the logits
                    t.copy_(torch.randn_like(t) * 0.5)
                elif name.endswith("self_attn.sinks"):  # gpt-oss attention sinks that matter
                    t.copy_(torch.randn_like(t))
                elif family == "gpt_oss" and name.endswith("experts.gate_up_proj"):  # the clamp at 7 is hit
                    t.normal_(0.0, 0.5)
                elif name.endswith("e_score_correction_bias"):
                    t.copy_(torch.randn_like(t) * 0.1)
                elif ".experts." in name or "shared_expert" in name:
                    t.normal_(0.0, 0.1)
                elif family == "qwen3_next" and name.endswith("norm.weight"):  # (1 + weight) norms: not all ones
                    t.normal_(0.0, 0.2)
    model.save_pretrained(path, max_shard_size=shard_size)
    make_byte_tokenizer(path)
    config = json.loads((path / "config.json").read_text())
    if family == "minimax_m2":
        # fields of the released MiniMax-M2 config that transformers does not know: a pruner must keep them
        config.update({"scoring_func": "sigmoid", "use_routing_bias": True, "use_mtp": True, "num_mtp_modules": 3,
                       "auto_map": {"AutoConfig": "configuration_minimax_m2.MiniMaxM2Config"}})
        (path / "configuration_minimax_m2.py").write_text("# remote-code stand-in: reap must copy this file\n")
    elif family == "qwen3_moe" and "num_local_experts" in config:
        # the released Qwen3-MoE configs name the expert count num_experts (transformers 5 writes its alias)
        config["num_experts"] = config.pop("num_local_experts")
    elif family == "qwen3_next":  # the released configs hold both the interval and the layer_types it implies
        config["full_attention_interval"] = config_overrides.get("full_attention_interval", 2)
    elif family == "kimi_k2":  # the released config: its own model_type, remote code, DeepSeek-V3 architecture
        config.update({"model_type": "kimi_k2", "scoring_func": "sigmoid", "topk_method": "noaux_tc",
                       "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                                    "AutoModel": "modeling_deepseek.DeepseekV3Model",
                                    "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}})
        (path / "configuration_deepseek.py").write_text("# remote-code stand-in: reap must copy this file\n")
    write_json(path / "config.json", config)
    (path / "LICENSE").write_text("tiny test model, no rights reserved\n")
    return path


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


#: the config key a family's released config counts its MTP modules by
MTP_COUNT_KEY = {"deepseek": "num_nextn_predict_layers", "qwen3_next": "mtp_num_hidden_layers"}


def add_mtp_modules(src: str | Path, dst: str | Path, count: int = 1, seed: int = 0) -> Path:
    """Copy a tiny checkpoint and give it ``count`` multi-token-prediction modules as the releases store them: module
    k's decoder layer (a copy of the last decoder layer, every weight perturbed so it is its own, the router spread)
    plus its own norms and projection. DeepSeek-V3 / Kimi-K2 / GLM-4.5 style: ``model.layers.{N+k}.{enorm, hnorm,
    eh_proj, shared_head.norm}`` beside the layer (``num_nextn_predict_layers``); Qwen3-Next style:
    ``mtp.layers.{k}.*`` with ``mtp.{pre_fc_norm_embedding, pre_fc_norm_hidden, fc, norm}`` (``mtp_num_hidden_layers``;
    its MTP norms are the (1 + w) kind, so their weights are spread around 0). The modules go to one more shard."""
    from reap.arch import MTP_STYLES

    ckpt = Checkpoint(src)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for p in ckpt.path.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    config = dict(ckpt.config)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    n, hidden = text["num_hidden_layers"], text["hidden_size"]
    style = next(s for s in MTP_STYLES if s.name == ("qwen3_next" if config["model_type"] == "qwen3_next" else "deepseek"))
    last = f"model.layers.{n - 1}."
    gen = torch.Generator().manual_seed(seed)
    extra: dict[str, torch.Tensor] = {}
    for k in range(count):
        layer = style.layer.format(layers="model.layers.", n=n + k, k=k)
        prefix = style.prefix.format(layers="model.layers.", n=n + k, k=k)
        for name in (nm for nm in ckpt.infos if nm.startswith(last)):
            t = ckpt.tensor(name).float()
            if name.endswith(("mlp.gate.weight", "router.weight")):
                t = torch.randn(t.shape, generator=gen) * 0.5  # its own router, spread
            elif name.endswith("e_score_correction_bias"):
                t = torch.randn(t.shape, generator=gen) * 0.1
            elif t.is_floating_point() and t.numel() > 1:
                t = t + torch.randn(t.shape, generator=gen) * (t.std() if t.numel() > 1 else 0.1) * 0.5
            extra[layer + name[len(last):]] = t.to(ckpt.tensor(name).dtype)
        dtype = ckpt.tensor(next(nm for nm in ckpt.infos if nm.endswith("input_layernorm.weight"))).dtype
        one = 0.0 if style.name == "qwen3_next" else 1.0
        for part in (style.embed_norm, style.hidden_norm, style.final_norm):
            extra[f"{prefix}{part}.weight"] = (one + 0.2 * torch.randn(hidden, generator=gen)).to(dtype)
        extra[f"{prefix}{style.proj}.weight"] = (torch.randn(hidden, 2 * hidden, generator=gen)
                                                 / (2 * hidden) ** 0.5).to(dtype)
    entries = []
    for name, t in extra.items():
        data = tensor_bytes(t.contiguous())
        entries.append(Entry(name, DTYPE_NAMES[t.dtype], tuple(t.shape), len(data), lambda d=data: d))
    shard = "model-mtp.safetensors"
    write_safetensors(dst / shard, entries, {"format": "pt"})
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    index["weight_map"].update({name: shard for name in extra})
    meta = index.setdefault("metadata", {})
    meta["total_size"] = meta.get("total_size", 0) + sum(e.nbytes for e in entries)
    if isinstance(meta.get("total_parameters"), int):  # buffers (correction biases) are not parameters
        meta["total_parameters"] += sum(t.numel() for nm, t in extra.items() if not nm.endswith("e_score_correction_bias"))
    write_json(dst / "model.safetensors.index.json", index)
    text[MTP_COUNT_KEY[style.name]] = count
    write_json(dst / "config.json", config)
    return dst
