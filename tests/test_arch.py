"""The layout derived from transformers: MoE layers, expert axes, count keys, the role of every stored tensor."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from reap.model.arch import build_config
from reap.core.humanize import human_bytes, human_count
from reap.io.checkpoint import Checkpoint
from reap.model.derive import derive
from reap.model.disk_side import disk_axis
from reap.core.errors import UserError
from reap.model.model_side import derive_model
from reap.selection.plan import Routing


@pytest.mark.parametrize(
    "model, numbers",
    [("tiny_fp32", (3, 16, 4, 64, 32)), ("tiny_fp8", (3, 16, 4, 64, 32)), ("mini_m2", (6, 64, 8, 192, 96)),
     ("mini_m2_fp8", (6, 64, 8, 192, 96))],
)
def test_minimax_m2_fixtures(model, numbers, request):
    ckpt = Checkpoint(request.getfixturevalue(model))
    layout = derive(ckpt)
    assert (layout.num_layers, layout.num_experts, layout.top_k, layout.hidden_size,
            layout.expert_intermediate) == numbers
    assert layout.family == "minimax_m2" and layout.model_class == "MiniMaxM2ForCausalLM"
    assert layout.count_keys == (("num_local_experts",),)
    assert layout.moe_layers == list(range(numbers[0]))
    E = numbers[1]
    # every stored tensor has a role; the expert ones are exactly those under .experts.{e}.
    for name, role in layout.roles.items():
        if ".experts." in name:
            assert role.kind == "expert" and role.part == "experts"
            assert name[role.span[0]:role.span[1]] == str(role.expert)
            assert name.split(".experts.")[1].split(".")[0] == str(role.expert)
        elif name.endswith(("block_sparse_moe.gate.weight", "e_score_correction_bias")):
            assert (role.kind, role.axis, role.part) == ("rows", 0, "router")
            assert role.buffer == name.endswith("bias")
        else:
            assert role.kind == "other"
    per_layer = Counter(r.layer for r in layout.roles.values() if r.kind == "expert")
    assert set(per_layer.values()) == {E * 3 * (2 if "fp8" in model else 1)}  # w1/w2/w3 (+ scales)


def test_count_keys_are_found_among_aliases(tmp_path):
    """Qwen3-MoE's released configs say num_experts; transformers 5 writes its alias num_local_experts: a config
    holding both has both rewritten, a key that merely equals the count (here top-k) is not."""
    from reap.testing.tiny import make_tiny_model

    path = make_tiny_model(tmp_path / "q", family="qwen3_moe", num_experts=8, num_experts_per_tok=2)
    config = json.loads((path / "config.json").read_text())
    config.update({"num_local_experts": 8, "num_experts": 8, "some_other_count": 8})
    (path / "config.json").write_text(json.dumps(config))
    layout = derive(Checkpoint(path))
    assert set(layout.count_keys) == {("num_experts",), ("num_local_experts",)}


def test_fused_experts_and_router_bias_are_rows(tmp_path):
    from reap.testing.tiny import make_tiny_model

    layout = derive(Checkpoint(make_tiny_model(tmp_path / "g", family="gpt_oss")))
    rows = {n: (r.axis, r.part, r.layer) for n, r in layout.roles.items() if r.kind == "rows"}
    assert rows["model.layers.1.mlp.experts.gate_up_proj"] == (0, "experts", 1)
    assert rows["model.layers.1.mlp.experts.down_proj_bias"] == (0, "experts", 1)
    assert rows["model.layers.1.mlp.router.bias"] == (0, "router", 1)
    assert not layout.stored("expert")


def test_groups_and_dense_layers_are_read_off_the_model(tmp_path):
    from reap.testing.tiny import make_tiny_model

    layout = derive(Checkpoint(make_tiny_model(tmp_path / "d", family="deepseek_v3")))
    assert (layout.n_group, layout.topk_group, Routing.of(layout).min_kept()) == (4, 2, 8)
    assert layout.moe_layers == [1, 2]  # first_k_dense_replace 1
    assert all(r.kind == "other" for n, r in layout.roles.items() if "shared_experts" in n)


def test_unknown_model_type_says_what_to_do():
    with pytest.raises(UserError, match="not implemented by the installed transformers.*MODEL_TYPE_ALIASES"):
        build_config({"model_type": "no_such_moe", "hidden_size": 8})


def test_dense_model_is_refused_with_the_reason():
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 64}
    with pytest.raises(UserError, match=r"a dense model \(LlamaForCausalLM, model_type 'llama'\): no experts to prune") \
            as err:
        derive_model(config)
    assert "\n" not in str(err.value) and "use_experts_implementation" not in str(err.value)


def test_config_and_disk_disagreeing_on_the_expert_count(tiny_fp32, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_fp32, bad)
    config = json.loads((bad / "config.json").read_text())
    config["num_local_experts"] = 8
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="config.json says 8 experts|disagree"):
        derive(Checkpoint(bad))


def test_the_config_dict_is_never_changed(tiny_fp32):
    """transformers' config classes rewrite legacy fields (rope_scaling + rope_theta): reap works on a copy."""
    ckpt = Checkpoint(tiny_fp32)
    config = {**ckpt.config, "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 5000.0}
    snapshot = json.dumps(config, sort_keys=True)
    build_config(config)
    derive_model(config)
    assert json.dumps(config, sort_keys=True) == snapshot


def test_disk_axis_through_conversion_ops():
    from transformers.core_model_loading import Concatenate, MergeModulelist, Transpose

    assert disk_axis([Transpose(1, 2)], 0, "x") == 0
    assert disk_axis([Transpose(0, 1)], 0, "x") == 1
    assert disk_axis([Concatenate(dim=1)], 0, "x") == 0
    with pytest.raises(UserError, match="across the expert axis"):
        disk_axis([Concatenate(dim=0)], 0, "x")
    with pytest.raises(UserError, match="MergeModulelist"):
        disk_axis([MergeModulelist(dim=0)], 0, "x")


def test_human_units():
    assert human_count(229_000_000_000) == "229B"
    assert human_count(10_300_000_000) == "10.3B"
    assert human_count(23_474_112) == "23.5M"
    assert human_count(999) == "999"
    assert human_bytes(1536) == "1.50 KiB"
    assert human_bytes(100) == "100 B"
