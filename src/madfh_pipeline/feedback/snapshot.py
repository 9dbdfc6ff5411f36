"""A consistent, self-contained copy of the knowledge base at one point in time: what the feedback pipeline reads.

The feedback pipeline must not read a table, let operators add verdicts, then read another table: its thresholds,
memory-bank additions and explainer data would come from different moments. :meth:`KnowledgeBase.snapshot` reads every
table in one snapshot transaction (WAL read transaction on SQLite, REPEATABLE READ on PostgreSQL) into DataFrames;
everything the pipeline needs is then computed from those frames by the same functions the live store uses, so a
snapshot and the live store agree on every label. ``save``/``load`` make it a file set that Kedro or MLflow can
version (Parquet per table + ``manifest.json``).

Image embeddings are not part of a snapshot (the pipeline re-extracts features from ``image_path`` with the model it
trains); everything else is.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from madfh_pipeline.feedback.resolution import (
    LABEL_KEY,
    feedback_rates,
    labelled_inspections,
    period_column,
    resolve_labels,
)
from madfh_pipeline.feedback.schema import OUTCOMES

logger = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 1
TABLES: tuple[str, ...] = ("inspections", "feedback", "defect_types", "model_versions")
#: Columns holding JSON values (stored as JSON text in files).
JSON_COLUMNS: dict[str, tuple[str, ...]] = {
    "inspections": ("attributes",),
    "feedback": ("region_polygon",),
    "model_versions": ("metrics",),
    "defect_types": (),
}
#: Columns kept as Python objects with None for missing values (as the live store builds them).
OBJECT_COLUMNS: dict[str, tuple[str, ...]] = {
    "inspections": ("attributes",),
    "feedback": ("region_polygon", "defect_type"),
    "model_versions": ("metrics",),
    "defect_types": (),
}
DATETIME_COLUMNS: dict[str, tuple[str, ...]] = {
    "inspections": ("inspected_at", "recorded_at"),
    "feedback": ("created_at",),
    "model_versions": ("created_at",),
    "defect_types": ("created_at",),
}


def labelled_scores_frame(
    inspections: pd.DataFrame,
    feedback: pd.DataFrame,
    category: str | None,
    model_version: str | None,
    policy: str = "majority",
    include_disputed: bool = False,
) -> pd.DataFrame:
    """Scores of ``model_version`` (all versions if None) on labelled images, with the operators' labels."""
    table = labelled_inspections(
        _in_scope(inspections, category, model_version), _in_scope(feedback, category, None), policy, include_disputed
    )
    columns = [
        "inspection_id",
        "image_id",
        "image_path",
        "category",
        "model_version",
        "score",
        "threshold",
        "decision",
        "inspected_at",
        "label",
        "is_defect",
        "outcome",
        "n_feedback",
        "n_operators",
        "votes_ok",
        "votes_ng",
        "conflict",
        "defect_type",
        "last_feedback_at",
    ]
    return table[columns]


def cases_frame(
    inspections: pd.DataFrame,
    feedback: pd.DataFrame,
    outcomes: tuple[str, ...],
    category: str | None,
    model_version: str | None,
    policy: str = "majority",
) -> pd.DataFrame:
    """Labelled inspections whose outcome is one of ``outcomes``, with map path, explanation and region info."""
    unknown = set(outcomes) - set(OUTCOMES)
    if unknown:
        raise ValueError(f"Unknown outcomes {sorted(unknown)}; expected some of {OUTCOMES}.")
    scoped_feedback = _in_scope(feedback, category, None)
    table = labelled_inspections(_in_scope(inspections, category, model_version), scoped_feedback, policy)
    table = table[table["outcome"].isin(outcomes)]
    regions = _latest_regions(scoped_feedback)
    table = table.merge(regions, on=["category", "image_id"], how="left")
    columns = [
        "inspection_id",
        "image_id",
        "image_path",
        "category",
        "model_version",
        "score",
        "threshold",
        "decision",
        "outcome",
        "label",
        "defect_type",
        "map_path",
        "explanation",
        "descriptions",
        "region_mask_path",
        "region_polygon",
        "n_operators",
        "conflict",
        "inspected_at",
        "last_feedback_at",
    ]
    return table[columns].reset_index(drop=True)


