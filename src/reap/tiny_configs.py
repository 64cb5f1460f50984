"""Tiny configs of every Mixture-of-Experts model type of the installed transformers, for CPU tests.

A model type counts as MoE when its modeling file decorates its experts class with transformers' standard
``@use_experts_implementation`` (``transformers.integrations.moe``): fused ``gate_up_proj`` [E, 2I, H] /
``down_proj`` [E, H, I] experts that reap prunes. :func:`tiny_config` builds one from the config class's own
defaults, shrunk by one generic table (:data:`SHRINK`) plus a small per-type table (:data:`OVERRIDES`), with the
layer pattern cut down to a few layers that keep every kind of layer of the family (dense and MoE MLPs, sliding /
full / linear / mamba attention, hash-routed MoE...). :data:`UNSUPPORTED` says why a type cannot be built and run
as a text causal LM here; :data:`NOTES` what a layer-by-layer streamer must know about a type.

Legend: L layers, E routed experts, H hidden size, I expert intermediate size.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import re
from pathlib import Path

TINY_LAYERS = 4  # L: room for a dense layer, two MoE layers and both attention kinds

# generic shrink: key -> tiny value, applied when the config class declares the key and its default is set
# (not None, not 0: a 0 / None default means "absent in this family" and stays so)
SHRINK: dict[str, object] = {
    "vocab_size": 258, "vocab_size_per_layer_input": 258, "bos_token_id": 256, "eos_token_id": 256,
    "pad_token_id": 257, "max_position_embeddings": 512, "model_max_length": 512, "tie_word_embeddings": False,
    "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
    "shared_experts_intermediate_size": 64, "shared_intermediate_size": 64, "moe_shared_expert_intermediate_size": 64,
    "prefix_dense_intermediate_size": 128, "dense_intermediate_size": 128, "moe_hidden_size": 32, "moe_latent_size": 32,
    "num_attention_heads": 4, "head_dim": 16, "rotary_dim": 8,
    "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 16,
    # multi-head latent attention (DeepSeek-V2/V3 family)
    "q_lora_rank": 32, "kv_lora_rank": 16, "o_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    # sparse-attention indexers (DeepSeek-V3.2 family)
    "index_n_heads": 2, "index_head_dim": 16, "index_topk": 8, "indexer_n_heads": 2, "indexer_kv_heads": 1,
    "indexer_head_dim": 16, "indexer_budget": 8,
    # linear attention (gated delta net, KDA, lightning)
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "linear_head_dim": 16, "linear_num_heads": 4,
    # mamba
    "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 16, "mamba_chunk_size": 8, "mamba_dt_rank": 8,
    "mamba_num_heads": 8, "mamba_head_dim": 16, "ssm_state_size": 16, "n_groups": 1, "mamba_n_groups": 1,
    "chunk_size": 8,
    # windows shorter than the test sequences (24 tokens), so that sliding layers differ from full ones
    "sliding_window": 8, "sliding_window_size": 8,
    "router_hidden_size": 16, "hc_lowrank": 16, "ple_embed_dim": 64, "hidden_size_per_layer_input": 16,
    "unpadded_vocab_size": 258, "loop_gate_rank": 8, "gated_norm_rank": 8, "d_rel": 8, "rel_extent": 64,
}
ALWAYS = ("bos_token_id", "eos_token_id", "pad_token_id", "head_dim")  # set even where the default is None
EXPERT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts")
TOPK_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "top_k_experts")
GROUP_KEYS = ("n_group", "num_expert_group")
TINY_EXPERTS, TINY_GROUPED_EXPERTS, TINY_TOPK = 8, 16, 2
TEXT_KEYS = ("text_config",)  # sub-config holding the decoder of a composite (multimodal) config

# per-type overrides, applied last (to the text config of a composite type): only what the generic shrink gets wrong
OVERRIDES: dict[str, dict] = {
    # families whose default layer pattern lacks a kind the modeling supports (sliding / dense / indexer layers)
    "cohere2_moe": {"mlp_layer_types": ["dense", "sparse", "sparse", "sparse"], "prefix_dense_intermediate_size": 128},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"]},
    "inkling_text": {"mlp_layer_types": ["dense", "sparse", "sparse", "sparse"]},
    "jamba": {"attn_layer_period": 4, "attn_layer_offset": 2},  # mamba, mamba, attention, mamba; MoE on 1 and 3
    "laguna": {"layer_types": ["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
               "num_attention_heads_per_layer": [4, 4, 4, 4]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},  # the default is None
    "mellum": {"layer_types": ["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
               "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"]},
    "minimax_m3_vl": {"layer_types": ["full_attention", "minimax_m3_sparse", "full_attention", "minimax_m3_sparse"],
                      "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"], "index_n_heads": 2,
                      "index_head_dim": 16, "index_block_size": 4, "index_topk_blocks": 2, "index_local_blocks": 1},
    "nemotron_h": {"layers_block_type": ["linear_attention", "moe", "full_attention", "mlp", "moe"]},
    "zaya": {"num_experts_per_tok": 1, "sliding_window": 8,  # ZayaConfig.validate_architecture: top-1 only
             "layer_types": ["hybrid", "hybrid_sliding", "hybrid", "hybrid_sliding"]},
    # families whose MoE or sparse attention is off (or unset) by default
    "dots1": {"n_shared_experts": 1},
    "gemma4": {"enable_moe_block": True, "moe_intermediate_size": 32},
    "deepseek_v4": {"layer_types": ["heavily_compressed_attention", "compressed_sparse_attention", "sliding_attention",
                                    "compressed_sparse_attention"],
                    "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
                    "o_groups": 2},
    "qwen4_exp": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
                  "indexer_compress_ratio": 2, "ple_layer_ids": [1], "heads_per_ngram": 2,
                  "ngram_vocab_size_base": 101, "make_ngram_vocab_size_divisible_by": 8, "split_ngram_parts": 4},
    # per-layer configs whose invariants a proportional shrink breaks (SWA head_dim = qk_nope + qk_rope)
    # ("per_layer_shrink": values for every per_layer_config entry that sets the key)
    "dots3_note": {"per_layer_shrink": {"num_attention_heads": 2, "num_key_value_heads": 2, "q_lora_rank": 16,
                                        "kv_lora_rank": 32, "head_dim": 32, "qk_nope_head_dim": 24,
                                        "qk_rope_head_dim": 8, "v_head_dim": 16}},
}

UNSUPPORTED: dict[str, str] = {}
NOTES: dict[str, str] = {}


def _transformers_dir() -> Path:
    import transformers

    return Path(transformers.__file__).parent


@functools.cache
def _moe_modules() -> tuple[str, ...]:
    """Module names (``transformers.models.<name>``) whose modeling file uses ``@use_experts_implementation``."""
    found = set()
    for path in (_transformers_dir() / "models").glob("*/modeling_*.py"):
        if "@use_experts_implementation" in path.read_text(encoding="utf-8"):
            found.add(path.parent.name)
    return tuple(sorted(found))


@functools.cache
def _types_by_module() -> dict[str, list[str]]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    out: dict[str, list[str]] = {}
    for model_type in CONFIG_MAPPING_NAMES:
        out.setdefault(model_type_to_module_name(model_type), []).append(model_type)
    return out


@functools.cache
def moe_model_types() -> list[str]:
    """One model type per MoE modeling module: the module's own name when it is a model type, else the module's
    type that AutoModelForCausalLM maps (inkling: ``inkling_text``), else its first type; sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = []
    for module in _moe_modules():
        candidates = _types_by_module().get(module, [])
        if not candidates:
            continue
        if module in candidates:
            types.append(module)
        else:
            types.append(next((t for t in candidates if t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), candidates[0]))
    return sorted(types)


