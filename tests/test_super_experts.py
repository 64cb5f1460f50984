"""Super experts as Su et al. define them (reap.selection.choose.super_experts over ExpertStats.max_abs): the largest
output magnitude of each expert, max |f_h|, against the 99.5th percentile and a tenth of the maximum of ONE set of
per-expert maxima across the model's first three quarters of decoder layers; the statistic itself against an
independent recomputation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from reap.calibrate.stats import FIELDS, ExpertStats, LayerAccumulator
from reap.core.errors import UserError
from reap.selection.choose import scores_for, select, super_experts


def _layer(E: int, pairs: int, H: int, seed: int, spikes=()) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's routed pairs: expert ids [N] (every expert hit) and outputs [N, H] from one distribution (standard
    normal), plus ``spikes``: (expert, value) pairs, each one output element of three of that expert's pairs set to
    +-value (a few huge activations)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.arange(E), torch.randint(E, (pairs - E,), generator=g)])
    y = torch.randn(pairs, H, generator=g)
    for expert, value in spikes:
        rows = (ids == expert).nonzero().squeeze(1)[:3]
        y[rows, 3] = torch.tensor([value, -value, value / 2])[: len(rows)]
    return ids, y


def _stats(layers, E: int, meta=None) -> ExpertStats:
    """ExpertStats of these layers, each fed to a LayerAccumulator in three add calls, as the experts implementation
    hands them: ids, weight, ||f||, max |f_h|."""
    stats = ExpertStats(len(layers), E, meta=meta)
    for layer, (ids, y) in enumerate(layers):
        acc = LayerAccumulator(E)
        for part in torch.tensor_split(torch.arange(len(ids)), 3):
            acc.add(ids[part], torch.full((len(part),), 0.5), y[part].norm(dim=-1), y[part].abs().amax(dim=-1))
        stats.set_layer(layer, acc)
    return stats


def _percentile(values: list[float], q: float) -> float:
    """numpy.percentile's default (linear interpolation between the two nearest ranks), in plain python."""
    v = sorted(values)
    pos = (len(v) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _eq6(a: list[list[float]], layers: list[int]) -> set[tuple[int, int]]:
    """Su et al.'s Eq. 6 in plain python: A = the maxima of ``layers`` (all experts); super iff above P99.5(A) and
    above max(A) / 10."""
    pool = [x for layer in layers for x in a[layer]]
    p995, top = _percentile(pool, 0.995), max(pool)
    return {(layer, e) for layer in layers for e, x in enumerate(a[layer]) if x > p995 and x > top / 10}


def _found(mask: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(i), int(j)) for i, j in mask.nonzero().tolist()}


# -- the definition -----------------------------------------------------------------------------------------------
def test_layers_without_outliers_have_none_not_even_their_top_expert():
    """Every layer's outputs from one distribution, but one layer's expert 5 with a few huge activations: that expert
    is the only super expert; no other layer has one, not even its top expert (which the per-layer percentile of the
    layer's own maxima always chose)."""
    E = 16
    layers = [_layer(E, 400, 32, seed=layer, spikes=[(5, 600.0)] if layer == 2 else ()) for layer in range(8)]
    stats = _stats(layers, E)
    got = super_experts(stats)
    assert got.shape == (8, E) and got.dtype == torch.bool
    assert _found(got) == {(2, 5)}
    for layer in range(8):
        top = int(stats.max_abs[layer].argmax())
        if layer != 2:
            assert not got[layer, top], layer  # the layer's own top expert is no super expert
        # what the per-layer rule protected: the top expert of every layer (P99.5 of E maxima lies below the largest)
        m = stats.max_abs[layer]
        assert m[top] > max(float(torch.quantile(m, 0.995)), float(m.max()) / 10)


