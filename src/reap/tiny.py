"""Tiny generated MiniMax-M2 checkpoints: the built-in default model of ``reap demo`` and the tests.

A random MiniMax-M2-architecture model made with transformers' own classes and ``save_pretrained`` into
several shards, with a non-zero ``e_score_correction_bias`` so routing depends on it, and optionally
rewritten in the released FP8 format (128x128 block-quantized ``float8_e4m3fn`` with ``weight_scale_inv``,
router and bias in float32).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from reap.checkpoint import DTYPE_NAMES, Checkpoint, Entry, tensor_bytes, write_json, write_safetensors

FP8_PATTERN = re.compile(r"(experts\.\d+\.w[123]|self_attn\.[qkvo]_proj)\.weight$")
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


def make_tiny_model(
    path: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shard_size: str = "60KB",
    **config_overrides,
) -> Path:
    """Write a random tiny MiniMax-M2 checkpoint (several shards) to ``path`` and return it."""
    from transformers import MiniMaxM2ForCausalLM

    path = Path(path)
    torch.manual_seed(seed)
    model = MiniMaxM2ForCausalLM(tiny_config(**config_overrides)).to(dtype)
    with torch.no_grad():
        # scale the router so that scores are spread, and give the correction bias real values
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
            layer.mlp.e_score_correction_bias.copy_(torch.randn_like(layer.mlp.e_score_correction_bias) * 0.1)
            layer.mlp.experts.gate_up_proj.normal_(0.0, 0.1)
            layer.mlp.experts.down_proj.normal_(0.0, 0.1)
    model.save_pretrained(path, max_shard_size=shard_size)
    make_byte_tokenizer(path)
    config = json.loads((path / "config.json").read_text())
    # fields of the released MiniMax-M2 config that transformers does not know: a pruner must keep them
    config.update({"scoring_func": "sigmoid", "use_routing_bias": True, "use_mtp": True, "num_mtp_modules": 3,
                   "auto_map": {"AutoConfig": "configuration_minimax_m2.MiniMaxM2Config"}})
    write_json(path / "config.json", config)
    (path / "configuration_minimax_m2.py").write_text("# remote-code stand-in: reap must copy this file\n")
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


def convert_to_fp8(src: str | Path, dst: str | Path) -> Path:
    """Rewrite a checkpoint in the released MiniMax-M2 FP8 layout (same shards, zero-based file names)."""
    ckpt = Checkpoint(src)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    n = len(ckpt.shards)
    names = {s: f"model-{i:05d}-of-{n + 2:05d}.safetensors" for i, s in enumerate(ckpt.shards)}
    weight_map: dict[str, str] = {}
    total = 0
    for shard in ckpt.shards:
        entries = []
        for info in ckpt.shard_tensors(shard):
            t = ckpt.tensor(info.name)
            outs = []
            if FP8_PATTERN.search(info.name):
                q, s = quantize_fp8(t)
                outs = [(info.name, q), (info.name + "_scale_inv", s)]
            elif FLOAT32_PATTERN.search(info.name):
                outs = [(info.name, t.float())]
            else:
                outs = [(info.name, t.to(torch.bfloat16))]
            for name, tensor in outs:
                data = tensor_bytes(tensor)
                entries.append(Entry(name, DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), len(data), lambda d=data: d))
                weight_map[name] = names[shard]
        total += write_safetensors(dst / names[shard], entries, {"format": "pt"})
    write_json(dst / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    config = dict(ckpt.config)
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "float8_e4m3fn",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
        "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"],
    }
    write_json(dst / "config.json", config)
    for p in ckpt.path.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name not in ("config.json", "model.safetensors.index.json"):
            (dst / p.name).write_bytes(p.read_bytes())
    return dst
