"""The verdict resolution rules, on plain frames (what both the live store and a snapshot use)."""

from __future__ import annotations

from datetime import timedelta

import pandas as pd
import pytest
from kb_support import T0

from madfh_pipeline.feedback.resolution import feedback_rates, labelled_inspections, resolve_labels
from madfh_pipeline.feedback.schema import outcome_of


def votes(*rows: tuple[str, str, int, str | None] | tuple[str, str, int]) -> pd.DataFrame:
    """Feedback on one image: (operator, verdict, confidence[, defect type]) in time order."""
    records = []
    for i, row in enumerate(rows):
        operator, verdict, confidence, *rest = row
        records.append(
            {
                "id": i + 1,
                "category": "c",
                "image_id": "img",
                "verdict": verdict,
                "confidence": confidence,
                "operator": operator,
                "created_at": T0 + timedelta(minutes=i),
                "defect_type": rest[0] if rest else None,
            }
        )
    return pd.DataFrame(records)


def label(frame: pd.DataFrame, policy: str = "majority") -> pd.Series:
    return resolve_labels(frame, policy).loc[("c", "img")]


def test_majority_one_operator_one_vote() -> None:
    row = label(votes(("anna", "NG", 2), ("bob", "NG", 1), ("carl", "OK", 5)))
    assert (row["label"], row["votes_ng"], row["votes_ok"], row["conflict"]) == ("NG", 2, 1, True)


def test_an_operator_who_corrects_themselves_is_one_vote() -> None:
    row = label(votes(("anna", "NG", 3), ("anna", "NG", 3), ("anna", "OK", 4), ("bob", "OK", 2)))
    assert (row["label"], row["n_feedback"], row["n_operators"], row["votes_ok"], row["conflict"]) == (
        "OK",
        4,
        2,
        2,
        False,
    )


def test_a_tie_goes_to_the_more_confident_side_else_stays_disputed() -> None:
    assert label(votes(("anna", "NG", 5), ("bob", "OK", 2)))["label"] == "NG"
    assert label(votes(("anna", "NG", 2), ("bob", "OK", 4)))["label"] == "OK"
    tied = label(votes(("anna", "NG", 3), ("bob", "OK", 3)))
    assert tied["label"] is None and tied["conflict"]


def test_latest_policy_takes_the_last_word() -> None:
    frame = votes(("anna", "NG", 5), ("bob", "NG", 5), ("carl", "OK", 1))
    assert label(frame, "majority")["label"] == "NG"
    assert label(frame, "latest")["label"] == "OK"
    with pytest.raises(ValueError, match="policy"):
        resolve_labels(frame, "loudest")


def test_defect_type_comes_from_the_latest_current_ng_vote() -> None:
    frame = votes(("anna", "NG", 3, "scratch"), ("bob", "NG", 3, "crack"), ("bob", "NG", 3, None))
    assert label(frame)["defect_type"] == "scratch"  # bob's current vote names none


def test_empty_feedback_gives_an_empty_table() -> None:
    empty = votes().reindex(columns=["id", "category", "image_id", "verdict", "confidence", "operator", "created_at"])
    assert resolve_labels(empty).empty


@pytest.mark.parametrize(
    ("decision", "verdict", "outcome"),
    [
        ("NG", "NG", "confirmed_defect"),
        ("NG", "OK", "false_alarm"),
        ("REVIEW", "NG", "confirmed_defect"),
        ("REVIEW", "OK", "false_alarm"),
        ("OK", "NG", "missed_defect"),
        ("OK", "OK", "confirmed_ok"),
    ],
)
def test_outcomes(decision: str, verdict: str, outcome: str) -> None:
    assert outcome_of(decision, verdict) == outcome


def test_rates_count_reviewed_items_only() -> None:
    inspections = pd.DataFrame(
        {
            "id": [1, 2, 3, 4, 5],
            "category": "c",
            "image_id": ["a", "b", "c", "d", "e"],
            "decision": ["NG", "NG", "REVIEW", "OK", "OK"],
            "score": [9.0, 8.0, 5.0, 1.0, 2.0],
            "threshold": 5.0,
            "model_version": "v1",
        }
    )
    feedback = pd.DataFrame(
        {
            "id": [1, 2, 3, 4],
            "category": "c",
            "image_id": ["a", "b", "c", "d"],
            "verdict": ["NG", "OK", "OK", "NG"],
            "confidence": 3,
            "operator": "anna",
            "created_at": pd.to_datetime([T0] * 4, utc=True),
            "defect_type": None,
        }
    )
    labelled = labelled_inspections(inspections, feedback)
    assert labelled["outcome"].tolist() == ["confirmed_defect", "false_alarm", "false_alarm", "missed_defect"]
    rates = feedback_rates(labelled, ["model_version"]).iloc[0]
    assert (rates["flagged_reviewed"], rates["false_alarms"], rates["ok_reviewed"], rates["missed_defects"]) == (
        3,
        2,
        1,
        1,
    )
    assert rates["false_alarm_rate"] == pytest.approx(2 / 3)
    assert rates["miss_rate"] == 1.0  # image e (OK, unreviewed) is not in the denominator
