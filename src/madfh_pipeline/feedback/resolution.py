"""How several verdicts on one part become one label, and the tables built on those labels.

A verdict is about the *part in the image*, not about one model's score: labels are therefore keyed by image
(``category``, ``image_id`` = content hash). A verdict given while reviewing model v1's detection also labels the
same image when model v2 scores it, which is what recalibrating v2's threshold needs. Outcomes (false alarm, missed
defect, ...) are then computed per inspection, from that model's decision and the image's label.

Every verdict is kept (feedback is append-only); a label is computed when reading, by one of two policies:

``majority`` (default)
    1. Each operator's *latest* verdict on the image counts; their earlier ones are superseded (an operator who
       corrects themselves is not two votes).
    2. One operator, one vote: the verdict with more operators wins.
    3. A tie is broken by the operators' summed confidence (1–5).
    4. Still tied: no label (the image is *disputed*). Disputed images are left out of calibration data and can be
       listed in the review queue (``status="disputed"``) for another operator to settle. Nothing is guessed.

``latest``
    The most recent verdict of anyone wins (useful where a supervisor's later word is final by procedure).

Whatever the policy, ``conflict`` marks images whose operators currently disagree, so dashboards can show contested
labels even when a majority resolved them. "Latest" means latest ``created_at``, ties broken by the row id.

These are pure functions over DataFrames so that the live store and a saved snapshot compute exactly the same labels.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from madfh_pipeline.feedback.schema import FLAGGED_DECISIONS, SCORED_DECISIONS

Policy = Literal["majority", "latest"]
POLICIES: tuple[str, ...] = ("majority", "latest")

#: What a label belongs to: one image (content hash) of one category.
LABEL_KEY: list[str] = ["category", "image_id"]
#: Columns of the feedback frame these functions need (``category``/``image_id`` are those of its inspection).
FEEDBACK_COLUMNS = ("id", *LABEL_KEY, "verdict", "confidence", "operator", "created_at", "defect_type")
#: Columns of :func:`resolve_labels`' result (indexed by ``category``, ``image_id``).
RESOLUTION_COLUMNS = (
    "label",
    "n_feedback",
    "n_operators",
    "votes_ok",
    "votes_ng",
    "confidence_ok",
    "confidence_ng",
    "conflict",
    "defect_type",
    "last_feedback_at",
)


def check_policy(policy: str) -> str:
    """The policy name, if known (a typo must not silently select another rule)."""
    if policy not in POLICIES:
        raise ValueError(f"Unknown resolution policy {policy!r}; expected one of {POLICIES}.")
    return policy


def resolve_labels(feedback: pd.DataFrame, policy: str = "majority") -> pd.DataFrame:
    """One row per labelled image (index: ``category``, ``image_id``): its label and the votes behind it.

    ``label`` is ``"OK"``, ``"NG"`` or None (disputed under ``majority``). ``defect_type`` is the defect type of the
    most recent current ``NG`` vote that named one.
    """
    check_policy(policy)
    if feedback.empty:
        index = pd.MultiIndex.from_arrays([[], []], names=LABEL_KEY)
        return pd.DataFrame({c: pd.Series(dtype=object) for c in RESOLUTION_COLUMNS}, index=index)
    ordered = feedback.sort_values([*LABEL_KEY, "created_at", "id"], kind="stable")
    current = ordered.groupby([*LABEL_KEY, "operator"], sort=False).tail(1)
    is_ng = current["verdict"].eq("NG")
    votes = pd.DataFrame(
        {
            "votes_ng": is_ng.astype(int),
            "votes_ok": (~is_ng).astype(int),
            "confidence_ng": current["confidence"].where(is_ng, 0).astype(int),
            "confidence_ok": current["confidence"].where(~is_ng, 0).astype(int),
        }
    )
    votes[LABEL_KEY] = current[LABEL_KEY]
    table = votes.groupby(LABEL_KEY).sum()
    grouped = ordered.groupby(LABEL_KEY)
    table["n_feedback"] = grouped.size()
    table["n_operators"] = current.groupby(LABEL_KEY)["operator"].nunique()
    table["last_feedback_at"] = grouped["created_at"].max()
    latest_verdict = grouped["verdict"].last()
    named = current[is_ng & current["defect_type"].notna()]
    table["defect_type"] = named.groupby(LABEL_KEY)["defect_type"].last()
    table["conflict"] = (table["votes_ng"] > 0) & (table["votes_ok"] > 0)

    if policy == "latest":
        label = latest_verdict
    else:
        ng_wins = (table["votes_ng"] > table["votes_ok"]) | (
            (table["votes_ng"] == table["votes_ok"]) & (table["confidence_ng"] > table["confidence_ok"])
        )
        ok_wins = (table["votes_ok"] > table["votes_ng"]) | (
            (table["votes_ng"] == table["votes_ok"]) & (table["confidence_ok"] > table["confidence_ng"])
        )
        label = pd.Series(np.where(ng_wins, "NG", np.where(ok_wins, "OK", None)), index=table.index, dtype=object)
    table["label"] = label.astype(object).where(label.notna(), None)
    table["defect_type"] = table["defect_type"].astype(object).where(table["defect_type"].notna(), None)
    return table[list(RESOLUTION_COLUMNS)]


def outcome_column(decision: pd.Series, label: pd.Series) -> pd.Series:
    """Outcome of each item from the model's decision and the resolved label (None where either is missing)."""
    flagged = decision.isin(FLAGGED_DECISIONS)
    scored = decision.isin(SCORED_DECISIONS)
    outcome = np.select(
        [
            scored & flagged & label.eq("NG"),
            scored & flagged & label.eq("OK"),
            scored & ~flagged & label.eq("NG"),
            scored & ~flagged & label.eq("OK"),
        ],
        ["confirmed_defect", "false_alarm", "missed_defect", "confirmed_ok"],
        default="",
    )
    return pd.Series(outcome, index=decision.index, dtype=object).replace("", None)


