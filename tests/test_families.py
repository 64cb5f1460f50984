"""The named families in their released formats (bf16, FP8 block, MXFP4), their expert groups and MTP modules,
checked against transformers: what the generic support matrix (test_matrix.py) does not cover in float32.

Each check is independent of reap's layout: transformers' own model is the reference, the expected bytes of a
pruned checkpoint come from the source tensors with the kept indices selected along the dimension where the two
shapes differ, and per-expert names are renumbered by a regex written here.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (assert_exact_surgery, assert_reference_outputs, feed_reference_inputs, hooked_stats,
                     load_causal_lm, random_sequences, reference_layers, removed_in_memory)
from safetensors import safe_open
from typer.testing import CliRunner

from reap.io.checkpoint import Checkpoint
from reap.cli import app
from reap.model.derive import derive
from reap.core.options import EngineOptions
from reap.calibrate.stats import FIELDS, LayerAccumulator
from reap.stream.streamer import LayerStreamer

pytestmark = pytest.mark.slow  # the named families in their released formats, end to end: ~1 minute

# name -> (family, tiny overrides)
MODELS = {
    "qwen3": ("qwen3_moe", {}),  # norm_topk_prob false (Qwen3MoeConfig default), layer 1 dense (mlp_only_layers)
    "mixtral": ("mixtral", {}),
    "deepseek": ("deepseek_v3", {}),  # 16 experts in 4 groups, top-2 groups, top-4, layer 0 dense, shared expert
    "kimi": ("kimi_k2", {}),  # DeepSeek-V3 as Kimi-K2 ships it: model_type kimi_k2, no groups, scaling 2.827
    "glm": ("glm4_moe", {}),  # as GLM-4.5: no groups, scaling 2.5, layer 0 dense, shared expert, q/k norm, qkv bias
    "glm_grouped": ("glm4_moe", {"n_group": 4, "topk_group": 2, "routed_scaling_factor": 1.0}),
    "qwen3_next": ("qwen3_next", {}),  # linear/full/linear/full attention, layer 2 dense, gated shared expert
    "gpt_oss": ("gpt_oss", {}),  # fused experts with biases, router bias, clamped GLU, sliding/full attention
}
LENGTHS = (23, 40, 7, 31)


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    """Tiny checkpoints made on first use, per (name, kind): float32/bfloat16 saved by transformers in several
    shards, "fp8" (the bf16 one in the released FP8 block layout), "mxfp4" (gpt-oss's released layout)."""
    from reap.testing.tiny import make_tiny_model
    from reap.testing.tiny_formats import convert_to_fp8, convert_to_mxfp4

    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, kind: str = "float32") -> Path:
        if (name, kind) not in cache:
            root = tmp_path_factory.mktemp("family-models")
            if kind in ("fp8", "mxfp4"):
                convert = convert_to_fp8 if kind == "fp8" else convert_to_mxfp4
                cache[name, kind] = convert(get(name, "bfloat16"), root / f"{name}-{kind}")
            else:
                family, overrides = MODELS[name]
                cache[name, kind] = make_tiny_model(root / f"{name}-{kind}", seed=2, dtype=getattr(torch, kind),
                                                    family=family, **overrides)
        return cache[name, kind]

    return get


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _prune(src: Path, out: Path, *extra) -> dict:
    res = _run("prune", src, "--out", out, "--ratio", "0.3", "-q", *(extra or ("--method", "random", "--seed", "5")))
    assert res.exit_code == 0, res.output
    return json.loads((out / "reap_report.json").read_text())


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(path / shard), "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    assert set(out) == set(weight_map)
    return out


