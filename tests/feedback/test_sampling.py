"""The review queue's exploration share: slot spacing, merging of the two orders, paging stability."""

from __future__ import annotations

import pytest

from madfh_pipeline.feedback import ValidationError
from madfh_pipeline.feedback.sampling import check_share, is_exploration_slot, mix, mixed_order


def test_exploration_slots_are_spread_evenly() -> None:
    assert [p for p in range(20) if is_exploration_slot(p, 0.3)] == [3, 6, 9, 13, 16, 19]
    assert [p for p in range(10) if is_exploration_slot(p, 0.5)] == [1, 3, 5, 7, 9]
    assert not any(is_exploration_slot(p, 0.0) for p in range(100))
    for share in (0.1, 0.2, 0.25, 0.3, 0.45):
        for start in range(0, 40):
            window = sum(is_exploration_slot(p, share) for p in range(start, start + 20))
            assert abs(window - 20 * share) <= 1


def test_mix_takes_the_share_from_the_exploratory_order_and_skips_what_was_served() -> None:
    ranked = list("abcdefghij")
    exploratory = list("jihgfedcba")
    merged = mix(ranked, exploratory, 0.3)
    assert [item for item, _ in merged] == list("abcjdeifgh")
    assert [item for item, explored in merged if explored] == list("jih")
    # every item once, and share 0 is the ranked order itself
    assert sorted(mixed_order(ranked, exploratory, 0.3)) == ranked
    assert mixed_order(ranked, exploratory, 0.0) == ranked


def test_mix_fills_from_the_other_order_when_one_runs_out() -> None:
    assert mix(list("ab"), list("xyz"), 0.5) == [("a", False), ("x", True), ("b", False), ("y", True), ("z", True)]
    assert mix([], list("xy"), 0.3) == [("x", True), ("y", True)]
    assert mix(list("ab"), [], 0.3) == [("a", False), ("b", False)]


def test_a_page_depends_only_on_the_head_of_each_order() -> None:
    ranked = [f"r{i}" for i in range(30)] + [f"x{i}" for i in range(10)]
    exploratory = [f"x{i}" for i in range(10)] + [f"r{i}" for i in range(30)]
    full = mixed_order(ranked, exploratory, 0.3)
    for offset, limit in ((0, 5), (5, 10), (17, 9)):
        head = offset + limit
        assert mixed_order(ranked[:head], exploratory[:head], 0.3, head)[offset:] == full[offset:head]


@pytest.mark.parametrize("bad", [-0.1, 0.6, float("nan"), True, "0.3"])
def test_a_bad_share_is_refused_with_its_value(bad: object) -> None:
    with pytest.raises(ValidationError, match="explore_share"):
        check_share(bad)
