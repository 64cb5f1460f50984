"""Expert surgery end to end through the real CLI, checked against the source bytes read independently.

Every pruned checkpoint is compared with its source by parsing the safetensors files here (no reap reader):
kept expert tensors (FP8 scales included) byte-identical and renumbered 0..K-1 in original order, router
rows and correction bias sliced with the same ids, everything else identical; index == shard headers;
config.json changed in the expert count only; other files copied; reap_report.json. transformers then
loads the result, and its logits equal the original model's with the pruned experts' correction bias at
-inf (which is exactly "those experts can never be chosen").
"""

from __future__ import annotations

import json
import math
import random
import re
import struct
from pathlib import Path

import pytest
import torch
from helpers import snapshot
from typer.testing import CliRunner

import reap
from reap.cli import app
from reap.report import CARD_NAME, GENERATED

MODELS = ["tiny_fp32", "tiny_bf16", "tiny_fp8", "mini_m2", "mini_m2_fp8"]
EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(.+)$")
ROUTER = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.(gate\.weight|e_score_correction_bias)$")
ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "I64": 8}


# -- independent readers ------------------------------------------------------------------------------------
def read_safetensors(path: Path) -> tuple[dict, dict[str, bytes]]:
    """(header without __metadata__, {name: raw bytes}), parsed here from the file format."""
    blob = path.read_bytes()
    (hlen,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + hlen])
    header.pop("__metadata__", None)
    base = 8 + hlen
    data = {n: blob[base + h["data_offsets"][0] : base + h["data_offsets"][1]] for n, h in header.items()}
    return header, data


def read_model(path: Path) -> dict[str, tuple[str, str, list[int], bytes]]:
    """{tensor: (shard, dtype, shape, bytes)} for the tensors the index names."""
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in sorted(set(weight_map.values())):
        header, data = read_safetensors(path / shard)
        for name, h in header.items():
            if weight_map.get(name) == shard:
                out[name] = (shard, h["dtype"], h["shape"], data[name])
    assert set(out) == set(weight_map)
    return out


def select_rows(raw: bytes, shape: list[int], dtype: str, rows: list[int]) -> bytes:
    row = len(raw) // shape[0]
    assert row * shape[0] == len(raw) and row == math.prod(shape[1:]) * ITEMSIZE[dtype]
    return b"".join(raw[r * row : (r + 1) * row] for r in rows)


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


# -- the surgery check --------------------------------------------------------------------------------------
def check_surgery(src: Path, out: Path, keep: dict[int, list[int]]) -> None:
    """out is src with, per layer, exactly the experts keep[layer] (any order), renumbered in original order."""
    src_config = json.loads((src / "config.json").read_text())
    num_experts = src_config["num_local_experts"]
    kept = {layer: sorted(ids) for layer, ids in keep.items()}
    k = len(next(iter(kept.values())))
    assert set(kept) == set(range(src_config["num_hidden_layers"]))

    before, after = read_model(src), read_model(out)
    # what each output tensor must be: (source tensor, rows to select or None)
    expected: dict[str, tuple[str, list[int] | None]] = {}
    seen_router = set()
    for name in before:
        m = EXPERT.match(name)
        r = ROUTER.match(name)
        if m:
            layer, expert, rest = int(m[1]), int(m[2]), m[3]
            if expert in kept[layer]:
                new = kept[layer].index(expert)
                expected[f"model.layers.{layer}.block_sparse_moe.experts.{new}.{rest}"] = (name, None)
        elif r:
            expected[name] = (name, kept[int(r[1])])
            seen_router.add(name)
        else:
            expected[name] = (name, None)
    assert len(seen_router) == 2 * src_config["num_hidden_layers"]
    assert set(after) == set(expected)
    for name, (shard, dtype, shape, raw) in after.items():
        src_name, rows = expected[name]
        s_shard, s_dtype, s_shape, s_raw = before[src_name]
        assert dtype == s_dtype, name
        assert shard == s_shard, name  # same shard file as its source: names come from the source index
        if rows is None:
            assert shape == s_shape and raw == s_raw, name
        else:
            assert shape == [len(rows), *s_shape[1:]], name
            assert raw == select_rows(s_raw, s_shape, s_dtype, rows), name
    # the bias and router keep their dtype (float32 router/bias in the FP8 format)
    for name in seen_router:
        assert after[name][1] == before[name][1]
        if "quantization_config" in src_config:
            assert after[name][1] == "F32"
    if "quantization_config" in src_config:  # and the FP8 experts kept their scales
        assert any(n.endswith("experts.0.w2.weight_scale_inv") for n in after)
        assert after["model.layers.0.block_sparse_moe.experts.0.w1.weight"][1] == "F8_E4M3"

    # index == shard headers; total_size; no stray weight files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert {p.name for p in out.glob("*.safetensors")} == shards
    total = 0
    for shard in shards:
        header, _ = read_safetensors(out / shard)
        assert set(header) == {n for n, s in index["weight_map"].items() if s == shard}
        total += sum(h["data_offsets"][1] - h["data_offsets"][0] for h in header.values())
        offsets = sorted(tuple(h["data_offsets"]) for h in header.values())
        assert offsets[0][0] == 0 and all(a[1] == b[0] for a, b in zip(offsets, offsets[1:]))
    assert index["metadata"]["total_size"] == total == sum(len(v[3]) for v in after.values())
    src_index = json.loads((src / "model.safetensors.index.json").read_text())
    for key, value in src_index["metadata"].items():
        if key not in ("total_size", "total_parameters"):
            assert index["metadata"][key] == value

    # config.json: the expert count changes, nothing else
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == k
    assert {**config, "num_local_experts": num_experts} == src_config

    # other files copied byte for byte; nothing else appears
    weights = {p.name for p in src.glob("*.safetensors")} | {"model.safetensors.index.json", "config.json"}
    others = {p.name for p in src.iterdir() if p.name not in weights}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= others
    if "auto_map" in src_config:  # the tiny fixtures carry remote code and a license
        assert {"LICENSE", "configuration_minimax_m2.py"} <= others
    for name in others:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    # besides the checkpoint: the model card, the summary and (with matplotlib) the pictures
    assert {p.name for p in out.iterdir()} - {CARD_NAME, *GENERATED} == others | shards | {
        "model.safetensors.index.json", "config.json", "reap_report.json"}
    assert (out / CARD_NAME).is_file() and (out / "reap_summary.txt").is_file()

    # the report
    report = json.loads((out / "reap_report.json").read_text())
    assert report["version"] == reap.__version__
    assert report["source"] == str(src.resolve())
    assert report["num_experts"] == num_experts
    assert report["kept_per_layer"] == k
    assert report["bytes_after"] == total
    for layer, ids in kept.items():
        entry = report["layers"][str(layer)]
        assert entry["kept"] == ids
        assert entry["pruned"] == [e for e in range(num_experts) if e not in ids]


