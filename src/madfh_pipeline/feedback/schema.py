"""The knowledge base's tables as SQLAlchemy 2 models, and the vocabulary they enforce.

The models describe the schema; they never create it. Tables exist only through the Alembic migrations in
``feedback/migrations`` (a test compares the migrated database with these models), so a database on a server and the
embedded SQLite file always have the same, versioned schema.

Design choices that the rest of the package relies on:

- **Append-only history.** Inspections are written once (first write wins, idempotent by image id and model version)
  and feedback rows are never updated: an operator who changes their mind adds a new row. Conflicts between verdicts
  are resolved when reading (:mod:`madfh_pipeline.feedback.resolution`), so no verdict is ever lost.
- **Vocabulary as CHECK constraints**, not database enum types: adding a value is a plain migration on both SQLite
  and PostgreSQL.
- **Timestamps are UTC.** :class:`UTCDateTime` refuses naive datetimes instead of guessing a time zone.
- **Deterministic constraint names** (``naming_convention``) so migrations can name what they alter.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

#: Decisions of the inspection pipeline. ``ERROR``: the file could not be read or scored (``error`` says why).
DECISIONS: tuple[str, ...] = ("OK", "NG", "REVIEW", "ERROR")
#: Decisions that carry a score and can therefore be reviewed and used for calibration.
SCORED_DECISIONS: tuple[str, ...] = ("OK", "NG", "REVIEW")
#: Decisions that raise an item to an operator's attention: a good part with one of these is a false alarm.
FLAGGED_DECISIONS: tuple[str, ...] = ("NG", "REVIEW")
#: An operator's verdict about the physical part: good (``OK``) or defective (``NG``).
VERDICTS: tuple[str, ...] = ("OK", "NG")
#: What a verdict means given the model's decision (see :func:`outcome_of`).
OUTCOMES: tuple[str, ...] = ("confirmed_defect", "false_alarm", "missed_defect", "confirmed_ok")
#: The review app's buttons and the verdict each one records.
ACTIONS: dict[str, str] = {
    "confirm_defect": "NG",
    "false_alarm": "OK",
    "missed_defect": "NG",
    "confirm_ok": "OK",
}
#: The outcome each button claims; a button that contradicts the model's decision is refused.
ACTION_OUTCOMES: dict[str, str] = {
    "confirm_defect": "confirmed_defect",
    "false_alarm": "false_alarm",
    "missed_defect": "missed_defect",
    "confirm_ok": "confirmed_ok",
}

NAME_LENGTH = 64
VERSION_LENGTH = 128
OPERATOR_LENGTH = 128


def outcome_of(decision: str, verdict: str) -> str:
    """What an operator's verdict says about the model's decision.

    ``NG`` and ``REVIEW`` both flag the item (they cost an operator's time), so a good part flagged either way is a
    false alarm and a defective one a confirmed defect; a defective part decided ``OK`` is a missed defect.
    """
    if decision not in SCORED_DECISIONS:
        raise ValueError(f"Decision {decision!r} has no score to judge; expected one of {SCORED_DECISIONS}.")
    if verdict not in VERDICTS:
        raise ValueError(f"Verdict {verdict!r} is not one of {VERDICTS}.")
    flagged = decision in FLAGGED_DECISIONS
    if verdict == "NG":
        return "confirmed_defect" if flagged else "missed_defect"
    return "false_alarm" if flagged else "confirmed_ok"


def valid_actions(decision: str) -> tuple[str, ...]:
    """The review buttons that make sense for an item with this decision (what the app should offer)."""
    return tuple(
        action for action, verdict in ACTIONS.items() if outcome_of(decision, verdict) == ACTION_OUTCOMES[action]
    )


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp stored as UTC on every backend.

    SQLite has no time zones: values are stored as naive UTC text (which sorts chronologically) and come back aware.
    Naive datetimes are refused, because guessing the zone of a plant's clock is how timelines silently shift.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"Expected a datetime, got {type(value).__name__}.")
        if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
            raise ValueError(f"Naive datetime {value.isoformat()}: give a timezone-aware one (e.g. datetime.now(UTC)).")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    """Now, aware, in UTC (the only clock the knowledge base writes)."""
    return datetime.now(UTC)


#: JSON that stores Python ``None`` as SQL NULL (not the JSON text ``null``), so ``IS NULL`` checks mean what they say.
JSONValue = sa.JSON(none_as_null=True)

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base with the naming convention shared by the models and the migrations."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: dict[Any, Any] = {datetime: UTCDateTime}


class ModelVersion(Base):
    """A trained model of one category: what an inspection was scored with, and what feedback retrains.

    ``version`` is the caller's identifier (an MLflow registry version or run id); ``parent_id`` links a model
    retrained from feedback to the one it came from. At most one version per category is the pinned champion.
    """

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    category: Mapped[str] = mapped_column(sa.String(NAME_LENGTH))
    version: Mapped[str] = mapped_column(sa.String(VERSION_LENGTH))
    mlflow_run_id: Mapped[str | None] = mapped_column(sa.String(VERSION_LENGTH))
    detector: Mapped[str | None] = mapped_column(sa.String(NAME_LENGTH))
    parent_id: Mapped[int | None] = mapped_column(sa.ForeignKey("model_versions.id", ondelete="RESTRICT"))
    created_at: Mapped[datetime]
    notes: Mapped[str | None] = mapped_column(sa.Text)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONValue)
    is_champion: Mapped[bool] = mapped_column(sa.Boolean, server_default=sa.false())

    __table_args__ = (
        sa.UniqueConstraint("category", "version"),
        sa.CheckConstraint("category <> ''", name="category_not_empty"),
        sa.CheckConstraint("version <> ''", name="version_not_empty"),
        sa.CheckConstraint("parent_id IS NULL OR parent_id <> id", name="not_own_parent"),
        sa.Index("ix_model_versions_category_created_at", "category", "created_at"),
        sa.Index("ix_model_versions_mlflow_run_id", "mlflow_run_id"),
        # One champion per category, enforced by the database (a partial unique index on both backends).
        sa.Index(
            "uq_model_versions_champion",
            "category",
            unique=True,
            sqlite_where=sa.text("is_champion"),
            postgresql_where=sa.text("is_champion"),
        ),
    )


class DefectType(Base):
    """One entry of a category's editable defect vocabulary (names are stored trimmed and lower-case).

    Retired types (``active`` false) stay valid on old feedback but cannot be chosen for new feedback.
    """

    __tablename__ = "defect_types"

    id: Mapped[int] = mapped_column(primary_key=True)
    category: Mapped[str] = mapped_column(sa.String(NAME_LENGTH))
    name: Mapped[str] = mapped_column(sa.String(NAME_LENGTH))
    description: Mapped[str | None] = mapped_column(sa.Text)
    active: Mapped[bool] = mapped_column(sa.Boolean, server_default=sa.true())
    created_at: Mapped[datetime]

    __table_args__ = (
        sa.UniqueConstraint("category", "name"),
        sa.CheckConstraint("category <> ''", name="category_not_empty"),
        sa.CheckConstraint("name <> ''", name="name_not_empty"),
    )


class Inspection(Base):
    """One image scored by one model version: the detection the operators review.

    ``image_id`` is the SHA-256 of the image file's bytes, so the same part photographed once is one id however the
    file is named or moved. ``embedding`` holds pooled backbone features (float32 bytes) for similar-case search;
    ``embedding_space`` names the feature extractor, since only vectors of one space are comparable.
    """

    __tablename__ = "inspections"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[str] = mapped_column(sa.String(64))
    image_path: Mapped[str] = mapped_column(sa.Text)
    category: Mapped[str] = mapped_column(sa.String(NAME_LENGTH))
    model_version_id: Mapped[int] = mapped_column(sa.ForeignKey("model_versions.id", ondelete="RESTRICT"))
    score: Mapped[float | None] = mapped_column(sa.Float)
    threshold: Mapped[float | None] = mapped_column(sa.Float)
    decision: Mapped[str] = mapped_column(sa.String(8))
    map_path: Mapped[str | None] = mapped_column(sa.Text)
    explanation: Mapped[str | None] = mapped_column(sa.Text)
    processing_time_s: Mapped[float | None] = mapped_column(sa.Float)
    inspected_at: Mapped[datetime]
    recorded_at: Mapped[datetime]
    error: Mapped[str | None] = mapped_column(sa.Text)
    embedding: Mapped[bytes | None] = mapped_column(sa.LargeBinary)
    embedding_dim: Mapped[int | None] = mapped_column(sa.Integer)
    embedding_space: Mapped[str | None] = mapped_column(sa.String(VERSION_LENGTH))
    attributes: Mapped[dict[str, Any] | None] = mapped_column(JSONValue)

    __table_args__ = (
        sa.UniqueConstraint("image_id", "model_version_id"),
        sa.CheckConstraint("length(image_id) = 64", name="image_id_sha256"),
        sa.CheckConstraint("image_path <> ''", name="image_path_not_empty"),
        sa.CheckConstraint(_in("decision", DECISIONS), name="decision_known"),
        sa.CheckConstraint(
            "(decision = 'ERROR' AND error IS NOT NULL AND score IS NULL) OR "
            "(decision <> 'ERROR' AND error IS NULL AND score IS NOT NULL AND threshold IS NOT NULL)",
            name="scored_or_error",
        ),
        sa.CheckConstraint("processing_time_s IS NULL OR processing_time_s >= 0", name="processing_time_positive"),
        sa.CheckConstraint(
            "(embedding IS NULL AND embedding_dim IS NULL AND embedding_space IS NULL) OR "
            "(embedding IS NOT NULL AND embedding_dim > 0 AND embedding_space IS NOT NULL)",
            name="embedding_complete",
        ),
        sa.Index("ix_inspections_category_inspected_at", "category", "inspected_at"),
        sa.Index("ix_inspections_category_decision", "category", "decision"),
        sa.Index("ix_inspections_model_version_id", "model_version_id"),
        sa.Index("ix_inspections_image_id", "image_id"),
        sa.Index("ix_inspections_category_embedding_space", "category", "embedding_space"),
    )


class Feedback(Base):
    """One operator's verdict on one inspection; never updated, so every verdict ever given is kept.

    ``outcome`` is derived from the inspection's decision and the verdict when the row is written (inspections are
    immutable, so it cannot go stale). A corrected region is a mask file path, a list of polygons in image pixel
    coordinates (JSON), or both; regions and defect types only belong to ``NG`` verdicts.
    """

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(primary_key=True)
    inspection_id: Mapped[int] = mapped_column(sa.ForeignKey("inspections.id", ondelete="RESTRICT"))
    verdict: Mapped[str] = mapped_column(sa.String(2))
    outcome: Mapped[str] = mapped_column(sa.String(20))
    defect_type_id: Mapped[int | None] = mapped_column(sa.ForeignKey("defect_types.id", ondelete="RESTRICT"))
    description: Mapped[str | None] = mapped_column(sa.Text)
    region_mask_path: Mapped[str | None] = mapped_column(sa.Text)
    region_polygon: Mapped[list[Any] | None] = mapped_column(JSONValue)
    confidence: Mapped[int] = mapped_column(sa.SmallInteger)
    operator: Mapped[str] = mapped_column(sa.String(OPERATOR_LENGTH))
    session: Mapped[str | None] = mapped_column(sa.String(OPERATOR_LENGTH))
    created_at: Mapped[datetime]

    __table_args__ = (
        sa.CheckConstraint(_in("verdict", VERDICTS), name="verdict_known"),
        sa.CheckConstraint(_in("outcome", OUTCOMES), name="outcome_known"),
        sa.CheckConstraint(
            "(verdict = 'NG' AND outcome IN ('confirmed_defect', 'missed_defect')) OR "
            "(verdict = 'OK' AND outcome IN ('false_alarm', 'confirmed_ok'))",
            name="outcome_matches_verdict",
        ),
        sa.CheckConstraint(
            "verdict = 'NG' OR (defect_type_id IS NULL AND region_mask_path IS NULL AND region_polygon IS NULL)",
            name="region_only_for_defects",
        ),
        sa.CheckConstraint("confidence BETWEEN 1 AND 5", name="confidence_range"),
        sa.CheckConstraint("operator <> ''", name="operator_not_empty"),
        sa.Index("ix_feedback_inspection_id_created_at", "inspection_id", "created_at"),
        sa.Index("ix_feedback_operator_created_at", "operator", "created_at"),
        sa.Index("ix_feedback_created_at", "created_at"),
        sa.Index("ix_feedback_defect_type_id", "defect_type_id"),
    )


class TextEmbedding(Base):
    """A cached sentence embedding of an inspection's explanation or a feedback description.

    Computed lazily by the first text search (the text model is optional) and keyed by the embedding model's name, so
    a new model never mixes vector spaces. Owners are immutable, so a cached vector never goes stale.
    """

    __tablename__ = "text_embeddings"

    id: Mapped[int] = mapped_column(primary_key=True)
    inspection_id: Mapped[int | None] = mapped_column(sa.ForeignKey("inspections.id", ondelete="RESTRICT"))
    feedback_id: Mapped[int | None] = mapped_column(sa.ForeignKey("feedback.id", ondelete="RESTRICT"))
    model: Mapped[str] = mapped_column(sa.String(VERSION_LENGTH))
    dim: Mapped[int] = mapped_column(sa.Integer)
    vector: Mapped[bytes] = mapped_column(sa.LargeBinary)
    created_at: Mapped[datetime]

    __table_args__ = (
        sa.CheckConstraint(
            "(inspection_id IS NULL) <> (feedback_id IS NULL)",
            name="one_owner",
        ),
        sa.CheckConstraint("dim > 0", name="dim_positive"),
        sa.UniqueConstraint("inspection_id", "model"),
        sa.UniqueConstraint("feedback_id", "model"),
        sa.Index("ix_text_embeddings_model", "model"),
    )
