"""Wiring of the preprocessing template; instantiated once per category namespace."""

from kedro.pipeline import Pipeline, node, pipeline

from madfh_pipeline.pipelines.preprocessing.nodes import (
    build_manifest,
    build_validation_report,
    preprocess_images,
    summarize_preprocessing,
    validate_layout,
)


def create_pipeline(**kwargs: object) -> Pipeline:
    """The category-agnostic template; ``namespaced`` in pipeline_registry gives each category its own copy."""
    return pipeline(
        [
            node(validate_layout, ["raw_images", "params:category"], "checked_files", name="validate_layout"),
            node(
                preprocess_images,
                ["checked_files", "params:preprocessing", "params:category"],
                "image_store",
                name="preprocess_images",
            ),
            node(
                summarize_preprocessing,
                ["image_store", "checked_files", "params:preprocessing", "params:category"],
                ["preprocessing_table", "preprocessing_stats"],
                name="summarize_preprocessing",
            ),
            node(
                build_validation_report,
                ["preprocessing_table", "preprocessing_stats", "params:category"],
                ["validation_report", "validation_summary", "preprocessing_metrics"],
                name="build_validation_report",
            ),
            node(
                build_manifest,
                ["preprocessing_table", "validation_report", "params:splits"],
                "manifest",
                name="build_manifest",
            ),
        ]
    )
