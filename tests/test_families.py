"""Qwen3-MoE, Mixtral, DeepSeek-V3, Kimi-K2, GLM-4.5 and Qwen3-Next (the families beyond MiniMax-M2), checked
against transformers.

For every family, on tiny random checkpoints saved by transformers in several shards:

* routing (:func:`reap.arch.route`) equals transformers' own router module;
* the layer streamer's output equals transformers' decoder layer output (fp32 tight, bf16 loose), dense layers
  (Qwen3-MoE / Qwen3-Next ``mlp_only_layers`` / ``decoder_sparse_step``, DeepSeek-V3 / GLM-4.5
  ``first_k_dense_replace``), shared experts (gated by a sigmoid in Qwen3-Next) and both attention kinds of
  Qwen3-Next (Gated DeltaNet linear attention, by transformers' torch fallback, and full attention) included;
  Kimi-K2 (``model_type`` "kimi_k2", remote code) against transformers' DeepSeek-V3 classes;
* ``reap prune --ratio 0.3 --method random`` through the CLI writes a checkpoint transformers loads, whose
  logits equal the original's with the pruned experts masked out of routing. Masking means: softmax routers
  get router logits of -inf for the pruned experts (transformers' own router code runs, only its ``F.linear``
  is wrapped), so the pruned experts are never chosen *and* their softmax mass vanishes -- exactly what
  removing the rows does, with or without top-k renormalization; sigmoid routers (DeepSeek-V3) get a
  correction bias of -inf, since their scores do not depend on the other experts;
* group-limited routing (DeepSeek-V3, GLM-4.5 with ``n_group`` > 1) keeps every group equally sized and contiguous.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from helpers import (assert_reference_outputs, feed_reference_inputs, load_causal_lm, random_sequences,
                     reference_layers)
from safetensors import safe_open
from typer.testing import CliRunner

from reap.arch import DEEPSEEK_V3, GLM4_MOE, KIMI_K2, MIXTRAL, QWEN3_MOE, QWEN3_NEXT, detect, route
from reap.calibrate import EngineOptions, LayerStreamer
from reap.checkpoint import Checkpoint
from reap.cli import app
from reap.moe import RoutedMoE
from reap.saliency import LayerAccumulator

# name -> (family, tiny overrides); the expert count key as the released configs spell it
MODELS = {
    "qwen3": ("qwen3_moe", {}),  # norm_topk_prob false (Qwen3MoeConfig default), layer 1 dense (mlp_only_layers)
    "qwen3_norm": ("qwen3_moe", {"norm_topk_prob": True, "decoder_sparse_step": 2, "mlp_only_layers": []}),
    "mixtral": ("mixtral", {}),
    "deepseek": ("deepseek_v3", {}),  # 16 experts in 4 groups, top-2 groups, top-4, layer 0 dense, shared expert
    "kimi": ("kimi_k2", {}),  # DeepSeek-V3 as Kimi-K2 ships it: model_type kimi_k2, no groups, scaling 2.827
    "glm": ("glm4_moe", {}),  # as GLM-4.5: no groups, scaling 2.5, layer 0 dense, shared expert, q/k norm, qkv bias
    "glm_grouped": ("glm4_moe", {"n_group": 4, "topk_group": 2, "routed_scaling_factor": 1.0, "use_qk_norm": False,
                                 "attention_bias": False}),
    "qwen3_next": ("qwen3_next", {}),  # linear/full/linear/full attention, layer 2 dense, gated shared expert
}
FAMILY = {"qwen3_moe": QWEN3_MOE, "mixtral": MIXTRAL, "deepseek_v3": DEEPSEEK_V3, "kimi_k2": KIMI_K2,
          "glm4_moe": GLM4_MOE, "qwen3_next": QWEN3_NEXT}
SIGMOID = ("deepseek_v3", "kimi_k2", "glm4_moe")  # routers with a correction bias (masked by a bias of -inf)
SHARED = {"deepseek_v3": "shared_experts", "kimi_k2": "shared_experts", "glm4_moe": "shared_experts",
          "qwen3_next": "shared_expert"}
EXPERT = {  # written here, independently of the family table
    "qwen3_moe": re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(.+)$"),
    "mixtral": re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(.+)$"),
    "deepseek_v3": re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(.+)$"),
}
EXPERT |= {f: EXPERT["deepseek_v3"] for f in ("kimi_k2", "glm4_moe", "qwen3_next")}
ROUTER = {
    "qwen3_moe": re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.weight$"),
    "mixtral": re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight$"),
    "deepseek_v3": re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.(weight|e_score_correction_bias)$"),
}
ROUTER |= {"kimi_k2": ROUTER["deepseek_v3"], "glm4_moe": ROUTER["deepseek_v3"], "qwen3_next": ROUTER["qwen3_moe"]}
COUNT_KEY = {"qwen3_moe": "num_experts", "mixtral": "num_local_experts", "deepseek_v3": "n_routed_experts",
             "kimi_k2": "n_routed_experts", "glm4_moe": "n_routed_experts", "qwen3_next": "num_experts"}
LENGTHS = (23, 40, 7, 31)


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    """Tiny checkpoints made on first use, per (name, dtype)."""
    from reap.tiny import make_tiny_model

    from reap.tiny import convert_to_fp8

    cache: dict[tuple[str, torch.dtype | str], Path] = {}

    def get(name: str, dtype: torch.dtype | str = torch.float32) -> Path:
        if dtype == "fp8":  # the released FP8 block layout, made from the bf16 model
            if (name, dtype) not in cache:
                cache[name, dtype] = convert_to_fp8(get(name, torch.bfloat16),
                                                    tmp_path_factory.mktemp("family-models") / f"{name}-fp8")
            return cache[name, dtype]
        if (name, dtype) not in cache:
            family, overrides = MODELS[name]
            path = tmp_path_factory.mktemp("family-models") / f"{name}-{str(dtype).split('.')[1]}"
            cache[name, dtype] = make_tiny_model(path, seed=2, dtype=dtype, family=family, **overrides)
        return cache[name, dtype]

    return get


@pytest.fixture(scope="session")
def pruned_models(tmp_path_factory, family_models):
    """``reap prune --ratio 0.3 --method random`` through the CLI, once per model."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:  # "NAME" or "NAME-fp8"
        if name not in cache:
            src = family_models(name[:-4], "fp8") if name.endswith("-fp8") else family_models(name)
            out = tmp_path_factory.mktemp("family-pruned") / name
            res = CliRunner().invoke(app, ["prune", str(src), "--out", str(out), "--ratio", "0.3", "--method",
                                           "random", "--seed", "5", "-q"])
            assert res.exit_code == 0, res.output
            assert res.stdout.strip() == str(out.resolve())
            cache[name] = out
        return cache[name]

    return get


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(path / shard), "pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    assert set(out) == set(weight_map)
    return out


