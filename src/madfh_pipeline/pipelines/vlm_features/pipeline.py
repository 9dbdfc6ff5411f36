"""Wiring of the vlm_features template; instantiated once per category namespace."""

from kedro.pipeline import Pipeline, node, pipeline

from madfh_pipeline.pipelines.vlm_features.nodes import extract_vlm_features, feature_metrics


def create_pipeline(**kwargs: object) -> Pipeline:
    return pipeline(
        [
            node(
                extract_vlm_features,
                ["manifest", "image_store", "params:vlm", "params:category"],
                "vlm_features",
                name="extract_vlm_features",
            ),
            node(feature_metrics, "vlm_features", "vlm_feature_metrics", name="vlm_feature_metrics"),
        ]
    )