def test_few_huge_activations_make_super_experts_and_the_tenth_of_the_maximum_trims():
    """Large A (6 layers x 128 experts): three experts with huge activations are super; one well above the rest (and
    above P99.5 of A) but below a tenth of the largest is not; a huge one in the last quarter of the layers is neither
    super nor part of A (else its tenth, 100, would drop the expert at 100)."""
    E = 128
    spikes = {0: [(7, 600.0)], 1: [(90, 400.0)], 3: [(3, 100.0), (64, 20.0)], 7: [(11, 1000.0)]}
    layers = [_layer(E, 2000, 16, seed=10 + layer, spikes=spikes.get(layer, ())) for layer in range(8)]
    stats = _stats(layers, E)
    a = stats.max_abs.tolist()
    got = _found(super_experts(stats))
    assert got == {(0, 7), (1, 90), (3, 3)} == _eq6(a, list(range(6)))
    assert a[3][64] > _percentile([x for row in a[:6] for x in row], 0.995)  # (3, 64): above P99.5, below 600 / 10
    assert (7, 11) not in got and _eq6(a, list(range(8))) == {(0, 7), (1, 90), (7, 11)}  # with every layer in A
    # MTP modules (rows after the decoder layers) are not in L either: the same model with an MTP row
    mtp = _stats(layers + [_layer(E, 2000, 16, seed=99, spikes=[(0, 5000.0)])], E, meta={"mtp_layers": 1})
    assert _found(super_experts(mtp)) == got
    # the layers given: the set A and the layers looked at
    assert _found(super_experts(stats, layers=range(8))) == _eq6(a, list(range(8)))
    assert _found(super_experts(stats.max_abs, layers=[0, 3])) == _eq6(a, [0, 3]) == {(0, 7), (3, 3)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_maxima_and_threshold_equal_the_whole_set(seed):
    """Random outputs over several add calls: max_abs == max |y| over all of an expert's pairs (exactly), and the
    choice == Eq. 6 computed in plain python with numpy's percentile (a model without a heavy tail: the experts above
    P99.5 of A, the largest always among them)."""
    import numpy as np

    E, H = 48, 24
    layers = []
    g = torch.Generator().manual_seed(100 + seed)
    for layer in range(4):
        n = 300 + 50 * layer
        ids = torch.randint(E - 1, (n,), generator=g)  # expert E - 1 is never routed: max 0
        y = torch.randn(n, H, generator=g) * torch.rand(n, 1, generator=g) * 3  # varied scales, no outlier
        layers.append((ids, y))
    stats = _stats(layers, E)
    for layer, (ids, y) in enumerate(layers):
        want = [float(y[ids == e].abs().max()) if bool((ids == e).any()) else 0.0 for e in range(E)]
        assert stats.max_abs[layer].tolist() == want, layer
    a = stats.max_abs.tolist()
    L = list(range(3))  # round(0.75 x 4)
    pool = [x for layer in L for x in a[layer]]
    assert math.isclose(_percentile(pool, 0.995), float(np.percentile(pool, 99.5)), rel_tol=1e-12)
    got = _found(super_experts(stats))
    assert got == _eq6(a, L)
    top = max(pool)
    assert got == {(layer, e) for layer in L for e in range(E) if a[layer][e] > np.percentile(pool, 99.5)}
    assert 1 <= len(got) <= 1 + len(pool) // 200 and any(a[layer][e] == top for layer, e in got)


def test_never_routed_layers_and_empty_pools():
    stats = ExpertStats(4, 8)
    assert not super_experts(stats).any()  # nothing routed: no super expert (and no error)
    table = torch.zeros(4, 8, dtype=torch.float64)
    table[1, 2] = 5.0  # one routed expert in one layer: A = that layer's 8 maxima (dense rows of zeros left out)
    assert _found(super_experts(table)) == {(1, 2)}


# -- old stats files ------------------------------------------------------------------------------------------------
def test_old_stats_file_without_max_abs_is_a_one_line_error_for_protection(tmp_path):
    E = 8
    stats = _stats([_layer(E, 100, 8, seed=s) for s in range(2)], E)
    path = tmp_path / "v2.safetensors"
    tensors = {f: getattr(stats, f) for f in FIELDS if f != "max_abs"}  # what version 2 wrote
    tensors["completed"] = torch.ones(2, dtype=torch.int64)
    save_file(tensors, str(path), metadata={"format": "reap-stats", "version": "2", "meta": json.dumps({})})
    old = ExpertStats.load(path)
    assert "max_abs" in old.missing and old.version == "2"
    for attempt in (lambda: super_experts(old), lambda: scores_for(old, "reap", protect_super=True),
                    lambda: select(old, "reap", 0.5, top_k=1, protect_super=True)):
        with pytest.raises(UserError) as err:
            attempt()
        msg = str(err.value)
        assert "\n" not in msg and "max_abs" in msg and str(path) in msg and "version 2" in msg, msg
        assert "reap calibrate" in msg and "--protect-super-experts" in msg, msg
    assert super_experts(old, strict=False) is None  # the report's list: none, no error
    select(old, "reap", 0.5, top_k=1)  # without protection the file still serves
    old.save(tmp_path / "again.safetensors")  # re-saved: still lacks it, never a table of zeros
    with pytest.raises(UserError, match="max_abs"):
        super_experts(ExpertStats.load(tmp_path / "again.safetensors"))


def test_pairs_without_peaks_leave_max_abs_missing():
    acc = LayerAccumulator(4)
    acc.add(torch.tensor([0, 1]), torch.ones(2), torch.ones(2))
    stats = ExpertStats(2, 4)
    stats.set_layer(0, acc)
    assert "max_abs" in stats.missing
    with pytest.raises(UserError, match="max_abs"):
        super_experts(stats)
    with pytest.raises(ValueError, match="peak"):
        LayerAccumulator(4).add(torch.tensor([0, 1]), torch.ones(2), torch.ones(2), torch.ones(3))


# -- the statistic of a real calibration ------------------------------------------------------------------------------
def test_calibrated_max_abs_equals_hooks_on_transformers_experts(tiny_fp32, tmp_path):
    """A calibration of the tiny model: max_abs == max |f_h| of each pair's output recomputed with transformers' own
    experts module (fp32, eager, one expert per call, weight 1), and the super experts of both tables agree."""
    from helpers import hooked_stats, python_snippets

    from reap.calibrate.run import calibrate
    from reap.core.options import CalibrateOptions, DataOptions, EngineOptions
    from reap.data.tokens import calibration_sequences, load_tokenizer

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in python_snippets(3)))
    opts = CalibrateOptions(model=str(tiny_fp32), data=DataOptions(dataset=str(data), max_length=96),
                            engine=EngineOptions(device="cpu", dtype="float32", batch_tokens=200, progress=False))
    stats, _ = calibrate(opts)
    want = hooked_stats(tiny_fp32, calibration_sequences(opts.data, load_tokenizer(tiny_fp32)))
    assert "max_abs" not in stats.missing and bool((stats.max_abs > 0).all())
    torch.testing.assert_close(stats.max_abs, want["max_abs"], rtol=1e-5, atol=1e-6)
    assert bool((stats.max_abs <= stats.max_norm * (1 + 1e-6)).all())  # |f_h| <= ||f||
    assert torch.equal(super_experts(stats), super_experts(want["max_abs"]))
