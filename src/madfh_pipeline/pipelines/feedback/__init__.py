"""Operators' verdicts back into the model: recalibrated threshold, extended memory bank, defect bank."""

from madfh_pipeline.pipelines.feedback.pipeline import create_pipeline

__all__ = ["create_pipeline"]
