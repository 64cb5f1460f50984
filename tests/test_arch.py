"""The family table: detection from config.json, its errors, and routing against transformers' own router."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from reap.arch import FAMILIES, MINIMAX_M2, detect, human_bytes, human_count, route
from reap.errors import UserError


def config_of(path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize(
    "model, numbers",
    [("tiny_fp32", (3, 16, 4, 64, 32)), ("tiny_fp8", (3, 16, 4, 64, 32)), ("mini_m2", (6, 64, 8, 192, 96)),
     ("mini_m2_fp8", (6, 64, 8, 192, 96))],
)
def test_detect_fixtures(model, numbers, request):
    spec = detect(config_of(request.getfixturevalue(model)))
    assert spec.family is MINIMAX_M2
    assert (spec.num_layers, spec.num_experts, spec.top_k, spec.hidden_size, spec.expert_intermediate) == numbers
    assert spec.num_experts_key == "num_local_experts"
    assert spec.router_name(2) == "model.layers.2.block_sparse_moe.gate.weight"
    assert spec.router_bias_name(2) == "model.layers.2.block_sparse_moe.e_score_correction_bias"
    assert spec.projection_name(1, 5, "gate") == "model.layers.1.block_sparse_moe.experts.5.w1.weight"
    assert spec.projection_name(1, 5, "up") == "model.layers.1.block_sparse_moe.experts.5.w3.weight"
    assert spec.projection_name(1, 5, "down") == "model.layers.1.block_sparse_moe.experts.5.w2.weight"


def test_expert_regex_matches_every_expert_tensor_of_the_fp8_fixture(mini_m2_fp8):
    weight_map = json.loads((mini_m2_fp8 / "model.safetensors.index.json").read_text())["weight_map"]
    regex = MINIMAX_M2.expert_regex()
    hits = {n: regex.match(n) for n in weight_map}
    experts = {n: m for n, m in hits.items() if m}
    assert len(experts) == 6 * 64 * 6  # w1/w2/w3 weights and their scales
    assert all(".experts." in n for n in experts) and not any(".experts." in n for n in weight_map if n not in experts)
    m = experts["model.layers.5.block_sparse_moe.experts.63.w2.weight_scale_inv"]
    assert (m["layer"], m["expert"], m["rest"]) == ("5", "63", "w2.weight_scale_inv")


BASE = {"model_type": "minimax_m2", "architectures": ["MiniMaxM2ForCausalLM"], "num_local_experts": 8,
        "num_experts_per_tok": 2, "num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 8}


@pytest.mark.parametrize(
    "config",
    [{**BASE, "model_type": "llama", "architectures": ["LlamaForCausalLM"]},
     {**BASE, "model_type": "qwen2_moe"},  # model_type decides, whatever architectures says
     {k: v for k, v in BASE.items() if k != "model_type"} | {"architectures": ["DeepseekV2ForCausalLM"]},
     {"hidden_size": 16}],
)
def test_unsupported_family_names_the_table(config):
    with pytest.raises(UserError) as err:
        detect(config)
    text = str(err.value)
    assert "unsupported model family" in text and "src/reap/arch.py" in text and "minimax_m2" in text
    assert "\n" not in text


def test_architectures_decide_when_model_type_is_absent():
    config = {k: v for k, v in BASE.items() if k != "model_type"}
    assert detect(config).family is MINIMAX_M2


@pytest.mark.parametrize(
    "change, needle",
    [({"num_local_experts": None}, "num_local_experts"), ({"num_local_experts": 0}, "num_local_experts"),
     ({"num_local_experts": True}, "num_local_experts"), ({"num_local_experts": "8"}, "num_local_experts"),
     ({"num_experts_per_tok": None}, "num_experts_per_tok"), ({"num_hidden_layers": -1}, "num_hidden_layers"),
     ({"num_experts_per_tok": 9}, "top-k 9 > 8")],
)
def test_bad_numbers(change, needle):
    config = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(UserError, match=needle.replace("+", r"\+")):
        detect(config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_equals_transformers_router(dtype):
    from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2TopKRouter

    from reap.tiny import tiny_config

    config = tiny_config(num_local_experts=32, num_experts_per_tok=6)
    router = MiniMaxM2TopKRouter(config).to(dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 0.5)
    bias = torch.randn(32, generator=gen) * 0.3  # large enough to change the choice
    hidden = torch.randn(500, config.hidden_size, generator=gen).to(dtype)
    with torch.no_grad():
        logits_ref, weights_ref, chosen_ref = router(hidden, bias)
        logits = torch.nn.functional.linear(hidden, router.weight)  # [T, E] in the router's dtype
        weights, chosen = route(logits, bias, config.num_experts_per_tok, MINIMAX_M2)
    assert torch.equal(logits, logits_ref)
    assert chosen.shape == (500, 6) and weights.dtype == torch.float32
    # same experts with the same weights (compared in expert order: the order within top-k is not meaningful)
    order, order_ref = chosen.argsort(dim=1), chosen_ref.argsort(dim=1)
    assert torch.equal(chosen.gather(1, order), chosen_ref.gather(1, order_ref))
    torch.testing.assert_close(weights.gather(1, order), weights_ref.gather(1, order_ref), rtol=1e-6, atol=1e-7)
    # the bias matters: without it other experts are chosen for some tokens
    _, unbiased = route(logits, None, config.num_experts_per_tok, MINIMAX_M2)
    assert not torch.equal(unbiased.sort(dim=1).values, chosen.sort(dim=1).values)


def test_route_softmax_family_against_a_direct_computation():
    family = dataclasses.replace(MINIMAX_M2, scoring="softmax", renormalize=False)
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 10, generator=gen)
    weights, chosen = route(logits, None, 3, family)
    probs = logits.softmax(-1)
    for t in range(50):
        best = sorted(range(10), key=lambda e: -probs[t, e].item())[:3]
        assert sorted(chosen[t].tolist()) == sorted(best)
        for w, e in zip(weights[t].tolist(), chosen[t].tolist()):
            assert w == pytest.approx(probs[t, e].item())


def test_family_table_is_consistent():
    names = [f.name for f in FAMILIES]
    assert len(set(names)) == len(names)
    for family in FAMILIES:
        assert family.scoring in ("softmax", "sigmoid", "topk_softmax")
        assert family.expert_fn in ("glu", "clamped_swiglu")
        if family.fused_experts:  # gpt-oss: one [E, ...] tensor per projection and its bias
            assert not family.projections
            assert set(family.fused_experts) == {"gate_up", "gate_up_bias", "down", "down_bias"}
            assert all(family.is_fused_expert(n) for n in family.fused_names(3).values())
        else:
            assert set(family.projections) == {"gate", "up", "down"}
        name = family.expert_prefix.format(layer=3, expert=11) + "w1.weight"
        m = family.expert_regex().match(name)
        assert m and (m["layer"], m["expert"]) == ("3", "11")


def test_human_units():
    assert human_count(229_000_000_000) == "229B"
    assert human_count(10_300_000_000) == "10.3B"
    assert human_count(23_474_112) == "23.5M"
    assert human_count(999) == "999"
    assert human_bytes(1536) == "1.50 KiB"
    assert human_bytes(100) == "100 B"
