"""Tests for reap.selection.criteria (the criterion registry) and reap.selection.choose (kept counts, super experts)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from reap.selection.criteria import CRITERIA, METHODS, get_criterion
from reap.core.errors import UserError
from reap.calibrate.greedy_order import TokenSample, greedy_rerouted_order
from reap.calibrate.stats import FIELDS, ExpertStats, LayerAccumulator
from reap.selection.choose import choose_experts, select

# layer 0: expert 0 gets pairs (g=0.5, n=2), (g=0.25, n=4); expert 1 one pair (g=1, n=3); expert 2 never routed;
#          expert 3 four pairs (g=0.5, n=1)
# layer 1: expert 2 gets (g=0.5, n=10) x3; expert 0 (g=0.75, n=1); expert 1 (g=1, n=8); expert 3 never routed
PAIRS = {
    0: ([0, 0, 1, 3, 3, 3, 3], [0.5, 0.25, 1.0, 0.5, 0.5, 0.5, 0.5], [2.0, 4.0, 3.0, 1.0, 1.0, 1.0, 1.0]),
    1: ([2, 2, 2, 0, 1], [0.5, 0.5, 0.5, 0.75, 1.0], [10.0, 10.0, 10.0, 1.0, 8.0]),
}
E = 4


def hand_stats() -> ExpertStats:
    stats = ExpertStats(2, E)
    for layer, (idx, gate, norm) in PAIRS.items():  # all values exact in float32
        acc = LayerAccumulator(E)
        acc.add(torch.tensor(idx), torch.tensor(gate), torch.tensor(norm), torch.tensor(norm) / 2)  # max |f_h|
        stats.set_layer(layer, acc)
    return stats


def per_expert(fn) -> list[list[float]]:
    """fn(list of (g, n) pairs of one expert) for every layer and expert, by a plain python loop."""
    out = []
    for layer in range(2):
        idx, gate, norm = PAIRS[layer]
        out.append([fn([(g, n) for i, g, n in zip(idx, gate, norm) if i == e]) for e in range(E)])
    return out


def _mean(xs):
    return sum(xs) / len(xs) if xs else 0.0


n_bar = [7 / E, 5 / E]  # tokens routed per expert, layer mean
EXPECTED = {
    "reap": per_expert(lambda p: _mean([g * n for g, n in p])),  # the paper: mean of g * ||f|| over routed tokens
    "ean": per_expert(lambda p: sum(n for _, n in p)),
    "frequency": per_expert(len),
    "weighted-frequency": per_expert(lambda p: sum(g for g, _ in p)),
    "weighted-ean": per_expert(lambda p: sum(g * n for g, n in p)),
    "ean-mean": per_expert(lambda p: _mean([n for _, n in p])),
    "ean-sq": per_expert(lambda p: sum(n * n for _, n in p)),
    "max-activation": per_expert(lambda p: max((n for _, n in p), default=0.0)),
}


def test_expected_numbers_by_hand():
    # a few entries written out, so the python-loop definitions above are themselves checked
    assert EXPECTED["reap"][0] == [(0.5 * 2 + 0.25 * 4) / 2, 3.0, 0.0, 0.5]
    assert EXPECTED["weighted-ean"][1] == [0.75, 8.0, 15.0, 0.0]
    assert EXPECTED["ean-sq"][0] == [20.0, 9.0, 0.0, 4.0]
    assert EXPECTED["max-activation"][1] == [1.0, 8.0, 10.0, 0.0]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_criterion_on_hand_made_stats(name):
    got = hand_stats().scores(name)
    assert got.dtype == torch.float64 and got.shape == (2, E)
    torch.testing.assert_close(got, torch.tensor(EXPECTED[name], dtype=torch.float64), rtol=1e-12, atol=1e-15)


def test_reap_is_exactly_the_paper_definition():
    # random pairs, python double loop: mean over the tokens routed to j of g_j(x) * ||f_j(x)||; 0 if never routed
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 7, (5000,), generator=gen)
    idx[idx == 3] = 4  # expert 3 never routed
    gate, norm = torch.rand(5000, generator=gen), torch.rand(5000, generator=gen) * 30
    acc = LayerAccumulator(7)
    acc.add(idx, gate, norm)
    stats = ExpertStats(1, 7)
    stats.set_layer(0, acc)
    sums, counts = [0.0] * 7, [0] * 7
    for e, g, n in zip(idx.tolist(), gate.double().tolist(), norm.double().tolist()):
        sums[e] += g * n
        counts[e] += 1
    want = [s / c if c else 0.0 for s, c in zip(sums, counts)]
    torch.testing.assert_close(stats.scores("reap")[0], torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    assert stats.scores("reap")[0, 3].item() == 0.0


def test_reap_prior_scores():
    # sum g||f|| / (n + n_bar): layer 0 n_bar = 7/4, layer 1 n_bar = 5/4
    got = hand_stats().scores("reap-prior")
    want = [[s / (n + n_bar[layer]) if n else 0.0 for s, n in zip(EXPECTED["weighted-ean"][layer],
                                                                   EXPECTED["frequency"][layer])]
            for layer in range(2)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    # between the mean and the sum: layer 1, expert 1 (1 token, g||f|| 8) vs expert 2 (3 tokens of 5)
    from reap.selection.criteria import reap_prior_scores

    stats = hand_stats()
    assert torch.equal(reap_prior_scores(stats, strength=0.0), stats.scores("reap"))
    assert got[1, 1] > got[1, 2]  # a prior of n_bar = 1.25 tokens: 8 / 2.25 > 15 / 4.25, REAP's order
    strong = reap_prior_scores(stats, strength=2.0)[1]  # 8 / 3.5 < 15 / 5.5: the sum's order
    assert strong[2] > strong[1]
    assert torch.equal(torch.argsort(reap_prior_scores(stats, strength=1e9)[1], descending=True)[:3],
                       torch.argsort(stats.scores("weighted-ean")[1], descending=True)[:3])


def test_never_routed_score_zero_and_random_ignores_data():
    stats = hand_stats()
    stats.set_greedy_order(0, [0, 1])
    stats.set_greedy_order(1, [0, 1])
    for name in METHODS:
        if name in ("random", "greedy-rerouted"):  # greedy ranks never-routed experts itself (its search removes
            continue  # them first, at no cost)
        s = stats.scores(name)
        assert s[0, 2].item() == 0.0 and s[1, 3].item() == 0.0, name
        assert torch.isfinite(s).all(), name
    a, b = stats.scores("random", seed=3), ExpertStats(2, E).scores("random", seed=3)
    assert torch.equal(a, b) and not torch.equal(a, stats.scores("random", seed=4))


def test_registry_entries():
    assert METHODS == tuple(CRITERIA)
    assert METHODS[:5] == ("reap", "ean", "frequency", "weighted-frequency", "random")  # the old names, first
    for name, c in CRITERIA.items():
        assert c.name == name and c.card and "\n" not in c.card
        assert set(c.needs) <= set(FIELDS) | {"greedy_rank"}, name
        assert c.needs_data == (name != "random")
    with pytest.raises(UserError) as ei:
        get_criterion("magnitude")
    assert all(m in str(ei.value) for m in METHODS)


def test_version_1_file_loads_and_names_what_it_lacks(tmp_path):
    stats = hand_stats()
    path = tmp_path / "v1.safetensors"
    tensors = {f: getattr(stats, f) for f in FIELDS[:5]}  # what version 1 wrote
    tensors["completed"] = torch.ones(2, dtype=torch.int64)
    save_file(tensors, str(path), metadata={"format": "reap-stats", "version": "1", "meta": "{}"})
    old = ExpertStats.load(path)
    assert old.missing == {"ean_sq_sum", "greedy_rank", "max_abs"} and old.version == "1"
    for name in ("reap", "frequency", "weighted-ean", "max-activation", "reap-prior"):
        assert torch.equal(old.scores(name), stats.scores(name)), name
    with pytest.raises(UserError) as ei:
        old.scores("ean-sq")
    msg = str(ei.value)
    assert "ean-sq" in msg and "ean_sq_sum" in msg and "reap calibrate" in msg and "\n" not in msg
    # re-saved, it is a current-version file that still lacks the fields
    again = tmp_path / "again.safetensors"
    old.save(again)
    back = ExpertStats.load(again)
    assert back.missing == {"ean_sq_sum", "greedy_rank", "max_abs"} and back.version == "3"
    with pytest.raises(UserError):
        back.scores("ean-sq")


def test_unknown_version_refused(tmp_path):
    stats = hand_stats()
    path = tmp_path / "v9.safetensors"
    tensors = {f: getattr(stats, f) for f in FIELDS}
    tensors["completed"] = torch.ones(2, dtype=torch.int64)
    save_file(tensors, str(path), metadata={"format": "reap-stats", "version": "9", "meta": "{}"})
    with pytest.raises(UserError, match="version"):
        ExpertStats.load(path)


# -- greedy selection with re-routing ---------------------------------------------------------------------------
def _route_output(w, choice, f, removed, k):
    """Reference MoE output [T, H]: top-k of choice among the kept experts, their weights renormalized."""
    out = []
    for t in range(w.shape[0]):
        cands = sorted((e for e in range(w.shape[1]) if e not in removed), key=lambda e: -float(choice[t, e]))[:k]
        ws = [float(w[t, e]) for e in cands]
        out.append(sum(wi * f[t, e].double() for wi, e in zip(ws, cands)) / sum(ws))
    return torch.stack(out)


def _brute_force_greedy(w, choice, f, k, steps):
    y0 = _route_output(w, choice, f, set(), k)
    removed: list[int] = []
    for _ in range(steps):
        errs = {j: float(((y0 - _route_output(w, choice, f, {*removed, j}, k)) ** 2).sum())
                for j in range(w.shape[1]) if j not in removed}
        removed.append(min(errs, key=lambda j: (errs[j], j)))
    return removed


@pytest.mark.parametrize("router", ["softmax", "sigmoid+bias"])
def test_greedy_rerouted_equals_brute_force(router):
    gen = torch.Generator().manual_seed(1 if router == "softmax" else 2)
    t, e, h, k = 40, 7, 5, 2
    logits = torch.randn(t, e, generator=gen) * 2
    if router == "softmax":
        w = torch.softmax(logits, -1)
        choice = w
    else:
        w = torch.sigmoid(logits)
        choice = w + torch.randn(e, generator=gen) * 0.3  # e_score_correction_bias
    f = torch.randn(t, e, h, generator=gen) * torch.rand(e, 1, generator=gen) * 3  # experts of unequal size
    want = _brute_force_greedy(w, choice, f, k, e - k)
    assert greedy_rerouted_order(w, choice, f, k) == want
    assert greedy_rerouted_order(w, choice, f, k, n_steps=3, chunk=7) == want[:3]  # chunking changes nothing


def test_greedy_rerouting_finds_a_twin():
    # top-1; 20 tokens prefer expert 0 (output 10 x base), 10 prefer expert 1 whose next choice is its exact twin 2;
    # expert 3 is never chosen. Removing 1 costs nothing (its tokens re-route to the twin), nor does removing 3;
    # ties go to the lower id: 1, then 3 (2 now carries the 10 tokens), then 2 (10 tokens lose less than 20).
    t, h = 30, 4
    base = torch.randn(t, 1, h, generator=torch.Generator().manual_seed(0))
    f = base.expand(t, 4, h).clone()
    f[:, 0] *= 10
    w = torch.full((t, 4), 0.25)
    choice = torch.tensor([[3.0, 2.0, 1.9, -1.0]] * 20 + [[2.0, 3.0, 2.9, -1.0]] * 10)
    assert greedy_rerouted_order(w, choice, f, 1) == [1, 3, 2] == _brute_force_greedy(w, choice, f, 1, 3)
    assert greedy_rerouted_order(w, choice, f, 1, n_steps=0) == []
    with pytest.raises(ValueError):
        greedy_rerouted_order(w, choice, f, 1, n_steps=4)  # would leave no next choice
    with pytest.raises(ValueError):
        greedy_rerouted_order(w, choice[:, :3], f, 1)


def test_greedy_rank_criterion_and_file(tmp_path):
    stats = hand_stats()
    with pytest.raises(UserError, match="greedy re-routing order"):  # never searched: recalibrate, or another method
        stats.scores("greedy-rerouted")
    stats.set_greedy_order(0, [2, 3, 0])
    # layer 1 has no order: weighted-ean (sum of g ||f||) stands in, scaled to [0, E-1]
    got = stats.scores("greedy-rerouted")
    want1 = stats.reap_sum[1] / stats.reap_sum[1].max() * (E - 1)
    assert torch.equal(got[1], want1)
    from reap.selection.criteria import greedy_fallback_layers

    assert list(greedy_fallback_layers(stats)) == [1]
    stats.set_greedy_order(1, [3, 0])
    assert stats.greedy_rank[0].tolist() == [2.0, 3.0, 0.0, 1.0] and stats.greedy_rank[1].tolist() == [1.0, 2.0, 2.0, 0.0]
    # the first n of the order are pruned, for every n; the criterion ranks never-routed experts itself
    assert torch.equal(stats.scores("greedy-rerouted"), stats.greedy_rank)
    for n in range(1, 3):
        assert choose_experts(stats.scores("greedy-rerouted")[0], n)[1] == sorted([2, 3, 0][:n])
    plan = select(stats, "greedy-rerouted", 0.5, top_k=1)
    assert (plan.kept(1), plan.pruned(1)) == ([1, 2], [0, 3])
    path = tmp_path / "g.safetensors"
    stats.save(path)
    back = ExpertStats.load(path)
    assert "greedy_rank" not in back.missing and torch.equal(back.greedy_rank, stats.greedy_rank)
    with pytest.raises(ValueError):
        stats.set_greedy_order(0, [1, 1])


def test_token_sample_stride_and_cap():
    x = torch.arange(100, dtype=torch.float32)[:, None].expand(100, 3)
    s = TokenSample(max_tokens=10, stride=7)
    for lo, hi in [(0, 5), (5, 6), (6, 40), (40, 100)]:  # batch boundaries do not matter
        s.add(x[lo:hi])
    assert s.rows[:, 0].tolist() == [0.0, 7, 14, 21, 28, 35, 42, 49, 56, 63] and s.seen == 100
    small = TokenSample(max_tokens=1000, stride=30)
    small.add(x)
    assert small.rows[:, 0].tolist() == [0.0, 30, 60, 90]
    with pytest.raises(ValueError):
        TokenSample(0)