def _latest_regions(feedback: pd.DataFrame) -> pd.DataFrame:
    """Per image: the most recent corrected region (mask path / polygons) and all descriptions, oldest first."""
    columns = ["category", "image_id", "region_mask_path", "region_polygon", "descriptions"]
    if feedback.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    ordered = feedback.sort_values(["created_at", "id"], kind="stable")
    key = ["category", "image_id"]
    descriptions = ordered[ordered["description"].notna()].groupby(key)["description"].agg(list).rename("descriptions")
    with_region = ordered[ordered["region_mask_path"].notna() | ordered["region_polygon"].notna()]
    regions = with_region.groupby(key)[["region_mask_path", "region_polygon"]].last()
    table = pd.DataFrame(index=ordered.groupby(key).size().index).join(regions).join(descriptions)
    table["descriptions"] = table["descriptions"].apply(lambda v: v if isinstance(v, list) else [])
    table = table.astype(object).where(table.notna(), None)
    return table.reset_index()[columns]


def rates_frame(
    inspections: pd.DataFrame,
    feedback: pd.DataFrame,
    category: str | None,
    model_version: str | None,
    freq: str | None,
    by_model_version: bool,
    policy: str = "majority",
) -> pd.DataFrame:
    """False-alarm and miss rates per period of inspection time (``freq``) and/or per model version."""
    labelled = labelled_inspections(
        _in_scope(inspections, category, model_version), _in_scope(feedback, category, None), policy
    )
    by: list[str] = []
    if by_model_version:
        by += ["category", "model_version"]
    if freq is not None:
        labelled = labelled.assign(period=period_column(labelled["inspected_at"], freq))
        by.append("period")
    if not by:
        raise ValueError("Group rates by a period (freq), by model version, or both.")
    return feedback_rates(labelled, by)


def _in_scope(frame: pd.DataFrame, category: str | None, model_version: str | None) -> pd.DataFrame:
    """Rows of one category and/or model version (None: all)."""
    if category is not None:
        frame = frame[frame["category"] == category]
    if model_version is not None:
        frame = frame[frame["model_version"] == model_version]
    return frame