def write_keep(path: Path, model: Path, k: int, seed: int) -> dict[int, list[int]]:
    config = json.loads((model / "config.json").read_text())
    rng = random.Random(seed)
    keep = {layer: rng.sample(range(config["num_local_experts"]), k) for layer in range(config["num_hidden_layers"])}
    path.write_text(json.dumps({str(layer): ids for layer, ids in keep.items()}))  # ids deliberately unsorted
    return keep


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, request):
    """Random-method prunes, cached per (model, seed), run through the CLI."""
    cache: dict[tuple[str, int], Path] = {}

    def get(model: str, seed: int) -> Path:
        if (model, seed) not in cache:
            src = request.getfixturevalue(model)
            out = tmp_path_factory.mktemp("pruned") / f"{model}-s{seed}"
            res = cli("prune", src, "--out", out, "--ratio", "0.3", "--method", "random", "--seed", seed, "-q", "--json")
            assert res.exit_code == 0, res.output
            assert json.loads(res.stdout)["out"] == str(out.resolve())
            cache[model, seed] = out
        return cache[model, seed]

    return get


# -- the tests ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_keep_file_surgery_is_exact(model, request, tmp_path):
    src = request.getfixturevalue(model)
    before = snapshot(src)
    config = json.loads((src / "config.json").read_text())
    k = config["num_local_experts"] // 2 + 1
    keep = write_keep(tmp_path / "keep.json", src, k, seed=7)
    out = tmp_path / "out"
    res = cli("prune", src, "--out", out, "--keep", tmp_path / "keep.json", "-q")
    assert res.exit_code == 0, res.output
    check_surgery(src, out, keep)
    report = json.loads((out / "reap_report.json").read_text())
    assert report["method"] == "keep-file" and report["ratio"] is None
    assert snapshot(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json", "out"]  # no temporary folder left


@pytest.mark.parametrize("model", MODELS)
def test_random_surgery_is_exact_and_seeded(model, request, pruned):
    src = request.getfixturevalue(model)
    config = json.loads((src / "config.json").read_text())
    num_experts = config["num_local_experts"]
    out = pruned(model, 3)
    report = json.loads((out / "reap_report.json").read_text())
    assert (report["method"], report["ratio"], report["seed"]) == ("random", 0.3, 3)
    keep = {int(layer): entry["kept"] for layer, entry in report["layers"].items()}
    for entry in report["layers"].values():
        assert len(entry["pruned"]) == math.floor(num_experts * 0.3)
    check_surgery(src, out, keep)
    # the same seed chooses the same experts (checked on the small models; the choice does not read weights)
    if model in ("tiny_fp32", "mini_m2"):
        out_same = out.parent / (out.name + "-again")
        res = cli("prune", src, "--out", out_same, "--ratio", "0.3", "--method", "random", "--seed", "3", "-q")
        assert res.exit_code == 0, res.output
        same = json.loads((out_same / "reap_report.json").read_text())
        assert same["layers"] == report["layers"]
        for shard in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values():
            assert (out_same / shard).read_bytes() == (out / shard).read_bytes()
        other = json.loads((pruned(model, 4) / "reap_report.json").read_text())
        assert [e["kept"] for e in other["layers"].values()] != [e["kept"] for e in report["layers"].values()]


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("model", ["tiny_fp32", "tiny_fp8", "mini_m2", "mini_m2_fp8"])
def test_pruned_model_equals_original_with_pruned_experts_masked(model, request, pruned):
    """transformers loads the output; its logits are the original's with the pruned experts unroutable."""
    src = request.getfixturevalue(model)
    out = pruned(model, 3)
    report = json.loads((out / "reap_report.json").read_text())
    original, small = _load(src), _load(out)
    kept = len(report["layers"]["0"]["kept"])
    assert small.config.num_local_experts == kept
    assert small.model.layers[0].mlp.experts.gate_up_proj.shape[0] == kept
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, original.config.vocab_size, (2, 32), generator=gen)
    with torch.no_grad():
        reference = original(ids).logits
        for layer, entry in report["layers"].items():
            original.model.layers[int(layer)].mlp.e_score_correction_bias[entry["pruned"]] = float("-inf")
        masked = original(ids).logits
        got = small(ids).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, masked, atol=1e-4, rtol=1e-4)
    # and pruning changed something: the comparison is not vacuous
    assert (reference - masked).abs().max() > 1e-3
    # the index's total_parameters (written by transformers) still matches what transformers counts
    meta = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]
    if "total_parameters" in meta:
        assert meta["total_parameters"] == small.num_parameters()


