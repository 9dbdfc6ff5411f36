"""Wiring of the training template; one copy per detector, inside each category's namespace."""

from kedro.pipeline import Pipeline, node, pipeline

from madfh_pipeline.pipelines.detection.nodes import calibrate_thresholds, fit_detector


def create_pipeline(**kwargs: object) -> Pipeline:
    return pipeline(
        [
            node(
                fit_detector,
                ["manifest", "image_store", "params:detector", "params:runtime"],
                ["fitted_model", "training_metrics"],
                name="fit_detector",
            ),
            node(
                calibrate_thresholds,
                ["fitted_model", "manifest", "image_store", "params:thresholds", "params:runtime"],
                "model",
                name="calibrate_thresholds",
            ),
        ]
    )
