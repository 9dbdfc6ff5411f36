"""Which images operators review next: the most uncertain ones, with a share of the queue spent on exploration.

A queue that serves only the images nearest the threshold teaches the feedback step about a thin slice of the score
range. Those labels are enough to move the threshold, but the feedback step also *judges* its bank extension and
defect bank out of fold on the labels it has (:mod:`madfh_pipeline.feedback.learning`), and on the demo data a
judgement that sees only near-threshold images rejected an extension that helps the whole test set, every round
(docs/performance.md, "Feedback loop"). Spending a fixed share of the queue on images in an order that does not
depend on the score gives the judgement representative labels while the rest of the queue still goes where a label
moves the threshold most.

The exploratory order must be stable, so that paging through the queue and reloading the app show the same items:
the knowledge base orders by the image id, a content hash, which is unrelated to the image's score and fixed for the
image's lifetime. The simulation bench passes a seeded random permutation instead.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from typing import TypeVar

from madfh_pipeline.feedback.errors import ValidationError
from madfh_pipeline.feedback.validation import in_range

T = TypeVar("T", bound=Hashable)

#: Above this share the queue would be mostly exploration and no longer "most uncertain first": refused as a typo.
MAX_EXPLORE_SHARE = 0.5


def check_share(value: object, where: str = "explore_share", error: type[ValueError] = ValidationError) -> float:
    """A valid exploration share: a finite number in [0, MAX_EXPLORE_SHARE] (``error``: the class to raise)."""
    return in_range(value, where, 0.0, MAX_EXPLORE_SHARE, error=error)


def is_exploration_slot(position: int, share: float) -> bool:
    """Whether queue position ``position`` (0-based) is served from the exploratory order.

    Slots are spread evenly (position p explores when ⌊(p+1)·share⌋ > ⌊p·share⌋), so any window of the queue holds
    the share up to one item: with 0.3, positions 3, 6 and 9 of every ten explore.
    """
    return math.floor((position + 1) * share + 1e-9) > math.floor(position * share + 1e-9)


def mix(ranked: Sequence[T], exploratory: Iterable[T], share: float, limit: int | None = None) -> list[tuple[T, bool]]:
    """Merge the uncertainty ``ranked`` order with the ``exploratory`` order, ``share`` of the slots exploring.

    Returns ``(item, explored)`` pairs; ``explored`` is true when the exploratory order served the item. An item
    already served by one order is skipped in the other. When one order runs out the other fills the remaining
    slots, so the result holds every item of either order once (or the first ``limit``). Position ``p`` of the
    result depends only on the first ``p + 1`` items of each order: a caller that pages may truncate both orders
    to ``offset + limit`` items.
    """
    share = check_share(share)
    total = math.inf if limit is None else limit
    seen: set[T] = set()
    out: list[tuple[T, bool]] = []
    sources = {False: iter(ranked), True: iter(exploratory)}

    def take(explored: bool) -> T | None:
        for item in sources[explored]:
            if item not in seen:
                return item
        return None

    while len(out) < total:
        preferred = is_exploration_slot(len(out), share)
        for explored in (preferred, not preferred):
            item = take(explored)
            if item is not None:
                seen.add(item)
                out.append((item, explored))
                break
        else:
            break
    return out


def mixed_order(ranked: Sequence[T], exploratory: Iterable[T], share: float, limit: int | None = None) -> list[T]:
    """The items of :func:`mix`, in order."""
    return [item for item, _ in mix(ranked, exploratory, share, limit)]
