"""Recovery (reap.recover, reap.rewrite.merged): merged experts against the formula computed here by hand, written
checkpoints against the same merge done in memory, FP8 merges within FP8 rounding of the bf16 merge, the router
re-fit never worse on the held-out tokens, and bad combinations refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import load_causal_lm, stored_tensors
from reap.cli import app
from reap.recover import weights as W


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def experts_of(model_dir: Path):
    model = load_causal_lm(model_dir, dtype=torch.float32)
    from reap.model.model_side import is_experts_module

    return model, [m for m in model.modules() if is_experts_module(m)]


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory) -> Path:
    from reap.testing.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "gpt-oss", family="gpt_oss")


def test_the_cli_knows_every_merge_method():
    from reap.core.options import MERGE_METHODS
    from reap.recover.methods import MERGE_METHODS as REGISTRY

    assert tuple(REGISTRY) == MERGE_METHODS


# -- the formula ------------------------------------------------------------------------------------------------
def test_neurons_are_read_off_the_gate_concatenated_and_interleaved(tiny_fp32, gpt_oss):
    """MiniMax-M2 concatenates gate and up (column c feeds neuron c mod I), gpt-oss interleaves them (c // 2)."""
    _, (m2, *_) = experts_of(tiny_fp32)
    cells = W.neurons(m2)
    I = m2.down_proj.shape[-1]
    assert torch.equal(cells.of_column, torch.arange(2 * I) % I)
    _, (oss, *_) = experts_of(gpt_oss)
    cells = W.neurons(oss)
    assert oss.is_transposed and torch.equal(cells.of_column, torch.arange(cells.of_column.numel()) // 2)


@pytest.mark.parametrize("which", ["m2", "gpt_oss"])
def test_a_permuted_expert_computes_the_same_function(tiny_fp32, gpt_oss, which):
    _, (experts, *_) = experts_of(tiny_fp32 if which == "m2" else gpt_oss)
    cells = W.neurons(experts)
    w = W.expert_weights(experts, 1)
    perm = torch.randperm(cells.size, generator=torch.Generator().manual_seed(0))
    p = W.permuted(w, perm, cells, experts.is_transposed)
    assert not torch.equal(p["up"], w["up"])
    x = torch.randn(5, experts.gate_up_proj.shape[-1 if not experts.is_transposed else -2])
    torch.testing.assert_close(W.forward(experts, p, x), W.forward(experts, w, x), rtol=1e-5, atol=1e-5)


def test_merge_is_the_weighted_sum_of_aligned_experts_by_hand(tiny_fp32):
    """MiniMax-M2 layout ([E, 2I, H] gate then up, [E, H, I] down): the merge of experts 0 and 3 with 0.7 / 0.3,
    expert 3's neurons permuted by p, computed with plain indexing."""
    _, (experts, *_) = experts_of(tiny_fp32)
    cells = W.neurons(experts)
    I = experts.down_proj.shape[-1]
    p = torch.randperm(I, generator=torch.Generator().manual_seed(1))
    got = W.merged([(W.expert_weights(experts, 0), 0.7),
                    (W.permuted(W.expert_weights(experts, 3), p, cells, False), 0.3)])
    gu, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    want_up = 0.7 * gu[0] + 0.3 * gu[3][torch.cat([p, p + I])]
    want_down = 0.7 * down[0] + 0.3 * down[3][:, p]
    torch.testing.assert_close(got["up"], want_up, rtol=0, atol=0)
    torch.testing.assert_close(got["down"], want_down, rtol=0, atol=0)


def test_align_finds_a_hidden_permutation(tiny_fp32):
    _, (experts, *_) = experts_of(tiny_fp32)
    cells = W.neurons(experts)
    w = W.expert_weights(experts, 2)
    p = torch.randperm(cells.size, generator=torch.Generator().manual_seed(2))
    shuffled = W.permuted(w, p, cells, False)  # its neuron n is w's neuron p[n]
    noisy = {k: v + 1e-3 * torch.randn_like(v) for k, v in shuffled.items()}
    perm = W.align(W.features(w, cells, False), W.features(noisy, cells, False))
    back = W.permuted(noisy, perm, cells, False)
    torch.testing.assert_close(back["down"], w["down"], atol=1e-2, rtol=0)
    assert torch.equal(p[perm], torch.arange(cells.size))


def test_fp8_block_quantization_is_the_inverse_of_dequantization_within_fp8_rounding():
    from reap.formats.kernels import dequantize_blocks, quantize_blocks

    w = torch.randn(200, 300) * torch.logspace(-3, 0, 300)
    q, s = quantize_blocks(w, (128, 128))
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3)
    back = dequantize_blocks(q, s, torch.float32, (128, 128))
    scale = s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    assert bool(((back - w).abs() <= w.abs() * 2 ** -4 + scale * 2 ** -9).all())


# -- the written checkpoint ---------------------------------------------------------------------------------------
def _merge_plan(model_dir: Path, seed: int = 0):
    """A hand-made plan: each layer keeps experts 0..E/2-1; expert E/2 + i is merged into i for even i (0.6 / 0.4,
    its neurons permuted at random); layer 0's router rows replaced by random rows."""
    from reap.io.checkpoint import Checkpoint
    from reap.model.validate import derive_checked
    from reap.selection.plan import ExpertPlan, OutputExpert

    ckpt = Checkpoint(model_dir)
    spec = derive_checked(ckpt)
    E, I = spec.num_experts, spec.expert_intermediate
    g = torch.Generator().manual_seed(seed)
    layers, perms = {}, {}
    for layer in spec.moe_layers:
        outs = []
        for i in range(E // 2):
            if i % 2 == 0:
                p = torch.randperm(I, generator=g)
                perms[(layer, i)] = p
                outs.append(OutputExpert(((i, 0.6), (E // 2 + i, 0.4)), (None, tuple(p.tolist()))))
            else:
                outs.append(OutputExpert.kept(i))
        layers[layer] = tuple(outs)
    rows = {spec.moe_layers[0]: torch.randn(E // 2, spec.hidden_size, generator=g) * 0.3}
    return ckpt, spec, ExpertPlan(E, layers, "hand"), perms, rows


def _expected(model_dir: Path, plan, perms, rows, dtype):
    """The original model's state with the plan applied in memory (model layout), rounded to ``dtype``."""
    original = load_causal_lm(model_dir, dtype=torch.float32)
    state = {}
    E = plan.num_experts
    for name, t in original.state_dict().items():
        parts = name.split(".")
        layer = int(parts[2]) if parts[1] == "layers" else None
        kept = plan.kept(layer) if layer in plan.layers else None
        if kept is not None and t.dim() and t.shape[0] == E:
            t = t[kept].clone()
            if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                I = original.state_dict()[name.replace("gate_up_proj", "down_proj")].shape[-1]
                for (lay, i), p in perms.items():
                    if lay != layer:
                        continue
                    src = original.state_dict()[name][E // 2 + i]
                    src = src[torch.cat([p, p + I])] if name.endswith("gate_up_proj") else src[:, p]
                    t[i] = (0.6 * original.state_dict()[name][i].to(dtype).float()
                            + 0.4 * src.to(dtype).float())
            if name.endswith("mlp.gate.weight") and layer in rows:
                t = rows[layer].clone()
        state[name] = t.to(dtype).float()
    return state


def test_a_merged_checkpoint_equals_the_merge_done_in_memory(tiny_bf16, tmp_path):
    """bf16: every tensor of the written checkpoint, loaded by transformers (no missing or unexpected weight), equals
    the original with the plan applied in memory, bit for bit; tensors the plan does not touch are stored as they
    were."""
    from reap.rewrite.surgery import rewrite

    ckpt, spec, plan, perms, rows = _merge_plan(tiny_bf16)
    out = tmp_path / "merged"
    rewrite(ckpt, spec, plan, out, {}, progress=False, router_rows=rows)
    model, info = load_causal_lm(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    want = _expected(tiny_bf16, plan, perms, rows, torch.bfloat16)
    got = model.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    before, after = stored_tensors(tiny_bf16), stored_tensors(out)
    untouched = [n for n in before if "experts" not in n and ".gate." not in n and "correction" not in n]
    assert untouched and all(torch.equal(before[n], after[n]) for n in untouched)


def test_fp8_merged_experts_are_within_fp8_rounding_of_the_bf16_merge(tiny_bf16, tiny_fp8, tmp_path):
    from reap.rewrite.surgery import rewrite

    ckpt, spec, plan, perms, rows = _merge_plan(tiny_fp8)
    rewrite(ckpt, spec, plan, tmp_path / "fp8", {}, progress=False, router_rows=rows)
    fp8 = load_causal_lm(tmp_path / "fp8", dtype=torch.float32).state_dict()
    want = _expected(tiny_fp8, plan, perms, rows, torch.float32)  # the FP8 source's values, merged exactly
    for name, t in want.items():
        if "experts" in name:
            err = (fp8[name] - t).abs().max()
            assert float(err) <= float(t.abs().max()) * 2 ** -3, (name, float(err))
    stored = stored_tensors(tmp_path / "fp8")
    assert any(n.endswith("weight_scale_inv") for n in stored)
    assert all(t.dtype == torch.float8_e4m3fn for n, t in stored.items() if ".experts." in n and n.endswith("weight"))


# -- the job ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from helpers import python_snippets

    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in python_snippets(24)))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("merge", ["fold", "ream"])
def test_prune_with_merge_and_refit_end_to_end(tiny_fp32, data, tmp_path, merge):
    """`reap prune --merge M --refit-router`: the output loads in transformers; the report records each merge and
    re-fit; no layer's held-out sample error is above the plain cut's; the merges and rows written are the report's."""
    out = tmp_path / merge
    res = cli("prune", tiny_fp32, "--ratio", "0.5", "--dataset", data, "--device", "cpu", "--max-length", "128",
              "--merge", merge, "--refit-router", "--recover-tokens", "512", "--out", out)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "reap_report.json").read_text())
    rec = report["recovery"]
    assert rec["merge"] == merge and rec["refit_router"] is True
    for layer, r in rec["layers"].items():
        assert r["error_final"][1] <= r["error_pruned"][1] + 1e-12, (layer, r)
        if isinstance(r.get("refit"), dict):
            assert r["refit"]["after"][1] <= r["refit"]["before"][1]
    _, info = load_causal_lm(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    card = (out / "README.md").read_text()
    assert f"--merge {merge}" in card and "--refit-router" in card, card


def test_recovery_options_refused_in_one_line(tiny_fp32, data, tmp_path):
    stats = tmp_path / "s.safetensors"
    for args, words in [
        (["--ratio", "0.5", "--merge", "fold", "--stats", stats], "--dataset"),
        (["--keep", tmp_path / "k.json", "--refit-router"], "--dataset"),
        (["--ratio", "0.5", "--merge", "average", "--dataset", data], "unknown --merge"),
        (["--ratio", "0.5", "--merge", "fold", "--recover-tokens", "0", "--dataset", data], "--recover-tokens"),
        (["--ratio", "0.5", "--refit-router", "--protect-super-experts", "--dataset", data], "--protect-super"),
    ]:
        out = tmp_path / "out"
        res = cli("prune", tiny_fp32, "--out", out, *args)
        assert res.exit_code == 2, res.output
        assert words in res.output and len(res.output.strip().splitlines()) == 1, res.output
        assert not out.exists()


def test_merging_into_a_format_reap_cannot_quantize_is_refused(tiny_bf16, tmp_path):
    """MXFP4 (gpt-oss's format) has no quantizer in reap: a plan with merges stops before anything is written."""
    from reap.core.errors import UserError
    from reap.rewrite.merged import check_recovery
    from reap.testing.tiny_formats import convert_to_mxfp4

    src = convert_to_mxfp4(tiny_bf16, tmp_path / "mxfp4")
    ckpt, spec, plan, _, _ = _merge_plan(src)
    with pytest.raises(UserError, match="--merge writes merged experts"):
        check_recovery(ckpt, spec, plan, {})


@pytest.mark.slow
def test_mtp_modules_are_recovered_like_decoder_layers(tmp_path, data):
    """A DeepSeek-V3 checkpoint with an MTP module: the module is a layer of the recovery like every other (report
    row num_layers), and where its router was re-fit the stored MTP router rows are the new ones, not a slice."""
    from reap.io.checkpoint import Checkpoint
    from reap.model.validate import derive_checked
    from reap.testing.tiny import add_mtp_modules, make_tiny_model

    plain = make_tiny_model(tmp_path / "plain", seed=2, family="deepseek_v3")
    src = add_mtp_modules(plain, tmp_path / "mtp", seed=5)
    out = tmp_path / "out"
    res = cli("prune", src, "--ratio", "0.5", "--dataset", data, "--device", "cpu", "--max-length", "128",
              "--merge", "fold", "--refit-router", "--recover-tokens", "512", "--out", out)
    assert res.exit_code == 0, res.output
    spec = derive_checked(Checkpoint(src))
    rec = json.loads((out / "reap_report.json").read_text())["recovery"]
    mtp = spec.num_layers
    assert str(mtp) in rec["layers"] and "refit" in rec["layers"][str(mtp)], rec["layers"].keys()
    before, after = stored_tensors(src), stored_tensors(out)
    router = next(n for n, r in spec.roles.items() if r.layer == mtp and r.kind == "rows" and
                  r.model == spec.moe[mtp].router)
    kept = rec["layers"][str(mtp)]["kept"]
    sliced = before[router][kept]
    assert torch.equal(after[router], sliced) == (mtp not in rec["refit_layers"])


def test_fused_interleaved_experts_merge_as_in_memory(gpt_oss, tmp_path):
    """gpt-oss stores every expert of a layer in one tensor, gate and up interleaved ([E, H, 2I]): the written merge
    equals the merge of the loaded model's experts in transformers' layout (neurons read off its gate)."""
    from reap.io.checkpoint import Checkpoint
    from reap.model.validate import derive_checked
    from reap.rewrite.surgery import rewrite
    from reap.selection.plan import ExpertPlan, OutputExpert

    model, mods = experts_of(gpt_oss)
    ckpt = Checkpoint(gpt_oss)
    spec = derive_checked(ckpt)
    E, I = spec.num_experts, spec.expert_intermediate
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(I, generator=g)
    layers = {layer: tuple([OutputExpert(((0, 0.25), (E - 1, 0.75)), (None, tuple(perm.tolist())))]
                           + [OutputExpert.kept(e) for e in range(1, E // 2)]) for layer in spec.moe_layers}
    plan = ExpertPlan(E, layers, "hand")
    columns = {layer: (W.neurons(mods[0]).columns, True) for layer in spec.moe_layers}
    rewrite(ckpt, spec, plan, tmp_path / "out", {}, progress=False, neuron_columns=columns)
    merged_model, info = load_causal_lm(tmp_path / "out", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _, out_mods = experts_of(tmp_path / "out")
    for src, out in zip(mods, out_mods):
        cells = W.neurons(src)
        want = W.merged([(W.expert_weights(src, 0), 0.25),
                         (W.permuted(W.expert_weights(src, E - 1), perm, cells, True), 0.75)])
        got = W.expert_weights(out, 0)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(W.expert_weights(out, 1)["up"], W.expert_weights(src, 1)["up"], rtol=0, atol=0)


@pytest.mark.parametrize("lr", [0.05, 50.0])
def test_the_refit_never_raises_the_held_out_error(tiny_fp32, lr):
    """On a real block (MiniMax-M2's sigmoid router and correction bias), whatever the step size: the rows kept are
    the stored ones or rows with a lower held-out error, and the sample, routed again with them, says the same."""
    from reap.calibrate.greedy import RouterDriver
    from reap.io.checkpoint import Checkpoint
    from reap.model.validate import derive_checked
    from reap.recover.refit import fit, router_leaf
    from reap.recover.sample import LayerSample
    from reap.stream.experts import use_reap_experts

    spec = derive_checked(Checkpoint(tiny_fp32))
    model = load_causal_lm(tiny_fp32, dtype=torch.float32)
    use_reap_experts(model)
    moe = spec.moe[0]
    block = model.get_submodule(moe.block)
    driver = RouterDriver(block, block.experts, moe.tensors, moe.block, spec.top_k, spec.num_experts, moe.extra)
    xs = torch.randn(640, spec.hidden_size, generator=torch.Generator().manual_seed(4))
    removed = torch.zeros(spec.num_experts, dtype=torch.bool)
    removed[torch.randperm(spec.num_experts, generator=torch.Generator().manual_seed(5))[: spec.num_experts // 2]] = True
    with torch.inference_mode():
        sample = LayerSample(driver, block.experts, xs, removed)
        sample.use_router(router_leaf(driver, moe.router, moe.block))
        before = sample.totals()
        result = fit(sample, sample.leaf, steps=40, lr=lr)
        after = sample.totals()
    assert result.before[1] == pytest.approx(before[1], rel=1e-6)
    assert after[1] <= before[1] + 1e-12 and after[1] == pytest.approx(result.after[1], rel=1e-4)
    kept = (~removed).nonzero().squeeze(1)
    if not result.improved:
        assert torch.equal(result.rows, block.gate.weight.detach()[kept].float())
