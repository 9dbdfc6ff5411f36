"""The SQL behind the store: reading rows into records and frames, and assembling cases with their verdicts.

Functions here take an open :class:`~sqlalchemy.orm.Session` and never commit: the transaction (and so what is
consistent with what) belongs to the :class:`~madfh_pipeline.feedback.store.KnowledgeBase` method that calls them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.orm import Session, aliased

from madfh_pipeline.feedback import validation as v
from madfh_pipeline.feedback.errors import NotFoundError, UnknownDefectTypeError
from madfh_pipeline.feedback.records import (
    Case,
    DefectTypeInfo,
    FeedbackInfo,
    InspectionInfo,
    ModelVersionInfo,
    Resolution,
)
from madfh_pipeline.feedback.resolution import resolve_labels
from madfh_pipeline.feedback.schema import DefectType, Feedback, Inspection, ModelVersion, TextEmbedding

logger = logging.getLogger(__name__)

#: Fields compared when an inspection is recorded twice (a difference is logged: the first record is kept).
IDEMPOTENT_FIELDS = ("image_path", "score", "threshold", "decision", "map_path", "explanation", "error")


def to_frame(result: sa.Result[Any]) -> pd.DataFrame:
    """Rows of a result as a DataFrame, keeping the columns when there are no rows."""
    return pd.DataFrame(result.mappings().all(), columns=list(result.keys()))


def inspection_select() -> sa.Select[Any]:
    """Inspections with their model version's name (callers see versions by name, not id)."""
    return sa.select(Inspection, ModelVersion.version).join(
        ModelVersion, ModelVersion.id == Inspection.model_version_id
    )


def time_filter(stmt: sa.Select[Any], since: datetime | None, until: datetime | None) -> sa.Select[Any]:
    """Half-open ``[since, until)`` window on inspection time; naive bounds are refused."""
    if since is not None:
        stmt = stmt.where(Inspection.inspected_at >= v.aware(since, "since"))
    if until is not None:
        stmt = stmt.where(Inspection.inspected_at < v.aware(until, "until"))
    return stmt


def time_window(frame: pd.DataFrame, since: datetime | None, until: datetime | None) -> pd.DataFrame:
    """The same window as :func:`time_filter`, on a frame that was read without it."""
    if since is not None:
        frame = frame[frame["inspected_at"] >= pd.Timestamp(since)]
    if until is not None:
        frame = frame[frame["inspected_at"] < pd.Timestamp(until)]
    return frame


INSPECTION_FRAME_COLUMNS = [
    "id",
    "image_id",
    "image_path",
    "category",
    "model_version",
    "model_version_id",
    "score",
    "threshold",
    "decision",
    "map_path",
    "explanation",
    "processing_time_s",
    "inspected_at",
    "recorded_at",
    "error",
    "embedding_space",
    "attributes",
]
FEEDBACK_FRAME_COLUMNS = [
    "id",
    "inspection_id",
    "category",
    "image_id",
    "model_version",
    "verdict",
    "outcome",
    "defect_type",
    "description",
    "region_mask_path",
    "region_polygon",
    "confidence",
    "operator",
    "session",
    "created_at",
]


