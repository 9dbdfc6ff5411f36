"""MiniCPM-V vision features per image, between preprocessing and training."""

from madfh_pipeline.pipelines.vlm_features.pipeline import create_pipeline

__all__ = ["create_pipeline"]
