"""Inspection of new images with the category's current model version, recorded in the knowledge base."""

from madfh_pipeline.pipelines.inspection.pipeline import create_pipeline

__all__ = ["create_pipeline"]
