"""Quantized checkpoints end to end: compressed-tensors INT4 (Kimi-K2-Thinking's layout) and FP8, ModelOpt and
compressed-tensors NVFP4, pruned with calibration, byte-exact, verified, loaded; inspect's counts; module lists of
the quantization config renumbered; unsupported quantization refused in one line; a sparse full-size
Kimi-K2-Thinking INT4 checkpoint inspected.

The tiny checkpoints are quantized by compressed-tensors itself (its min/max scales and compressor:
:func:`reap.testing.tiny_formats.convert_to_compressed_tensors`) or, for ModelOpt, by reap's packer, which tests/test_formats.py
checks byte for byte against ModelOpt's quantizer. The references are transformers' own loading where it works on
the CPU (compressed-tensors with ``dequantize=True``: symmetric INT4 and FP8), else the model with every weight
dequantized by reap (whose dequantizers tests/test_formats.py checks bit for bit against the libraries) and loaded
by transformers as a plain checkpoint. Skipped, with the reason, without compressed-tensors.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (KIMI_INT4_QUANT, assert_exact_surgery, load_causal_lm, random_sequences, stored_tensors,
                     write_sparse_shards)
from typer.testing import CliRunner

from reap.io.checkpoint import Checkpoint
from reap.cli import app
from reap.model.derive import derive

pytestmark = pytest.mark.slow  # every quantized format end to end against its library: ~1 minute

from conftest import import_or_skip  # noqa: E402

import_or_skip("compressed_tensors", "compressed-tensors")

ROUTER_AND_HEAD = ["lm_head", "re:.*mlp\\.gate$"]
# name -> (tiny family, converter, converter options)
MODELS = {
    "kimi-int4": ("kimi_k2", "ct", {}),  # the released Kimi-K2-Thinking layout: experts INT4 group 32, symmetric
    "qwen-fp8": ("qwen3_moe", "ct", {"preset": "FP8_DYNAMIC", "ignore": ROUTER_AND_HEAD}),  # per channel
    "deepseek-nvfp4": ("deepseek_v3", "modelopt", {}),  # ModelOpt NVFP4, 4 expert groups
    "qwen-fp8-block": ("qwen3_moe", "ct", {"preset": "FP8_BLOCK", "ignore": ROUTER_AND_HEAD}),
    "qwen-fp8-tensor": ("qwen3_moe", "ct", {"preset": "FP8", "ignore": ROUTER_AND_HEAD}),  # static input scales
    "glm-nvfp4": ("glm4_moe", "ct", {"preset": "NVFP4", "ignore": ROUTER_AND_HEAD}),
    "kimi-int4-asym": ("kimi_k2", "ct", {"preset": "W4A16_ASYM", "group_size": 32}),
    "kimi-int4-channel": ("kimi_k2", "ct", {"strategy": "channel", "group_size": None}),
}
DONE_WHEN = ["kimi-int4", "deepseek-nvfp4", "qwen-fp8"]
TRANSFORMERS_LOADS = {"kimi-int4": torch.float32, "kimi-int4-channel": torch.float32, "qwen-fp8": torch.bfloat16,
                      "qwen-fp8-block": torch.bfloat16, "qwen-fp8-tensor": torch.bfloat16}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from reap.testing.tiny import make_tiny_model
    from reap.testing.tiny_formats import LINEAR_BUT_ROUTER, convert_to_compressed_tensors, convert_to_nvfp4_modelopt

    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            family, kind, options = MODELS[name]
            root = tmp_path_factory.mktemp("quantized")
            src = make_tiny_model(root / f"{family}-bf16", seed=2, dtype=torch.bfloat16, family=family)
            if kind == "modelopt":
                cache[name] = convert_to_nvfp4_modelopt(src, root / name)
            else:
                if "ignore" in options:
                    options = {"quantize": LINEAR_BUT_ROUTER, **options}
                cache[name] = convert_to_compressed_tensors(src, root / name, **options)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.jsonl"
    sources = sorted((Path(__file__).resolve().parents[1] / "src" / "reap").glob("*.py"))[:6]
    path.write_text("".join(json.dumps({"text": p.read_text()[:3000]}) + "\n" for p in sources))
    return path


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _prune(src: Path, out: Path, *extra) -> dict:
    res = _run("prune", src, "--out", out, "-q", *(extra or ("--ratio", "0.3", "--method", "random", "--seed", "4")))
    assert res.exit_code == 0, res.output
    return json.loads((out / "reap_report.json").read_text())


def _kept(report: dict) -> dict[int, list[int]]:
    return {int(k): v["kept"] for k, v in report["layers"].items()}


def dequantized_copy(src: Path, dst: Path) -> Path:
    """The checkpoint with every weight dequantized by reap (float32), its companions dropped, as a plain
    checkpoint transformers loads without a quantizer."""
    from safetensors.torch import save_file

    from reap.formats import dequantize, group_parts

    ckpt = Checkpoint(src)
    layout = derive(ckpt)
    tensors = {}
    for base, parts in group_parts(list(ckpt.infos), layout.format).items():
        stored = {p: ckpt.tensor(n) for p, n in parts.items()}
        if "scale" in stored:
            tensors[base] = dequantize(stored, layout.format, torch.float32, ckpt.config, base)
        elif layout.roles[parts["values"]].model is not None:
            tensors[base] = stored["values"].clone()
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def removed_in_memory(original, pruned_config: dict, kept: dict[int, list[int]]):
    """``original`` (a loaded model) with the pruned experts removed: a model of the pruned config whose every
    tensor is the original's, the kept indices selected where the shapes differ."""
    import re

    small = load_causal_lm(Path("."), dtype=torch.float32, config_only=pruned_config)
    big = original.state_dict()
    state = {}
    for name, t in small.state_dict().items():
        b = big[name]
        if b.shape != t.shape:
            (dim,) = [d for d in range(b.dim()) if b.shape[d] != t.shape[d]]
            b = b.index_select(dim, torch.tensor(kept[int(re.search(r"layers\.(\d+)\.", name)[1])]))
        state[name] = b
    small.load_state_dict(state, strict=True)
    return small.eval()


