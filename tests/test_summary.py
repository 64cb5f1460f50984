"""`reap inspect`: its numbers against independent counts from the shard headers, and against the checkpoint
that pruning at the same ratio actually writes; plus a sparse full-size fake of the released MiniMax-M2."""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner
from helpers import write_sparse_shards

from reap.cli import app

MODELS = ["tiny_fp32", "tiny_bf16", "tiny_fp8", "mini_m2", "mini_m2_fp8"]
EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.")
ROUTER = re.compile(r"^model\.layers\.\d+\.block_sparse_moe\.(gate\.weight|e_score_correction_bias)$")


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def inspect_json(model: Path, *args) -> dict:
    res = cli("inspect", model, "--json", *args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def headers(model: Path) -> dict[str, dict]:
    """{tensor: header entry} for the tensors the index names, parsed here."""
    weight_map = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in set(weight_map.values()):
        with open(model / shard, "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(hlen))
        out.update({n: h for n, h in header.items() if weight_map.get(n) == shard})
    return out


def count(model: Path) -> dict:
    """Total and active parameters, bytes and params per dtype, counted tensor by tensor."""
    config = json.loads((model / "config.json").read_text())
    top_k = config["num_experts_per_tok"]
    total = active = nbytes = tables = 0
    dtypes: dict[str, int] = {}
    for name, h in headers(model).items():
        nbytes += h["data_offsets"][1] - h["data_offsets"][0]
        if name.endswith(("_scale_inv", "e_score_correction_bias")):  # scales and buffers hold no parameters
            continue
        n = math.prod(h["shape"])
        total += n
        dtypes[h["dtype"]] = dtypes.get(h["dtype"], 0) + n
        m = EXPERT.match(name)
        if m is None or int(m[2]) < top_k:  # a token runs top-k experts (all equal in size) and everything else
            active += n
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            tables += n
    return {"total": total, "active": active, "bytes": nbytes, "dtypes": dtypes, "tables": tables}


@pytest.mark.parametrize("model", MODELS)
def test_inspect_matches_headers_and_the_pruned_checkpoint(model, request, tmp_path):
    src = request.getfixturevalue(model)
    config = json.loads((src / "config.json").read_text())
    info = inspect_json(src, "--ratio", "0.3")
    before = count(src)
    num_experts = config["num_local_experts"]
    assert (info["family"], info["experts"], info["top_k"]) == ("minimax_m2", num_experts, config["num_experts_per_tok"])
    assert info["layers"] == info["moe_layers"] == config["num_hidden_layers"]
    assert info["hidden_size"] == config["hidden_size"]
    assert info["shards"] == len(set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert info["dtypes"] == before["dtypes"]
    assert info["before"] == {"experts_per_layer": num_experts, "total_params": before["total"],
                              "active_params": before["active"], "disk_bytes": before["bytes"],
                              "active_params_no_embeddings": before["active"] - before["tables"]}
    # "after" is what pruning at that ratio really writes
    out = tmp_path / "out"
    res = cli("prune", src, "--out", out, "--ratio", "0.3", "--method", "random", "-q")
    assert res.exit_code == 0, res.output
    after = count(out)
    assert info["after"] == {"experts_per_layer": num_experts - math.floor(num_experts * 0.3),
                             "total_params": after["total"], "active_params": after["active"],
                             "disk_bytes": after["bytes"], "active_params_no_embeddings": after["active"] - after["tables"]}
    assert info["ratio"] == 0.3
    if "quantization_config" in config:
        assert info["quantization"]["quant_method"] == "fp8" and info["quantization"]["weight_block_size"] == [128, 128]
    else:
        assert info["quantization"] is None
    # the human form runs and names the family
    res = cli("inspect", src, "--ratio", "0.3")
    assert res.exit_code == 0 and "minimax_m2" in res.stdout and "ratio 0.3" in res.stdout


def test_inspect_bad_ratio_is_a_user_error(tiny_fp32):
    res = cli("inspect", tiny_fp32, "--ratio", "1.5")
    assert res.exit_code == 2 and res.stderr.startswith("reap: error:") and "Traceback" not in res.output


# -- a sparse full-size fake of the released MiniMax-M2 ----------------------------------------------------------
FULL = dict(layers=62, experts=256, top_k=8, hidden=3072, inter=1536, heads=48, head_dim=128, kv_heads=8, vocab=200064)
SIZES = {"F8_E4M3": 1, "BF16": 2, "F32": 4}


def full_tensors() -> list[tuple[str, str, list[int]]]:
    c = FULL
    h, q, kv = c["hidden"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]

    def fp8(name, shape):
        scale = [-(-shape[0] // 128), -(-shape[1] // 128)]
        return [(name, "F8_E4M3", shape), (name + "_scale_inv", "F32", scale)]

    out = [("model.embed_tokens.weight", "BF16", [c["vocab"], h])]
    for layer in range(c["layers"]):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", "BF16", [h]), (p + "post_attention_layernorm.weight", "BF16", [h]),
                (p + "self_attn.q_norm.weight", "BF16", [q]), (p + "self_attn.k_norm.weight", "BF16", [kv])]
        for name, shape in (("q_proj", [q, h]), ("k_proj", [kv, h]), ("v_proj", [kv, h]), ("o_proj", [h, q])):
            out += fp8(p + f"self_attn.{name}.weight", shape)
        out += [(p + "block_sparse_moe.gate.weight", "F32", [c["experts"], h]),
                (p + "block_sparse_moe.e_score_correction_bias", "F32", [c["experts"]])]
        for e in range(c["experts"]):
            for w, shape in (("w1", [c["inter"], h]), ("w2", [h, c["inter"]]), ("w3", [c["inter"], h])):
                out += fp8(p + f"block_sparse_moe.experts.{e}.{w}.weight", shape)
    out += [("model.norm.weight", "BF16", [h]), ("lm_head.weight", "BF16", [c["vocab"], h])]
    return out


def write_sparse_model(path: Path, n_shards: int = 4) -> Path:
    """Real headers, holes for data: each shard is os.truncate'd to its full size (occupies no disk)."""
    c = FULL
    path.mkdir()
    tensors = full_tensors()
    # shard names zero-based with a wrong "-of-N", as released
    write_sparse_shards(path, tensors, SIZES, n_shards, lambda i: f"model-{i:05d}-of-00130.safetensors")
    config = {
        "architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2",
        "auto_map": {"AutoConfig": "configuration_minimax_m2.MiniMaxM2Config",
                     "AutoModelForCausalLM": "modeling_minimax_m2.MiniMaxM2ForCausalLM"},
        "hidden_size": c["hidden"], "intermediate_size": c["inter"], "num_hidden_layers": c["layers"],
        "num_attention_heads": c["heads"], "head_dim": c["head_dim"], "num_key_value_heads": c["kv_heads"],
        "num_local_experts": c["experts"], "num_experts_per_tok": c["top_k"], "vocab_size": c["vocab"],
        "scoring_func": "sigmoid", "use_routing_bias": True, "use_mtp": True, "num_mtp_modules": 3,
        "rotary_dim": 64, "hidden_act": "silu", "max_position_embeddings": 196608, "tie_word_embeddings": False,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "float8_e4m3fn", "quant_method": "fp8",
                                "weight_block_size": [128, 128],
                                "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]},
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.slow  # a sparse full-size MiniMax-M2 checkpoint (62 layers x 256 experts)
def test_inspect_full_size_minimax_m2(tmp_path):
    model = write_sparse_model(tmp_path / "MiniMax-M2")
    assert sum(p.stat().st_blocks for p in model.iterdir()) * 512 < 200 << 20  # sparse: ~headers only on disk
    info = inspect_json(model, "--ratio", "0.3")
    c = FULL
    h, q, kv = c["hidden"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    expert = 3 * c["inter"] * h
    router = c["experts"] * h  # the correction bias is a buffer, not a parameter (as transformers counts)
    dense = c["layers"] * (2 * q * h + 2 * kv * h + 2 * h + q + kv) + 2 * c["vocab"] * h + h
    total = dense + c["layers"] * (router + c["experts"] * expert)
    active = dense + c["layers"] * (router + c["top_k"] * expert)
    kept = c["experts"] - 76  # floor(256 x 0.3) = 76
    assert info["before"]["total_params"] == total
    assert info["before"]["active_params"] == active
    assert info["after"]["total_params"] == dense + c["layers"] * kept * (expert + h)
    assert info["after"]["experts_per_layer"] == 180
    # the published sizes: 230B total, 10B active (the published figure leaves out the 1.2B of embedding and
    # lm_head tables, which inspect counts), 162B after dropping 30% of experts
    assert abs(info["before"]["total_params"] / 230e9 - 1) < 0.02
    assert abs((info["before"]["active_params"] - 2 * c["vocab"] * h) / 10e9 - 1) < 0.03
    assert 10e9 < info["before"]["active_params"] < 11.5e9
    assert abs(info["after"]["total_params"] / 162e9 - 1) < 0.02
    assert info["before"]["disk_bytes"] == json.loads((model / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert 225 << 30 > info["before"]["disk_bytes"] > 205 << 30  # ~230 GB of FP8 on disk
    assert info["shards"] == 4 and info["experts"] == 256 and info["top_k"] == 8 and info["layers"] == 62
    assert info["dtypes"]["F8_E4M3"] > 0.97 * total
