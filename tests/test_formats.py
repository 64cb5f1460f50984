"""Weight formats: FP8 block and MXFP4 dequantization against independent computations, and how stored names
group into a logical tensor and its companions."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from reap.checkpoint import Checkpoint
from reap.errors import UserError
from reap.formats import (DENSE, FP8_BLOCK, MXFP4, checkpoint_format, dequantize_blocks, dequantize_mxfp4, group_parts,
                          stored_params)

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
