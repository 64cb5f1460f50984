"""reap.selection.choose: the ratio -> count rule, the choice by scores (groups included), keep files, super experts."""

import json
import math
import random
from fractions import Fraction

import pytest
import torch

from test_criteria import hand_stats

from reap.core.errors import UserError
from reap.selection.plan import Routing
from reap.selection.choose import (choose_experts, experts_to_drop, n_to_drop, plan_from_scores, protect, read_keep_file,
                            scores_for, select)


def kept(e: int, ratio: float, top_k: int, multiple_of: int = 1, n_group: int = 1, topk_group: int = 1) -> int:
    return e - experts_to_drop(Routing("fam", e, top_k, n_group, topk_group), ratio, multiple_of)


# -- how many ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("e,ratio,top_k,n,want", [
    (64, 0.3, 8, 1, 45), (64, 0.3, 8, 8, 40), (64, 0.3, 8, 16, 32), (64, 0.5, 8, 8, 32), (48, 0.3, 6, 8, 32),
    (48, 0.3, 6, 4, 32), (256, 0.3, 8, 8, 176), (256, 0.3, 8, 16, 176), (256, 0.3, 8, 32, 160),
])
def test_kept_count_multiple_of(e, ratio, top_k, n, want):
    assert kept(e, ratio, top_k, n) == want
    assert want % n == 0 and want <= e - math.floor(Fraction(str(ratio)) * e)


def test_kept_count_refuses_below_top_k_in_one_line():
    assert kept(16, 0.5, 8) == 8
    for args in ((16, 0.5, 8, 3), (64, 0.3, 8, 64), (16, 0.6, 8)):  # 8 -> 6; 45 -> 0; 7 kept
        with pytest.raises(UserError, match="fewer than the 8") as err:
            kept(*args)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, float("nan"), True, "0.3"])
def test_kept_count_refuses_a_ratio_outside_0_1(ratio):
    with pytest.raises(UserError, match="--ratio"):
        kept(64, ratio, 8)


def test_kept_count_refuses_a_ratio_that_drops_nothing():
    with pytest.raises(UserError, match="drops floor"):
        kept(64, 0.01, 8)


def test_kept_count_groups():
    # DeepSeek-V3: 256 experts in 8 groups; without --multiple-of the drop count is rounded to a multiple of 8
    assert kept(256, 0.3, 8, n_group=8, topk_group=4) == 256 - 72
    assert kept(256, 0.3, 8, multiple_of=16, n_group=8, topk_group=4) == 176
    with pytest.raises(UserError, match="groups"):
        kept(256, 0.3, 8, multiple_of=12, n_group=8, topk_group=4)  # 180: not a multiple of 8
    with pytest.raises(UserError, match="every group must lose the same number"):
        kept(64, 0.1, 2, n_group=8)  # drops 6 < 8 groups


def test_min_kept_with_groups():
    # top-8 into 4 of 8 groups: each allowed group must offer 2 (the group score's top two) -> 16
    assert Routing("deepseek_v3", 256, 8, 8, 4).min_kept() == 16
    assert Routing("x", 64, 8, 4, 2).min_kept() == 16  # ceil(8 / 2) = 4 per group
    assert Routing("x", 64, 6).min_kept() == 6


@pytest.mark.parametrize("bad", [0, -8, 2.5, True, "8"])
def test_kept_count_bad_multiple(bad):
    with pytest.raises(UserError, match="--multiple-of"):
        kept(64, 0.3, 8, bad)


# -- which ------------------------------------------------------------------------------------------------------
def test_choose_experts_drops_lowest():
    scores = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7])
    assert choose_experts(scores, 2) == ([0, 2, 4], [1, 3])
    assert choose_experts(scores, 0) == ([0, 1, 2, 3, 4], [])
    assert choose_experts(scores, 4) == ([2], [0, 1, 3, 4])