def read_frames(session: Session, category: str | None, reviewed_only: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Inspections (all, or only of images with feedback) and all feedback, of one category or all, as frames."""
    fb_inspection = aliased(Inspection)
    fb_version = aliased(ModelVersion)
    feedback_stmt = (
        sa.select(
            Feedback.id,
            Feedback.inspection_id,
            fb_inspection.category,
            fb_inspection.image_id,
            fb_version.version.label("model_version"),
            Feedback.verdict,
            Feedback.outcome,
            DefectType.name.label("defect_type"),
            Feedback.description,
            Feedback.region_mask_path,
            Feedback.region_polygon,
            Feedback.confidence,
            Feedback.operator,
            Feedback.session,
            Feedback.created_at,
        )
        .join(fb_inspection, fb_inspection.id == Feedback.inspection_id)
        .join(fb_version, fb_version.id == fb_inspection.model_version_id)
        .outerjoin(DefectType, DefectType.id == Feedback.defect_type_id)
        .order_by(Feedback.id)
    )
    inspection_columns = [getattr(Inspection, c) for c in INSPECTION_FRAME_COLUMNS if c != "model_version"]
    inspection_stmt = (
        sa.select(*inspection_columns, ModelVersion.version.label("model_version"))
        .join(ModelVersion, ModelVersion.id == Inspection.model_version_id)
        .order_by(Inspection.id)
    )
    if category is not None:
        feedback_stmt = feedback_stmt.where(fb_inspection.category == category)
        inspection_stmt = inspection_stmt.where(Inspection.category == category)
    if reviewed_only:
        other = aliased(Inspection)
        inspection_stmt = inspection_stmt.where(
            sa.select(Feedback.id)
            .join(other, other.id == Feedback.inspection_id)
            .where(other.category == Inspection.category, other.image_id == Inspection.image_id)
            .exists()
        )
    inspections = to_frame(session.execute(inspection_stmt)).reindex(columns=INSPECTION_FRAME_COLUMNS)
    feedback = to_frame(session.execute(feedback_stmt)).reindex(columns=FEEDBACK_FRAME_COLUMNS)
    for column in ("inspected_at", "recorded_at"):
        inspections[column] = pd.to_datetime(inspections[column], utc=True)
    feedback["created_at"] = pd.to_datetime(feedback["created_at"], utc=True)
    for frame, columns in ((inspections, ("attributes",)), (feedback, ("region_polygon", "defect_type"))):
        for column in columns:
            frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    return inspections, feedback


def labelled_images(session: Session, category: str | None) -> set[tuple[str, str]]:
    """(category, image_id) of every image with at least one verdict."""
    stmt = (
        sa.select(Inspection.category, Inspection.image_id)
        .join(Feedback, Feedback.inspection_id == Inspection.id)
        .distinct()
    )
    if category is not None:
        stmt = stmt.where(Inspection.category == category)
    return {(c, i) for c, i in session.execute(stmt)}


def reviewed_inspection_ids(session: Session, category: str, space: str) -> np.ndarray:
    """Ids of inspections in one embedding space whose image has a verdict."""
    other = aliased(Inspection)
    stmt = sa.select(Inspection.id).where(
        Inspection.category == category,
        Inspection.embedding_space == space,
        sa.select(Feedback.id)
        .join(other, other.id == Feedback.inspection_id)
        .where(other.category == Inspection.category, other.image_id == Inspection.image_id)
        .exists(),
    )
    return np.array(session.scalars(stmt).all(), dtype=np.int64)


def best_per_image(
    session: Session, ids: np.ndarray, similarity: np.ndarray, k: int, exclude_image: str | None
) -> list[tuple[int, float]]:
    """The first ``k`` hits with distinct images (hits arrive best first), skipping ``exclude_image``."""
    picked: list[tuple[int, float]] = []
    seen: set[str] = set()
    chunk = max(4 * k, 64)
    for start in range(0, len(ids), chunk):
        block = ids[start : start + chunk].tolist()
        images = dict(
            session.execute(sa.select(Inspection.id, Inspection.image_id).where(Inspection.id.in_(block))).all()
        )
        for inspection_id, sim in zip(block, similarity[start : start + chunk].tolist(), strict=True):
            image = images[inspection_id]
            if image == exclude_image or image in seen:
                continue
            seen.add(image)
            picked.append((int(inspection_id), float(sim)))
            if len(picked) == k:
                return picked
    return picked


def unembedded_texts(session: Session, model: str, category: str | None, limit: int) -> list[tuple[str, int, str]]:
    """Up to ``limit`` (source, owner id, text) not yet embedded by ``model``: explanations first, then descriptions."""
    embedded_inspections = sa.select(TextEmbedding.inspection_id).where(
        TextEmbedding.model == model, TextEmbedding.inspection_id.is_not(None)
    )
    stmt = sa.select(Inspection.id, Inspection.explanation).where(
        Inspection.explanation.is_not(None),
        Inspection.explanation != "",
        Inspection.id.not_in(embedded_inspections),
    )
    if category is not None:
        stmt = stmt.where(Inspection.category == category)
    todo = [("explanation", int(i), t) for i, t in session.execute(stmt.order_by(Inspection.id).limit(limit))]
    if len(todo) >= limit:
        return todo
    embedded_feedback = sa.select(TextEmbedding.feedback_id).where(
        TextEmbedding.model == model, TextEmbedding.feedback_id.is_not(None)
    )
    fb_stmt = (
        sa.select(Feedback.id, Feedback.description)
        .join(Inspection, Inspection.id == Feedback.inspection_id)
        .where(
            Feedback.description.is_not(None),
            Feedback.description != "",
            Feedback.id.not_in(embedded_feedback),
        )
    )
    if category is not None:
        fb_stmt = fb_stmt.where(Inspection.category == category)
    todo += [
        ("feedback", int(i), t) for i, t in session.execute(fb_stmt.order_by(Feedback.id).limit(limit - len(todo)))
    ]
    return todo


def texts_of(session: Session, text_ids: Sequence[int]) -> dict[int, str]:
    """The text each cached text vector was computed from (a description or an explanation)."""
    stmt = (
        sa.select(TextEmbedding.id, sa.func.coalesce(Feedback.description, Inspection.explanation))
        .outerjoin(Feedback, Feedback.id == TextEmbedding.feedback_id)
        .outerjoin(Inspection, Inspection.id == TextEmbedding.inspection_id)
        .where(TextEmbedding.id.in_(list(text_ids)))
    )
    return {int(i): t for i, t in session.execute(stmt)}


# ----------------------------------------------------------------------------------------------- row helpers


def model_version_row(session: Session, category: str, version: str, required: bool = True) -> ModelVersion:
    """A category's version by name; unknown is an error unless ``required`` is false."""
    row = session.scalars(
        sa.select(ModelVersion).where(ModelVersion.category == category, ModelVersion.version == version)
    ).one_or_none()
    if row is None and required:
        raise NotFoundError(f"Model version {category}/{version} is not registered; call register_model_version first.")
    return row  # type: ignore[return-value]


def model_version_info(session: Session, row: ModelVersion) -> ModelVersionInfo:
    """A version as a record, with its parent's name instead of the parent's id."""
    parent = session.get(ModelVersion, row.parent_id) if row.parent_id is not None else None
    return ModelVersionInfo(
        id=row.id,
        category=row.category,
        version=row.version,
        mlflow_run_id=row.mlflow_run_id,
        detector=row.detector,
        parent_version=parent.version if parent else None,
        created_at=row.created_at,
        notes=row.notes,
        metrics=row.metrics,
        is_champion=bool(row.is_champion),
    )


def defect_type_row(session: Session, category: str, key: str) -> DefectType | None:
    return session.scalars(
        sa.select(DefectType).where(DefectType.category == category, DefectType.name == key)
    ).one_or_none()


def require_defect_type(session: Session, category: str, key: str) -> DefectType:
    """A defect type by normalised name; the error lists the category's active types."""
    row = defect_type_row(session, category, key)
    if row is None:
        known = session.scalars(
            sa.select(DefectType.name)
            .where(DefectType.category == category, DefectType.active)
            .order_by(DefectType.name)
        ).all()
        listed = ", ".join(known) if known else "none yet: add one with add_defect_type"
        raise UnknownDefectTypeError(f"Unknown defect type '{key}' for {category} (known: {listed}).")
    return row


def defect_type_info(row: DefectType) -> DefectTypeInfo:
    return DefectTypeInfo(
        id=row.id,
        category=row.category,
        name=row.name,
        description=row.description,
        active=bool(row.active),
        created_at=row.created_at,
    )


def existing_inspection(session: Session, image_id: str, model_version_id: int) -> Inspection | None:
    """The inspection of an image by one model version (the idempotency key)."""
    return session.scalars(
        sa.select(Inspection).where(Inspection.image_id == image_id, Inspection.model_version_id == model_version_id)
    ).one_or_none()


def require_inspection(session: Session, inspection_id: int) -> tuple[Inspection, str]:
    """An inspection and its model version's name; unknown is an error."""
    row = session.execute(inspection_select().where(Inspection.id == inspection_id)).one_or_none()
    if row is None:
        raise NotFoundError(f"Inspection {inspection_id} does not exist.")
    return row[0], row[1]


def inspection_info(row: Inspection, version: str) -> InspectionInfo:
    return InspectionInfo(
        id=row.id,
        image_id=row.image_id,
        image_path=row.image_path,
        category=row.category,
        model_version=version,
        score=row.score,
        threshold=row.threshold,
        decision=row.decision,
        map_path=row.map_path,
        explanation=row.explanation,
        processing_time_s=row.processing_time_s,
        inspected_at=row.inspected_at,
        recorded_at=row.recorded_at,
        error=row.error,
        embedding_space=row.embedding_space,
        attributes=row.attributes,
    )


def feedback_info(row: Feedback, defect_type: str | None) -> FeedbackInfo:
    return FeedbackInfo(
        id=row.id,
        inspection_id=row.inspection_id,
        verdict=row.verdict,
        outcome=row.outcome,
        defect_type=defect_type,
        description=row.description,
        region_mask_path=row.region_mask_path,
        region_polygon=row.region_polygon,
        confidence=row.confidence,
        operator=row.operator,
        session=row.session,
        created_at=row.created_at,
    )


def feedback_rows(session: Session, stmt: sa.Select[Any]) -> list[FeedbackInfo]:
    """Verdicts selected by ``stmt`` with their defect type's name, oldest first."""
    stmt = (
        stmt.add_columns(DefectType.name)
        .outerjoin(DefectType, DefectType.id == Feedback.defect_type_id)
        .order_by(Feedback.created_at, Feedback.id)
    )
    return [feedback_info(row, name) for row, name in session.execute(stmt)]


def image_feedback(session: Session, category: str, image_ids: Sequence[str]) -> dict[str, list[FeedbackInfo]]:
    """Every verdict on the given images of a category (any model version), oldest first, per image."""
    stmt = (
        sa.select(Feedback, Inspection.image_id)
        .join(Inspection, Inspection.id == Feedback.inspection_id)
        .outerjoin(DefectType, DefectType.id == Feedback.defect_type_id)
        .add_columns(DefectType.name)
        .where(Inspection.category == category, Inspection.image_id.in_(list(image_ids)))
        .order_by(Feedback.created_at, Feedback.id)
    )
    grouped: dict[str, list[FeedbackInfo]] = {}
    for row, image_id, name in session.execute(stmt):
        grouped.setdefault(image_id, []).append(feedback_info(row, name))
    return grouped


def resolutions(feedback: dict[tuple[str, str], list[FeedbackInfo]], policy: str) -> dict[tuple[str, str], Resolution]:
    """Resolution of every image in ``feedback`` (one :func:`resolve_labels` call for all of them)."""
    records = [
        {
            "id": f.id,
            "category": category,
            "image_id": image_id,
            "verdict": f.verdict,
            "confidence": f.confidence,
            "operator": f.operator,
            "created_at": f.created_at,
            "defect_type": f.defect_type,
        }
        for (category, image_id), items in feedback.items()
        for f in items
    ]
    if not records:
        return {}
    frame = pd.DataFrame.from_records(records)
    frame["defect_type"] = frame["defect_type"].astype(object)
    table = resolve_labels(frame, policy)
    return {
        key: Resolution(
            label=row["label"],
            policy=policy,
            n_feedback=int(row["n_feedback"]),
            n_operators=int(row["n_operators"]),
            votes_ok=int(row["votes_ok"]),
            votes_ng=int(row["votes_ng"]),
            conflict=bool(row["conflict"]),
            defect_type=row["defect_type"],
            last_feedback_at=max(f.created_at for f in feedback[key]),
        )
        for key, row in zip(table.index, table.to_dict("records"), strict=True)
    }


def cases_by_id(session: Session, inspection_ids: Sequence[int], policy: str) -> dict[int, Case]:
    """Cases of the given inspections by id; an unknown id is an error, not a silent gap."""
    if not inspection_ids:
        return {}
    rows = session.execute(inspection_select().where(Inspection.id.in_(list(inspection_ids)))).all()
    missing = set(inspection_ids) - {row[0].id for row in rows}
    if missing:
        raise NotFoundError(f"Inspection(s) {sorted(missing)} do not exist.")
    return {case.inspection.id: case for case in cases_from_rows(session, rows, policy)}


def cases_from_rows(session: Session, rows: Sequence[Any], policy: str) -> list[Case]:
    """Cases for (Inspection, version) rows, in the rows' order, with the verdicts on each image."""
    by_category: dict[str, set[str]] = {}
    for inspection, _ in rows:
        by_category.setdefault(inspection.category, set()).add(inspection.image_id)
    feedback: dict[tuple[str, str], list[FeedbackInfo]] = {}
    for category, images in by_category.items():
        image_list = sorted(images)
        for start in range(0, len(image_list), 500):
            for image_id, items in image_feedback(session, category, image_list[start : start + 500]).items():
                feedback[(category, image_id)] = items
    resolved = resolutions(feedback, policy)
    unreviewed = Resolution(None, policy, 0, 0, 0, 0, False, None, None)
    return [
        Case(
            inspection=inspection_info(inspection, version),
            feedback=tuple(feedback.get((inspection.category, inspection.image_id), [])),
            resolution=resolved.get((inspection.category, inspection.image_id), unreviewed),
        )
        for inspection, version in rows
    ]


#: Fields a repeated inspection by the same model version updates: the decision follows the review band in force (a
#: setting of the app, not of the model), and the knowledge base must show what the latest report says.
REFRESHED_FIELDS = ("decision",)


def refresh_decision(existing: Inspection, values: dict[str, Any]) -> None:
    """Take the repeat's decision when both inspections succeeded and only the decision rule changed (same score)."""
    score = values.get("score")
    if existing.error is not None or values.get("error") is not None or existing.score is None or score is None:
        return
    if not math.isclose(float(existing.score), float(score), rel_tol=1e-6, abs_tol=1e-9):
        return
    for name in REFRESHED_FIELDS:
        new = values.get(name)
        if new is not None and getattr(existing, name) != new:
            logger.info(
                "Inspection %d (image %s): %s %s -> %s (same model version, another decision rule).",
                existing.id,
                existing.image_id,
                name,
                getattr(existing, name),
                new,
            )
            setattr(existing, name, new)


def log_differences(existing: Inspection, values: dict[str, Any]) -> None:
    """Warn when a repeated inspection differs from the stored one (the first record is kept)."""
    changed = [
        name
        for name in IDEMPOTENT_FIELDS
        if name not in REFRESHED_FIELDS and getattr(existing, name) != values.get(name)
    ]
    if changed:
        logger.warning(
            "Inspection of image %s by model version id %d was already recorded (id %d); kept the first record. "
            "This call differed in: %s.",
            existing.image_id,
            existing.model_version_id,
            existing.id,
            ", ".join(changed),
        )
