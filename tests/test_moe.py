"""reap's experts implementation against transformers' own eager experts forward, for every experts layout."""

from __future__ import annotations

import pytest
import torch

from reap.stream.experts import ExpertsProbe, _grouped_mm_fn, reap_experts_forward, use_reap_experts
from reap.calibrate.stats import FIELDS, LayerAccumulator

FAMILIES = ["minimax_m2", "gpt_oss", "deepseek_v3", "qwen3_next"]


def _experts(family: str, seed: int = 0):
    """A tiny model's first experts module with spread-out random weights (float32, on the CPU)."""
    from transformers import AutoModelForCausalLM

    from reap.model.model_side import is_experts_module
    from reap.testing.tiny import tiny_family_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_family_config(family), experts_implementation="eager")
    experts = next(m for m in model.modules() if is_experts_module(m))
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.3)
    return model, experts


def _routing(T: int, E: int, K: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])  # [T, K] distinct per token
    weights = torch.rand(T, K, generator=g)
    return index, weights


@pytest.mark.parametrize("family", FAMILIES)
def test_output_equals_transformers_eager(family):
    model, experts = _experts(family)
    T, H, K = 40, model.config.hidden_size, 3
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(2))
    index, weights = _routing(T, experts.num_experts, K)
    with torch.no_grad():
        want = experts(x, index, weights)  # transformers' eager forward (experts_implementation="eager")
        got = reap_experts_forward(experts, x, index, weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_statistics_equal_a_per_pair_recomputation(family):
    model, experts = _experts(family)
    T, H, K, E = 30, model.config.hidden_size, 2, experts.num_experts
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(3))
    index, weights = _routing(T, E, K, seed=4)
    mask = torch.ones(T, dtype=torch.bool)
    mask[25:] = False  # padding: these rows are neither computed nor counted
    acc = LayerAccumulator(E)
    experts._reap_probe = ExpertsProbe(acc, mask)
    with torch.no_grad():
        out = reap_experts_forward(experts, x, index, weights)
        want = {f: torch.zeros(E, dtype=torch.float64) for f in FIELDS}
        for t in range(25):
            for k in range(K):
                e = int(index[t, k])
                f = experts(x[t : t + 1], index[t : t + 1, k : k + 1], torch.ones(1, 1))[0]  # eager, weight 1
                n, w = float(f.norm()), float(weights[t, k])
                want["max_abs"][e] = max(float(want["max_abs"][e]), float(f.abs().max()))
                want["count"][e] += 1
                want["gate_sum"][e] += w
                want["ean_sum"][e] += n
                want["reap_sum"][e] += w * n
                want["max_norm"][e] = max(float(want["max_norm"][e]), n)
                want["ean_sq_sum"][e] += n * n
    assert torch.equal(out[25:], torch.zeros_like(out[25:]))
    torch.testing.assert_close(out[:25], experts(x[:25], index[:25], weights[:25]), rtol=1e-5, atol=1e-5)
    for f in FIELDS:
        torch.testing.assert_close(acc.to_dict()[f], want[f], rtol=1e-5, atol=1e-7, msg=f)


@pytest.mark.skipif(_grouped_mm_fn() is None, reason="this torch has no grouped matmul")
@pytest.mark.parametrize("family", FAMILIES)
def test_grouped_matmul_path_equals_loop(family):
    """The GPU path (one grouped matmul per projection), run here on the CPU in float32, == the per-expert loop,
    an expert with no token included."""
    model, experts = _experts(family)
    T, H, K = 50, model.config.hidden_size, 2
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(5))
    index, weights = _routing(T, experts.num_experts, K, seed=6)
    index[index == 3] = 4  # expert 3 gets no token
    results = []
    for grouped in (False, True):
        acc = LayerAccumulator(experts.num_experts)
        experts._reap_probe = ExpertsProbe(acc, grouped=grouped)
        with torch.no_grad():
            results.append((reap_experts_forward(experts, x, index, weights), acc.to_dict()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    for f in FIELDS:
        torch.testing.assert_close(results[1][1][f], results[0][1][f], rtol=1e-4, atol=1e-6)
    assert results[0][1]["count"][3] == 0


def test_use_reap_experts_switches_every_experts_module():
    model, _ = _experts("minimax_m2")
    modules = use_reap_experts(model)
    assert len(modules) == model.config.num_hidden_layers
    ids = torch.randint(0, 250, (1, 12))
    acc = LayerAccumulator(modules[0].num_experts)
    modules[0]._reap_probe = ExpertsProbe(acc)
    with torch.no_grad():
        model(ids)
    assert acc.count.sum() == 12 * model.config.num_experts_per_tok  # reap's function ran inside transformers' block
