"""Tests for reap.calibrate.stats: accumulators, stats files, scores, and the choice of experts to prune."""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from reap.core.errors import UserError
from reap.calibrate.stats import (
    FIELDS,
    METHODS,
    ExpertStats,
    LayerAccumulator,
)


def _random_pairs(n: int, num_experts: int, dtype: torch.dtype, seed: int, skip: tuple[int, ...] = ()):
    """N pairs routed to experts in range(num_experts) minus ``skip``."""
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(num_experts) if e not in skip])
    idx = allowed[torch.randint(len(allowed), (n,), generator=gen)]
    gate = torch.rand(n, generator=gen).to(dtype)
    norm = (torch.rand(n, generator=gen) * 50).to(dtype)
    return idx, gate, norm


def _reference(idx, gate, norm, num_experts: int, peak=None) -> dict[str, list[float]]:
    """Plain python loop over pairs, python floats (double precision)."""
    ref = {f: [0.0] * num_experts for f in FIELDS}
    peaks = peak.double().tolist() if peak is not None else [0.0] * len(idx)
    for e, g, n, p in zip(idx.tolist(), gate.double().tolist(), norm.double().tolist(), peaks):
        ref["max_abs"][e] = max(ref["max_abs"][e], p)
        ref["count"][e] += 1
        ref["gate_sum"][e] += g
        ref["ean_sum"][e] += n
        ref["reap_sum"][e] += g * n
        ref["max_norm"][e] = max(ref["max_norm"][e], n)
        ref["ean_sq_sum"][e] += n * n
    return ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_add_matches_python_loop(dtype):
    num_experts = 9
    idx, gate, norm = _random_pairs(3000, num_experts, dtype, seed=1, skip=(2, 7))
    peak = (norm.double() * torch.rand(3000, generator=torch.Generator().manual_seed(9), dtype=torch.float64)).to(dtype)
    acc = LayerAccumulator(num_experts)
    acc.add(idx, gate, norm, peak)
    got = acc.to_dict()
    ref = _reference(idx, gate, norm, num_experts, peak)
    assert acc.peaks and got["max_abs"].max() > 0
    for f in FIELDS:
        assert got[f].dtype == torch.float64 and got[f].shape == (num_experts,)
        assert torch.allclose(got[f], torch.tensor(ref[f], dtype=torch.float64), rtol=1e-12, atol=0), f
    for e in (2, 7):  # never routed -> all zeros
        assert all(got[f][e].item() == 0.0 for f in FIELDS)
    assert got["count"].sum().item() == 3000


def test_add_casts_before_summing():
    # 1e8 + 1 == 1e8 in float32 (ulp 8); float64 keeps every unit, within a batch and across batches.
    big = torch.tensor([1e8] + [1.0] * 999, dtype=torch.float32)
    idx = torch.zeros(1000, dtype=torch.long)
    acc = LayerAccumulator(2)
    acc.add(idx, torch.ones(1000, dtype=torch.float32), big)
    assert acc.to_dict()["ean_sum"][0].item() == 1e8 + 999
    for _ in range(500):
        acc.add(torch.zeros(2, dtype=torch.long), torch.full((2,), 0.5), torch.ones(2))
    d = acc.to_dict()
    assert d["ean_sum"][0].item() == 1e8 + 1999
    assert d["reap_sum"][0].item() == 1e8 + 999 + 500
    assert d["count"][0].item() == 2000
    assert d["max_norm"][0].item() == 1e8


def test_add_products_in_float64():
    # bf16 * bf16 rounded to bf16 would lose bits; the product must be formed in float64.
    gate = torch.tensor([1.0078125], dtype=torch.bfloat16)  # 1 + 2**-7
    norm = torch.tensor([1.0078125], dtype=torch.bfloat16)  # exact in bf16; square is not
    acc = LayerAccumulator(1)
    acc.add(torch.tensor([0]), gate, norm)
    assert acc.to_dict()["reap_sum"][0].item() == 1.0078125 * 1.0078125