def assert_pruned_model_equals_removal(src: Path, out: Path, kept, tmp_path: Path, name: str) -> None:
    """The pruned checkpoint, dequantized, is the original dequantized with the pruned experts removed in memory
    (logits equal), and, where transformers loads the format on the CPU, transformers' own load of either holds
    exactly the weights reap's dequantization gives."""
    from transformers import CompressedTensorsConfig

    dense_src, dense_out = dequantized_copy(src, tmp_path / "dense-src"), dequantized_copy(out, tmp_path / "dense-out")
    original = load_causal_lm(dense_src, dtype=torch.float32)
    pruned, info = load_causal_lm(dense_out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    small = removed_in_memory(original, json.loads((out / "config.json").read_text()), kept)
    ids = torch.tensor(random_sequences(250, [29, 29], seed=3))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, small(ids).logits, rtol=1e-5, atol=1e-5)
    dtype = TRANSFORMERS_LOADS.get(name)
    if dtype is not None:  # transformers' compressed-tensors loader (dequantize=True) == reap's dequantization
        for model_dir, dense in ((src, dense_src), (out, dense_out)):
            loaded, info = load_causal_lm(model_dir, dtype=dtype, output_loading_info=True,
                                          quantization_config=CompressedTensorsConfig(dequantize=True))
            assert not (info["missing_keys"] or info["mismatched_keys"]), info
            ref = load_causal_lm(dense, dtype=dtype).state_dict()
            for key, t in loaded.state_dict().items():
                assert torch.equal(t, ref[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("name", DONE_WHEN)
def test_prune_with_calibration_exact_verified_loadable(quantized, calibration_file, tmp_path, name):
    """`reap prune --ratio 0.3 --dataset ...` on a Kimi-K2-style INT4, a ModelOpt NVFP4 and a compressed-tensors
    FP8 checkpoint: calibrated through the dequantized layers, every kept tensor byte for byte (packed weights,
    scales, shapes, global scales), verified, and the pruned model is the original with the experts removed."""
    from reap.report.inspect import describe

    src = quantized(name)
    predicted = describe(Checkpoint(src), ratio=0.3)["after"]
    report = _prune(src, tmp_path / "o", "--ratio", "0.3", "--dataset", calibration_file, "--max-length", "128",
                    "--device", "cpu")
    assert report["method"] == "greedy-rerouted" and report["calibration"]["tokens"] > 0  # the default
    kept = _kept(report)
    assert_exact_surgery(src, tmp_path / "o", kept)
    before, after = json.loads((src / "config.json").read_text()), json.loads((tmp_path / "o" / "config.json").read_text())
    count = {k for k, v in before.items() if v == report["num_experts"] and k in ("num_experts", "n_routed_experts")}
    assert after == {**before, **{k: len(kept[min(kept)]) for k in count}}  # the module lists name no expert here
    written = describe(Checkpoint(tmp_path / "o"))["before"]
    assert written["total_params"] == predicted["total_params"] and written["disk_bytes"] == predicted["disk_bytes"]
    assert_pruned_model_equals_removal(src, tmp_path / "o", kept, tmp_path, name)
    if name == "deepseek-nvfp4":  # ModelOpt's own description travels with the checkpoint
        assert (tmp_path / "o" / "hf_quant_config.json").read_text() == (src / "hf_quant_config.json").read_text()


@pytest.mark.parametrize("name", [n for n in MODELS if n not in DONE_WHEN])
def test_every_format_prunes_byte_exact(quantized, tmp_path, name):
    """FP8 blocks and per-tensor scales with static activation scales, compressed-tensors NVFP4, asymmetric and
    per-channel INT4: the same surgery, the same equality."""
    src = quantized(name)
    report = _prune(src, tmp_path / "o")
    assert_exact_surgery(src, tmp_path / "o", _kept(report))
    assert_pruned_model_equals_removal(src, tmp_path / "o", _kept(report), tmp_path, name)


@pytest.mark.parametrize("name", ["kimi-int4", "deepseek-nvfp4"])
def test_inspect_counts_parameters_as_transformers_does(quantized, tmp_path, name):
    """8 INT4 values per int32, 2 FP4 values per byte, companions none: inspect's total is the parameter count of
    the dequantized model transformers builds; disk bytes are the shard bytes."""
    from reap.report.inspect import describe

    src = quantized(name)
    info = describe(Checkpoint(src), ratio=0.3)
    model = load_causal_lm(dequantized_copy(src, tmp_path / "dense"), dtype=torch.float32)
    assert info["before"]["total_params"] == model.num_parameters()
    assert info["before"]["disk_bytes"] == sum(i.nbytes for i in Checkpoint(src).infos.values())


@pytest.mark.parametrize("name", ["kimi-int4", "deepseek-nvfp4", "qwen-fp8-block"])
def test_streamed_layers_equal_transformers(quantized, tmp_path, name):
    """Calibration's layer stream, dequantizing each layer as it loads it, gives layer by layer what transformers'
    own model computes with the same weights (float32; transformers' compressed-tensors loader itself keeps the
    experts in the scales' bfloat16 even when float32 is asked, so the reference is the dequantized checkpoint,
    whose weights test_prune_with_calibration_exact_verified_loadable checks are transformers' own)."""
    from helpers import assert_reference_outputs, feed_reference_inputs, reference_layers

    from reap.core.options import EngineOptions
    from reap.calibrate.stats import LayerAccumulator
    from reap.stream.streamer import LayerStreamer

    src = quantized(name)
    seqs = random_sequences(250, (23, 40, 7))
    ref = reference_layers(dequantized_copy(src, tmp_path / "dense"), torch.float32, seqs)
    ckpt = Checkpoint(src)
    layout = derive(ckpt)
    streamer = LayerStreamer(ckpt, layout, seqs, EngineOptions(device="cpu", dtype="float32", batch_tokens=4096,
                                                               progress=False))
    for layer in range(layout.num_layers):
        feed_reference_inputs(streamer, ref, layer, torch.float32)
        streamer.run_layer(layer, LayerAccumulator(layout.num_experts))
        scale = max(r[1].abs().max().item() for r in ref[layer])
        assert_reference_outputs(streamer, ref, layer, 1e-5 * max(scale, 1.0))
    streamer.close()


def test_module_lists_naming_experts_are_renumbered(quantized, tmp_path):
    """Entries of compressed-tensors' ignore list and ModelOpt's exclude_modules that name expert indices point,
    after pruning, at the same experts under their new index (or are dropped with a pruned expert); the modules
    they name are still the ones stored unquantized; the result loads."""
    from reap.testing.tiny_formats import KIMI_INT4_IGNORE, convert_to_compressed_tensors, convert_to_nvfp4_modelopt

    base = quantized("kimi-int4").parent / "kimi_k2-bf16"
    named = ["model.layers.1.mlp.experts.3.down_proj", "model.layers.2.mlp.experts.9.gate_proj",
             "model.layers.2.mlp.experts.4.up_proj"]
    left = r"layers\.1\.mlp\.experts\.3\.down_proj$|layers\.2\.mlp\.experts\.9\.gate_proj$|layers\.2\.mlp\.experts\.4\.up_proj$"
    src = convert_to_compressed_tensors(base, tmp_path / "ct", quantize=rf"^(?!.*(?:{left})).*\.mlp\.experts\.\d+\.\w+_proj$",
                                        ignore=KIMI_INT4_IGNORE + named)
    keep = {"1": [0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13], "2": [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12]}
    (tmp_path / "keep.json").write_text(json.dumps(keep))
    _prune(src, tmp_path / "o", "--keep", tmp_path / "keep.json")
    ignore = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]["ignore"]
    # layer 1 expert 3 stays expert 3; layer 2 expert 9 becomes 8; layer 2 expert 4 is pruned: its entry goes
    assert ignore == KIMI_INT4_IGNORE + ["model.layers.1.mlp.experts.3.down_proj", "model.layers.2.mlp.experts.8.gate_proj"]
    after = stored_tensors(tmp_path / "o")
    for module in ignore[len(KIMI_INT4_IGNORE):]:
        assert after[module + ".weight"].dtype == torch.bfloat16 and module + ".weight_packed" not in after
    # (transformers' compressed-tensors loader cannot merge unquantized experts with packed ones: reap's forward)
    _, info = load_causal_lm(dequantized_copy(tmp_path / "o", tmp_path / "dense"), output_loading_info=True)
    assert not any(info.values()), info
    # ModelOpt: exclude_modules in hf_quant_config.json and config.json, renumbered alike
    mo = convert_to_nvfp4_modelopt(quantized("deepseek-nvfp4").parent / "deepseek_v3-bf16", tmp_path / "mo")
    hf = json.loads((mo / "hf_quant_config.json").read_text())
    hf["quantization"]["exclude_modules"].append("model.layers.2.mlp.experts.13.*")
    (mo / "hf_quant_config.json").write_text(json.dumps(hf))
    config = json.loads((mo / "config.json").read_text())
    config["quantization_config"]["ignore"].append("model.layers.2.mlp.experts.13.*")
    (mo / "config.json").write_text(json.dumps(config))
    keep = {"1": [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14], "2": [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14]}
    (tmp_path / "keep2.json").write_text(json.dumps(keep))
    _prune(mo, tmp_path / "o2", "--keep", tmp_path / "keep2.json")
    out_hf = json.loads((tmp_path / "o2" / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    out_cfg = json.loads((tmp_path / "o2" / "config.json").read_text())["quantization_config"]["ignore"]
    assert out_hf[-1] == out_cfg[-1] == "model.layers.2.mlp.experts.10.*"


@pytest.mark.parametrize("quant, names", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128}, "'awq'"),
    ({"quant_method": "gptq", "bits": 4}, "'gptq'"),
    ({"quant_method": "hqq"}, "'hqq'"),
    ({"quant_method": "compressed-tensors", "format": "marlin-24", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}}},
     "'marlin-24'"),
])
def test_unsupported_quantization_exits_2_in_one_line(quantized, tmp_path, quant, names):
    src = tmp_path / "m"
    shutil.copytree(quantized("kimi-int4"), src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
    for args in (("inspect", src), ("prune", src, "--out", tmp_path / "o", "--ratio", "0.3", "--method", "random")):
        res = _run(*args)
        assert res.exit_code == 2 and res.stderr.startswith("reap: error:") and "Traceback" not in res.output
        line = res.stderr.strip()
        assert "\n" not in line and names in line and "compressed-tensors" in line and "modelopt" in line, line
        assert not (tmp_path / "o").exists()


# -- a sparse full-size Kimi-K2-Thinking (INT4 experts) ----------------------------------------------------------
REAL = Path(__file__).resolve().parents[2] / "shared" / "real-configs" / "Kimi-K2-Instruct" / "config.json"
KIMI_THINKING_QUANT = KIMI_INT4_QUANT  # Kimi-K2-Thinking's quantization_config as released
SIZES = {"BF16": 2, "F32": 4, "I32": 4}


def kimi_tensors(c: dict) -> list[tuple[str, str, list[int]]]:
    """Kimi-K2-Thinking's tensors (DeepSeek-V3 names): bf16 attention, dense layer 0, shared experts, router; INT4
    routed experts as compressed-tensors pack-quantized (weight_packed I32 [O, I/8], weight_scale BF16 [O, I/32],
    weight_shape I32 [2])."""
    h, heads, E, inter = c["hidden_size"], c["num_attention_heads"], c["n_routed_experts"], c["moe_intermediate_size"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    out = [("model.embed_tokens.weight", "BF16", [c["vocab_size"], h])]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", "BF16", [h]), (p + "post_attention_layernorm.weight", "BF16", [h]),
                (p + "self_attn.q_a_proj.weight", "BF16", [c["q_lora_rank"], h]),
                (p + "self_attn.q_a_layernorm.weight", "BF16", [c["q_lora_rank"]]),
                (p + "self_attn.q_b_proj.weight", "BF16", [heads * qk, c["q_lora_rank"]]),
                (p + "self_attn.kv_a_proj_with_mqa.weight", "BF16", [c["kv_lora_rank"] + c["qk_rope_head_dim"], h]),
                (p + "self_attn.kv_a_layernorm.weight", "BF16", [c["kv_lora_rank"]]),
                (p + "self_attn.kv_b_proj.weight", "BF16",
                 [heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]]),
                (p + "self_attn.o_proj.weight", "BF16", [h, heads * c["v_head_dim"]])]
        if layer < c["first_k_dense_replace"]:
            out += [(p + f"mlp.{w}_proj.weight", "BF16", s) for w, s in
                    (("gate", [c["intermediate_size"], h]), ("up", [c["intermediate_size"], h]),
                     ("down", [h, c["intermediate_size"]]))]
            continue
        out += [(p + "mlp.gate.weight", "BF16", [E, h]), (p + "mlp.gate.e_score_correction_bias", "F32", [E])]
        out += [(p + f"mlp.shared_experts.{w}_proj.weight", "BF16", s) for w, s in
                (("gate", [inter, h]), ("up", [inter, h]), ("down", [h, inter]))]
        for e in range(E):
            for w, (rows, cols) in (("gate", (inter, h)), ("up", (inter, h)), ("down", (h, inter))):
                q = p + f"mlp.experts.{e}.{w}_proj."
                out += [(q + "weight_packed", "I32", [rows, cols // 8]), (q + "weight_scale", "BF16", [rows, cols // 32]),
                        (q + "weight_shape", "I32", [2])]
    return out + [("model.norm.weight", "BF16", [h]), ("lm_head.weight", "BF16", [c["vocab_size"], h])]


def write_sparse_kimi(path: Path, n_shards: int = 62) -> Path:
    """Real headers, holes for data (each shard truncated to its size): no weight is written or read."""
    if not REAL.is_file():
        pytest.skip(f"{REAL} is absent: the shared fixtures sit beside the repository in CI and on dev machines")
    config = json.loads(REAL.read_text())
    config["quantization_config"] = KIMI_THINKING_QUANT
    path.mkdir()
    tensors = kimi_tensors(config)
    # shard names as released: 6-digit total
    write_sparse_shards(path, tensors, SIZES, n_shards, lambda i: f"model-{i + 1:05d}-of-{n_shards:06d}.safetensors")
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.slow
def test_inspect_full_size_kimi_k2_thinking_int4(tmp_path):
    """The published ~1T parameters (1.03T counted as transformers counts them: 8 INT4 values per int32), ~594 GB
    on disk, and 269 of 384 experts after dropping 30%; no weight read (the shards are holes)."""
    model = write_sparse_kimi(tmp_path / "Kimi-K2-Thinking")
    assert sum(p.stat().st_blocks for p in model.iterdir()) * 512 < 200 << 20
    res = _run("inspect", model, "--ratio", "0.3", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    c = json.loads((model / "config.json").read_text())
    h, E, inter, L = c["hidden_size"], c["n_routed_experts"], c["moe_intermediate_size"], c["num_hidden_layers"]
    expert = 3 * inter * h
    moe_layers = L - c["first_k_dense_replace"]
    total = sum(math.prod(s) * (8 if d == "I32" and n.endswith("_packed") else 1)
                for n, d, s in kimi_tensors(c) if not n.endswith(("_scale", "_shape", "e_score_correction_bias")))
    assert info["before"]["total_params"] == total
    assert abs(total / 1.03e12 - 1) < 0.01  # Kimi-K2: "1T total parameters"
    assert info["after"]["experts_per_layer"] == E - math.floor(E * 0.3) == 269
    assert info["after"]["total_params"] == total - moe_layers * math.floor(E * 0.3) * (expert + h)  # experts + router rows
    assert abs(info["after"]["total_params"] / 0.7225e12 - 1) < 0.01
    assert info["before"]["disk_bytes"] == json.loads((model / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert 560 << 30 > info["before"]["disk_bytes"] > 540 << 30  # ~594 GB, as the release
    assert info["quantization"]["quant_method"] == "compressed-tensors"


def _fused_ct(src: Path, dst: Path, preset: str) -> Path:
    """GraniteMoE's fused experts ([E, O, I] on disk) compressed by compressed-tensors expert by expert and stacked
    (``weight_packed`` [E, O, I/8] or uint8 [E, O, I/2], ``weight_scale`` [E, O, G], ``weight_global_scale``
    [E, 1], ``weight_shape`` [E, O, I]; NVFP4's ``input_global_scale`` one for every expert)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    from reap.testing.tiny_formats import _ct_qparams, _rewrite_tensors

    preset_args = PRESET_SCHEMES[preset]
    wargs = QuantizationArgs(**{**preset_args["weights"].model_dump(), **({"group_size": 32} if preset == "W4A16" else {})})
    fmt = "pack-quantized" if preset == "W4A16" else "nvfp4-pack-quantized"
    scheme = QuantizationScheme(targets=["re:.*block_sparse_moe\\.(input|output)_linear$"], weights=wargs,
                                input_activations=preset_args.get("input_activations"), format=fmt)
    comp = BaseCompressor.get_value_from_registry(fmt)

    def convert(name, t):
        if not name.endswith(("input_linear.weight", "output_linear.weight")):
            return [(name, t)]
        parts: dict[str, list] = {}
        for e in range(t.shape[0]):
            scale, zero, gscale = _ct_qparams(t[e].to(torch.bfloat16), wargs)
            state = {"weight": t[e].to(torch.bfloat16), "weight_scale": scale, "weight_zero_point": zero}
            if gscale is not None:
                state["weight_global_scale"] = gscale
            for k, v in comp.compress(state, scheme).items():
                parts.setdefault(k, []).append(v)
        out = {k: torch.stack(v) for k, v in parts.items() if k != "weight_shape"}
        out["weight_shape"] = torch.tensor(t.shape)
        if preset == "NVFP4":
            out["input_global_scale"] = torch.ones(1, dtype=torch.float32)
        module = name[: -len(".weight")]
        return [(f"{module}.{k}", v.contiguous()) for k, v in sorted(out.items())]

    config = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, quantization_status="compressed",
                                ignore=["lm_head"]).model_dump()
    return _rewrite_tensors(src, dst, convert, lambda i, n: f"model-{i + 1:05d}-of-{n:05d}.safetensors", config)


@pytest.mark.parametrize("preset", ["W4A16", "NVFP4"])
def test_fused_experts_companions_sliced_along_the_expert_axis(tmp_path, preset):
    """Quantized fused experts: every part with the expert axis is sliced along it byte for byte, weight_shape's
    expert count becomes K, a scale shared by all experts is copied; the pruned model is the original with the
    experts removed."""
    from reap.testing.tiny import make_tiny_model

    base = make_tiny_model(tmp_path / "granite", seed=2, dtype=torch.bfloat16, family="granitemoe")
    src = _fused_ct(base, tmp_path / "fused", preset)
    layout = derive(Checkpoint(src))
    kinds = {n.rpartition(".")[2]: r.kind for n, r in layout.roles.items() if ".layers.1.block_sparse_moe.input_linear" in n}
    assert kinds == {"weight_packed": "rows", "weight_scale": "rows", "weight_shape": "shape",
                     **({"weight_global_scale": "rows", "input_global_scale": "other"} if preset == "NVFP4" else {})}
    report = _prune(src, tmp_path / "o")
    kept = _kept(report)
    before, after = stored_tensors(src), stored_tensors(tmp_path / "o")
    assert before.keys() == after.keys()
    for name, t in after.items():
        source = before[name]
        if name.endswith("weight_shape"):
            assert t.tolist() == [len(kept[1]), *source.tolist()[1:]] and source[0] == report["num_experts"]
        elif source.shape != t.shape:
            layer = int(name.split(".")[2])
            assert torch.equal(source.index_select(0, torch.tensor(kept[layer])).reshape(-1).view(torch.uint8),
                               t.reshape(-1).view(torch.uint8)), name
        else:
            assert torch.equal(source.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
    assert_pruned_model_equals_removal(src, tmp_path / "o", kept, tmp_path, "fused")