def _config_class(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


def _text_key(config_cls) -> str | None:
    subs = getattr(config_cls, "sub_configs", {}) or {}
    return next((k for k in TEXT_KEYS if k in subs), None)


def causal_lm_class(model_type: str) -> type | None:
    """The class that builds ``model_type`` as a causal LM: AutoModelForCausalLM's entry for the type; else the
    modeling module's own ``*ForCausalLM`` of the same config class (mistral4: only in the pretraining and
    image-text mappings); else AutoModelForCausalLM's entry for the type's text sub-config; else None."""
    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if name is not None:
        return getattr(transformers, name)
    config_cls = _config_class(model_type)
    module = importlib.import_module(f"transformers.models.{model_type_to_module_name(model_type)}.modeling_"
                                     f"{model_type_to_module_name(model_type)}")
    for attr in dir(module):
        cls = getattr(module, attr)
        if attr.endswith("ForCausalLM") and isinstance(cls, type) and getattr(cls, "config_class", None) is config_cls:
            return cls
    key = _text_key(config_cls)
    if key is not None:
        text_type = getattr(config_cls.sub_configs[key], "model_type", None)
        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text_type)
        if name is not None:
            return getattr(transformers, name)
    return None


def _fields(config_cls) -> dict[str, object]:
    """The config class's declared fields and their defaults (dataclass configs of transformers 5)."""
    out = {}
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = None
    return out


def _get(config, key: str, default=None):
    """``config.key`` without the per-layer guard of heterogeneous configs (the global value)."""
    if hasattr(config, "_getattr_without_heterogeneous_validation"):
        return config._getattr_without_heterogeneous_validation(key, default)
    return getattr(config, key, default)


def _per_layer_overrides(config) -> dict[int, dict]:
    """{layer: {attribute: value}} of a heterogeneous config (transformers >= 5.2x ``per_layer_config``), every
    explicitly per-layer attribute included even where it equals the global value."""
    spec = config.__dict__.get("_heterogeneity_spec")
    if spec is None:
        return {}
    attrs = spec.explicit_per_layer_attributes
    return {i: {a: o.get(a, _get(config, a)) for a in attrs} | o for i, o in spec.per_layer_overrides.items()}


