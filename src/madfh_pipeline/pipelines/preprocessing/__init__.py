"""Validate, resize and split the raw MVTec AD 2 images of a category."""

from madfh_pipeline.pipelines.preprocessing.pipeline import create_pipeline

__all__ = ["create_pipeline"]
