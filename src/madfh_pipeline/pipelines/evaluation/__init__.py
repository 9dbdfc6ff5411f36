"""Score images, compute the benchmark metrics, plot, and export the submission format."""

from madfh_pipeline.pipelines.evaluation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
