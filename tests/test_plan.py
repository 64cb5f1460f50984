"""reap.selection.plan: the expert plan object and check_plan, the one place every selection rule lives."""

import pytest

from reap.core.errors import UserError
from reap.selection.plan import ExpertPlan, OutputExpert, Routing, check_plan

QWEN = Routing("qwen3_moe", 8, 2)
GROUPED = Routing("deepseek_v3", 16, 2, 4, 2)  # 4 groups of 4, top-2 into 2 groups: at least 2 per group


def test_plan_views_agree_with_an_independent_listing():
    plan = ExpertPlan.keeping(8, {3: [7, 0, 2], 1: [1, 2, 3]}, "reap")
    assert plan.moe_layers == [1, 3] and plan.kept_per_layer == 3
    assert plan.kept(3) == [0, 2, 7]  # original order: output expert i is the i-th smallest kept id
    assert plan.pruned(3) == [e for e in range(8) if e not in (0, 2, 7)]
    assert plan.new_ids()[3] == {0: 0, 2: 1, 7: 2}
    assert plan.to_json() == {"1": [1, 2, 3], "3": [0, 2, 7]}
    assert ExpertPlan.keeping(8, {int(k): v for k, v in plan.to_json().items()}, "reap") == plan


def test_a_merge_has_an_anchor_and_its_weights_are_checked():
    merged = OutputExpert(((0, 0.5), (3, 0.5)), (None, (1, 0)))
    assert not merged.is_copy and OutputExpert.kept(3).source == 3 and merged.anchor == 0
    assert merged.permutation(1) == (1, 0) and merged.permutation(0) is None
    with pytest.raises(ValueError):
        merged.source
    plan = ExpertPlan(8, {0: (merged, OutputExpert.kept(5))})
    assert plan.kept(0) == [0, 5] and plan.pruned(0) == [1, 2, 3, 4, 6, 7]  # merged-in experts are gone as experts
    assert plan.merges(0) == {0: merged}
    assert check_plan(plan, QWEN, [0]) is plan
    for bad, match in [(OutputExpert(((0, 0.7), (3, 0.5))), "sum to 1"), (OutputExpert(((0, 1.5), (3, -0.5))),
                                                                         "positive"),
                       (OutputExpert(((0, 0.5), (5, 0.5))), "more than once")]:
        with pytest.raises(UserError, match=match):
            check_plan(ExpertPlan(8, {0: (bad, OutputExpert.kept(5))}), QWEN, [0])


@pytest.mark.parametrize("layers,match", [
    ({0: [0, 1], 1: [0, 1], 5: [0, 1]}, "not an MoE layer"),
    ({0: [0, 1]}, "no entry for layer"),
    ({0: [0, 9], 1: [0, 1]}, "names expert 9"),
    ({0: [-1, 2], 1: [0, 1]}, "names expert -1"),
    ({0: [1, 1], 1: [0, 1]}, "more than once"),
    ({0: [3], 1: [4]}, "fewer than the 2 each token"),
    ({0: [0, 1], 1: [0, 1, 2]}, "different numbers"),
])
def test_check_plan_rules(layers, match):
    plan = ExpertPlan.keeping(8, layers)
    with pytest.raises(RuntimeError, match=match) as err:
        check_plan(plan, QWEN, [0, 1], where="verify", error=RuntimeError)
    assert str(err.value).startswith("verify")
    with pytest.raises(UserError, match=match):  # the same rule, as the user's mistake
        check_plan(plan, QWEN, [0, 1], where="keep file k.json")


def test_check_plan_original_order_groups_and_multiple_of():
    out_of_order = ExpertPlan(8, {0: (OutputExpert.kept(3), OutputExpert.kept(1))})
    with pytest.raises(UserError, match="original order"):
        check_plan(out_of_order, QWEN, [0])
    even = ExpertPlan.keeping(16, {0: [0, 1, 4, 5, 8, 9, 12, 13]})
    assert check_plan(even, GROUPED, [0], multiple_of=4) is even
    with pytest.raises(UserError, match="not a multiple of --multiple-of 3"):
        check_plan(even, GROUPED, [0], multiple_of=3)
    uneven = ExpertPlan.keeping(16, {0: [0, 1, 2, 4, 5, 8, 9, 12]})
    with pytest.raises(UserError, match=r"keeps \[3, 2, 2, 1\] experts from the 4 expert groups"):
        check_plan(uneven, GROUPED, [0])
    too_few = ExpertPlan.keeping(16, {0: [0, 4, 8, 12]})  # one per group, but the group score needs two
    with pytest.raises(UserError, match="fewer than the 8 that top-2 routing into 2 of 4 equal groups needs"):
        check_plan(too_few, GROUPED, [0])
    with pytest.raises(UserError, match="is for 16 experts"):
        check_plan(even, QWEN, [0])