def test_choose_experts_tie_rule():
    # equal scores: the higher index is pruned first
    assert choose_experts(torch.tensor([1.0, 1.0, 1.0, 1.0]), 1) == ([0, 1, 2], [3])
    assert choose_experts(torch.tensor([2.0, 0.0, 0.0, 0.0, 5.0]), 2) == ([0, 1, 4], [2, 3])
    assert choose_experts(torch.zeros(6, dtype=torch.float64), 3) == ([0, 1, 2], [3, 4, 5])


def test_choose_experts_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        e = rng.randint(1, 12)
        vals = [float(rng.randint(0, 3)) for _ in range(e)]  # many ties
        n = rng.randint(0, e - 1)
        kept, pruned = choose_experts(torch.tensor(vals), n)
        # independent rule: an expert is pruned iff at least E-n experts beat it in (score desc, index asc)
        want_pruned = [i for i in range(e)
                       if sum(1 for j in range(e) if (vals[j], -j) > (vals[i], -i)) >= e - n]
        assert pruned == want_pruned and kept == [i for i in range(e) if i not in want_pruned]


def test_choose_experts_rejects_nan_and_bad_n():
    with pytest.raises(ValueError):
        choose_experts(torch.tensor([1.0, float("nan"), 2.0]), 1)
    with pytest.raises(ValueError):
        choose_experts(torch.tensor([1.0, 2.0]), 2)
    with pytest.raises(ValueError):
        choose_experts(torch.tensor([1.0, 2.0]), -1)


@pytest.mark.parametrize(
    "num_experts,ratio,want",
    [(256, 0.3, 76), (64, 0.3, 19), (256, 0.25, 64), (256, 0.4, 102), (128, 0.5, 64), (100, 0.29, 29),
     (100, 0.57, 57), (10, 0.1 * 3, 3), (64, 0.0, 0), (8, 0.99, 7)],
)
def test_n_to_drop(num_experts, ratio, want):
    assert n_to_drop(num_experts, ratio) == want


def test_n_to_drop_needs_float_guard():
    assert math.floor(100 * 0.29) == 28  # naive floor is wrong here
    assert n_to_drop(100, 0.29) == 29


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_n_to_drop_bad_ratio(ratio):
    with pytest.raises(UserError):
        n_to_drop(64, ratio)