def test_many_small_adds_do_not_drift():
    acc = LayerAccumulator(1)
    gate = torch.full((1000,), 0.1, dtype=torch.float32)
    idx = torch.zeros(1000, dtype=torch.long)
    for _ in range(2000):
        acc.add(idx, gate, gate)
    expected = 2_000_000 * float(torch.tensor(0.1, dtype=torch.float32))
    got = acc.to_dict()["gate_sum"][0].item()
    assert math.isclose(got, expected, rel_tol=1e-11)
    f32 = torch.zeros(1, dtype=torch.float32)  # the same adds in float32 visibly drift
    for _ in range(2000):
        f32.index_add_(0, idx, gate)
    assert not math.isclose(f32.item(), expected, rel_tol=1e-5)


def test_batches_equal_single_add():
    idx, gate, norm = _random_pairs(2000, 16, torch.float32, seed=2, skip=(5,))
    one = LayerAccumulator(16)
    one.add(idx, gate, norm)
    many = LayerAccumulator(16)
    for lo, hi in [(0, 1), (1, 700), (700, 700), (700, 1999), (1999, 2000)]:
        many.add(idx[lo:hi], gate[lo:hi], norm[lo:hi])
    a, b = one.to_dict(), many.to_dict()
    for f in FIELDS:
        assert torch.allclose(a[f], b[f], rtol=1e-12, atol=0), f
    assert torch.equal(a["max_norm"], b["max_norm"]) and torch.equal(a["count"], b["count"])


