"""Wiring of the training template; one copy per detector, inside each category's namespace."""

from kedro.pipeline import Pipeline, node, pipeline

from madfh_pipeline.pipelines.detection.nodes import calibrate_thresholds, fit_detector


def create_pipeline(features: bool = False, **kwargs: object) -> Pipeline:
    """``features``: the detector reads the category's ``vlm_features`` store (the MiniCPM-V detectors)."""
    extra = ["vlm_features"] if features else []
    return pipeline(
        [
            node(
                fit_detector,
                [
                    "manifest",
                    "image_store",
                    "model_cache",
                    "params:detector",
                    "params:category",
                    "params:runtime",
                    *(extra + ["params:vlm"] if features else []),
                ],
                ["fitted_model", "training_metrics", "detector_params"],
                name="fit_detector",
            ),
            node(
                calibrate_thresholds,
                ["fitted_model", "manifest", "image_store", "params:thresholds", "params:runtime", *extra],
                ["model", "calibration_metrics"],
                name="calibrate_thresholds",
            ),
        ]
    )
