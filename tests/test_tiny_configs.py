"""Tiny configs of every MoE model type of the installed transformers (:mod:`reap.testing.tiny_configs`).

For every type whose modeling uses ``@use_experts_implementation`` (types in ``UNSUPPORTED`` are skipped with the
reason): the tiny config builds a random model quickly, with 8-16 routed experts (top-2..4), at least two MoE
layers, a dense layer where the family has them, and every layer kind of the family's default pattern (attention
kinds, MLP kinds such as hash-routed MoE); a forward on a padded batch gives finite logits; ``save_pretrained`` in
several 60 KB shards and ``from_pretrained`` round-trip without missing or unexpected keys and give the same logits.
"""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from reap.model import moe_types

from reap.testing import tiny_configs

pytestmark = pytest.mark.slow  # a tiny config of every MoE model type built by transformers

TYPES = moe_types.moe_model_types()
TOP1 = {"zaya"}  # ZayaConfig.validate_architecture accepts num_experts_per_tok=1 only
NO_DENSE = {"deepseek_v4"}  # mlp_layer_types of DeepSeek-V4 are hash_moe / moe only
DENSE_KEYS = ("first_k_dense_replace", "mlp_only_layers", "mlp_layer_types", "num_dense_layers",
              "moe_layer_start_index", "expert_layer_period")
KIND_KEYS = ("layer_types", "mlp_layer_types", "indexer_types", "layers_block_type")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on matrices this small a second thread costs ~15 ms a matmul (2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _decoder_layers(model) -> torch.nn.ModuleList:
    """The text decoder's layers (the shortest ``*layers`` ModuleList outside vision / audio towers)."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)
             and name.endswith("layers") and not any(k in name for k in ("vision", "visual", "audio", "sam"))]
    return min(found, key=lambda item: len(item[0]))[1]


def _experts(module) -> list:
    # the attributes @use_experts_implementation sets on the experts (transformers 5.17 and 5.24)
    return [m for m in module.modules() if hasattr(m, "is_concatenated") and hasattr(m, "has_gate")]


def _inputs():
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, -5:] = 0  # the second row padded
    return ids, mask


def test_types_found():
    assert len(TYPES) >= 50 and TYPES == sorted(TYPES)
    assert {"mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"} <= set(TYPES)
    supported = [t for t in TYPES if t not in moe_types.UNSUPPORTED]
    assert len(supported) >= len(TYPES) - 5
    assert set(moe_types.NOTES) & set(TYPES) <= set(supported)  # (the notes name 5.24's types; 5.17 has fewer)
    assert all(reason for reason in moe_types.UNSUPPORTED.values())


@pytest.mark.parametrize("model_type", TYPES)
def test_tiny_config(model_type, tmp_path):
    if model_type in moe_types.UNSUPPORTED:
        pytest.skip(moe_types.UNSUPPORTED[model_type])
    cls = moe_types.causal_lm_class(model_type)
    config = tiny_configs.tiny_config(model_type)
    start = time.perf_counter()
    torch.manual_seed(0)
    model = cls._from_config(config).eval()
    assert time.perf_counter() - start < 3.0, "the tiny model should build in well under a second"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:  # the config is ready for AutoModelForCausalLM too
        assert type(AutoModelForCausalLM.from_config(config)) is cls

    # experts and layer pattern
    text = config.get_text_config()
    get = lambda key: moe_types.config_value(text, key)  # noqa: E731 (global values of heterogeneous configs too)
    layers = _decoder_layers(model)
    moe_layers = [layer for layer in layers if _experts(layer)]
    assert len(moe_layers) >= 2
    for layer in moe_layers:
        for experts in _experts(layer):
            n = next(iter(experts.parameters())).shape[0]
            assert 8 <= n <= 16 and n % 2 == 0
            assert n % (get("n_group") or get("num_expert_group") or 1) == 0
    top_k = next(get(k) for k in tiny_configs.TOPK_KEYS if get(k))
    assert top_k == 1 if model_type in TOP1 else 2 <= top_k <= 4
    if any(get(k) is not None for k in DENSE_KEYS) and model_type not in NO_DENSE:
        assert len(moe_layers) < len(layers), "a dense layer among the MoE layers"
    default = type(text)()
    for key in KIND_KEYS:  # every layer kind of the family's default pattern is kept
        kinds = moe_types.config_value(default, key)
        if isinstance(kinds, list):
            assert set(kinds) <= set(get(key)), key

    # a padded batch, then a sharded save and load
    ids, mask = _inputs()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.shape[:2] == (2, 24) and logits.shape[-1] >= 256
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    loaded, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    with torch.no_grad():
        again = loaded.eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(again, logits, rtol=0, atol=1e-6)