def _scaled(value, default, tiny):
    """A per-layer value kept in proportion to the global default (head_dim 512 of 256 -> 2 x tiny)."""
    if isinstance(value, int) and not isinstance(value, bool) and isinstance(default, int) and default and tiny:
        return max(1, tiny * value // default)
    return value


def _layer_selection(signatures: list[tuple], n: int) -> list[int]:
    """Indices of ``n`` layers (sorted) that keep one layer of every distinct signature (first occurrences), then
    fill up with the most common signature (the family's typical MoE layer)."""
    sel: list[int] = []
    for i, sig in enumerate(signatures):
        if sig not in [signatures[j] for j in sel]:
            sel.append(i)
    common = max(set(signatures), key=signatures.count)
    for i, sig in enumerate(signatures):
        if len(sel) >= n:
            break
        if sig == common and i not in sel:
            sel.append(i)
    for i in range(len(signatures)):  # a family with fewer layers than n: take them all
        if len(sel) >= n:
            break
        if i not in sel:
            sel.append(i)
    return sorted(sel)


def _shrink(config_cls, overrides: dict) -> dict:
    """kwargs of a tiny ``config_cls``: the generic table, experts, then the per-layer pattern cut to a few layers."""
    overrides = dict(overrides)
    layer_table = overrides.pop("per_layer_shrink", {})
    defaults = _fields(config_cls)
    base = config_cls()
    get = functools.partial(_get, base)
    kw: dict[str, object] = {}
    for key, tiny in SHRINK.items():
        if key in defaults and (get(key) not in (None, 0) or key in ALWAYS):
            kw[key] = tiny
    heads, kv = get("num_attention_heads"), defaults.get("num_key_value_heads")
    if "num_key_value_heads" in defaults:  # MHA (and MLA, which expands k/v to every head) stays MHA, MQA stays MQA
        kw["num_key_value_heads"] = 4 if kv in (None, heads) else 1 if kv == 1 else 2
    grouped = any((defaults.get(k) or 1) > 1 for k in GROUP_KEYS)
    for key in EXPERT_KEYS:
        if key in defaults:
            kw[key] = TINY_GROUPED_EXPERTS if grouped else TINY_EXPERTS
    for key in TOPK_KEYS:
        if key in defaults:
            kw[key] = TINY_TOPK
    if grouped:
        kw.update({k: 4 for k in GROUP_KEYS if k in defaults}, topk_group=2)
    if "first_k_dense_replace" in defaults:
        kw["first_k_dense_replace"] = 1
    if "num_dense_layers" in defaults:
        kw["num_dense_layers"] = 1
    # the per-layer pattern: lists of one value per layer, index lists, per_layer_config
    n0 = get("num_hidden_layers")
    per_layer = {k: get(k) for k in defaults
                 if isinstance(get(k), (list, tuple)) and len(get(k)) == n0 and n0 > 1}
    index_lists = {k: list(get(k)) for k in ("mlp_only_layers", "ple_layer_ids", "local_layer_ids",
                                                        "mtp_local_layer_ids") if isinstance(get(k),
                                                                                             (list, tuple))}
    plc = _per_layer_overrides(base)
    signatures = [tuple(v[i] for v in per_layer.values()) + tuple(i in v for v in index_lists.values())
                  + (str(plc.get(i)), i < (get("first_k_dense_replace") or 0)) for i in range(n0)]
    n = overrides.get("num_hidden_layers", TINY_LAYERS)
    sel = _layer_selection(signatures, n)
    kw["num_hidden_layers"] = len(sel)
    for key, values in per_layer.items():
        kw[key] = [values[i] for i in sel]
    for key, values in index_lists.items():
        kw[key] = [j for j, i in enumerate(sel) if i in values]
    if "mlp_only_layers" in index_lists and not kw["mlp_only_layers"] and defaults.get("decoder_sparse_step"):
        kw["mlp_only_layers"] = [0]  # one dense layer among the MoE layers
    if plc:
        kw["per_layer_config"] = {f"{j:02d}": {k: layer_table[k] if k in layer_table else _scaled(v, get(k), kw.get(k))
                                               for k, v in plc[i].items()}
                                  for j, i in enumerate(sel) if i in plc}
    if "moe_layer_start_index" in defaults:
        kw.update(moe_layer_start_index=1, moe_layer_end_index=len(sel) - 1)
    kw.update(overrides)
    return {k: v for k, v in kw.items() if k in defaults or k in overrides or k == "per_layer_config"}


def tiny_config(model_type: str, **overrides):
    """A tiny config of ``model_type`` for ``causal_lm_class(model_type).from_config`` (and AutoModelForCausalLM):
    the text config alone where the causal LM is text-only, else the composite with a tiny text config."""
    config_cls = _config_class(model_type)
    lm = causal_lm_class(model_type)
    key = _text_key(config_cls)
    table = {**OVERRIDES.get(model_type, {}), **overrides}
    if key is None:
        return config_cls(**_shrink(config_cls, table))
    text_cls = config_cls.sub_configs[key]
    text = text_cls(**_shrink(text_cls, table))
    if lm is not None and getattr(lm, "config_class", None) is text_cls:
        return text
    return config_cls(**{key: text})