def test_interrupted_rewrite_publishes_nothing(tiny_fp32, tmp_path, monkeypatch):
    """An error (or Ctrl-C) after the 2nd shard leaves no target and no .NAME.incomplete-* folder."""
    import reap.rewrite.surgery
    import reap.io.writer
    from reap.core.options import PruneOptions
    from reap.prune import prune_model

    real = reap.io.writer.write_safetensors
    calls = []

    def make_failing(exc):
        def failing(path, entries, metadata=None, **kw):
            calls.append(path)
            if len(calls) > 2:
                raise exc
            return real(path, entries, metadata, **kw)

        return failing

    before = snapshot(tiny_fp32)
    for exc in (RuntimeError("disk full"), KeyboardInterrupt()):
        calls.clear()
        failing = make_failing(exc)
        monkeypatch.setattr(reap.rewrite.surgery, "write_safetensors", failing)
        target = tmp_path / "out"
        with pytest.raises(type(exc)):
            prune_model(PruneOptions(model=str(tiny_fp32), out=target, ratio=0.3, method="random", progress=False),
                        log=lambda *_: None)
        assert len(calls) == 3
        assert calls[0].parent.name.startswith(".out.incomplete-")  # it did write beside the target
        assert not target.exists()
        assert list(tmp_path.iterdir()) == []

    # an existing target (a previous output) survives a failed --overwrite untouched
    target = tmp_path / "out"
    monkeypatch.setattr(reap.rewrite.surgery, "write_safetensors", real)
    prune_model(PruneOptions(model=str(tiny_fp32), out=target, ratio=0.3, method="random", progress=False),
                log=lambda *_: None)
    previous = snapshot(target)
    calls.clear()
    failing = make_failing(RuntimeError("disk full"))
    monkeypatch.setattr(reap.rewrite.surgery, "write_safetensors", failing)
    with pytest.raises(RuntimeError):
        prune_model(PruneOptions(model=str(tiny_fp32), out=target, ratio=0.3, method="random", overwrite=True,
                                 progress=False), log=lambda *_: None)
    assert len(calls) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert snapshot(target) == previous
    assert snapshot(tiny_fp32) == before


def test_no_fsync_writes_the_same_checkpoint(tiny_fp8, tmp_path):
    """--no-fsync changes when bytes reach the disk, never which bytes: same files, same contents (the report
    and card differ only in their timestamps and command line)."""
    from reap.core.options import PruneOptions
    from reap.prune import prune_model

    outs = {}
    for fsync in (True, False):
        outs[fsync] = tmp_path / f"out-{fsync}"
        prune_model(PruneOptions(model=str(tiny_fp8), out=outs[fsync], ratio=0.3, method="random", seed=1,
                                 fsync=fsync, progress=False), log=lambda *_: None)
    files = {fsync: sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) for fsync, out in outs.items()}
    assert files[True] == files[False]
    for rel in files[True]:
        if rel.endswith((".safetensors", ".json")) and rel != "reap_report.json":
            assert (outs[True] / rel).read_bytes() == (outs[False] / rel).read_bytes(), rel
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
