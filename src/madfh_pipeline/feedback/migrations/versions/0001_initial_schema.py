"""Initial knowledge-base schema: model versions, defect types, inspections, feedback, text embeddings.

Written out in full (not imported from the models) so that this revision keeps creating exactly this schema when the
models move on; a test compares a migrated database with the models to catch drift.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_DATETIME = sa.DateTime(timezone=True)
JSON = sa.JSON(none_as_null=True)


def upgrade() -> None:
    """Create the five tables with their constraints and indexes."""
    op.create_table(
        "defect_types",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("category", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("active", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.CheckConstraint("category <> ''", name=op.f("ck_defect_types_category_not_empty")),
        sa.CheckConstraint("name <> ''", name=op.f("ck_defect_types_name_not_empty")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_defect_types")),
        sa.UniqueConstraint("category", "name", name=op.f("uq_defect_types_category_name")),
    )

    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("category", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("mlflow_run_id", sa.String(length=128), nullable=True),
        sa.Column("detector", sa.String(length=64), nullable=True),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column("notes", sa.Text(), nullable=True),
        sa.Column("metrics", JSON, nullable=True),
        sa.Column("is_champion", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.CheckConstraint("category <> ''", name=op.f("ck_model_versions_category_not_empty")),
        sa.CheckConstraint("version <> ''", name=op.f("ck_model_versions_version_not_empty")),
        sa.CheckConstraint("parent_id IS NULL OR parent_id <> id", name=op.f("ck_model_versions_not_own_parent")),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["model_versions.id"],
            name=op.f("fk_model_versions_parent_id_model_versions"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("category", "version", name=op.f("uq_model_versions_category_version")),
    )
    op.create_index("ix_model_versions_category_created_at", "model_versions", ["category", "created_at"])
    op.create_index("ix_model_versions_mlflow_run_id", "model_versions", ["mlflow_run_id"])
    op.create_index(
        "uq_model_versions_champion",
        "model_versions",
        ["category"],
        unique=True,
        sqlite_where=sa.text("is_champion"),
        postgresql_where=sa.text("is_champion"),
    )

    op.create_table(
        "inspections",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.String(length=64), nullable=False),
        sa.Column("image_path", sa.Text(), nullable=False),
        sa.Column("category", sa.String(length=64), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("decision", sa.String(length=8), nullable=False),
        sa.Column("map_path", sa.Text(), nullable=True),
        sa.Column("explanation", sa.Text(), nullable=True),
        sa.Column("processing_time_s", sa.Float(), nullable=True),
        sa.Column("inspected_at", UTC_DATETIME, nullable=False),
        sa.Column("recorded_at", UTC_DATETIME, nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("embedding", sa.LargeBinary(), nullable=True),
        sa.Column("embedding_dim", sa.Integer(), nullable=True),
        sa.Column("embedding_space", sa.String(length=128), nullable=True),
        sa.Column("attributes", JSON, nullable=True),
        sa.CheckConstraint(
            "(decision = 'ERROR' AND error IS NOT NULL AND score IS NULL) OR "
            "(decision <> 'ERROR' AND error IS NULL AND score IS NOT NULL AND threshold IS NOT NULL)",
            name=op.f("ck_inspections_scored_or_error"),
        ),
        sa.CheckConstraint("decision IN ('OK', 'NG', 'REVIEW', 'ERROR')", name=op.f("ck_inspections_decision_known")),
        sa.CheckConstraint("image_path <> ''", name=op.f("ck_inspections_image_path_not_empty")),
        sa.CheckConstraint(
            "(embedding IS NULL AND embedding_dim IS NULL AND embedding_space IS NULL) OR "
            "(embedding IS NOT NULL AND embedding_dim > 0 AND embedding_space IS NOT NULL)",
            name=op.f("ck_inspections_embedding_complete"),
        ),
        sa.CheckConstraint("length(image_id) = 64", name=op.f("ck_inspections_image_id_sha256")),
        sa.CheckConstraint(
            "processing_time_s IS NULL OR processing_time_s >= 0",
            name=op.f("ck_inspections_processing_time_positive"),
        ),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_inspections_model_version_id_model_versions"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inspections")),
        sa.UniqueConstraint("image_id", "model_version_id", name=op.f("uq_inspections_image_id_model_version_id")),
    )
    op.create_index("ix_inspections_category_decision", "inspections", ["category", "decision"])
    op.create_index("ix_inspections_category_embedding_space", "inspections", ["category", "embedding_space"])
    op.create_index("ix_inspections_category_inspected_at", "inspections", ["category", "inspected_at"])
    op.create_index("ix_inspections_image_id", "inspections", ["image_id"])
    op.create_index("ix_inspections_model_version_id", "inspections", ["model_version_id"])

    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("inspection_id", sa.Integer(), nullable=False),
        sa.Column("verdict", sa.String(length=2), nullable=False),
        sa.Column("outcome", sa.String(length=20), nullable=False),
        sa.Column("defect_type_id", sa.Integer(), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("region_mask_path", sa.Text(), nullable=True),
        sa.Column("region_polygon", JSON, nullable=True),
        sa.Column("confidence", sa.SmallInteger(), nullable=False),
        sa.Column("operator", sa.String(length=128), nullable=False),
        sa.Column("session", sa.String(length=128), nullable=True),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.CheckConstraint(
            "(verdict = 'NG' AND outcome IN ('confirmed_defect', 'missed_defect')) OR "
            "(verdict = 'OK' AND outcome IN ('false_alarm', 'confirmed_ok'))",
            name=op.f("ck_feedback_outcome_matches_verdict"),
        ),
        sa.CheckConstraint("operator <> ''", name=op.f("ck_feedback_operator_not_empty")),
        sa.CheckConstraint(
            "outcome IN ('confirmed_defect', 'false_alarm', 'missed_defect', 'confirmed_ok')",
            name=op.f("ck_feedback_outcome_known"),
        ),
        sa.CheckConstraint(
            "verdict = 'NG' OR (defect_type_id IS NULL AND region_mask_path IS NULL AND region_polygon IS NULL)",
            name=op.f("ck_feedback_region_only_for_defects"),
        ),
        sa.CheckConstraint("verdict IN ('OK', 'NG')", name=op.f("ck_feedback_verdict_known")),
        sa.CheckConstraint("confidence BETWEEN 1 AND 5", name=op.f("ck_feedback_confidence_range")),
        sa.ForeignKeyConstraint(
            ["defect_type_id"],
            ["defect_types.id"],
            name=op.f("fk_feedback_defect_type_id_defect_types"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["inspection_id"],
            ["inspections.id"],
            name=op.f("fk_feedback_inspection_id_inspections"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback")),
    )
    op.create_index("ix_feedback_created_at", "feedback", ["created_at"])
    op.create_index("ix_feedback_defect_type_id", "feedback", ["defect_type_id"])
    op.create_index("ix_feedback_inspection_id_created_at", "feedback", ["inspection_id", "created_at"])
    op.create_index("ix_feedback_operator_created_at", "feedback", ["operator", "created_at"])

    op.create_table(
        "text_embeddings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("inspection_id", sa.Integer(), nullable=True),
        sa.Column("feedback_id", sa.Integer(), nullable=True),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.CheckConstraint(
            "(inspection_id IS NULL) <> (feedback_id IS NULL)", name=op.f("ck_text_embeddings_one_owner")
        ),
        sa.CheckConstraint("dim > 0", name=op.f("ck_text_embeddings_dim_positive")),
        sa.ForeignKeyConstraint(
            ["feedback_id"],
            ["feedback.id"],
            name=op.f("fk_text_embeddings_feedback_id_feedback"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["inspection_id"],
            ["inspections.id"],
            name=op.f("fk_text_embeddings_inspection_id_inspections"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_text_embeddings")),
        sa.UniqueConstraint("feedback_id", "model", name=op.f("uq_text_embeddings_feedback_id_model")),
        sa.UniqueConstraint("inspection_id", "model", name=op.f("uq_text_embeddings_inspection_id_model")),
    )
    op.create_index("ix_text_embeddings_model", "text_embeddings", ["model"])


def downgrade() -> None:
    """Drop everything (history included): only for development databases."""
    op.drop_table("text_embeddings")
    op.drop_table("feedback")
    op.drop_table("inspections")
    op.drop_table("model_versions")
    op.drop_table("defect_types")