@pytest.mark.parametrize("name, kind, atol, batch_tokens", [
    *[(n, "float32", 1e-5, b) for n in MODELS for b in (1, 4096)],  # one sequence per batch; padded batches
    *[(n, "bfloat16", 3e-2, 4096) for n in ("qwen3", "deepseek", "glm", "qwen3_next", "gpt_oss")],
    # quantized checkpoints in float32 compute: transformers dequantizes them too, so this checks dequantization
    *[(n, "fp8", 1e-5, 4096) for n in ("qwen3", "deepseek", "glm", "qwen3_next")],
    ("gpt_oss", "mxfp4", 1e-5, 4096),
])
def test_layer_output_equals_transformers(family_models, name, kind, atol, batch_tokens):
    """Every decoder layer, fed transformers' own input, gives transformers' own output (quantized checkpoints:
    transformers dequantizes them on the CPU with its own code, reap with its own)."""
    path = family_models(name, kind)
    dtype = torch.bfloat16 if kind == "bfloat16" else torch.float32
    seqs = random_sequences(250, LENGTHS)
    ref = reference_layers(path, dtype, seqs)
    ckpt = Checkpoint(path)
    layout = derive(ckpt)
    streamer = LayerStreamer(ckpt, layout, seqs, EngineOptions(device="cpu", dtype=str(dtype).split(".")[1],
                                                               batch_tokens=batch_tokens, progress=False))
    for layer in range(layout.num_layers):
        feed_reference_inputs(streamer, ref, layer, dtype)
        streamer.run_layer(layer, LayerAccumulator(layout.num_experts))
        scale = max(r[1].abs().max().item() for r in ref[layer])
        assert_reference_outputs(streamer, ref, layer, atol * max(scale, 1.0))
    streamer.close()


