"""Weight formats: FP8 block and MXFP4 dequantization against independent computations; compressed-tensors and
ModelOpt dequantization bit for bit against the libraries themselves (skipped, with the reason, where
``compressed-tensors`` / ``nvidia-modelopt`` are not installed: ``pip install -e ".[dev]"`` brings them); how stored
names group into a logical tensor and its companions; detection; module lists after pruning."""

from __future__ import annotations

import pytest
import torch
from conftest import import_or_skip
from helpers import KIMI_INT4_QUANT as KIMI_QUANT
from safetensors import safe_open

from reap.io.checkpoint import Checkpoint
from reap.core.errors import UserError
from reap.formats import (DENSE, FP8_BLOCK, MXFP4, checkpoint_format, companion_problem, dequantize,
                          dequantize_blocks, dequantize_mxfp4, group_parts, stored_params, value_dtype)
from reap.formats.kernels import pack_int32, unpack_int32

FP8 = torch.float8_e4m3fn

def naive_dequant(weight: torch.Tensor, scale: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """Element by element: value x scale of its block."""
    out = torch.empty(weight.shape, dtype=torch.float32)
    w, s = weight.float().tolist(), scale.float().tolist()
    for i, row in enumerate(w):
        srow = s[i // block[0]]
        out[i] = torch.tensor([v * srow[j // block[1]] for j, v in enumerate(row)], dtype=torch.float32)
    return out


@pytest.mark.parametrize("shape", [(256, 384), (96, 192), (200, 300), (130, 129), (1, 5), (128, 129)])
def test_dequantize_blocks_against_a_loop(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    weight = (torch.randn(shape, generator=gen) * 100).to(FP8)
    scale = torch.rand((-(-shape[0] // 128), -(-shape[1] // 128)), generator=gen) + 0.01
    ref = naive_dequant(weight, scale)
    assert torch.equal(dequantize_blocks(weight, scale, torch.float32), ref)
    assert torch.equal(dequantize_blocks(weight, scale, torch.bfloat16), ref.to(torch.bfloat16))


def test_dequantize_blocks_other_block_size_and_bad_scale():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(70, 50, generator=gen).to(FP8)
    scale = torch.rand(3, 2, generator=gen) + 0.5  # 32x32 blocks
    assert torch.equal(dequantize_blocks(weight, scale, torch.float32, (32, 32)), naive_dequant(weight, scale, (32, 32)))
    with pytest.raises(UserError, match="weight_block_size"):
        dequantize_blocks(weight, scale, torch.float32)  # 128x128 blocks need a [1, 1] scale


def test_fp8_fixture_loads_close_to_the_bf16_one(mini_m2, mini_m2_fp8):
    """Checkpoint.load dequantizes exactly like the loop, and lands within FP8 rounding of the bf16 weights."""
    fp8, bf16 = Checkpoint(mini_m2_fp8), Checkpoint(mini_m2)
    for name in ("model.layers.0.block_sparse_moe.experts.3.w1.weight",  # [96, 192]: not a multiple of 128
                 "model.layers.5.block_sparse_moe.experts.60.w2.weight",  # [192, 96]
                 "model.layers.2.self_attn.q_proj.weight"):
        with safe_open(str(mini_m2_fp8 / fp8.infos[name].shard), "pt") as f:
            weight, scale = f.get_tensor(name), f.get_tensor(name + "_scale_inv")
        got = fp8.load(name, torch.float32)  # reap.formats.dequantize through Checkpoint.load
        assert weight.dtype == FP8 and got.dtype == torch.float32
        assert torch.equal(got, naive_dequant(weight, scale))
        orig = bf16.load(name, torch.float32)
        per_elem_scale = scale.repeat_interleave(128, 0)[: got.shape[0]].repeat_interleave(128, 1)[:, : got.shape[1]]
        # e4m3: 3 mantissa bits (relative rounding <= 2^-4), subnormal step 2^-9 in units of the scale
        assert ((got - orig).abs() <= orig.abs() / 16 + per_elem_scale * 2.0**-9 + 1e-12).all(), name
    assert fp8.load("model.layers.0.block_sparse_moe.gate.weight").dtype == torch.float32  # not quantized


def test_mxfp4_dequantization_equals_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

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


def test_group_parts_and_stored_params():
    names = ["a.weight", "a.weight_scale_inv", "norm.weight", "e.gate_up_proj_blocks", "e.gate_up_proj_scales",
             "x_scales"]
    assert group_parts(names, FP8_BLOCK)["a.weight"] == {"values": "a.weight", "scale": "a.weight_scale_inv"}
    assert group_parts(names, FP8_BLOCK)["norm.weight"] == {"values": "norm.weight"}
    mx = group_parts(names, MXFP4)
    assert mx["e.gate_up_proj"] == {"values": "e.gate_up_proj_blocks", "scale": "e.gate_up_proj_scales"}
    assert mx["x_scales"] == {"values": "x_scales"}  # a scale without blocks is a plain tensor
    assert group_parts(names, DENSE)["a.weight_scale_inv"] == {"values": "a.weight_scale_inv"}
    assert stored_params("a.weight_scale_inv", "F32", 4, FP8_BLOCK) == 0
    assert stored_params("e.gate_up_proj_blocks", "U8", 16, MXFP4) == 32
    assert stored_params("e.gate_up_proj_scales", "U8", 16, MXFP4) == 0
    assert stored_params("a.weight", "BF16", 16, DENSE) == 16


@pytest.mark.parametrize("quant, fmt", [(None, DENSE), ({"quant_method": "fp8", "fmt": "float8_e4m3fn"}, FP8_BLOCK),
                                        ({"quant_method": "mxfp4"}, MXFP4)])
def test_checkpoint_format(quant, fmt):
    assert checkpoint_format({"quantization_config": quant} if quant else {}) is fmt


def test_unknown_quantization_names_what_reap_reads():
    with pytest.raises(UserError, match="'awq'.*fp8.*mxfp4") as err:
        checkpoint_format({"quantization_config": {"quant_method": "awq"}})
    assert "\n" not in str(err.value)


def test_fused_fp8_dequantization_keeps_leading_dims():
    gen = torch.Generator().manual_seed(4)
    weight = (torch.randn(3, 130, 129, generator=gen) * 10).to(FP8)
    scale = torch.rand(3, 2, 2, generator=gen) + 0.1
    got = dequantize_blocks(weight, scale, torch.float32)
    for e in range(3):
        assert torch.equal(got[e], dequantize_blocks(weight[e], scale[e], torch.float32))


# -- compressed-tensors: compressed by compressed-tensors, decompressed by it and by reap ----------------------------
def _ct():
    return import_or_skip("compressed_tensors", "compressed-tensors")


def _ct_roundtrip(weight: torch.Tensor, preset: str, **overrides):
    """(the Format reap detects, the stored parts compressed-tensors writes for ``weight``, its decompressed weight)."""
    _ct()
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    from reap.testing.tiny_formats import _ct_qparams

    args = QuantizationArgs(**{**PRESET_SCHEMES[preset]["weights"].model_dump(), **overrides})
    kind = str(getattr(args.type, "value", args.type))
    fmt = ("pack-quantized" if kind == "int" else "nvfp4-pack-quantized" if args.num_bits == 4 else "float-quantized")
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format=fmt)
    comp = BaseCompressor.get_value_from_registry(fmt)
    stored = {}
    for e in range(weight.shape[0]) if weight.dim() == 3 else [None]:  # fused experts: one module per expert
        w = weight[e] if e is not None else weight
        scale, zero, gscale = _ct_qparams(w, args)
        state = {"weight": w, "weight_scale": scale, "weight_zero_point": zero}
        if gscale is not None:
            state["weight_global_scale"] = gscale
        for k, v in comp.compress(state, scheme).items():
            stored.setdefault(k, []).append(v)
    stored = {k: torch.stack(v) if weight.dim() == 3 else v[0] for k, v in stored.items()}
    if weight.dim() == 3:
        stored["weight_shape"] = torch.tensor(weight.shape)
        ref = torch.stack([comp.decompress({k: (v[e] if k != "weight_shape" else v[1:]) for k, v in stored.items()},
                                           scheme)["weight"] for e in range(weight.shape[0])])
    else:
        ref = comp.decompress(dict(stored), scheme)["weight"]
    config = {"quantization_config": QuantizationConfig(config_groups={"group_0": scheme}, format=fmt,
                                                        quantization_status="compressed").model_dump()}
    return checkpoint_format(config), config, stored, ref


PARTS = {"weight_packed": "values", "weight": "values", "weight_scale": "scale", "weight_zero_point": "zero_point",
         "weight_shape": "shape", "weight_global_scale": "global_scale"}


@pytest.mark.parametrize("preset, overrides, shape", [
    ("W4A16", {"group_size": 32}, (64, 96)),  # Kimi-K2-Thinking: INT4, symmetric, groups of 32
    ("W4A16", {"group_size": 128}, (48, 256)),
    ("W4A16_ASYM", {"group_size": 32}, (40, 64)),  # zero points packed along the rows (40 rows: 5 words)
    ("W4A16", {"strategy": "channel", "group_size": None}, (24, 70)),  # 70 columns: the last word half used
    ("W4A16_ASYM", {"strategy": "channel", "group_size": None}, (24, 64)),
    ("W8A16", {}, (32, 256)),
    ("W4A16", {"group_size": 32}, (3, 32, 64)),  # fused experts [E, O, I]
])
def test_int_pack_quantized_equals_compressed_tensors(preset, overrides, shape):
    gen = torch.Generator().manual_seed(len(shape) + shape[-1])
    weight = (torch.randn(shape, generator=gen) * 0.05 + 0.01).to(torch.bfloat16)
    fmt, config, stored, ref = _ct_roundtrip(weight, preset, **overrides)
    assert fmt.name == "compressed-tensors"
    parts = {PARTS[k]: v for k, v in stored.items()}
    for dtype in (torch.bfloat16, torch.float32):
        got = dequantize(parts, fmt, dtype, config, "model.layers.1.mlp.experts.3.down_proj.weight")
        assert got.dtype == dtype and torch.equal(got, ref.to(dtype))  # bit for bit compressed-tensors
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    bits = 8 if preset == "W8A16" else 4
    ints = unpack_from_int32(stored["weight_packed"].reshape(-1, stored["weight_packed"].shape[-1]), bits,
                             torch.Size([stored["weight_packed"][..., 0].numel(), shape[-1]]))
    assert torch.equal(unpack_int32(stored["weight_packed"], bits, shape[-1]).reshape(ints.shape), ints)
    assert torch.equal(pack_int32(ints, bits), pack_to_int32(ints, bits))  # reap's packer writes the same words


@pytest.mark.parametrize("preset, overrides, shape", [
    ("FP8", {}, (64, 96)),  # per tensor
    ("FP8_DYNAMIC", {}, (64, 96)),  # per channel
    ("FP8_BLOCK", {}, (200, 300)),  # 128x128 blocks, partial ones at both edges
    ("FP8_BLOCK", {"block_structure": [32, 16]}, (64, 48)),
    ("FP8_DYNAMIC", {"strategy": "group", "group_size": 32}, (16, 64)),
])
def test_float_quantized_equals_compressed_tensors(preset, overrides, shape):
    gen = torch.Generator().manual_seed(shape[0])
    weight = (torch.randn(shape, generator=gen) * 0.1).to(torch.bfloat16)
    fmt, config, stored, ref = _ct_roundtrip(weight, preset, **overrides)
    assert stored["weight"].dtype == FP8
    parts = {PARTS[k]: v for k, v in stored.items()}
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(dequantize(parts, fmt, dtype, config, "model.layers.0.self_attn.q_proj.weight"),
                           ref.to(dtype))


@pytest.mark.parametrize("shape", [(64, 96), (2, 32, 64)])
def test_nvfp4_pack_quantized_equals_compressed_tensors(shape):
    gen = torch.Generator().manual_seed(7)
    weight = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    if len(shape) == 3:  # compressed-tensors packs one 2-d module at a time; reap also reads them stacked
        per = [_ct_roundtrip(weight[e], "NVFP4") for e in range(shape[0])]
        fmt, config = per[0][0], per[0][1]
        stored = {k: torch.stack([p[2][k] for p in per]) for k in per[0][2]}
        ref = torch.stack([p[3] for p in per])
    else:
        fmt, config, stored, ref = _ct_roundtrip(weight, "NVFP4")
    assert stored["weight_packed"].dtype == torch.uint8 and stored["weight_scale"].dtype == FP8
    parts = {PARTS[k]: v for k, v in stored.items()}
    assert ref.dtype == torch.bfloat16
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(dequantize(parts, fmt, dtype, config, "model.layers.1.mlp.experts.0.up_proj.weight"),
                           ref.to(dtype))
    assert stored_params("x.weight_packed", "U8", stored["weight_packed"].numel(), fmt) == weight.numel()


def test_optional_library_skip_says_why(tmp_path, monkeypatch):
    """The skip of a library's comparison says "not installed" only when it is not; an import that fails on something
    else (a dependency of its own missing) shows that ImportError's message."""
    (tmp_path / "half_installed").mkdir()
    (tmp_path / "half_installed" / "__init__.py").write_text("import reap_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        import_or_skip("reap_no_such_library.sub", "no-such-library")
    with pytest.raises(pytest.skip.Exception) as info:
        import_or_skip("half_installed.sub", "half-installed")
    assert "is installed but `import half_installed.sub` fails: No module named 'reap_no_such_dependency'" in \
        str(info.value) and "not installed" not in str(info.value)


def test_nvfp4_modelopt_packer_and_dequantizer_equal_modelopt():
    import_or_skip("modelopt.torch.quantization.qtensor.nvfp4_tensor", "nvidia-modelopt")
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    from reap.formats.kernels import dequantize_nvfp4_modelopt
    from reap.testing.tiny_formats import quantize_nvfp4_modelopt

    for seed, dtype in ((0, torch.bfloat16), (1, torch.float32)):
        gen = torch.Generator().manual_seed(seed)
        weight = (torch.randn(64, 96, generator=gen) * 0.05).to(dtype)
        weight[0, :16] = 0  # an all-zero block: scale 1
        weight[1, 3] = -0.0
        packed, scale, scale_2 = quantize_nvfp4_modelopt(weight)
        q, ref_scale, ref_scale_2 = NVFP4QTensor.quantize(weight.clone(), 16)
        assert torch.equal(q._quantized_data, packed)  # byte for byte ModelOpt's quantizer
        assert torch.equal(ref_scale.view(torch.uint8), scale.view(torch.uint8)) and torch.equal(ref_scale_2, scale_2)
        for out in (torch.bfloat16, torch.float32):
            ref = q.dequantize(dtype=out, scale=ref_scale, double_scale=ref_scale_2, block_sizes={-1: 16})
            assert torch.equal(dequantize_nvfp4_modelopt(packed, scale, scale_2, 16, out), ref)


# -- detection, parameter counts, companion checks ---------------------------------------------------------------
def test_detection_of_compressed_tensors_and_modelopt(tmp_path):
    fmt = checkpoint_format({"quantization_config": KIMI_QUANT})
    assert fmt.name == "compressed-tensors"
    scheme = fmt.scheme("model.layers.3.mlp.experts.7.gate_proj.weight", "int")
    assert (scheme.bits, scheme.strategy, scheme.group, scheme.symmetric) == (4, "group", 32, True)
    assert stored_params("a.experts.0.w.weight_packed", "I32", 10, fmt) == 80  # 8 INT4 values per int32
    assert value_dtype("a.experts.0.w.weight_packed", "I32", fmt) == "INT4"
    assert stored_params("a.experts.0.w.weight_scale", "BF16", 10, fmt) == 0
    assert stored_params("a.experts.0.w.weight_shape", "I32", 2, fmt) == 0
    assert stored_params("a.self_attn.q_proj.weight", "BF16", 10, fmt) == 10
    from reap.formats import describe_format

    assert describe_format(fmt) == {"format": "compressed-tensors", "schemes": ["INT4 group 32 (pack-quantized)"]}
    assert describe_format(DENSE) is None
    # nested in text_config (multimodal wrappers such as Kimi-K2.5)
    assert checkpoint_format({"text_config": {"quantization_config": KIMI_QUANT}}).name == "compressed-tensors"
    # ModelOpt: hf_quant_config.json alone, or with config.json's quantization_config
    (tmp_path / "hf_quant_config.json").write_text('{"producer": {"name": "modelopt"}, "quantization": '
                                                   '{"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": []}}')
    mo = checkpoint_format({}, tmp_path)
    assert mo.name == "modelopt" and mo.quant.algo == "NVFP4"
    assert stored_params("m.experts.1.up_proj.weight", "U8", 8, mo) == 16
    assert stored_params("m.experts.1.up_proj.weight_scale_2", "F32", 1, mo) == 0
    assert checkpoint_format({"quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8"}}).quant.algo == "FP8"
    # a compressed-tensors config whose every group is dense holds plain weights
    dense = {**KIMI_QUANT, "format": "dense", "config_groups": {"g": {"targets": ["Linear"], "weights": None}}}
    assert checkpoint_format({"quantization_config": dense}) is DENSE


@pytest.mark.parametrize("quant, words", [
    ({"quant_method": "awq", "bits": 4}, ["'awq'", "AWQ", "compressed-tensors", "modelopt"]),
    ({"quant_method": "gptq", "bits": 4}, ["'gptq'", "GPTQ", "compressed-tensors"]),
    ({"quant_method": "bitsandbytes"}, ["'bitsandbytes'", "fp8", "mxfp4", "compressed-tensors", "modelopt"]),
    ({**KIMI_QUANT, "format": "sparse-24-bitmask"}, ["sparse-24-bitmask", "pack-quantized", "nvfp4-pack-quantized"]),
    ({**KIMI_QUANT, "format": "mxfp4-pack-quantized"}, ["mxfp4-pack-quantized", "pack-quantized"]),
    ({**KIMI_QUANT, "sparsity_config": {"format": "sparse-bitmask"}}, ["sparsity", "pack-quantized"]),
    ({"quant_method": "modelopt", "quant_algo": "W4A8_AWQ"}, ["W4A8_AWQ", "NVFP4", "FP8"]),
    ({**KIMI_QUANT, "config_groups": {"g": {"targets": ["Linear"], "weights": {
        "num_bits": 3, "type": "int", "strategy": "group", "group_size": 32}}}}, ["3-bit", "2, 4 and 8-bit"]),
])
def test_unsupported_quantization_is_one_line_naming_it_and_what_reap_reads(quant, words):
    with pytest.raises(UserError) as err:
        checkpoint_format({"quantization_config": quant})
    text = str(err.value)
    assert "\n" not in text and all(w in text for w in words), text


def test_companion_checks():
    from reap.io.checkpoint import TensorInfo

    fmt = checkpoint_format({"quantization_config": KIMI_QUANT})

    def info(name, dtype, shape):
        return TensorInfo(name, "s", dtype, tuple(shape), 0, 0)

    base = "model.layers.1.mlp.experts.2.gate_proj.weight"
    ok = {"values": info(base + "_packed", "I32", [64, 12]), "scale": info(base + "_scale", "BF16", [64, 3]),
          "shape": info(base + "_shape", "I64", [2])}
    assert companion_problem(fmt, base, ok) is None
    assert "no shape" in companion_problem(fmt, base, {k: v for k, v in ok.items() if k != "shape"})
    assert "does not fit" in companion_problem(fmt, base, {**ok, "scale": info(base + "_scale", "BF16", [63, 3])})
    fused = {"values": info("e.gate_up_proj_blocks", "U8", [4, 64, 2, 16]),
             "scale": info("e.gate_up_proj_scales", "U8", [3, 64, 2])}
    assert "does not fit" in companion_problem(MXFP4, "e.gate_up_proj", fused)
    assert companion_problem(FP8_BLOCK, "x.weight", {"values": info("x.weight", "BF16", [4, 4])}) is None


# -- module lists after pruning ------------------------------------------------------------------------------------
def _renames(layers=(1, 2), experts=6, keep=(0, 2, 3, 5)):
    """Modules of a 2-MoE-layer model (6 experts, kept 0, 2, 3, 5 -> 0..3) and their names after pruning."""
    new_id = {layer: {old: new for new, old in enumerate(keep)} for layer in layers}
    renames = {"lm_head": "lm_head", "model.layers.0.mlp.down_proj": "model.layers.0.mlp.down_proj"}
    for layer in (0, *layers):
        renames[f"model.layers.{layer}.self_attn.q_proj"] = f"model.layers.{layer}.self_attn.q_proj"
    for layer in layers:
        renames[f"model.layers.{layer}.mlp.gate"] = f"model.layers.{layer}.mlp.gate"
        for e in range(experts):
            new = new_id[layer].get(e)
            for proj in ("gate_proj", "down_proj"):
                renames[f"model.layers.{layer}.mlp.experts.{e}.{proj}"] = (
                    None if new is None else f"model.layers.{layer}.mlp.experts.{new}.{proj}")
    return renames, new_id


def test_module_lists_renumbered_or_dropped_never_pointing_elsewhere():
    from reap.formats.modules import (match_compressed_tensors, match_transformers, match_wildcard,
                                      rewrite_entries, rewrite_quantization)

    renames, new_id = _renames()
    ct = ["lm_head", "re:.*self_attn.*", "re:.*mlp\\.gate$", "model.layers.1.mlp.experts.3.down_proj",
          "model.layers.2.mlp.experts.1.gate_proj", "re:model\\.layers\\.2\\.mlp\\.experts\\.5\\..*"]
    assert rewrite_entries(ct, match_compressed_tensors, renames, new_id, "ignore") == [
        "lm_head", "re:.*self_attn.*", "re:.*mlp\\.gate$", "model.layers.1.mlp.experts.2.down_proj",
        "re:model\\.layers\\.2\\.mlp\\.experts\\.3\\..*"]  # expert 1 of layer 2 was pruned: dropped
    # ModelOpt wildcards: one entry for every layer, renumbered (the same new index in each layer: one entry)
    assert rewrite_entries(["model.layers.*.mlp.experts.5.*", "*self_attn*"], match_wildcard, renames, new_id,
                           "exclude_modules") == ["model.layers.*.mlp.experts.3.*", "*self_attn*"]
    with pytest.raises(UserError, match="cannot renumber"):  # a glob over indices (5, 50-59, ...)
        rewrite_entries(["model.layers.*.mlp.experts.5*"], match_wildcard, renames, new_id, "exclude_modules")
    assert rewrite_entries(["model.layers.*.mlp.experts.4.*"], match_wildcard, renames, new_id, "x") == []
    # transformers' modules_to_not_convert (suffixes): unaffected entries stay
    assert rewrite_entries(["gate", "lm_head"], match_transformers, renames, new_id, "m") == ["gate", "lm_head"]
    # different new indices per layer: expanded per layer
    renames2, new_id2 = _renames()
    new_id2[2] = {0: 0, 1: 1, 5: 2, 4: 3}
    for e in range(6):
        for proj in ("gate_proj", "down_proj"):
            new = new_id2[2].get(e)
            renames2[f"model.layers.2.mlp.experts.{e}.{proj}"] = None if new is None else \
                f"model.layers.2.mlp.experts.{new}.{proj}"
    assert rewrite_entries(["model.layers.*.mlp.experts.5.down_proj"], match_wildcard, renames2, new_id2, "x") == [
        "model.layers.1.mlp.experts.3.down_proj", "model.layers.2.mlp.experts.2.down_proj"]
    # a regex over expert indices cannot be renumbered: an error naming the entry, never a silent shift
    with pytest.raises(UserError, match=r"experts\\\\.\[0-2\]"):
        rewrite_entries(["re:.*experts\\.[0-2]\\..*"], match_compressed_tensors, renames, new_id, "ignore")
    # a whole config: ignore lists, targets, quantized_layers keys
    quant = {"ignore": ["model.layers.1.mlp.experts.5.gate_proj"],
             "config_groups": {"g": {"targets": ["Linear", "model.layers.2.mlp.experts.3.down_proj"]}},
             "quantized_layers": {"model.layers.1.mlp.experts.4.gate_proj": {"quant_algo": "FP8"},
                                  "model.layers.1.mlp.experts.2.gate_proj": {"quant_algo": "NVFP4"}}}
    out = rewrite_quantization(quant, renames, new_id)
    assert out["ignore"] == ["model.layers.1.mlp.experts.3.gate_proj"]
    assert out["config_groups"]["g"]["targets"] == ["Linear", "model.layers.2.mlp.experts.2.down_proj"]
    assert out["quantized_layers"] == {"model.layers.1.mlp.experts.1.gate_proj": {"quant_algo": "NVFP4"}}
