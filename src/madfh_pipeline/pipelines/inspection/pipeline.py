"""Wiring of the inspection template (category level; ``model`` is the inspecting detector's calibrated model)."""

from kedro.pipeline import Pipeline, node, pipeline

from madfh_pipeline.pipelines.inspection.nodes import inspect_images, publish_inspection_model, record_inspections


def create_pipeline(**kwargs: object) -> Pipeline:
    return pipeline(
        [
            node(
                publish_inspection_model,
                ["model", "params:category", "params:preprocessing", "params:inspection"],
                ["inspection_models", "model_version"],
                name="publish_inspection_model",
            ),
            node(
                inspect_images,
                [
                    "inspection_images",
                    "inspection_models",
                    "model_version",
                    "params:inspection",
                    "review_settings",
                    "params:category",
                ],
                "inspection_maps",
                name="inspect_images",
            ),
            node(
                record_inspections,
                ["inspection_maps", "inspection_images", "model_version", "params:category", "knowledge_base"],
                ["inspection_records", "inspection_reports", "inspection_metrics", "ng_notifications"],
                name="record_inspections",
            ),
        ]
    )
