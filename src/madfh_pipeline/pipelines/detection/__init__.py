"""Fit detectors on train/good and calibrate their thresholds on validation/good."""

from madfh_pipeline.pipelines.detection.pipeline import create_pipeline

__all__ = ["create_pipeline"]
