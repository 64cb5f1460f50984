"""Tiny configs of every Mixture-of-Experts model type of the installed transformers, for CPU tests.

:func:`tiny_config` builds one for a type of :func:`reap.model.moe_types.moe_model_types` from the config class's own
defaults, shrunk by one generic table (:data:`SHRINK`) plus a small per-type table (:data:`OVERRIDES`), with the
layer pattern cut down to a few layers that keep every kind of layer of the family (dense and MoE MLPs, sliding /
full / linear / mamba attention, hash-routed MoE...); the vision / audio encoders of a composite (multimodal) config
get one layer (:data:`ENCODER`). Which types there are, which class builds each and why some cannot be covered:
:mod:`reap.model.moe_types`.

Legend: L layers, E routed experts, H hidden size, I expert intermediate size.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

from reap.model.moe_types import base_config_class, config_class, delegate, config_value, sub_config_class, text_key, causal_lm_class

TINY_LAYERS = 4  # L: room for a dense layer, two MoE layers and both attention kinds
MAX_LAYERS = 6  # more distinct layer kinds than this: the family's layer lists belong in OVERRIDES
INDEX_LISTS = ("mlp_only_layers", "local_layer_ids", "mtp_local_layer_ids")  # lists of (0-based) layer indices

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
    "index_n_heads": 2, "index_head_dim": 16, "index_topk": 8, "index_kpool": 4, "indexer_n_heads": 2,
    "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
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

# per-type overrides, applied last (to the text config of a composite type): only what the generic shrink gets wrong
OVERRIDES: dict[str, dict] = {
    # families whose default layer pattern lacks a kind the modeling supports (sliding / dense / indexer layers)
    "cohere2_moe": {"mlp_layer_types": ["dense", "sparse", "sparse", "sparse"],
                    "prefix_dense_intermediate_size": 128},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"]},
    "inkling_text": {"mlp_layer_types": ["dense", "sparse", "sparse", "sparse"]},
    "jamba": {"attn_layer_period": 4, "attn_layer_offset": 2},  # mamba, mamba, attention, mamba; MoE on 1 and 3
    "laguna": {"layer_types": ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},  # the default is None
    "mellum": {"layer_types": ["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
               "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"]},
    "muse_spark": {"mlp_layer_types": ["dense", "sparse", "sparse", "sparse"]},
    "minimax_m3_vl": {"layer_types": ["full_attention", "minimax_m3_sparse", "full_attention", "minimax_m3_sparse"],
                      "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"], "index_n_heads": 2,
                      "index_head_dim": 16, "index_block_size": 4, "index_topk_blocks": 2, "index_local_blocks": 1},
    "nemotron_h": {"layers_block_type": ["linear_attention", "moe", "full_attention", "mlp", "moe"]},
    "zaya": {"num_experts_per_tok": 1, "sliding_window": 8,  # ZayaConfig.validate_architecture: top-1 only
             "layer_types": ["hybrid", "hybrid_sliding", "hybrid", "hybrid_sliding"]},
    "deepseek_ocr2": {"mlp_layer_types": ["dense", "sparse", "sparse", "sparse"]},  # the default is None
    # its layer count is num_layers (two attention + MLP pairs and one MoE each); the rotary head_dim is
    # qk_rope_head_dim; zero-computation experts (zero_expert_num) follow the routed ones in the router
    # indexed layers 1 and 4 select key pools, 3 rescores 1's and reads its keys and values (cross-layer KV sharing)
    "kolibri1_1": {"num_hidden_layers": 5, "layer_types": ["sliding_attention", "indexed_attention", "sliding_attention",
                                                           "indexed_attention", "indexed_attention"],
                   "index_layers": [1, 4], "kv_source_layers": [0, 1, 2, 1, 4], "index_topk": 8,
                   "index_pool_size": 16, "index_compression": 2, "index_num_heads": 2, "index_num_local_tokens": 4,
                   "index_num_sink_tokens": 2, "mlp_only_intermediate_size": 128},
    # its base model builds a sliding-window mask whatever the layers (the default sliding_window is None)
    "step3p7": {"sliding_window": 8, "layer_types": ["full_attention", "sliding_attention", "full_attention",
                                                     "sliding_attention"]},
    "longcat_flash": {"num_layers": 2, "head_dim": 8, "ffn_hidden_size": 128, "expert_ffn_hidden_size": 32,
                      "zero_expert_num": 4},
    # mrope sections of the 16-wide heads (the modeling's default [22, 22, 20] is for 128)
    "ernie4_5_vl_moe": {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0,
                                            "mrope_section": [3, 3, 2]}},
    "glm4v_moe": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                      "mrope_section": [2, 1, 1]}},  # the modeling's default: [8, 12, 12]
    # attention-residual blocks of 2 layers (default 6: none would close in 4 layers); layers 2-3 looped twice
    "inkling2": {"n_layers_per_attn_res_block": 2},
    "inkling2_loop": {"n_layers_per_attn_res_block": 2, "loop_layer_index_start": 2, "loop_layer_index_end": 4,
                      "loop_num_passes": 2},
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

# vision / audio encoders of composite configs: one layer, widths meeting the tiny text model (64)
ENCODER: dict[str, object] = {
    "mlp_dim": 128, "output_channels": 32, "downsample_channels": 64,  # SAM-style encoders (OCR models)
    "downsample_hidden_size": 32, "hidden_sizes": 16, "num_position_embeddings": 64, "max_image_size": 128,
    "num_hidden_layers": 1, "depth": 1, "encoder_layers": 1, "n_layers": 1, "num_heads": 4,
    "encoder_attention_heads": 4, "encoder_ffn_dim": 128, "d_model": 64, "out_hidden_size": 64,
    "text_hidden_size": 64, "output_dim": 64,
    "projection_intermediate_size": 128, "projector_hidden_size": 128, "projection_hidden_dim": 128,
}
LAYER_COUNTS = ("num_hidden_layers", "depth", "encoder_layers", "n_layers")
COMPOSITE_OVERRIDES: dict[str, dict] = {  # model_type -> kwargs of the composite config itself
    # Qwen3OmniMoeThinkerForConditionalGeneration.get_rope_index reads config.vision_start_token_id, a field of the
    # talker config only (modeling_qwen3_omni_moe.py:291): the released thinker_config carries it as an extra key
    "qwen3_omni_moe_thinker": {"vision_start_token_id": 151652},
}


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


def _per_layer_overrides(config) -> dict[int, dict]:
    """{layer: {attribute: value}} of a heterogeneous config (transformers >= 5.2x ``per_layer_config``), every
    explicitly per-layer attribute included even where it equals the global value."""
    spec = config.__dict__.get("_heterogeneity_spec")
    if spec is None:
        return {}
    attrs = spec.explicit_per_layer_attributes
    return {i: {a: o.get(a, config_value(config, a)) for a in attrs} | o for i, o in spec.per_layer_overrides.items()}


def _scaled(value, default, tiny):
    """A per-layer value kept in proportion to the global default (head_dim 512 of 256 -> 2 x tiny)."""
    if isinstance(value, int) and not isinstance(value, bool) and isinstance(default, int) and default and tiny:
        return max(1, tiny * value // default)
    return value


def _split(total: int, parts: list[int]) -> list[int]:
    """``total`` split in proportion to ``parts`` (each at least 1)."""
    out = [max(1, total * p // sum(parts)) for p in parts]
    out[out.index(max(out))] += total - sum(out)
    return out


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


def _shrink(config_cls, overrides: dict, encoder: bool = False) -> dict:
    """kwargs of a tiny ``config_cls``: the generic table, experts, then the per-layer pattern cut to a few layers."""
    overrides = dict(overrides)
    layer_table = overrides.pop("per_layer_shrink", {})
    defaults = _fields(config_cls)
    base = base_config_class(config_cls)
    get = functools.partial(config_value, base)
    kw: dict[str, object] = {}
    kw.update(_table(config_cls, {**SHRINK, **(ENCODER if encoder else {})}))
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
    # the per-layer pattern: lists of one value per layer (layer kinds; layer references such as kv_source_layers,
    # remapped), index lists (mlp_only_layers...), per_layer_config; cut to a few layers that keep every kind
    n0 = get("num_hidden_layers") or 0
    per_layer = {k: list(get(k)) for k in defaults
                 if isinstance(get(k), (list, tuple)) and len(get(k)) == n0 > 1 and k not in overrides}
    refs = {k: v for k, v in per_layer.items() if v == list(range(n0))}
    kinds = {k: v for k, v in per_layer.items() if k not in refs}
    index_lists = {k: list(get(k)) for k in INDEX_LISTS if isinstance(get(k), (list, tuple))}
    plc = _per_layer_overrides(base)
    dense_k = get("first_k_dense_replace") or 0
    signatures = [tuple(v[i] for v in kinds.values()) + tuple(i in v for v in index_lists.values())
                  + (str(plc.get(i)), i < dense_k) for i in range(n0)]
    n = overrides.get("num_hidden_layers", 1 if encoder else TINY_LAYERS)
    sel = list(range(min(n, n0 or 1))) if encoder else _layer_selection(signatures, n)
    if len(sel) > MAX_LAYERS:
        raise ValueError(f"{config_cls.__name__}: {len(sel)} distinct layer kinds; give its layer lists in OVERRIDES")
    if "num_hidden_layers" in defaults:
        kw["num_hidden_layers"] = len(sel)
    for key, values in kinds.items():
        # per-layer sizes (laguna's num_attention_heads_per_layer) follow the global key's shrink
        glob = key.removesuffix("_per_layer")
        kw[key] = [_scaled(values[i], get(glob), kw[glob]) if glob in kw else values[i] for i in sel]
    for key in refs:
        kw[key] = list(range(len(sel)))
    for key, values in index_lists.items():
        kw[key] = [j for j, i in enumerate(sel) if i in values]
    if "mlp_only_layers" in index_lists and not kw["mlp_only_layers"] and defaults.get("decoder_sparse_step"):
        kw["mlp_only_layers"] = [0]  # one dense layer among the MoE layers
    if plc:  # per-layer values in proportion to the global ones, or the type's per_layer_shrink
        kw["per_layer_config"] = {
            f"{j:02d}": {k: layer_table.get(k, _scaled(v, get(k), kw.get(k))) for k, v in plc[i].items()}
            for j, i in enumerate(sel) if i in plc}
    rope = get("rope_parameters")
    if isinstance(rope, dict) and "mrope_section" in rope and "rope_parameters" not in overrides:
        # multimodal RoPE: (t, h, w) sections of the rotary half-dimension, shrunk with the heads
        head = kw.get("qk_rope_head_dim") or kw.get("head_dim") or kw["hidden_size"] // kw["num_attention_heads"]
        half = int(head * rope.get("partial_rotary_factor", 1.0)) // 2
        kw["rope_parameters"] = {**rope, "mrope_section": _split(half, rope["mrope_section"])}
    if "moe_layer_start_index" in defaults:
        kw.update(moe_layer_start_index=1, moe_layer_end_index=len(sel) - 1)
    kw.update(overrides)
    return {k: v for k, v in kw.items() if k in defaults or k in overrides or k == "per_layer_config"}


def _table(config_cls, table: dict) -> dict:
    """The entries of ``table`` for the keys ``config_cls`` declares and sets (see :data:`SHRINK`); a list default
    (ernie4_5_vl_moe's per-modality expert sizes) shrinks element-wise in proportion."""
    defaults, base, out = _fields(config_cls), base_config_class(config_cls), {}
    for key, tiny in table.items():
        value = config_value(base, key)
        if key in defaults and (value not in (None, 0) or key in ALWAYS):
            if isinstance(value, (list, tuple)) and value and isinstance(tiny, int) and isinstance(value[0], int):
                tiny = [_scaled(v, value[0], tiny) for v in value]
            out[key] = tiny
    return out


def _shrink_encoder(config_cls, overrides: dict) -> dict:
    """kwargs of a tiny vision / audio sub-config (only built, never run here): the generic table, one layer, widths
    that meet the text model's, nested sub-configs shrunk the same way."""
    kw = _shrink(config_cls, overrides, encoder=True)
    for key, sub in (getattr(config_cls, "sub_configs", {}) or {}).items():
        if isinstance(sub, type) and dataclasses.is_dataclass(sub) and key not in kw:
            kw[key] = sub(**_shrink_encoder(sub, {}))
    return kw


def tiny_config(model_type: str, **overrides):
    """A tiny config of ``model_type`` for ``causal_lm_class(model_type)._from_config`` (and AutoModelForCausalLM
    where it maps the type): the text config alone where the class is text-only, else the composite config with a
    tiny text config and tiny (one-layer) vision / audio configs. ``overrides`` go to the text config."""
    config_cls = config_class(model_type)
    lm = causal_lm_class(model_type)
    if lm is not None and getattr(lm, "config_class", config_cls) is not config_cls and (sub := delegate(model_type)):
        return tiny_config(sub, **{**OVERRIDES.get(model_type, {}), **overrides})
    key = text_key(config_cls)
    table = copy.deepcopy({**OVERRIDES.get(model_type, {}), **overrides})  # configs may edit their lists in place
    if key is None:
        return config_cls(**_shrink(config_cls, table))
    text_cls = sub_config_class(config_cls, key)
    text = text_cls(**_shrink(text_cls, table))
    if lm is not None and getattr(lm, "config_class", None) is text_cls:
        return text
    kw: dict[str, object] = {key: text}
    base = base_config_class(config_cls)
    for sub_key, sub_cls in config_cls.sub_configs.items():
        if sub_key == key or config_value(base, sub_key) is None:  # optional encoders left out by default stay out
            continue
        sub_cls = sub_config_class(config_cls, sub_key)
        kw[sub_key] = sub_cls(**_shrink_encoder(sub_cls, {}))
    kw.update({k: v for k, v in _table(config_cls, {**SHRINK, **ENCODER}).items() if k not in LAYER_COUNTS})
    kw.update(copy.deepcopy(COMPOSITE_OVERRIDES.get(model_type, {})))
    return config_cls(**kw)