def test_add_accepts_2d_and_rejects_mismatch():
    acc = LayerAccumulator(4)
    acc.add(torch.tensor([[0, 1], [1, 3]]), torch.ones(2, 2), torch.full((2, 2), 2.0))
    assert acc.to_dict()["count"].tolist() == [1.0, 2.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        acc.add(torch.tensor([0, 1]), torch.ones(3), torch.ones(2))


def test_all_reduce_noop_without_process_group():
    acc = LayerAccumulator(3)
    acc.add(torch.tensor([0, 2]), torch.ones(2), torch.tensor([1.0, 4.0]))
    before = acc.to_dict()
    acc.all_reduce()
    after = acc.to_dict()
    assert all(torch.equal(before[f], after[f]) for f in FIELDS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _all_reduce_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        idx, gate, norm = _random_pairs(1000, 8, torch.float32, seed=3, skip=(6,))
        half = slice(0, 500) if rank == 0 else slice(500, 1000)
        acc = LayerAccumulator(8)
        if rank == 0:  # rank 1 brings no peaks: the merged accumulator has none (MIN), while its maxima still merge
            acc.add(idx[half], gate[half], norm[half], norm[half] / 3)
        else:
            acc.add(idx[half], gate[half], norm[half])
        acc.all_reduce()
        torch.save({"peaks": acc.peaks}, f"{out_dir}/peaks{rank}.pt")
        if world == 2:  # both with peaks: max_abs merges by MAX
            both = LayerAccumulator(8)
            both.add(idx[half], gate[half], norm[half], norm[half] / 3)
            both.all_reduce()
            torch.save({"max_abs": both.max_abs.clone(), "peaks": both.peaks}, f"{out_dir}/both{rank}.pt")
        torch.save(acc.to_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_processes_gloo(tmp_path):
    mp.spawn(_all_reduce_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    idx, gate, norm = _random_pairs(1000, 8, torch.float32, seed=3, skip=(6,))
    single = LayerAccumulator(8)
    single.add(idx, gate, norm, norm / 3)
    want = single.to_dict()
    # sanity: each half alone differs from the whole, so the reduction did something
    half = LayerAccumulator(8)
    half.add(idx[:500], gate[:500], norm[:500])
    assert not torch.allclose(half.to_dict()["count"], want["count"])
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for f in ("count", "gate_sum", "ean_sum", "reap_sum"):
            assert torch.allclose(got[f], want[f], rtol=1e-12, atol=0), (rank, f)
        assert torch.equal(got["max_norm"], want["max_norm"])
        assert got["count"][6].item() == 0.0
        assert torch.load(tmp_path / f"peaks{rank}.pt") == {"peaks": False}
        both = torch.load(tmp_path / f"both{rank}.pt")
        assert both["peaks"] and torch.equal(both["max_abs"], want["max_abs"])
    first = LayerAccumulator(8)
    first.add(idx[:500], gate[:500], norm[:500], norm[:500] / 3)
    assert not torch.equal(first.max_abs, single.max_abs)  # rank 0's maxima alone are not the whole's: MAX merged


def _filled_stats(num_layers=3, num_experts=5, seed=0, layers=(0, 2), meta=None) -> ExpertStats:
    stats = ExpertStats(num_layers, num_experts, meta=meta)
    for layer in layers:
        acc = LayerAccumulator(num_experts)
        idx, gate, norm = _random_pairs(200, num_experts, torch.float32, seed=seed + layer, skip=(1,))
        acc.add(idx, gate, norm, norm / 4)
        stats.set_layer(layer, acc)
    return stats


def test_set_layer_and_shapes():
    stats = _filled_stats()
    assert stats.completed == {0, 2}
    for f in FIELDS:
        t = getattr(stats, f)
        assert t.dtype == torch.float64 and t.shape == (3, 5)
        assert torch.all(t[1] == 0)
    assert stats.count[0].sum().item() == 200


def test_save_load_roundtrip(tmp_path):
    meta = {"model": "org/moe", "samples": 64, "tokens": 131072, "dtype": "bfloat16", "nested": {"a": [1, 2]}}
    stats = _filled_stats(meta=meta)
    path = tmp_path / "sub" / "stats.safetensors"
    stats.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["stats.safetensors"]  # no temp left behind
    back = ExpertStats.load(path)
    assert back.meta == meta
    assert back.completed == {0, 2}
    assert (back.num_layers, back.num_experts) == (3, 5)
    for f in FIELDS:
        assert torch.equal(getattr(back, f), getattr(stats, f)), f
    stats.save(path)  # overwriting works
    assert ExpertStats.load(path).completed == {0, 2}


def test_saved_file_layout(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "s.safetensors"
    _filled_stats(meta={"x": 1}).save(path)
    with safe_open(str(path), framework="pt") as fh:
        md = fh.metadata()
        assert md["format"] == "reap-stats" and md["version"] == "3"
        assert json.loads(md["meta"]) == {"x": 1}
        assert set(fh.keys()) == {*FIELDS, "completed"}
        mask = fh.get_tensor("completed")
        assert mask.dtype == torch.int64 and mask.tolist() == [1, 0, 1]


def _one_line_user_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_load_missing(tmp_path):
    with pytest.raises(UserError) as ei:
        ExpertStats.load(tmp_path / "nope.safetensors")
    assert "reap calibrate" in _one_line_user_error(ei)


def test_load_corrupt(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}garbage")
    with pytest.raises(UserError) as ei:
        ExpertStats.load(bad)
    assert "reap calibrate" in _one_line_user_error(ei)
    good = tmp_path / "good.safetensors"
    _filled_stats().save(good)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(UserError):
        ExpertStats.load(truncated)


def test_load_foreign_safetensors(tmp_path):
    other = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(UserError) as ei:
        ExpertStats.load(other)
    assert "not a reap" in _one_line_user_error(ei)
    partial = tmp_path / "partial.safetensors"
    save_file({"count": torch.zeros(2, 2, dtype=torch.float64)}, str(partial),
              metadata={"format": "reap-stats", "version": "1", "meta": "{}"})
    with pytest.raises(UserError):
        ExpertStats.load(partial)


def _hand_stats() -> ExpertStats:
    # layer 0: expert 0 gets pairs (g=0.5,n=2),(g=0.25,n=4); expert 1 one pair (g=1,n=3); expert 2 never routed
    # layer 1: expert 2 gets (g=0.1,n=10) x3; expert 0 (g=0.9,n=1)
    stats = ExpertStats(2, 3)
    acc0 = LayerAccumulator(3)
    acc0.add(torch.tensor([0, 0, 1]), torch.tensor([0.5, 0.25, 1.0]), torch.tensor([2.0, 4.0, 3.0]))
    stats.set_layer(0, acc0)
    acc1 = LayerAccumulator(3)
    acc1.add(torch.tensor([2, 2, 2, 0]), torch.tensor([0.1, 0.1, 0.1, 0.9]), torch.tensor([10.0, 10, 10, 1]))
    stats.set_layer(1, acc1)
    return stats


def test_scores_each_method():
    stats = _hand_stats()
    g01 = float(torch.tensor(0.1, dtype=torch.float32))  # inputs were float32
    g09 = float(torch.tensor(0.9, dtype=torch.float32))
    expected = {
        "reap": [[(0.5 * 2 + 0.25 * 4) / 2, 3.0, 0.0], [g09, 0.0, g01 * 10]],
        "ean": [[6.0, 3.0, 0.0], [1.0, 0.0, 30.0]],
        "frequency": [[2.0, 1.0, 0.0], [1.0, 0.0, 3.0]],
        "weighted-frequency": [[0.75, 1.0, 0.0], [g09, 0.0, 3 * g01]],
    }
    for method, want in expected.items():
        got = stats.scores(method)
        assert got.dtype == torch.float64 and got.shape == (2, 3)
        assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-15), method
        assert torch.isfinite(got).all()


def test_scores_random():
    stats = _hand_stats()
    a, b, c = stats.scores("random", seed=7), stats.scores("random", seed=7), stats.scores("random", seed=8)
    assert a.dtype == torch.float64 and a.shape == (2, 3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert bool(((a >= 0) & (a < 1)).all())
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(stats.scores("random", seed=7), a)


def test_scores_unknown_method():
    with pytest.raises(UserError) as ei:
        _hand_stats().scores("magnitude")
    msg = _one_line_user_error(ei)
    assert all(m in msg for m in METHODS)


# -- the greedy search's measured error per removal (greedy_error) ------------------------------------------------
def _direct_errors(w, choice, f, k, order):
    """sum_t ||y_t - y'_t||^2 / sum_t ||y_t||^2 after removing order[:n], n = 1.., by re-routing every token."""
    def out(removed):
        ch = choice.masked_fill(removed, float("-inf"))
        idx = torch.topk(ch, k, dim=-1).indices
        ww = w.gather(1, idx).double()
        ff = f.gather(1, idx[..., None].expand(-1, -1, f.shape[-1])).double()
        return (ww[..., None] * ff).sum(1) / ww.sum(1, keepdim=True)

    removed = torch.zeros(w.shape[1], dtype=torch.bool)
    y0 = out(removed)
    errors = []
    for j in order:
        removed[j] = True
        errors.append(float(((y0 - out(removed)) ** 2).sum() / (y0 ** 2).sum()))
    return errors


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_search_records_its_error_per_removal(seed):
    from reap.calibrate.greedy_order import GreedyOrder, greedy_rerouted_order, greedy_routed_order

    gen = torch.Generator().manual_seed(seed)
    t, e, h, k = 80, 8, 5, 2
    w = torch.sigmoid(torch.randn(t, e, generator=gen) * 2)
    choice = w + torch.randn(e, generator=gen) * 0.3
    f = torch.randn(t, e, h, generator=gen) * torch.rand(e, 1, generator=gen) * 3

    def route(removed, rows):
        idx = torch.topk(choice[rows].masked_fill(removed, float("-inf")), k + 1, dim=-1).indices
        return idx, w[rows].gather(1, idx)

    for order in (greedy_rerouted_order(w, choice, f, k), greedy_routed_order(route, f, k, chunk=7)):
        assert isinstance(order, GreedyOrder) and isinstance(order, list) and len(order.errors) == e - k
        want = _direct_errors(w, choice, f, k, list(order))
        assert order.errors == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert all(b >= a - 1e-12 for a, b in zip(order.errors, order.errors[1:]))  # greedy: the error only grows
    assert greedy_rerouted_order(w, choice, f, k, n_steps=0).errors == []


def test_greedy_error_in_the_stats_file(tmp_path):
    """set_layer takes the error from the search's GreedyOrder; the file carries it as greedy_error; a file without
    it (an older reap) still loads, with no curves."""
    from safetensors import safe_open

    from reap.calibrate.greedy_order import GreedyOrder

    stats = ExpertStats(3, 4, meta={"top_k": 1})
    for layer, (order, errors) in enumerate([([2, 0, 1], [0.01, 0.05, 0.4]), ([3, 1, 0], [0.02, 0.03, 0.9])]):
        acc = LayerAccumulator(4)
        acc.add(torch.arange(4), torch.ones(4), torch.ones(4), torch.ones(4))
        acc.greedy_order, acc.greedy_note, acc.greedy_sample = GreedyOrder(order, errors), None, 64
        stats.set_layer(layer, acc)
    acc = LayerAccumulator(4)
    acc.greedy_order, acc.greedy_note = None, "hash routing"
    stats.set_layer(2, acc)  # searched, no order: no curve
    assert stats.has_greedy_error
    assert stats.greedy_curve(0) == [0.0, 0.01, 0.05, 0.4] and stats.greedy_order(0) == [2, 0, 1]
    assert stats.greedy_curve(1) == [0.0, 0.02, 0.03, 0.9] and stats.greedy_curve(2) is None
    path = tmp_path / "s.safetensors"
    stats.save(path)
    with safe_open(str(path), framework="pt") as fh:
        assert "greedy_error" in fh.keys() and fh.metadata()["version"] == "3"
    back = ExpertStats.load(path)
    assert back.greedy_curve(0) == stats.greedy_curve(0) and back.greedy_order(1) == [3, 1, 0]
    assert "greedy_error" not in back.missing and back.missing == set()
    with pytest.raises(ValueError, match="one value per removal step"):
        stats.set_greedy_order(0, [1, 2], errors=[0.1])
    # an order without errors (an older search, or set by hand) clears the layer's curve
    stats.set_greedy_order(0, [1, 2])
    assert stats.greedy_curve(0) is None and stats.greedy_order(0) == [1, 2]
    # older files: greedy_rank without greedy_error, and neither
    old = ExpertStats(2, 4)
    old.set_greedy_order(0, [1, 0])
    old.set_greedy_order(1, [0, 3])
    old.completed = {0, 1}
    old.save(path)
    with safe_open(str(path), framework="pt") as fh:
        assert "greedy_error" not in fh.keys()
    back = ExpertStats.load(path)
    assert not back.has_greedy_error and back.greedy_curve(0) is None and back.greedy_order(0) == [1, 0]
    _filled_stats().save(path)
    assert not ExpertStats.load(path).has_greedy_error
    tensors = {"count": torch.zeros(2, 4, dtype=torch.float64), "completed": torch.ones(2, dtype=torch.int64),
               "greedy_error": torch.zeros(3, 4, dtype=torch.float64)}
    for f in FIELDS[:5]:
        tensors[f] = torch.zeros(2, 4, dtype=torch.float64)
    save_file(tensors, str(path), metadata={"format": "reap-stats", "version": "2", "meta": "{}"})
    with pytest.raises(UserError, match="greedy_error"):
        ExpertStats.load(path)