def test_plan_from_scores_groups_equals_per_group_brute_force():
    gen = torch.Generator().manual_seed(0)
    routing = Routing("deepseek_v3", 32, 4, 4, 2)  # 4 groups of 8
    scores = torch.randint(0, 5, (3, 32), generator=gen).double()  # ties
    n_drop = experts_to_drop(routing, 0.5)
    plan = plan_from_scores(scores, routing, [0, 1, 2], n_drop, "reap")
    for layer in range(3):
        want = []
        for g in range(4):  # each group drops its n_drop/4 lowest (ties: the higher index), independently
            ids = list(range(8 * g, 8 * g + 8))
            ranked = sorted(ids, key=lambda i: (-float(scores[layer, i]), i))
            want += sorted(ranked[: 8 - n_drop // 4])
        assert plan.kept(layer) == want
        assert plan.pruned(layer) == [e for e in range(32) if e not in want]
    assert plan.kept_per_layer == 32 - n_drop and plan.method == "reap"


def _keep_file(tmp_path, data) -> str:
    path = tmp_path / "keep.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_read_keep_file_round_trip(tmp_path):
    routing = Routing("qwen3_moe", 8, 2)
    plan = read_keep_file(_keep_file(tmp_path, {"0": [5, 1, 2], "2": [0, 1, 7]}), routing, [0, 2])
    assert plan.keep == {0: [1, 2, 5], 2: [0, 1, 7]} and plan.method == "keep-file"
    assert read_keep_file(_keep_file(tmp_path, plan.to_json()), routing, [0, 2]) == plan


@pytest.mark.parametrize("data,match", [
    ("not json", "not valid JSON"),
    ([1, 2], "must be a JSON object"),
    ({"x": [0, 1]}, "not an MoE layer"),
    ({"1": [0, 1], "0": [0, 1], "2": [0, 1]}, "not an MoE layer"),
    ({"0": "0,1"}, "list of integer"),
    ({"0": [0, True]}, "list of integer"),
    ({"0": [0, 8], "2": [0, 1]}, "names expert 8"),
    ({"0": [0, 0], "2": [0, 1]}, "more than once"),
    ({"0": [0], "2": [0]}, "fewer than the 2 each token"),
    ({"0": [0, 1]}, "no entry for layer"),
    ({"0": [0, 1], "2": [0, 1, 2]}, "different numbers"),
])
def test_read_keep_file_refuses_in_one_line(tmp_path, data, match):
    with pytest.raises(UserError, match=match) as err:
        read_keep_file(_keep_file(tmp_path, data), Routing("qwen3_moe", 8, 2), [0, 2])
    assert "\n" not in str(err.value) and "keep.json" in str(err.value)


def test_read_keep_file_refuses_unequal_groups(tmp_path):
    routing = Routing("deepseek_v3", 16, 2, 4, 2)  # min_kept 8: two per group
    ok = {"0": [0, 1, 4, 5, 8, 9, 12, 13]}
    assert read_keep_file(_keep_file(tmp_path, ok), routing, [0]).kept_per_layer == 8
    with pytest.raises(UserError, match="same number from each"):
        read_keep_file(_keep_file(tmp_path, {"0": [0, 1, 2, 4, 5, 8, 9, 12]}), routing, [0])


def test_read_keep_file_missing_or_a_directory(tmp_path):
    for path in (tmp_path / "absent.json", tmp_path):
        with pytest.raises(UserError, match="keep file"):
            read_keep_file(path, Routing("m", 8, 2), [0])


# -- super experts ----------------------------------------------------------------------------------------------
# the definition itself (Su et al.'s Eq. 6 over the model's max |f_h|): tests/test_super_experts.py


def test_more_super_experts_than_kept_is_a_one_line_error():
    import torch

    from reap.selection.choose import check_super_fit

    protected = torch.zeros(3, 8, dtype=torch.bool)
    protected[2, :5] = True  # layer 2: five super experts
    check_super_fit(protected, 5)
    check_super_fit(protected, 2, layers=[0, 1])  # layer 2 is not among the layers pruned
    with pytest.raises(UserError) as err:
        check_super_fit(protected, 4)
    assert "\n" not in str(err.value) and "5 super experts" in str(err.value) and "4 kept" in str(err.value)


def test_protect_keeps_protected_and_order():
    scores = torch.tensor([[5.0, 0.1, 3.0, 0.2], [1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    prot = torch.tensor([[False, True, False, True], [False, False, False, False]])
    got = protect(scores, prot)
    assert choose_experts(got[0], 2) == ([1, 3], [0, 2])
    assert got[0, 3] > got[0, 1]  # order among protected kept
    assert torch.equal(got[1], scores[1])


def test_select_with_protection_and_multiple_of():
    stats = hand_stats()
    stats.max_abs[0] = torch.tensor([1.0, 1.0, 0.0, 100.0], dtype=torch.float64)  # expert 3 is super
    plain = select(stats, "reap", 0.5, top_k=1)
    assert (plain.kept(0), plain.pruned(0)) == ([0, 1], [2, 3])
    prot = select(stats, "reap", 0.5, top_k=1, protect_super=True)
    assert 3 in prot.kept(0) and prot.kept_per_layer == 2
    scores, protected = scores_for(stats, "reap", protect_super=True)
    assert protected[0].tolist() == [False, False, False, True]
    plan = select(stats, "frequency", 0.25, top_k=1, multiple_of=2)  # 3 kept -> 2
    assert (plan.kept(1), plan.pruned(1)) == ([0, 2], [1, 3])


