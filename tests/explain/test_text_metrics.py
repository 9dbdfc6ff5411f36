"""Text metrics against hand-computed values: BLEU (sacrebleu), ROUGE-L (rouge-score) and fact agreement."""

from __future__ import annotations

import math

import pytest

from madfh_pipeline.explain.describer import ParsedDescription, ParsedRegion
from madfh_pipeline.explain.text_metrics import AGREEMENTS, fact_agreement, score_explanations

NORMAL_REF = "The image looks normal."
NORMAL_HYP = "the image looks normal"  # no full stop
REGION_REF = (
    "1 defect region. Region 1: a small compact defect in the upper left, covering 0.50% of the image (100 px)."
)
REGION_HYP = REGION_REF.replace("upper left", "upper right")

# Hand counts. BLEU's 13a tokens of REGION_REF: 1 defect region . region 1 : a small compact defect in the upper left
# , covering 0.50 % of the image ( 100 px ) .  -> 27 tokens; the hypothesis differs in one (left -> right), so of its
# 27 - n + 1 n-grams, n contain the wrong word: 26/27, 24/26, 22/25, 20/24 matches, same length (BP = 1).
REGION_BLEU = (26 / 27 * 24 / 26 * 22 / 25 * 20 / 24) ** 0.25
# NORMAL: 13a gives 5 reference tokens (with ".") and 4 hypothesis tokens, every n-gram matches: BLEU = BP = e^(1-5/4).
NORMAL_BLEU = math.exp(1 - 5 / 4)
# ROUGE-L drops punctuation: NORMAL is a perfect match; REGION has 21 tokens each, LCS 20.
REGION_ROUGE = 20 / 21


def test_sentence_scores_and_agreements_match_hand_counts() -> None:
    result = score_explanations([NORMAL_HYP, REGION_HYP, ""], [NORMAL_REF, REGION_REF, NORMAL_REF], ids=["a", "b", "c"])
    a, b, c = result.per_item
    assert [row["id"] for row in result.per_item] == ["a", "b", "c"]

    assert a["bleu"] == pytest.approx(NORMAL_BLEU, abs=1e-6)
    assert a["rouge_l"] == pytest.approx(1.0)
    assert a["parsed"] is True
    assert all(a[name] == 1.0 for name in AGREEMENTS)

    assert b["bleu"] == pytest.approx(REGION_BLEU, abs=1e-6)
    assert b["rouge_l"] == pytest.approx(REGION_ROUGE)
    assert (b["normal_agreement"], b["count_agreement"], b["location_agreement"], b["size_agreement"]) == (
        1.0,
        1.0,
        0.0,
        1.0,
    )

    # An empty generation is scored, not skipped: zero everywhere.
    assert (c["bleu"], c["rouge_l"], c["parsed"]) == (0.0, 0.0, False)
    assert all(c[name] == 0.0 for name in AGREEMENTS)


def test_corpus_values() -> None:
    result = score_explanations([NORMAL_HYP, REGION_HYP, ""], [NORMAL_REF, REGION_REF, NORMAL_REF])
    # Corpus BLEU pools the n-gram counts: matches 4+26, 3+24, 2+22, 1+20 of 4+27, 3+26, 2+25, 1+24 hypothesis
    # n-grams; hypothesis length 31 against reference length 5+27+5 = 37.
    precisions = (30 / 31) * (27 / 29) * (24 / 27) * (21 / 25)
    expected_bleu = math.exp(1 - 37 / 31) * precisions**0.25
    assert result.corpus["bleu"] == pytest.approx(expected_bleu, abs=1e-6)
    assert result.corpus["rouge_l"] == pytest.approx((1 + REGION_ROUGE + 0) / 3)
    assert result.corpus["parse_rate"] == pytest.approx(2 / 3)
    assert result.corpus["location_agreement"] == pytest.approx(1 / 3)
    assert result.corpus["size_agreement"] == pytest.approx(2 / 3)
    assert result.corpus["n_items"] == 3


def test_perfect_generation_scores_one_even_with_word_piece_spacing() -> None:
    decoded = "1 defect region. region 1 : a small compact defect in the upper left , covering 0. 50 % of the image ( 100 px )."
    result = score_explanations([decoded], [REGION_REF])
    assert result.corpus["bleu"] == pytest.approx(1.0)
    assert result.corpus["rouge_l"] == pytest.approx(1.0)
    assert all(result.corpus[name] == 1.0 for name in AGREEMENTS)


def region(location: str, size: str = "small") -> ParsedRegion:
    return ParsedRegion(location=location, size=size, shape="compact", contrast=None, near_edge=False)


def test_multiset_agreement_ignores_order_and_penalises_missing_and_extra_regions() -> None:
    ref = ParsedDescription(False, 2, (region("upper left"), region("centre", "tiny")))
    swapped = ParsedDescription(False, 2, (region("centre", "tiny"), region("upper left")))
    missing = ParsedDescription(False, 1, (region("centre"),))
    extra = ParsedDescription(False, 3, (region("centre"), region("centre"), region("lower right")))
    normal = ParsedDescription(True, 0, ())
    assert fact_agreement(ref, swapped)["location_agreement"] == 1.0
    assert fact_agreement(ref, missing) == {
        "normal_agreement": 1.0,
        "count_agreement": 0.0,
        "location_agreement": 0.5,
        "size_agreement": 0.5,
        "contrast_agreement": 0.5,
    }
    assert fact_agreement(ref, extra)["location_agreement"] == pytest.approx(1 / 3)
    assert fact_agreement(ref, normal)["normal_agreement"] == 0.0
    assert fact_agreement(ref, normal)["location_agreement"] == 0.0
    assert fact_agreement(normal, normal)["location_agreement"] == 1.0


def test_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="2 generated texts but 1 references"):
        score_explanations(["a", "b"], [NORMAL_REF])
    with pytest.raises(ValueError, match="not a describer text"):
        score_explanations(["x"], ["Operator: burr on the rim"])
    with pytest.raises(ValueError, match="at least one item"):
        score_explanations([], [])
