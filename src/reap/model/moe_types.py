"""The Mixture-of-Experts model types of the installed transformers, and the classes that build them.

A model type counts as MoE when its modeling file decorates its experts class with transformers' standard
``@use_experts_implementation`` (``transformers.integrations.moe``): fused ``gate_up_proj`` [E, 2I, H] /
``down_proj`` [E, H, I] experts that reap prunes; :func:`moe_model_types` lists one type per such modeling module.
:func:`causal_lm_class` is the class that builds a type as a causal LM (where the type has no AutoModelForCausalLM
entry: its module's own ``*ForCausalLM``, its text sub-config's, or its image-text-to-text class). :data:`UNSUPPORTED`
says why a type cannot be built and run as a text causal LM here (computed on first use from
:data:`LISTED_UNSUPPORTED` and the installed transformers); :data:`NOTES` what a layer-by-layer streamer must know
about a type. Their tiny configs: :mod:`reap.testing.tiny_configs`.

Legend: L layers, E routed experts, H hidden size, I expert intermediate size, B batch, S sequence length.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from pathlib import Path

TEXT_KEYS = ("text_config",)  # sub-config holding the decoder of a composite (multimodal) config

# why a type is not covered (MoE types of the interface without a causal LM; MoE types outside the interface). The
# module attribute UNSUPPORTED holds those of the installed transformers, computed on first use (see __getattr__).
LISTED_UNSUPPORTED: dict[str, str] = {
    "diffusion_gemma": "block-diffusion LM (DiffusionGemmaForBlockDiffusion is its only head): encoder + bidirectional "
                       "decoder over a noised canvas (modeling_diffusion_gemma.py:374), not a causal LM",
    "openai_privacy_filter": "bidirectional token classifier (OpenAIPrivacyFilterForTokenClassification, "
                             "is_causal=False at modeling_openai_privacy_filter.py:184): no LM head",
    # experts outside @use_experts_implementation: reap's fused-experts slicing does not apply
    "aria": "experts outside the interface before transformers 5.2x: AriaGroupedExpertsGemm fc1/fc2 "
            "(modeling_aria.py:275 in 5.17; 5.24 uses the interface)",
    "dbrx": "experts outside the interface: DbrxExperts holds w1/v1/w2 as flat [E*I, H] parameters "
            "(modeling_dbrx.py:247-256)",
    "doge": "product-key retrieval experts (DogeCDMoE: sqrt(E) keys, embedding-table experts, modeling_doge.py:380), "
            "not gated-MLP experts",
    "jetmoe": "experts outside the interface: JetMoeParallelExperts [E, out, in] (modeling_jetmoe.py:115) plus a "
              "mixture of attention heads (JetMoeMoA)",
    "llama4": "experts outside the interface: Llama4TextExperts keeps gate_up_proj [E, H, 2I] transposed with its own "
              "forward (modeling_llama4.py:55)",
    "longcat_flash": "experts outside the interface: LongcatFlashExperts adds zero (identity) experts, gate_up_proj "
                     "[E+Z, 2I, H] vs down_proj [E, H, I] (modeling_longcat_flash.py:158)",
    "nllb-moe": "encoder-decoder translation model; experts a ModuleDict of expert_{i} dense blocks with capacity "
                "(modeling_nllb_moe.py:342)",
    "step3p7": "experts outside the interface: Step3p7Experts, plain 3D parameters with its own forward "
               "(modeling_step3p7.py:537)",
    "switch_transformers": "T5 encoder-decoder; top-1 experts a ModuleDict of expert_{i} with capacity "
                           "(modeling_switch_transformers.py:161)",
    "vitpose_backbone": "vision backbone; VitPoseNaiveMoe is a ModuleList of per-dataset expert MLPs without a router "
                        "(modeling_vitpose_backbone.py:219)",
}


# What a layer-by-layer streamer must know about a supported type (transformers 5.24 line references; "router" means
# tensors with one row / entry per expert besides the experts' own). Types not listed are standard: decoder layer
# (hidden_states [B, S, H], attention_mask, position_embeddings, position_ids, cache) -> hidden_states, experts fed
# B*S tokens of width H, router weight [E, H] (+ e_score_correction_bias [E]), final norm, plain lm_head.
# MTP: no type builds multi-token-prediction modules in from_config; checkpoints of deepseek_v3/v4, glm4_moe,
# bailing_hybrid, mellum, nemotron_h, inkling, qwen3_next/3_5_moe... keep them (model.layers.{L}.* or mtp.*), which
# from_pretrained ignores (_keys_to_ignore_on_load_unexpected) and transformers.modeling_layers.MtpModel (:380)
# builds separately for generate(use_mtp=True). A pruner must prune (or keep consistent) those MoE layers too.
NOTES: dict[str, str] = {
    "afmoe": "router: mlp.expert_bias [E] fp32 (modeling_afmoe.py:211), not named e_score_correction_bias; "
             "mup_enabled scales embeddings (:568)",
    "beam": "layers take attention_scaling (per layer type, from the model's rotary, modeling_beam.py:560-579); "
            "lm_head logits soft-capped by final_logit_softcapping (:636-641)",
    "bailing_hybrid": "MTP layers stored as model.layers.{L..L+num_mtp_layers-1} (modeling_bailing_hybrid.py:964)",
    "cohere2_moe": "logits * logit_scale (modeling_cohere2_moe.py:626); dense prefix layers via mlp_layer_types",
    "deepseek_v4": "hidden states [B, S, hc_mult, H] between layers: embeddings expanded to hc_mult streams "
                   "(modeling_deepseek_v4.py:1363), collapsed by hc_head before the final norm (:1380); layers take "
                   "input_ids (hash routing); hash_moe layers route by the buffer gate.tid2eid [vocab, top_k] of "
                   "expert ids (:1115, :1123; zeros from from_config, :1281): pruning must remap it; experts see "
                   "B*S tokens",
    "ernie4_5_moe": "router: gate.moe_statics.e_score_correction_bias [1, E] (modeling_ernie4_5_moe.py:269-282)",
    "ernie4_5_vl_moe": "two expert sets per MoE layer, mlp.text_moe and mlp.vision_moe, each with its own router; "
                       "layers take moe_mm_token_type_ids and each set sees only its modality's tokens "
                       "(modeling_ernie4_5_vl_moe.py:432-473): text-only calibration never reaches vision_moe",
    "gemma4": "router and experts are direct children of the decoder layer (layer.router, layer.experts, "
              "modeling_gemma4.py:1353-1358), beside a dense mlp; the experts see the pre-MLP residual (:1395); "
              "router: router.per_expert_scale [E] (:1305); layers take per_layer_input (PLE, [B, S, n_layers, "
              "hidden_size_per_layer_input] computed from input_ids, :1626-1684) and shared_kv_states; embeddings "
              "* sqrt(H) (:1551); layer_scalar buffer; optional final_logit_softcapping (:1920)",
    "glm_moe_dsa": "layers return (hidden_states, topk_indices) and take prev_topk_indices: 'shared' indexer layers "
                   "reuse the previous layer's top-k (modeling_glm_moe_dsa.py:713-723)",
    "glm5_next": "hidden states [B, S, hc_mult, H] (modeling_glm5_next.py:1505, hc_head :1521); layers return "
                 "(hidden_states, topk_indices), take prev_topk_indices and input_ids; NoPE (position_embeddings=None)",
    "gpt_oss": "router bias [E] (modeling_gpt_oss.py:124); attention sinks",
    "granitemoe": "embeddings * embedding_multiplier, residual * residual_multiplier, logits / logits_scaling "
                  "(modeling_granitemoe.py:447, :359, :614); same in granitemoe_swa / shared / hybrid",
    "hunyuan_v1_moe": "router weight is gate.wg.weight [E, H] fp32 (modeling_hunyuan_v1_moe.py:232)",
    "hy_v3": "router: mlp.e_score_correction_bias [E] on the MoE block, not on the gate (modeling_hy_v3.py:346)",
    "hy_v4": "hidden states [B, S, hc_mult, H] (modeling_hy_v4.py:844, hc_head :860); layers return (hidden_states, "
             "topk_indices) and take prev_topk_indices (indexer_types 'shared', :855); same in hy_v4_vl",
    "inkling_text": "router weight [E + n_shared, H]: shared experts are gated by the last rows "
                    "(modeling_inkling.py:339-368) and stored stacked ([n_shared, I, H], :382); layers take conv_mask; "
                    "logits from hidden / logits_mup_width_multiplier, cut to unpadded_vocab_size (:797-802)",
    "inkling2": "layers take block_states (attention residuals over finished blocks of n_layers_per_attn_res_block "
                "layers, grown by the model loop, modeling_inkling2.py:1421-1437), relative_distance, conv_mask; "
                "sliding / full layers are different classes; final_input mixes block_states before the norm (:1437); "
                "lm_head has unpadded_vocab_size rows, logits soft-capped (:1458-1516)",
    "inkling2_loop": "as inkling2, and layers loop_layer_index_start..end run loop_num_passes times, later passes "
                     "restarting from the pre-loop states with messages from the previous pass "
                     "(modeling_inkling2_loop.py:1350-1420): a layer is visited more than once per forward",
    "jamba": "attention and mamba layers are different classes; the MoE block is layer.feed_forward",
    "lfm2_moe": "router: feed_forward.expert_bias [E] buffer (modeling_lfm2_moe.py:205); the MoE block is "
                "layer.feed_forward; conv (short convolution) layers",
    "minimax_m2": "router: mlp.e_score_correction_bias [E] on the MoE block (modeling_minimax_m2.py:114)",
    "mistral_large4": "layers return (hidden_states, topk_indices) and take prev_topk_indices and shared_kv_states "
                      "(kv_source_layers, modeling_mistral_large4.py:771-788); logits soft-capped (:1111-1116)",
    "muse_spark": "experts work at width moe_hidden_size: mlp.pre_expert_proj / post_expert_proj around them "
                  "(modeling_muse_spark.py:238-241); residual gates; NoPE layers where layer_rope_theta is 0 (:645); "
                  "logits * output_multiplier then soft-capped (:1664-1667)",
    "nemotron_h": "one mixer per layer (mamba, attention, moe or mlp: layer.mixer, modeling_nemotron_h.py:957); "
                  "moe_latent_size (None here) would project experts' inputs to a latent width (:669, :736)",
    "qwen3_omni_moe": "built as its MoE thinker alone (Qwen3OmniMoeThinkerForConditionalGeneration): released "
                      "checkpoints prefix it thinker.* and add a MoE talker (talker.*) this config leaves out",
    "qwen4_exp": "hidden states [B, S, hc_count * H]: embeddings repeated hc_count times "
                 "(modeling_qwen4_exp.py:1479), mixed back by hyper_connection_mixer instead of a final norm "
                 "(:1492); layers take ple_input_ids (input_ids, padding replaced by eos, :1475) for n-gram "
                 "per-layer embeddings, and conv_mask",
    "zaya": "layers take and return prev_router_hidden_states (router state carried layer to layer) and an "
            "attention_mask dict {'causal', 'conv'} (modeling_zaya.py:764-778); router has E + 1 classes (a skip "
            "expert): router_mlp.out_proj [E+1, r], balancing_biases [E+1] (:523-536); top-1 only",
}


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


def config_class(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


def text_key(config_cls) -> str | None:
    subs = getattr(config_cls, "sub_configs", {}) or {}
    return next((k for k in TEXT_KEYS if k in subs), None)


def causal_lm_class(model_type: str, strict: bool = False) -> type | None:
    """The class that builds ``model_type`` as a causal LM: AutoModelForCausalLM's entry for the type. Unless
    ``strict``, where it has none: the modeling module's own ``*ForCausalLM`` of the same config class (mistral4's is
    only in the pretraining and image-text mappings); AutoModelForCausalLM's entry for the type's text sub-config
    (aria -> aria_text); the image-text-to-text ``*ForConditionalGeneration``, whose forward takes ``input_ids``
    alone (qwen3_vl_moe, glm4v_moe...). None where there is none."""
    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if name is not None or strict:
        return getattr(transformers, name) if name else None
    config_cls = config_class(model_type)
    module_name = model_type_to_module_name(model_type)
    module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    for attr in dir(module):
        cls = getattr(module, attr)
        if attr.endswith("ForCausalLM") and getattr(cls, "config_class", None) is config_cls:
            return cls
    key = text_key(config_cls)
    if key is not None:
        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(sub_config_class(config_cls, key).model_type)
        if name is not None:
            return getattr(transformers, name)
    name = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
    if name is not None and name.endswith("ForConditionalGeneration"):
        return getattr(transformers, name)
    sub = delegate(model_type)
    return causal_lm_class(sub) if sub else None


def delegate(model_type: str) -> str | None:
    """The sub-config type that stands for a composite without a text_config nor a class of its own (qwen3_omni_moe,
    generate-only: its MoE thinker ``qwen3_omni_moe_thinker``)."""
    config_cls = config_class(model_type)
    if text_key(config_cls) is not None:
        return None
    for key in getattr(config_cls, "sub_configs", {}) or {}:
        sub_type = getattr(sub_config_class(config_cls, key), "model_type", "")
        if sub_type and sub_type != model_type and causal_lm_class(sub_type) is not None:
            return sub_type
    return None


def config_value(config, key: str, default=None):
    """``config.key`` without the per-layer guard of heterogeneous configs (the global value)."""
    if hasattr(config, "_getattr_without_heterogeneous_validation"):
        return config._getattr_without_heterogeneous_validation(key, default)
    return getattr(config, key, default)


@functools.cache
def base_config_class(config_cls):
    """The config class's default instance (cached: read, never handed out)."""
    return config_cls()


def sub_config_class(config_cls, key: str):
    """The class of a composite's sub-config (the default's class where it is declared as AutoConfig)."""
    sub = config_cls.sub_configs[key]
    return sub if dataclasses.is_dataclass(sub) else type(config_value(base_config_class(config_cls), key))


def _unsupported() -> dict[str, str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    out = {t: r for t, r in LISTED_UNSUPPORTED.items() if t in CONFIG_MAPPING_NAMES}
    for model_type in moe_model_types():
        if causal_lm_class(model_type) is None:
            out.setdefault(model_type, "no causal-LM class: no AutoModelForCausalLM entry, no *ForCausalLM in its "
                                       "module, no image-text-to-text *ForConditionalGeneration")
        else:
            out.pop(model_type, None)
    return dict(sorted(out.items()))


def __getattr__(name: str):
    if name == "UNSUPPORTED":  # computed once (it imports the modeling modules without a causal-LM entry)
        globals()["UNSUPPORTED"] = _unsupported()
        return globals()["UNSUPPORTED"]
    raise AttributeError(name)
