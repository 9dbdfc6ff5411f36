"""The knowledge base of MAD-FH: inspections, operator feedback, defect types and model versions.

Everything else (the inspection and feedback pipelines, the review app, webhooks) talks to :class:`KnowledgeBase`.
Embedded SQLite by default, PostgreSQL by URL; the schema is owned by the Alembic migrations shipped in
``migrations/``. Kedro-free: the catalog and pipelines wrap this API, not the other way round. See
``docs/knowledge_base.md``.
"""

from madfh_pipeline.feedback.database import head_revision, sqlite_url
from madfh_pipeline.feedback.errors import (
    AlreadyExistsError,
    InUseError,
    KnowledgeBaseError,
    NotFoundError,
    SchemaOutOfDateError,
    TextModelUnavailableError,
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
    Resolution,
    SimilarCase,
    image_content_id,
)
from madfh_pipeline.feedback.retrieval import MiniLMTextEmbedder, TextEmbedder
from madfh_pipeline.feedback.schema import (
    ACTIONS,
    DECISIONS,
    OUTCOMES,
    VERDICTS,
    outcome_of,
    valid_actions,
)
from madfh_pipeline.feedback.snapshot import KnowledgeBaseSnapshot
from madfh_pipeline.feedback.store import DashboardStats, KnowledgeBase

__all__ = [
    "ACTIONS",
    "DECISIONS",
    "OUTCOMES",
    "VERDICTS",
    "AlreadyExistsError",
    "Case",
    "DashboardStats",
    "DefectTypeInfo",
    "FeedbackInfo",
    "InUseError",
    "InspectionInfo",
    "InspectionRecord",
    "KnowledgeBase",
    "KnowledgeBaseError",
    "KnowledgeBaseSnapshot",
    "MiniLMTextEmbedder",
    "ModelVersionInfo",
    "NotFoundError",
    "QueueItem",
    "RecordedInspection",
    "Resolution",
    "SchemaOutOfDateError",
    "SimilarCase",
    "TextEmbedder",
    "TextModelUnavailableError",
    "UnknownDefectTypeError",
    "UnsupportedDatabaseError",
    "ValidationError",
    "head_revision",
    "image_content_id",
    "outcome_of",
    "sqlite_url",
    "valid_actions",
]
