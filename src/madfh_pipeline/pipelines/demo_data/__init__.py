"""Generate the synthetic demo data set in the MVTec AD 2 layout."""

from madfh_pipeline.pipelines.demo_data.pipeline import create_pipeline

__all__ = ["create_pipeline"]
