"""Tiny generated checkpoints: the built-in default model of ``reap demo`` and the tests.

A random model of a supported family (MiniMax-M2 by default; ``family="qwen3_moe"``, ``"mixtral"``,
``"deepseek_v3"``, ``"kimi_k2"``, ``"glm4_moe"``, ``"qwen3_next"`` or ``"gpt_oss"``) made with transformers' own
classes and ``save_pretrained`` into several shards, with a spread-out router and, where the family has one, a
non-zero ``e_score_correction_bias`` so routing depends on it. Kimi-K2 is a DeepSeek-V3 model saved under the
released config's ``model_type`` ("kimi_k2") and remote-code ``auto_map``. Any other MoE model type of the installed
transformers is built from its tiny config (:mod:`reap.testing.tiny_configs`). Each checkpoint gets a byte-level tokenizer;
:func:`add_mtp_modules` adds multi-token-prediction modules as the releases store them. The same checkpoints in the
released quantized formats (FP8, MXFP4, compressed-tensors, ModelOpt): :mod:`reap.testing.tiny_formats`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from reap.io.checkpoint import DTYPE_NAMES, Checkpoint
from reap.io.writer import Entry, tensor_bytes, write_json, write_safetensors


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
    """A tiny random checkpoint of any MoE model type (:func:`reap.testing.tiny_configs.tiny_config`): routers spread so
    that routing depends on the input, experts non-trivial, expert-id tables (hash routing) filled with distinct
    random experts per token; saved by transformers in several shards with the byte-level tokenizer."""
    from reap.model.model_side import derive_model
    from reap.model.moe_types import causal_lm_class
    from reap.testing.tiny_configs import tiny_config

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
    fixtures of most tests) or any MoE model type of the installed transformers (:mod:`reap.testing.tiny_configs`)."""
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


#: the config key a family's released config counts its MTP modules by
MTP_COUNT_KEY = {"deepseek": "num_nextn_predict_layers", "qwen3_next": "mtp_num_hidden_layers"}


def add_mtp_modules(src: str | Path, dst: str | Path, count: int = 1, seed: int = 0) -> Path:
    """Copy a tiny checkpoint and give it ``count`` multi-token-prediction modules as the releases store them: module
    k's decoder layer (a copy of the last decoder layer, every weight perturbed so it is its own, the router spread)
    plus its own norms and projection. DeepSeek-V3 / Kimi-K2 / GLM-4.5 style: ``model.layers.{N+k}.{enorm, hnorm,
    eh_proj, shared_head.norm}`` beside the layer (``num_nextn_predict_layers``); Qwen3-Next style:
    ``mtp.layers.{k}.*`` with ``mtp.{pre_fc_norm_embedding, pre_fc_norm_hidden, fc, norm}`` (``mtp_num_hidden_layers``;
    its MTP norms are the (1 + w) kind, so their weights are spread around 0). The modules go to one more shard."""
    from reap.model.arch import MTP_STYLES

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