def labelled_inspections(
    inspections: pd.DataFrame, feedback: pd.DataFrame, policy: str = "majority", include_disputed: bool = False
) -> pd.DataFrame:
    """Scored inspections of labelled images, with the image's resolved label, its votes and the outcome.

    ``inspections`` needs ``id``, ``category``, ``image_id``, ``decision``; every other column is carried along. An
    image inspected by several model versions gives one row per inspection (filter by ``model_version``).
    Disputed images (label None) are dropped unless ``include_disputed``.
    """
    resolution = resolve_labels(feedback, policy).reset_index()
    scored = inspections[inspections["decision"].isin(SCORED_DECISIONS)]
    table = scored.rename(columns={"id": "inspection_id"}).merge(resolution, on=LABEL_KEY, how="inner")
    if not include_disputed:
        table = table[table["label"].notna()]
    table = table.copy()
    table["is_defect"] = table["label"].map({"NG": True, "OK": False}).astype("boolean")
    table["outcome"] = outcome_column(table["decision"], table["label"])
    return table.sort_values("inspection_id", kind="stable").reset_index(drop=True)


def feedback_rates(labelled: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """False-alarm and miss rates of reviewed items, grouped by ``by`` (e.g. a period and/or the model version).

    - false-alarm rate = flagged items (NG or REVIEW) labelled OK / flagged items reviewed;
    - miss rate = items decided OK labelled NG / OK items reviewed.

    Denominators are *reviewed* items only. The review queue serves uncertain items first, so these are rates of
    what operators looked at, not of the line's whole output (say so next to any chart of them).
    """
    columns = [
        *by,
        "reviewed",
        "flagged_reviewed",
        "false_alarms",
        "false_alarm_rate",
        "ok_reviewed",
        "missed_defects",
        "miss_rate",
        "confirmed_defects",
    ]
    if labelled.empty:
        return pd.DataFrame(columns=columns)
    frame = labelled.assign(
        _flagged=labelled["decision"].isin(FLAGGED_DECISIONS),
        _false_alarm=labelled["outcome"].eq("false_alarm"),
        _missed=labelled["outcome"].eq("missed_defect"),
        _confirmed=labelled["outcome"].eq("confirmed_defect"),
    )
    grouped = frame.groupby(by, sort=True, dropna=False)
    table = pd.DataFrame(
        {
            "reviewed": grouped.size(),
            "flagged_reviewed": grouped["_flagged"].sum(),
            "false_alarms": grouped["_false_alarm"].sum(),
            "missed_defects": grouped["_missed"].sum(),
            "confirmed_defects": grouped["_confirmed"].sum(),
        }
    )
    table["ok_reviewed"] = table["reviewed"] - table["flagged_reviewed"]
    with np.errstate(divide="ignore", invalid="ignore"):
        table["false_alarm_rate"] = (table["false_alarms"] / table["flagged_reviewed"]).where(
            table["flagged_reviewed"] > 0
        )
        table["miss_rate"] = (table["missed_defects"] / table["ok_reviewed"]).where(table["ok_reviewed"] > 0)
    return table.reset_index()[columns]


def period_column(timestamps: pd.Series, freq: str) -> pd.Series:
    """Start of the period (``D``, ``W``, ``M``, …) of each UTC timestamp, as a UTC timestamp."""
    naive = pd.to_datetime(timestamps, utc=True).dt.tz_convert("UTC").dt.tz_localize(None)
    return naive.dt.to_period(freq).dt.start_time.dt.tz_localize("UTC")