@pytest.mark.parametrize("name, kind", [(n, "float32") for n in MODELS] + [("gpt_oss", "mxfp4"), ("deepseek", "fp8")])
def test_pruned_checkpoint_is_exact_surgery_and_equals_removal_in_memory(family_models, tmp_path, name, kind):
    src = family_models(name, kind)
    report = _prune(src, tmp_path / "o")
    kept = {int(k): v["kept"] for k, v in report["layers"].items()}
    assert_exact_surgery(src, tmp_path / "o", kept)
    original, small = removed_in_memory(src, tmp_path / "o", kept)
    pruned, info = load_causal_lm(tmp_path / "o", dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    ids = torch.randint(0, 250, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = small(ids).logits, pruned(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-4 if kind == "float32" else 2e-2, atol=1e-4 if kind == "float32" else 2e-2)
    E, K = report["num_experts"], len(next(iter(kept.values())))
    count_keys = {k for k, v in _config(src).items() if v == E and k in ("num_experts", "num_local_experts",
                                                                            "n_routed_experts")}
    assert _config(tmp_path / "o") == {**_config(src), **{k: K for k in count_keys}}


@pytest.mark.parametrize("name", ["deepseek", "glm_grouped"])
def test_groups_stay_equal_and_contiguous(family_models, tmp_path, name):
    src = family_models(name)
    config = _config(src)
    report = _prune(src, tmp_path / "o")
    size = config["n_routed_experts"] // config["n_group"]
    for entry in report["layers"].values():
        per = [sum(1 for e in entry["kept"] if e // size == g) for g in range(config["n_group"])]
        assert len(set(per)) == 1, per


def _calibrate_on_source(model: Path, tmp_path: Path, stats_path: Path, files: int, chars: int, max_length: int):
    """`calibrate` on CPU with the first ``chars`` characters of reap's first ``files`` source files as the data;
    the statistics are also written to ``stats_path``. Returns (stats, summary)."""
    from reap.calibrate.run import calibrate
    from reap.core.options import CalibrateOptions, DataOptions

    sources = sorted((Path(__file__).resolve().parents[1] / "src" / "reap").glob("*.py"))[:files]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": p.read_text()[:chars]}) + "\n" for p in sources))
    return calibrate(CalibrateOptions(model=str(model), data=DataOptions(dataset=str(data), max_length=max_length),
                                      out=stats_path, engine=EngineOptions(device="cpu", progress=False)))


@pytest.mark.parametrize("name, kind", [("qwen3", "float32"), ("deepseek", "float32"), ("kimi", "float32"),
                                        ("qwen3_next", "float32"), ("gpt_oss", "mxfp4"), ("glm", "fp8")])
def test_calibrate_then_prune_by_reap_score(family_models, tmp_path, name, kind):
    """The whole pipeline: calibration statistics (dense layers have none), then `prune --method reap --stats`,
    which drops the lowest scores (of each group, with expert groups)."""
    src = family_models(name, kind)
    stats_path = tmp_path / "s.safetensors"
    stats, summary = _calibrate_on_source(src, tmp_path, stats_path, files=4, chars=400, max_length=64)
    layout = derive(Checkpoint(src))
    for layer in range(layout.num_layers):
        assert stats.count[layer].sum().item() == (summary["tokens"] * layout.top_k if layer in layout.moe else 0)
    report = _prune(src, tmp_path / "o", "--stats", stats_path, "--method", "reap")
    scores = stats.scores("reap")
    groups = layout.n_group
    size = layout.num_experts // groups
    for layer, entry in report["layers"].items():
        s = scores[int(layer)]
        for g in range(groups):
            ks = [s[e] for e in entry["kept"] if e // size == g]
            ps = [s[e] for e in entry["pruned"] if e // size == g]
            assert min(ks) >= max(ps)
    assert _config(tmp_path / "o") == {**_config(src), **{".".join(k): len(entry["kept"]) for k in layout.count_keys}}


def test_stats_equal_hooks_on_transformers_experts_for_fp8(family_models):
    """Statistics of an FP8 checkpoint (dequantized by reap) == the hooked recomputation on transformers' model
    loading the same FP8 checkpoint (dequantized by transformers), fp32."""
    src = family_models("deepseek", "fp8")
    seqs = random_sequences(250, LENGTHS)
    want = hooked_stats(src, seqs)
    ckpt = Checkpoint(src)
    layout = derive(ckpt)
    streamer = LayerStreamer(ckpt, layout, seqs, EngineOptions(device="cpu", dtype="float32", progress=False))
    streamer.embed()
    for layer in range(layout.num_layers):
        acc = LayerAccumulator(layout.num_experts)
        streamer.run_layer(layer, acc)
        for f in FIELDS:
            torch.testing.assert_close(acc.to_dict()[f], want[f][layer], rtol=1e-4, atol=1e-5, msg=f"{layer} {f}")
    streamer.close()


def _fuse_experts(src: Path, dst: Path) -> Path:
    """The checkpoint with every layer's per-expert gate/up/down tensors stored fused, as released Qwen3.5-MoE
    checkpoints store them: experts.gate_up_proj [E, 2I, H] (gate rows first) and experts.down_proj [E, H, I]."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"))
    tensors = _tensors(src)
    fused: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        m = re.match(r"^(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$", name)
        if m:
            groups.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = t
        else:
            fused[name] = t
    for prefix, experts in groups.items():
        order = sorted(experts)
        fused[prefix + ".gate_up_proj"] = torch.stack([torch.cat([experts[e]["gate"], experts[e]["up"]]) for e in order])
        fused[prefix + ".down_proj"] = torch.stack([experts[e]["down"] for e in order])
    names = sorted(fused)
    shards = {n: f"model-{i % 3:05d}-of-00003.safetensors" for i, n in enumerate(names)}
    for shard in set(shards.values()):
        save_file({n: fused[n].contiguous() for n in names if shards[n] == shard}, str(dst / shard), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in fused.values())
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": shards}))
    return dst


def test_qwen3_5_moe_vision_language_wrapper_with_fused_experts(tmp_path):
    """Qwen3.5-MoE as released: Qwen3_5MoeForConditionalGeneration (a vision tower beside the text model, the
    text model under model.language_model) with fused experts on disk. reap calibrates the text model, prunes its
    experts (slicing the fused tensors), rewrites text_config.num_experts, copies the vision tower byte for byte;
    transformers loads the result as the same wrapper, equal to the original with those experts removed."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    from reap.testing.tiny import make_byte_tokenizer
    from reap.testing.tiny_configs import tiny_config

    cfg = Qwen3_5MoeConfig(text_config=tiny_config("qwen3_5_moe").to_dict(),
                           vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64,
                                              out_hidden_size=64, patch_size=4, spatial_merge_size=2,
                                              temporal_patch_size=1))
    torch.manual_seed(0)
    model = Qwen3_5MoeForConditionalGeneration._from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(tmp_path / "vl", max_shard_size="60KB")
    make_byte_tokenizer(tmp_path / "vl")
    src = _fuse_experts(tmp_path / "vl", tmp_path / "fused")
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in _tensors(src)
    layout = derive(Checkpoint(src))
    assert layout.model_class == "Qwen3_5MoeForConditionalGeneration"
    assert layout.layers_path == "model.language_model.layers" and layout.count_keys == (("text_config", "num_experts"),)
    stats_path = tmp_path / "s.safetensors"
    stats, summary = _calibrate_on_source(src, tmp_path, stats_path, files=3, chars=300, max_length=48)
    assert stats.count[layout.moe_layers[0]].sum() == summary["tokens"] * layout.top_k
    report = _prune(src, tmp_path / "o", "--stats", stats_path)
    kept = {int(k): v["kept"] for k, v in report["layers"].items()}
    assert_exact_surgery(src, tmp_path / "o", kept)
    after = _tensors(tmp_path / "o")
    assert after["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape[0] == len(kept[0])
    assert all(torch.equal(t, _tensors(src)[n]) for n, t in after.items() if n.startswith("model.visual."))
    config = _config(tmp_path / "o")
    assert config["text_config"]["num_experts"] == len(kept[0])
    assert {k: v for k, v in config.items() if k != "text_config"} == {k: v for k, v in _config(src).items()
                                                                        if k != "text_config"}
    original, small = removed_in_memory(src, tmp_path / "o", kept)
    pruned, info = load_causal_lm(tmp_path / "o", dtype=torch.float32, output_loading_info=True)
    assert type(pruned).__name__ == "Qwen3_5MoeForConditionalGeneration" and not any(info.values()), info
    ids = torch.randint(0, 250, (1, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids).logits, small(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_deepseek_v4_hash_table_names_only_kept_experts(tmp_path):
    """DeepSeek-V4's hash-routed layers choose experts by a token -> expert table (tid2eid). After pruning the table
    names only kept experts, renumbered: a kept expert keeps its tokens, a pruned expert's tokens go to the kept
    expert whose router row is most similar (cosine; computed here independently of reap)."""
    from reap.testing.tiny import make_tiny_model

    src = make_tiny_model(tmp_path / "v4", family="deepseek_v4")
    report = _prune(src, tmp_path / "o")
    before, after = _tensors(src), _tensors(tmp_path / "o")
    tables = [n for n in before if n.endswith("tid2eid")]
    assert tables and report["id_remap"].keys() == {str(_layer(n)) for n in tables}
    for name in tables:
        layer = _layer(name)
        kept = report["layers"][str(layer)]["kept"]
        router = before[f"model.layers.{layer}.ffn.gate.weight"].float()  # the released name (ffn, not mlp)
        unit = router / router.norm(dim=1, keepdim=True)
        table, new = before[name], after[name]
        assert new.shape == table.shape and int(new.max()) < len(kept) and int(new.min()) >= 0
        for old in range(router.shape[0]):
            want = kept.index(old) if old in kept else int((unit[kept] @ unit[old]).argmax())
            assert torch.all(new[table == old] == want), old
    original, small = removed_in_memory(src, tmp_path / "o", {int(k): v["kept"] for k, v in report["layers"].items()},
                                        {int(k): v for k, v in report["id_remap"].items()})
    pruned = load_causal_lm(tmp_path / "o", dtype=torch.float32)
    ids = torch.randint(0, 250, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, small(ids).logits, rtol=1e-5, atol=1e-5)


def _layer(name: str) -> int:
    return int(re.search(r"layers\.(\d+)\.", name)[1])