def _load(path: Path, dtype=torch.float32):
    model, info = load_causal_lm(path, dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


# -- detection ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, numbers, routing, moe_layers", [
    ("qwen3", (4, 16, 4, 32), (False, 1.0, 1, 1), [0, 2, 3]),
    ("qwen3_norm", (4, 16, 4, 32), (True, 1.0, 1, 1), [1, 3]),
    ("mixtral", (3, 8, 2, 32), (True, 1.0, 1, 1), [0, 1, 2]),
    ("deepseek", (3, 16, 4, 32), (True, 2.5, 4, 2), [1, 2]),
    ("kimi", (3, 16, 4, 32), (True, 2.827, 1, 1), [1, 2]),
    ("glm", (3, 16, 4, 32), (True, 2.5, 1, 1), [1, 2]),
    ("glm_grouped", (3, 16, 4, 32), (True, 1.0, 4, 2), [1, 2]),
    ("qwen3_next", (4, 16, 4, 32), (True, 1.0, 1, 1), [0, 1, 3]),
])
def test_detect_and_moe_layers(family_models, name, numbers, routing, moe_layers):
    from reap.prune import moe_layers as find_moe_layers

    path = family_models(name)
    config = _config(path)
    spec = detect(config)
    assert spec.family is FAMILY[MODELS[name][0]]
    assert (spec.num_layers, spec.num_experts, spec.top_k, spec.expert_intermediate) == numbers
    r = spec.routing
    assert (r.renormalize, r.scaling, r.n_group, r.topk_group) == routing
    assert spec.num_experts_keys == (COUNT_KEY[spec.family.name],)
    assert find_moe_layers(Checkpoint(path), spec) == moe_layers
    # transformers agrees on which layers are sparse
    from transformers import AutoConfig, AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    with torch.device("meta"):
        if spec.family is KIMI_K2:  # transformers' DeepSeek-V3 classes (the checkpoint's own are remote code)
            model = DeepseekV3ForCausalLM(DeepseekV3Config.from_pretrained(path))
        else:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    assert [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")] == moe_layers


@pytest.mark.parametrize("model_type, architectures, family", [
    ("kimi_k2", ["DeepseekV3ForCausalLM"], "kimi_k2"),  # model_type decides
    (None, ["DeepseekV3ForCausalLM"], "deepseek_v3"),  # without one, the architecture: Kimi-K2 is DeepSeek-V3
    (None, ["Glm4MoeForCausalLM"], "glm4_moe"), (None, ["Qwen3NextForCausalLM"], "qwen3_next"),
])
def test_detect_new_families(model_type, architectures, family):
    config = {"architectures": architectures, "n_routed_experts": 8, "num_experts": 8, "num_experts_per_tok": 2,
              "num_hidden_layers": 2, "hidden_size": 16, "moe_intermediate_size": 8, "n_group": 1, "topk_group": 1,
              **({"model_type": model_type} if model_type else {})}
    assert detect(config).family is FAMILY[family]


def test_qwen3_config_with_both_count_keys_is_rewritten_in_both():
    config = {"model_type": "qwen3_moe", "num_experts": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
              "num_hidden_layers": 2, "hidden_size": 16, "moe_intermediate_size": 8}
    assert detect(config).num_experts_keys == ("num_experts", "num_local_experts")
    from reap.errors import UserError

    with pytest.raises(UserError, match="different expert counts"):
        detect({**config, "num_local_experts": 6})


@pytest.mark.parametrize("change, needle", [({"n_group": 3}, "do not divide"), ({"topk_group": 5}, "top-5 of 4"),
                                            ({"n_group": 0}, "positive integer"),
                                            ({"routed_scaling_factor": "x"}, "must be a number")])
def test_deepseek_bad_group_config(change, needle):
    from reap.errors import UserError

    config = {"model_type": "deepseek_v3", "n_routed_experts": 16, "num_experts_per_tok": 4, "num_hidden_layers": 2,
              "hidden_size": 16, "moe_intermediate_size": 8, "n_group": 4, "topk_group": 2, **change}
    with pytest.raises(UserError, match=re.escape(needle)):
        detect(config)


# -- routing against transformers' router modules --------------------------------------------------------------
def _router_case(family: str, overrides: dict):
    from reap.tiny import tiny_family_config

    config = tiny_family_config(family, **overrides)
    if family == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter as Router
    elif family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter as Router
    elif family == "glm4_moe":
        from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter as Router
    elif family == "qwen3_next":
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextTopKRouter as Router
    else:  # deepseek_v3, kimi_k2
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter as Router
    return config, Router(config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family, overrides", [
    ("qwen3_moe", {"num_experts": 32, "num_experts_per_tok": 6}),
    ("qwen3_moe", {"num_experts": 32, "num_experts_per_tok": 6, "norm_topk_prob": True}),
    ("mixtral", {"num_local_experts": 32, "num_experts_per_tok": 6}),
    ("deepseek_v3", {"n_routed_experts": 32, "num_experts_per_tok": 6, "n_group": 8, "topk_group": 3}),
    ("deepseek_v3", {"n_routed_experts": 32, "num_experts_per_tok": 6, "n_group": 4, "topk_group": 2,
                     "norm_topk_prob": False, "routed_scaling_factor": 1.0}),
    ("kimi_k2", {"n_routed_experts": 32, "num_experts_per_tok": 6}),
    ("glm4_moe", {"n_routed_experts": 32, "num_experts_per_tok": 6}),  # as released: no groups, scaling 2.5
    ("glm4_moe", {"n_routed_experts": 32, "num_experts_per_tok": 6, "n_group": 8, "topk_group": 3,
                  "norm_topk_prob": False, "routed_scaling_factor": 1.0}),
    ("qwen3_next", {"num_experts": 32, "num_experts_per_tok": 6}),
    ("qwen3_next", {"num_experts": 32, "num_experts_per_tok": 6, "norm_topk_prob": False}),
])
def test_route_equals_transformers_router(family, overrides, dtype):
    config, router = _router_case(family, overrides)
    router = router.to(dtype)
    spec = detect({**config.to_dict(), "model_type": family})
    assert spec.family is FAMILY[family]
    gen = torch.Generator().manual_seed(0)
    E, H = router.weight.shape
    bias = None
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, H, generator=gen) * 0.5)
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.copy_(torch.randn(E, generator=gen) * 0.3)
            bias = router.e_score_correction_bias
    hidden = torch.randn(500, H, generator=gen).to(dtype)
    with torch.no_grad():
        _, weights_ref, chosen_ref = router(hidden)
        w = router.weight.float() if spec.family.router_float32 else router.weight
        logits = torch.nn.functional.linear(hidden.to(w.dtype), w)
        weights, chosen = route(logits, bias, spec.top_k, spec.family, spec.routing)
    assert chosen.shape == (500, spec.top_k) and weights.dtype == torch.float32
    order, order_ref = chosen.argsort(dim=1), chosen_ref.argsort(dim=1)
    assert torch.equal(chosen.gather(1, order), chosen_ref.gather(1, order_ref))
    torch.testing.assert_close(weights.gather(1, order), weights_ref.float().gather(1, order_ref), rtol=1e-6, atol=1e-7)
    if spec.routing.n_group > 1:  # the group limit matters: plain top-k picks other experts for some tokens
        from dataclasses import replace

        _, free = route(logits, bias, spec.top_k, spec.family, replace(spec.routing, n_group=1))
        assert not torch.equal(free.sort(dim=1).values, chosen.sort(dim=1).values)
        size = E // spec.routing.n_group
        assert all(len(set((row // size).tolist())) <= spec.routing.topk_group for row in chosen)


def test_softmax_pruning_equals_minus_inf_logits_not_choice_masking():
    """Without renormalization a softmax router's weights depend on every expert's logit: removing rows equals
    logits of -inf (mass vanishes), not merely forbidding the choice (mass kept in the denominator)."""
    spec = detect({"model_type": "qwen3_moe", "num_experts": 12, "num_experts_per_tok": 3, "num_hidden_layers": 1,
                   "hidden_size": 8, "moe_intermediate_size": 4, "norm_topk_prob": False})
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(200, 12, generator=gen)
    kept = [0, 2, 3, 5, 6, 8, 9, 11]
    pruned = [e for e in range(12) if e not in kept]
    w_small, c_small = route(logits[:, kept], None, 3, spec.family, spec.routing)
    masked = logits.clone()
    masked[:, pruned] = float("-inf")
    w_mask, c_mask = route(masked, None, 3, spec.family, spec.routing)
    ids = torch.tensor(kept)[c_small]
    o1, o2 = ids.argsort(1), c_mask.argsort(1)
    assert torch.equal(ids.gather(1, o1), c_mask.gather(1, o2))
    torch.testing.assert_close(w_small.gather(1, o1), w_mask.gather(1, o2), rtol=1e-6, atol=1e-7)
    choice_only = logits.softmax(-1).gather(1, c_mask)  # forbidding the choice keeps the full denominator
    assert (choice_only.gather(1, o2) - w_mask.gather(1, o2)).abs().max() > 1e-2


# -- the layer streamer against transformers' decoder layers ----------------------------------------------------
def _sequences(vocab: int) -> list[list[int]]:
    return random_sequences(vocab, LENGTHS)


@pytest.mark.parametrize("name, dtype, atol, batch_tokens", [
    ("qwen3", torch.float32, 1e-5, 1), ("qwen3", torch.float32, 1e-5, 4096), ("qwen3", torch.bfloat16, 2e-2, 4096),
    ("qwen3_norm", torch.float32, 1e-5, 4096),
    ("mixtral", torch.float32, 1e-5, 1), ("mixtral", torch.float32, 1e-5, 4096),
    ("deepseek", torch.float32, 1e-5, 1), ("deepseek", torch.float32, 1e-5, 4096),
    ("deepseek", torch.bfloat16, 2e-2, 4096),
    ("deepseek", "fp8", 1e-5, 4096), ("qwen3", "fp8", 1e-5, 4096),  # FP8 blocks: transformers dequantizes too
    ("kimi", torch.float32, 1e-5, 4096),
    ("glm", torch.float32, 1e-5, 1), ("glm", torch.float32, 1e-5, 4096), ("glm", torch.bfloat16, 2e-2, 4096),
    ("glm_grouped", torch.float32, 1e-5, 4096), ("glm", "fp8", 1e-5, 4096),
    # one sequence per batch, and all four right-padded in one batch (the linear attention's padding mask)
    ("qwen3_next", torch.float32, 1e-5, 1), ("qwen3_next", torch.float32, 1e-5, 4096),
    ("qwen3_next", torch.bfloat16, 2e-2, 4096), ("qwen3_next", "fp8", 1e-5, 4096),
])
def test_layer_output_equals_transformers(family_models, name, dtype, atol, batch_tokens):
    from reap.prune import moe_layers

    path = family_models(name, dtype)
    dtype = torch.float32 if dtype == "fp8" else dtype
    ckpt = Checkpoint(path)
    spec = detect(ckpt.config)
    sparse = moe_layers(ckpt, spec)
    seqs = _sequences(ckpt.config["vocab_size"])
    ref = reference_layers(path, dtype, seqs)
    streamer = LayerStreamer(ckpt, spec, seqs, EngineOptions(device="cpu", dtype=str(dtype).split(".")[1],
                                                             batch_tokens=batch_tokens, progress=False))
    for layer in range(spec.num_layers):
        feed_reference_inputs(streamer, ref, layer, dtype)
        acc = LayerAccumulator(spec.num_experts)
        streamer.run_layer(layer, acc)
        # the instrumented MoE ran exactly in the sparse layers: every real token is routed to top-k experts in a
        # sparse layer, none in a dense one (after the layer, transformers' block is back and on meta)
        assert not isinstance(getattr(streamer.layers[layer], "mlp"), RoutedMoE)
        assert acc.count.sum().item() == (sum(LENGTHS) * spec.top_k if layer in sparse else 0)
        assert_reference_outputs(streamer, ref, layer, atol)
    streamer.close()


@pytest.mark.parametrize("name", ["deepseek", "glm", "qwen3_next"])
def test_shared_experts_are_computed(family_models, name):
    """The layer output needs the shared expert (and, in Qwen3-Next, its sigmoid gate): without it the output
    differs (the test above is not passing by accident)."""
    path = family_models(name)
    ckpt = Checkpoint(path)
    spec = detect(ckpt.config)
    seqs = _sequences(ckpt.config["vocab_size"])[:1]
    streamer = LayerStreamer(ckpt, spec, seqs, EngineOptions(device="cpu", dtype="float32", progress=False))
    module = streamer.load_layer(1)
    moe = module.mlp
    assert isinstance(moe, RoutedMoE) and moe.shared is not None
    assert (moe.shared_gate is not None) == (name == "qwen3_next")
    x = torch.randn(1, 5, spec.hidden_size)
    with torch.no_grad():
        full = moe(x)
        shared, moe.shared = moe.shared, None
        routed = moe(x)
        if moe.shared_gate is None:
            torch.testing.assert_close(full, routed + shared(x))
        else:
            gate = torch.sigmoid(moe.shared_gate(x))  # [1, 5, 1]
            torch.testing.assert_close(full, routed + gate * shared(x))
            assert (full - routed - shared(x)).abs().max() > 1e-3  # the gate is not the identity
    assert (full - routed).abs().max() > 1e-3
    streamer.close()


# -- pruning through the CLI ---------------------------------------------------------------------------------------
def _mask_softmax_routers(monkeypatch, model, family: str, pruned: dict[int, list[int]]) -> None:
    """Router logits of the pruned experts -> -inf, by wrapping the F.linear of transformers' router code."""
    import importlib

    module = importlib.import_module(type(model).__module__)
    masks = {}
    for layer, ids in pruned.items():
        weight = model.model.layers[layer].mlp.gate.weight
        mask = torch.zeros(weight.shape[0])
        mask[ids] = float("-inf")
        masks[id(weight)] = mask

    class MaskedF:
        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

        def linear(self, x, weight, bias=None):
            out = torch.nn.functional.linear(x, weight, bias)
            mask = masks.get(id(weight))
            return out if mask is None else out + mask.to(out.dtype)

    monkeypatch.setattr(module, "F", MaskedF())


PRUNED = [*MODELS, "qwen3-fp8", "deepseek-fp8", "glm-fp8", "qwen3_next-fp8"]


def _source(family_models, name: str) -> Path:
    return family_models(name[:-4], "fp8") if name.endswith("-fp8") else family_models(name)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("name", PRUNED)
def test_pruned_checkpoint_is_exact_surgery(family_models, pruned_models, name):
    from reap.prune import moe_layers

    src, out = _source(family_models, name), pruned_models(name)
    family = MODELS[name.removesuffix("-fp8")][0]
    src_config, config = _config(src), _config(out)
    report = json.loads((out / "reap_report.json").read_text())
    spec = detect(src_config)
    E = spec.num_experts
    layers = {int(k): v for k, v in report["layers"].items()}
    drop = math.floor(E * 0.3)
    if spec.routing.n_group > 1:
        drop -= drop % spec.routing.n_group
    k = E - drop
    assert report["kept_per_layer"] == k and report["family"] == family
    # config.json: the expert count (under the key the source uses) changes, nothing else
    assert config == {**src_config, COUNT_KEY[family]: k}
    before, after = _tensors(src), _tensors(out)
    expected = {}
    for name_, t in before.items():
        m, r = EXPERT[family].match(name_), ROUTER[family].match(name_)
        if m:
            layer, expert, rest = int(m[1]), int(m[2]), m[3]
            if expert in layers[layer]["kept"]:
                new = layers[layer]["kept"].index(expert)
                expected[name_.replace(f".experts.{expert}.{rest}", f".experts.{new}.{rest}")] = t
        elif r:
            expected[name_] = t[layers[int(r[1])]["kept"]]
        else:
            expected[name_] = t  # attention, norms, dense MLPs, shared experts: untouched
    assert set(after) == set(expected)
    for n, t in after.items():
        assert _same(t.contiguous(), expected[n].contiguous()), n
    if name.endswith("-fp8"):  # the FP8 experts kept their scales, renumbered with them
        assert any(n.endswith("experts.0.down_proj.weight_scale_inv") for n in after)
        assert str(next(t for n, t in after.items() if n.endswith("experts.0.down_proj.weight")).dtype) == "torch.float8_e4m3fn"
    assert sorted(layers) == moe_layers(Checkpoint(src), spec)
    if family in SHARED:  # shared experts (and Qwen3-Next's shared expert gate) are kept, byte for byte (above)
        assert any(f"mlp.{SHARED[family]}.down_proj.weight" in n for n in after)
        if family == "qwen3_next":
            assert all(f"model.layers.{layer}.mlp.shared_expert_gate.weight" in after for layer in layers)


@pytest.mark.parametrize("name", PRUNED)
def test_pruned_model_equals_original_with_pruned_experts_masked(family_models, pruned_models, name, monkeypatch):
    src, out = _source(family_models, name), pruned_models(name)
    family = MODELS[name.removesuffix("-fp8")][0]
    report = json.loads((out / "reap_report.json").read_text())
    pruned = {int(layer): entry["pruned"] for layer, entry in report["layers"].items()}
    original, small = _load(src), _load(out)
    kept = report["kept_per_layer"]
    assert getattr(small.config, COUNT_KEY[family]) == kept
    for layer in pruned:
        assert small.model.layers[layer].mlp.experts.gate_up_proj.shape[0] == kept
    ids = torch.randint(0, original.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = original(ids).logits
        got = small(ids).logits
        if family in SIGMOID:  # sigmoid scores: a bias of -inf only forbids the choice, which is all it takes
            for layer, ids_ in pruned.items():
                original.model.layers[layer].mlp.gate.e_score_correction_bias[ids_] = float("-inf")
        else:
            _mask_softmax_routers(monkeypatch, original, family, pruned)
        masked = original(ids).logits
    torch.testing.assert_close(got, masked, atol=1e-4, rtol=1e-4)
    assert (reference - masked).abs().max() > 1e-3  # pruning changed something: the comparison is not vacuous
    meta = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]
    if "total_parameters" in meta:
        assert meta["total_parameters"] == small.num_parameters()


# -- group-limited routing keeps equal groups ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["deepseek", "glm_grouped"])
def test_groups_stay_equal_and_contiguous(family_models, pruned_models, name):
    src, out = family_models(name), pruned_models(name)
    spec = detect(_config(src))
    G, size = spec.routing.n_group, spec.num_experts // spec.routing.n_group
    report = json.loads((out / "reap_report.json").read_text())
    assert len(report["layers"]) == 2  # layer 0 is dense
    for entry in report["layers"].values():
        per_group = [sum(1 for e in entry["kept"] if e // size == g) for g in range(G)]
        assert per_group == [per_group[0]] * G and per_group[0] == size - 1  # floor(16 x 0.3) = 4 -> 1 per group
        # renumbered in original order: new group g holds exactly the kept experts of old group g
        new_size = len(entry["kept"]) // G
        assert [e // size for e in entry["kept"]] == [i // new_size for i in range(len(entry["kept"]))]
    config = _config(out)
    assert (config["n_group"], config["topk_group"], config["n_routed_experts"]) == (4, 2, 12)


def test_keep_from_scores_by_group():
    from reap.prune import keep_from_scores

    scores = torch.tensor([[5.0, 1, 3, 2, 0, 9, 8, 7, 6, 4, 4, 1]])  # 3 groups of 4
    keep = keep_from_scores(scores, [0], 6, n_group=3)
    assert keep == {0: [0, 2, 5, 6, 8, 9]}  # the best 2 of each group; among equal scores the lower id stays


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_deepseek_keep_file_and_ratio_errors(family_models, tmp_path):
    src = family_models("deepseek")
    keep = tmp_path / "keep.json"
    # 12 experts but 4 + 2 + 3 + 3 from the groups
    keep.write_text(json.dumps({"1": [0, 1, 2, 3, 4, 5, 8, 9, 10, 12, 13, 14], "2": list(range(12))}))
    res = _run("prune", src, "--out", tmp_path / "o", "--keep", keep, "-q")
    assert res.exit_code == 2 and "same number from each" in res.output and "\n" not in res.output.strip()
    # 0.1 drops floor(1.6) = 1 < 4 groups
    res = _run("prune", src, "--out", tmp_path / "o", "--ratio", "0.1", "--method", "random", "-q")
    assert res.exit_code == 2 and "expert groups" in res.output
    # 0.75 would leave 1 per group: top-4 in 2 groups needs 2 per group
    res = _run("prune", src, "--out", tmp_path / "o", "--ratio", "0.75", "--method", "random", "-q")
    assert res.exit_code == 2 and "--ratio 0.5 or less" in res.output, res.output
    assert not (tmp_path / "o").exists()
    # an explicit equal-group keep file works
    keep.write_text(json.dumps({str(layer): [0, 1, 2, 4, 5, 7, 8, 9, 11, 12, 14, 15] for layer in (1, 2)}))
    res = _run("prune", src, "--out", tmp_path / "o", "--keep", keep, "-q")
    assert res.exit_code == 0, res.output
    assert _config(tmp_path / "o")["n_routed_experts"] == 12


@pytest.mark.parametrize("name, routing", [
    ("qwen3", "softmax, top-k not renormalized"), ("qwen3_norm", "softmax, top-k renormalized"),
    ("mixtral", "softmax, top-k renormalized"),
    ("deepseek", "sigmoid + correction bias, top-2 of 4 groups, top-k renormalized, scaled x2.5"),
    ("kimi", "sigmoid + correction bias, top-k renormalized, scaled x2.827"),
    ("glm", "sigmoid + correction bias, top-k renormalized, scaled x2.5"),
    ("glm_grouped", "sigmoid + correction bias, top-2 of 4 groups, top-k renormalized"),
    ("qwen3_next", "softmax, top-k renormalized"),
])
def test_inspect(family_models, name, routing):
    from reap.summary import describe, format_description

    info = describe(Checkpoint(family_models(name)), ratio=0.3)
    assert info["routing"] == routing and info["family"] == MODELS[name][0]
    assert info["after"]["experts_per_layer"] == (12 if name in ("deepseek", "glm_grouped") else info["experts"] - math.floor(info["experts"] * 0.3))
    assert f"family      {MODELS[name][0]} ({info['moe_layers']}/{info['layers']} layers" in format_description(info)
    assert info["after"]["total_params"] < info["before"]["total_params"]


@pytest.mark.parametrize("name, mtp_key, prefix", [
    ("glm", "num_nextn_predict_layers", None),  # GLM-4.5: model.layers.92 past num_hidden_layers
    ("deepseek", "num_nextn_predict_layers", None),  # DeepSeek-V3: model.layers.61
    ("qwen3_next", "mtp_num_hidden_layers", "mtp.layers.0."),  # Qwen3-Next: mtp.*
])
def test_mtp_module_is_left_out_and_inspect_predicts_the_output(family_models, tmp_path, name, mtp_key, prefix):
    """A multi-token-prediction module (its own router and experts, which transformers never loads) would no longer
    match the pruned expert count: prune leaves it out and sets its config key to 0, the rest is the same surgery
    as without it, transformers loads the result, and `reap inspect`'s prediction equals what prune writes."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from reap.summary import describe

    src = tmp_path / "mtp"
    shutil.copytree(family_models(name), src)
    config = _config(src)
    n = config["num_hidden_layers"]
    target = prefix or f"model.layers.{n}."  # the MTP module: a copy of the last layer, plus its own projection
    extra = {k.replace(f"model.layers.{n - 1}.", target): t
             for k, t in _tensors(src).items() if k.startswith(f"model.layers.{n - 1}.")}
    extra[target + "eh_proj.weight"] = torch.randn(config["hidden_size"], 2 * config["hidden_size"])
    save_file(extra, str(src / "mtp.safetensors"), metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "mtp.safetensors" for k in extra})
    index["metadata"]["total_size"] += sum(t.numel() * t.element_size() for t in extra.values())
    index["metadata"]["total_parameters"] += sum(t.numel() for k, t in extra.items()
                                                 if not k.endswith("e_score_correction_bias"))  # a buffer
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (src / "config.json").write_text(json.dumps({**config, mtp_key: 1}))
    info = describe(Checkpoint(src), ratio=0.3)
    assert info["mtp"] == {"tensors": len(extra), "params": sum(t.numel() for t in extra.values())}
    with_mtp, without = tmp_path / "o", tmp_path / "plain"
    for model, out in ((src, with_mtp), (family_models(name), without)):
        res = _run("prune", model, "--out", out, "--ratio", "0.3", "--method", "random", "--seed", "3", "-q")
        assert res.exit_code == 0, res.output
    after = _tensors(with_mtp)
    assert not any(k in after for k in extra)
    assert after.keys() == _tensors(without).keys()  # otherwise the same checkpoint
    assert all(_same(after[k], t) for k, t in _tensors(without).items())
    assert _config(with_mtp) == {**_config(without), mtp_key: 0}
    assert "dropped_mtp_tensors" in json.loads((with_mtp / "reap_report.json").read_text())
    assert info["after"]["total_params"] == sum(t.numel() for t in after.values())
    assert info["after"]["disk_bytes"] == sum(t.numel() * t.element_size() for t in after.values())
    meta = json.loads((with_mtp / "model.safetensors.index.json").read_text())["metadata"]
    assert meta["total_size"] == info["after"]["disk_bytes"]
    model = AutoModelForCausalLM.from_pretrained(with_mtp)
    assert meta["total_parameters"] == model.num_parameters()


def test_every_expert_count_key_is_rewritten(family_models, tmp_path):
    """A Qwen3-MoE config that holds the count under both spellings gets both updated."""
    import shutil

    src = tmp_path / "both"
    shutil.copytree(family_models("qwen3"), src)
    config = _config(src)
    config["num_local_experts"] = config["num_experts"]
    (src / "config.json").write_text(json.dumps(config))
    res = _run("prune", src, "--out", tmp_path / "o", "--ratio", "0.25", "--method", "random", "-q")
    assert res.exit_code == 0, res.output
    out = _config(tmp_path / "o")
    assert out["num_experts"] == out["num_local_experts"] == 12
    assert out == {**config, "num_experts": 12, "num_local_experts": 12}


def test_unknown_moe_tensor_is_refused_by_the_streamer(family_models, tmp_path):
    """A tensor in the MoE block that the family entry does not describe (a Qwen2-MoE-style shared expert gate)
    would make reap route differently from the model: calibration refuses it with a one-line error."""
    import shutil

    from safetensors.torch import save_file

    from reap.errors import UserError

    src = tmp_path / "extra"
    shutil.copytree(family_models("qwen3"), src)
    name = "model.layers.0.mlp.shared_expert_gate.weight"
    save_file({name: torch.zeros(1, 64)}, str(src / "extra.safetensors"), metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = "extra.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = Checkpoint(src)
    streamer = LayerStreamer(ckpt, detect(ckpt.config), [[1, 2, 3]], EngineOptions(device="cpu", progress=False))
    with pytest.raises(UserError, match="shared_expert_gate.*not described by the qwen3_moe entry"):
        streamer.load_layer(0)
    streamer.close()


def _calibrate_on_source(model: Path, tmp_path: Path, stats_path: Path, files: int, chars: int, max_length: int):
    """`calibrate` on CPU with the first ``chars`` characters of reap's first ``files`` source files as the data;
    the statistics are also written to ``stats_path``. Returns (stats, summary)."""
    from reap.calibrate import CalibrateOptions, calibrate
    from reap.data import DataOptions

    sources = sorted((Path(__file__).resolve().parents[1] / "src" / "reap").glob("*.py"))[:files]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": p.read_text()[:chars]}) + "\n" for p in sources))
    return calibrate(CalibrateOptions(model=str(model), data=DataOptions(dataset=str(data), max_length=max_length),
                                      out=stats_path, engine=EngineOptions(device="cpu", progress=False)))


@pytest.mark.parametrize("name", ["qwen3", "deepseek", "kimi", "qwen3_next"])
def test_calibrate_then_prune_by_reap_score(family_models, tmp_path, name):
    """The whole pipeline: calibration statistics (dense layers have none), then `prune --method reap --stats`."""
    from reap.prune import moe_layers

    src = family_models(name)
    stats_path = tmp_path / "s.safetensors"
    stats, summary = _calibrate_on_source(src, tmp_path, stats_path, files=4, chars=400, max_length=64)
    spec = detect(_config(src))
    sparse = moe_layers(Checkpoint(src), spec)
    for layer in range(spec.num_layers):
        assert stats.count[layer].sum().item() == (summary["tokens"] * spec.top_k if layer in sparse else 0)
    assert stats.completed == set(range(spec.num_layers))
    res = _run("prune", src, "--out", tmp_path / "o", "--ratio", "0.3", "--stats", stats_path, "-q")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o" / "reap_report.json").read_text())
    scores = stats.scores("reap")
    for layer, entry in report["layers"].items():
        kept, pruned = entry["kept"], entry["pruned"]
        s = scores[int(layer)]
        if spec.routing.n_group > 1:  # the lowest of each group go
            size = spec.num_experts // spec.routing.n_group
            for g in range(spec.routing.n_group):
                ks = [s[e] for e in kept if e // size == g]
                ps = [s[e] for e in pruned if e // size == g]
                assert len(ps) == 1 and min(ks) >= max(ps)
        else:
            assert min(s[kept]) >= max(s[pruned])


# -- gpt-oss: fused experts with biases, a router bias, clamped GLU, sliding/full attention, MXFP4 -----------------
# Independent of the family table: transformers' GptOss modules are the reference throughout; the MXFP4 checkpoint
# is loaded by transformers, which dequantizes it to bf16 on the CPU with its own code.
GPT_OSS_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?$")
GPT_OSS_ROUTER = re.compile(r"^model\.layers\.(\d+)\.mlp\.router\.(weight|bias)$")
GPT_OSS_LENGTHS = (23, 40, 7, 31)  # the tiny config's sliding window is 8 tokens


@pytest.fixture(scope="session")
def gpt_oss_models(tmp_path_factory):
    """Tiny gpt-oss checkpoints per kind: float32, bfloat16 (saved by transformers, several shards), and "mxfp4"
    (the bf16 one in the released MXFP4 layout)."""
    from reap.tiny import convert_to_mxfp4, make_tiny_model

    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            root = tmp_path_factory.mktemp("gpt-oss")
            if kind == "mxfp4":
                cache[kind] = convert_to_mxfp4(get("bfloat16"), root / "mxfp4")
            else:
                cache[kind] = make_tiny_model(root / kind, seed=2, dtype=getattr(torch, kind), family="gpt_oss")
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def gpt_oss_pruned(tmp_path_factory, gpt_oss_models):
    """``reap prune --ratio 0.3 --method random`` through the CLI, once per kind."""
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            out = tmp_path_factory.mktemp("gpt-oss-pruned") / kind
            res = CliRunner().invoke(app, ["prune", str(gpt_oss_models(kind)), "--out", str(out), "--ratio", "0.3",
                                           "--method", "random", "--seed", "5", "-q"])
            assert res.exit_code == 0, res.output
            cache[kind] = out
        return cache[kind]

    return get


def test_gpt_oss_detect(gpt_oss_models):
    from reap.arch import GPT_OSS
    from reap.prune import moe_layers

    path = gpt_oss_models("float32")
    config = _config(path)
    spec = detect(config)
    assert spec.family is GPT_OSS
    assert (spec.num_layers, spec.num_experts, spec.top_k, spec.expert_intermediate) == (3, 16, 4, 32)
    assert spec.num_experts_keys == ("num_local_experts",)
    assert config["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert config["sliding_window"] == 8 < min(n for n in GPT_OSS_LENGTHS if n != 7)
    assert moe_layers(Checkpoint(path), spec) == [0, 1, 2]
    # the released config also says experts_per_token (top-k, unchanged by pruning) and swiglu_limit
    released = {**config, "experts_per_token": 4, "swiglu_limit": 7.0}
    released.pop("num_experts_per_tok")
    assert detect(released).top_k == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_oss_route_equals_transformers_router(dtype):
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    from reap.tiny import tiny_family_config

    config = tiny_family_config("gpt_oss", num_local_experts=32, num_experts_per_tok=4)
    router = GptOssTopKRouter(config)
    spec = detect({"model_type": "gpt_oss", **config.to_dict()})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(32, 64, generator=gen) * 0.5)
        router.bias.copy_(torch.randn(32, generator=gen))
    router = router.to(dtype)
    hidden = torch.randn(500, 64, generator=gen).to(dtype)
    with torch.no_grad():
        _, scores_ref, chosen_ref = router(hidden)
        logits = torch.nn.functional.linear(hidden, router.weight, router.bias)
        weights, chosen = route(logits, None, spec.top_k, spec.family, spec.routing)
        no_bias = route(torch.nn.functional.linear(hidden, router.weight), None, spec.top_k, spec.family)[1]
    assert torch.equal(chosen, chosen_ref)  # same order too (top-k sorted, as transformers)
    torch.testing.assert_close(weights, scores_ref.float(), rtol=0, atol=0)
    assert not torch.equal(no_bias, chosen)  # the router bias matters
    if dtype == torch.float32:  # == softmax over all E, renormalized over the chosen K
        full = logits.softmax(-1).gather(1, chosen)
        torch.testing.assert_close(weights, full / full.sum(-1, keepdim=True), rtol=1e-6, atol=1e-7)


def _gpt_oss_reference(path: Path, dtype: torch.dtype, seqs):
    """transformers' model: per layer and sequence, (layer input, layer output, MoE input), and the model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ref = reference_layers(path, dtype, seqs)
    moe_in: dict[int, list] = {}
    hooks = [layer.mlp.register_forward_hook(lambda mod, args, out, i=i: moe_in.setdefault(i, []).append(args[0][0].clone()))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for seq in seqs:
            model.model(torch.tensor([seq]))
    for h in hooks:
        h.remove()
    return ref, moe_in, model


def _independent_stats(mlp, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per expert, float64: tokens routed, sum of gate weights, sum of ||f_e(x)||, sum of g x ||f_e(x)||, with
    transformers' own router and experts (one expert at a time, routing weight 1)."""
    E = mlp.router.num_experts
    count, gate, ean, reap = (torch.zeros(E, dtype=torch.float64) for _ in range(4))
    with torch.no_grad():
        _, scores, chosen = mlp.router(x)
        for e in range(E):
            tok, pos = (chosen == e).nonzero(as_tuple=True)
            if not len(tok):
                continue
            f = mlp.experts(x[tok], torch.full((len(tok), 1), e), torch.ones(len(tok), 1, dtype=x.dtype))
            norm, g = f.double().norm(dim=-1), scores[tok, pos].double()
            count[e], gate[e], ean[e], reap[e] = len(tok), g.sum(), norm.sum(), (g * norm).sum()
    return count, gate, ean, reap


@pytest.mark.parametrize("kind, atol, batch_tokens", [
    ("float32", 1e-5, 1), ("float32", 1e-5, 4096), ("bfloat16", 1e-2, 4096),
    ("mxfp4", 1e-2, 4096),  # dequantized by reap on the fly vs by transformers on load (bf16 compute)
])
def test_gpt_oss_layer_output_and_stats_equal_transformers(gpt_oss_models, kind, atol, batch_tokens):
    """Each decoder layer, sliding-window and full, on sequences longer than the window (padded batches too):
    the streamed output equals transformers' GptOssDecoderLayer, and the per-expert statistics equal an
    independent recomputation with transformers' router and experts."""
    path = gpt_oss_models(kind)
    dtype = torch.bfloat16 if kind == "mxfp4" else getattr(torch, kind)
    ckpt = Checkpoint(path)
    spec = detect(ckpt.config)
    seqs = random_sequences(ckpt.config["vocab_size"], GPT_OSS_LENGTHS)
    ref, moe_in, model = _gpt_oss_reference(path, dtype, seqs)
    streamer = LayerStreamer(ckpt, spec, seqs, EngineOptions(device="cpu", dtype=str(dtype).split(".")[1],
                                                             batch_tokens=batch_tokens, progress=False))
    assert streamer.config._attn_implementation == "eager"
    clamped = 0
    for layer in range(spec.num_layers):
        feed_reference_inputs(streamer, ref, layer, dtype)
        acc = LayerAccumulator(spec.num_experts)
        streamer.run_layer(layer, acc)
        assert_reference_outputs(streamer, ref, layer, atol)
        mlp = model.model.layers[layer].mlp
        x = torch.cat(moe_in[layer])  # [T, H]: every real token's MoE input
        expected = _independent_stats(mlp, x)
        got = (acc.count, acc.gate_sum, acc.ean_sum, acc.reap_sum)
        assert acc.count.sum().item() == sum(GPT_OSS_LENGTHS) * spec.top_k
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for what, a, b in zip(("count", "gate", "ean", "reap"), got, expected):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"layer {layer} {what}")
        with torch.no_grad():  # the clamp at 7 is exercised: some gate values exceed it
            gate_up = torch.einsum("th,ehi->tei", x.float(), mlp.experts.gate_up_proj.float())
            clamped += int((gate_up[..., ::2] > 7.0).sum())
    assert clamped > 0
    streamer.close()


def test_gpt_oss_sliding_window_mask_matters(gpt_oss_models):
    """The sliding layers' own mask is needed: with the full causal mask the output of layer 0 differs."""
    path = gpt_oss_models("float32")
    ckpt = Checkpoint(path)
    spec = detect(ckpt.config)
    seqs = random_sequences(ckpt.config["vocab_size"], (40,))
    outs = []
    for types in (None, ["full_attention"] * spec.num_layers):
        streamer = LayerStreamer(ckpt, spec, seqs, EngineOptions(device="cpu", progress=False))
        if types:
            streamer.config.layer_types = types
        streamer.embed()
        streamer.run_layer(0)
        outs.append(streamer.store.get(0))
        streamer.close()
        ckpt = Checkpoint(path)
    assert torch.equal(outs[0][:, :8], outs[1][:, :8])  # within the window: the same
    assert (outs[0][:, 8:] - outs[1][:, 8:]).abs().max() > 1e-3


def test_mxfp4_dequantization_equals_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from reap.checkpoint import dequantize_mxfp4

    gen = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), generator=gen, dtype=torch.uint8)  # every code, both nibbles
    scales = torch.randint(110, 140, (3, 10, 4), generator=gen, dtype=torch.uint8)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    got = dequantize_mxfp4(blocks, scales, torch.bfloat16)
    assert got.shape == ref.shape == (3, 128, 10) and torch.equal(got, ref)
    torch.testing.assert_close(dequantize_mxfp4(blocks, scales, torch.float32), ref.float(), rtol=0, atol=0)
    # one value by hand: code 0x7 (6.0) in the low nibble, 0xA (-1.0) in the high one, scale 2^(128-127)
    b, s = torch.zeros(1, 1, 1, 16, dtype=torch.uint8), torch.full((1, 1, 1), 128, dtype=torch.uint8)
    b[0, 0, 0, 0] = 0xA7
    w = dequantize_mxfp4(b, s, torch.float32)
    assert w[0, :2, 0].tolist() == [12.0, -2.0] and w.abs().sum() == 14.0


def _gpt_oss_expected(src: dict, kept: dict[int, list[int]]) -> dict:
    out = {}
    for n, t in src.items():
        m = GPT_OSS_FUSED.match(n) or GPT_OSS_ROUTER.match(n)
        out[n] = t[kept[int(m[1])]] if m else t
    return out


@pytest.mark.parametrize("kind", ["float32", "mxfp4"])
def test_gpt_oss_pruned_checkpoint_is_exact_surgery(gpt_oss_models, gpt_oss_pruned, kind):
    src, out = gpt_oss_models(kind), gpt_oss_pruned(kind)
    report = json.loads((out / "reap_report.json").read_text())
    kept = {int(layer): entry["kept"] for layer, entry in report["layers"].items()}
    k = 16 - math.floor(16 * 0.3)
    assert sorted(kept) == [0, 1, 2] and all(len(ids) == k for ids in kept.values()) and report["family"] == "gpt_oss"
    assert _config(out) == {**_config(src), "num_local_experts": k}
    before, after = _tensors(src), _tensors(out)
    expected = _gpt_oss_expected(before, kept)
    assert set(after) == set(expected)
    for n, t in after.items():
        assert _same(t.contiguous(), expected[n].contiguous()), n
    fused = [n for n in after if GPT_OSS_FUSED.match(n)]
    assert len(fused) == 3 * (4 if kind == "mxfp4" else 2) + 3 * 2  # (blocks + scales | weight) x 2 + 2 biases
    if kind == "mxfp4":
        t = after["model.layers.0.mlp.experts.gate_up_proj_blocks"]
        assert t.dtype == torch.uint8 and tuple(t.shape) == (k, 64, 2, 16)
        assert after["model.layers.0.mlp.experts.down_proj_scales"].shape == (k, 64, 1)
    assert after["model.layers.1.mlp.router.bias"].shape == (k,)
    meta = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]
    assert meta["total_size"] == sum(t.numel() * t.element_size() for t in after.values())


@pytest.mark.parametrize("kind", ["float32", "mxfp4"])
def test_gpt_oss_pruned_model_equals_original_with_pruned_experts_masked(gpt_oss_models, gpt_oss_pruned, kind):
    """Logits of the pruned model == the original's with the pruned experts' router bias at -inf (never chosen,
    and absent from the softmax over the chosen K). Sequences longer than the sliding window."""
    src, out = gpt_oss_models(kind), gpt_oss_pruned(kind)
    report = json.loads((out / "reap_report.json").read_text())
    pruned = {int(layer): entry["pruned"] for layer, entry in report["layers"].items()}
    dtype = torch.bfloat16 if kind == "mxfp4" else torch.float32
    original, small = _load(src, dtype), _load(out, dtype)
    k = report["kept_per_layer"]
    assert small.config.num_local_experts == k
    assert all(layer.mlp.experts.gate_up_proj.shape[0] == k for layer in small.model.layers)
    ids = torch.randint(0, original.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = original(ids).logits.float()
        got = small(ids).logits.float()
        for layer, experts in pruned.items():
            original.model.layers[layer].mlp.router.bias[experts] = float("-inf")
        masked = original(ids).logits.float()
    atol = 1e-4 if kind == "float32" else 0.0  # bf16: the same operations on the same values, bit for bit
    torch.testing.assert_close(got, masked, atol=atol, rtol=atol)
    assert (reference - masked).abs().max() > 1e-3  # pruning changed something: the comparison is not vacuous
    meta = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]
    if kind == "float32":  # the router bias is a parameter: total_parameters counts it
        assert meta["total_parameters"] == small.num_parameters()


@pytest.mark.parametrize("kind", ["float32", "mxfp4"])
def test_gpt_oss_inspect(gpt_oss_models, gpt_oss_pruned, kind):
    """`reap inspect` counts fused expert tensors (MXFP4 blocks as two parameters a byte) as experts: its numbers
    equal transformers' parameter count and the pruned checkpoint's size."""
    src, out = gpt_oss_models(kind), gpt_oss_pruned(kind)
    res = _run("inspect", src, "--ratio", "0.3", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["family"] == "gpt_oss" and info["routing"] == "softmax over the top-k logits (router bias)"
    assert info["after"]["experts_per_layer"] == 12
    dtype = torch.bfloat16 if kind == "mxfp4" else torch.float32
    original, small = _load(src, dtype), _load(out, dtype)
    assert info["before"]["total_params"] == original.num_parameters()
    assert info["after"]["total_params"] == small.num_parameters()
    total_size = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert info["after"]["disk_bytes"] == total_size
    per_expert = 3 * (64 * 64 + 64 + 32 * 64 + 64)  # layers x (gate_up + its bias + down + its bias)
    router_row = 3 * (64 + 1)
    assert info["before"]["active_params"] == original.num_parameters() - 12 * per_expert
    assert info["before"]["total_params"] - info["after"]["total_params"] == 4 * (per_expert + router_row)
    if kind == "mxfp4":
        assert info["quantization"] == {"quant_method": "mxfp4"} and "FP4" in info["dtypes"]
    text = _run("inspect", out)
    assert text.exit_code == 0 and "gpt_oss" in text.output and "12 experts/layer" in text.output


def test_gpt_oss_calibrate_mxfp4_then_prune_by_reap_score(gpt_oss_models, tmp_path):
    """The whole pipeline on the MXFP4 checkpoint: calibration (dequantized on the fly), `prune --method reap`."""
    src = gpt_oss_models("mxfp4")
    stats_path = tmp_path / "s.safetensors"
    stats, summary = _calibrate_on_source(src, tmp_path, stats_path, files=3, chars=300, max_length=48)
    assert all(stats.count[layer].sum().item() == summary["tokens"] * 4 for layer in range(3))
    res = _run("prune", src, "--out", tmp_path / "o", "--ratio", "0.3", "--stats", stats_path, "-q")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o" / "reap_report.json").read_text())
    scores = stats.scores("reap")
    for layer, entry in report["layers"].items():
        assert min(scores[int(layer)][entry["kept"]]) >= max(scores[int(layer)][entry["pruned"]])


def test_gpt_oss_verify_checks_fused_shapes():
    from reap.prune import _verify_fused

    spec = detect({"model_type": "gpt_oss", "num_local_experts": 16, "num_experts_per_tok": 4, "num_hidden_layers": 1,
                   "hidden_size": 64, "intermediate_size": 32})
    p = "model.layers.0.mlp."
    good = {p + "experts.gate_up_proj_blocks": [12, 64, 2, 16], p + "experts.gate_up_proj_scales": [12, 64, 2],
            p + "experts.gate_up_proj_bias": [12, 64], p + "experts.down_proj": [12, 32, 64],
            p + "experts.down_proj_bias": [12, 64], p + "router.bias": [12]}
    _verify_fused(good, spec, 0, 12)
    for name, shape in ((p + "experts.gate_up_proj_scales", [16, 64, 2]), (p + "router.bias", [16])):
        with pytest.raises(RuntimeError, match="expected"):
            _verify_fused({**good, name: shape}, spec, 0, 12)
    with pytest.raises(RuntimeError, match="no fused expert tensor"):
        _verify_fused({n: s for n, s in good.items() if "down_proj_bias" not in n}, spec, 0, 12)


def test_gpt_oss_grouped_matmul_path_equals_loop():
    """The grouped-matmul expert path (used on GPU) == the per-expert loop (CPU), biases and clamp included, with
    experts that get no token."""
    from reap.arch import GPT_OSS
    from reap.moe import FusedClampedSwiGLUMoE, _grouped_mm_fn

    if _grouped_mm_fn() is None:
        pytest.skip("this torch has no grouped matmul")
    g = torch.Generator().manual_seed(0)
    E, I, H, K, T = 8, 32, 48, 2, 64
    bias = torch.randn(E, generator=g)
    bias[5] = -1e4  # expert 5 gets no token
    args = [torch.randn(E, H, generator=g), bias, torch.randn(E, H, 2 * I, generator=g) * 0.5,
            torch.randn(E, 2 * I, generator=g), torch.randn(E, I, H, generator=g) * 0.1, torch.randn(E, H, generator=g)]
    x = torch.randn(1, T, H, generator=g)
    outs = []
    for grouped in (False, True):
        moe = FusedClampedSwiGLUMoE(GPT_OSS, K, *args, grouped=grouped)
        moe.accumulator = LayerAccumulator(E)
        out, scores = moe(x)
        assert scores is None
        outs.append((out, moe.accumulator))
    assert outs[0][1].count[5] == 0 and outs[0][1].count.sum() == T * K
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-4)
    for f in ("count", "gate_sum", "ean_sum", "reap_sum", "max_norm"):
        torch.testing.assert_close(getattr(outs[0][1], f), getattr(outs[1][1], f), rtol=1e-4, atol=1e-4)