@dataclass(frozen=True)
class KnowledgeBaseSnapshot:
    """Every table of the knowledge base (or of one category) as read in one transaction.

    ``inspections`` carries ``model_version`` (the version string); ``feedback`` carries the ``category``,
    ``image_id`` and ``model_version`` of the inspection it was given on and the defect type's name.
    """

    taken_at: datetime
    source: str
    schema_revision: str
    category: str | None
    inspections: pd.DataFrame
    feedback: pd.DataFrame
    defect_types: pd.DataFrame
    model_versions: pd.DataFrame

    def labels(self, policy: str = "majority") -> pd.DataFrame:
        """Resolved label per image (see :mod:`madfh_pipeline.feedback.resolution`)."""
        return resolve_labels(self.feedback, policy)

    def labelled_scores(
        self,
        category: str,
        model_version: str | None,
        *,
        policy: str = "majority",
        include_disputed: bool = False,
    ) -> pd.DataFrame:
        """Same as :meth:`KnowledgeBase.labelled_scores`, from this snapshot."""
        return labelled_scores_frame(self.inspections, self.feedback, category, model_version, policy, include_disputed)

    def cases(
        self,
        outcomes: tuple[str, ...],
        category: str | None = None,
        model_version: str | None = None,
        *,
        policy: str = "majority",
    ) -> pd.DataFrame:
        """Same as :meth:`KnowledgeBase.cases`, from this snapshot."""
        return cases_frame(self.inspections, self.feedback, outcomes, category, model_version, policy)

    def false_alarms(self, category: str | None = None, model_version: str | None = None) -> pd.DataFrame:
        """Flagged inspections whose image was labelled OK (see :meth:`KnowledgeBase.false_alarms`)."""
        return self.cases(("false_alarm",), category, model_version)

    def confirmed_defects(
        self, category: str | None = None, model_version: str | None = None, include_missed: bool = True
    ) -> pd.DataFrame:
        """Inspections whose image was labelled NG (see :meth:`KnowledgeBase.confirmed_defects`)."""
        outcomes = ("confirmed_defect", "missed_defect") if include_missed else ("confirmed_defect",)
        return self.cases(outcomes, category, model_version)

    def rates(
        self,
        category: str | None = None,
        model_version: str | None = None,
        *,
        freq: str | None = "W",
        by_model_version: bool = False,
        policy: str = "majority",
    ) -> pd.DataFrame:
        """False-alarm and miss rates (see :meth:`KnowledgeBase.stats`)."""
        return rates_frame(self.inspections, self.feedback, category, model_version, freq, by_model_version, policy)

    def export_table(self, policy: str = "majority") -> pd.DataFrame:
        """Inspections left-joined with their feedback (one row per verdict, unreviewed items once), plus each row's
        image label (``resolved_label``, ``label_conflict``); JSON fields as JSON text. What ``export`` writes."""
        inspections = self.inspections.rename(columns={"id": "inspection_id"}).drop(columns=["model_version_id"])
        feedback = self.feedback.rename(
            columns={"id": "feedback_id", "created_at": "feedback_at", "session": "feedback_session"}
        ).drop(columns=["category", "image_id", "model_version"])
        table = inspections.merge(feedback, on="inspection_id", how="left")
        labels = resolve_labels(self.feedback, policy)[["label", "conflict"]].rename(
            columns={"label": "resolved_label", "conflict": "label_conflict"}
        )
        table = table.merge(labels, left_on=LABEL_KEY, right_index=True, how="left")
        for column in ("attributes", "region_polygon"):
            table[column] = table[column].map(_json_text)
        table["feedback_id"] = table["feedback_id"].astype("Int64")
        table["confidence"] = table["confidence"].astype("Int64")
        return table.sort_values(["inspection_id", "feedback_id"], kind="stable").reset_index(drop=True)

    # ------------------------------------------------------------------------------------------------- files

    def save(self, folder: str | Path) -> Path:
        """Write the snapshot as ``<table>.parquet`` files plus ``manifest.json`` (written last: marks completeness)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        manifest_path = folder / "manifest.json"
        if manifest_path.exists():
            manifest_path.unlink()  # an interrupted save must not look complete
        for table in TABLES:
            frame = getattr(self, table).copy()
            for column in JSON_COLUMNS[table]:
                frame[column] = frame[column].map(lambda v: None if v is None else json.dumps(v))
            _atomic_parquet(frame, folder / f"{table}.parquet")
        manifest = {
            "format": SNAPSHOT_FORMAT,
            "taken_at": self.taken_at.isoformat(),
            "source": self.source,
            "schema_revision": self.schema_revision,
            "category": self.category,
            "rows": {table: len(getattr(self, table)) for table in TABLES},
        }
        tmp = manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, manifest_path)
        logger.info("Saved knowledge-base snapshot of %s to %s (%s).", self.taken_at, folder, manifest["rows"])
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> KnowledgeBaseSnapshot:
        """Read a snapshot written by :meth:`save` (refuses an incomplete one)."""
        folder = Path(folder)
        manifest_path = folder / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(f"{manifest_path} is missing: not a snapshot, or its save was interrupted.")
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        if manifest.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"Snapshot format {manifest.get('format')!r} is not {SNAPSHOT_FORMAT}.")
        frames: dict[str, pd.DataFrame] = {}
        for table in TABLES:
            frame = pd.read_parquet(folder / f"{table}.parquet")
            if len(frame) != manifest["rows"][table]:
                raise ValueError(f"{table}.parquet has {len(frame)} rows, the manifest says {manifest['rows'][table]}.")
            for column in JSON_COLUMNS[table]:
                frame[column] = frame[column].map(lambda v: None if v is None or pd.isna(v) else json.loads(v))
            for column in OBJECT_COLUMNS[table]:
                frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
            for column in DATETIME_COLUMNS[table]:
                frame[column] = pd.to_datetime(frame[column], utc=True)
            frames[table] = frame
        return cls(
            taken_at=datetime.fromisoformat(manifest["taken_at"]),
            source=manifest["source"],
            schema_revision=manifest["schema_revision"],
            category=manifest["category"],
            **frames,
        )


def _json_text(value: Any) -> str | None:
    """A JSON value as JSON text; None (or the NaN a merge leaves in an unmatched row) as None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return json.dumps(value)


def _atomic_parquet(frame: pd.DataFrame, path: Path) -> None:
    """Write to a temporary name and rename, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)
