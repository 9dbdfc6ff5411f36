"""Wiring of the evaluation template; one copy per detector, inside each category's namespace."""

from kedro.pipeline import Pipeline, node, pipeline

from madfh_pipeline.pipelines.evaluation.nodes import (
    collect_scores,
    compute_metrics,
    export_submission,
    plot_evaluation,
    score_images,
)
from madfh_pipeline.pipelines.explainer.nodes import explain_detections


def create_pipeline(features: bool = False, learned: bool = False, **kwargs: object) -> Pipeline:
    """``features``: the detector reads the category's ``vlm_features``; ``learned``: the category has a fine-tuned
    explainer (``explainer_model``) whose text is stored beside the grounded explanation."""
    extra = ["vlm_features"] if features else []
    return pipeline(
        [
            node(
                score_images,
                ["model", "manifest", "image_store", "params:evaluation", "params:runtime", *extra],
                "anomaly_maps",
                name="score_images",
            ),
            node(
                collect_scores,
                ["anomaly_maps", "manifest", "model"],
                ["scores", "inference_metrics"],
                name="collect_scores",
            ),
            node(
                compute_metrics,
                ["scores", "anomaly_maps", "image_store", "raw_masks", "model", "params:evaluation"],
                ["evaluation_report", "evaluation_metrics"],
                name="compute_metrics",
            ),
            node(
                explain_detections,
                [
                    "scores",
                    "anomaly_maps",
                    "image_store",
                    "model",
                    "params:explainer",
                    *(["explainer_model"] if learned else []),
                ],
                ["explanations", "explanation_metrics", "explanation_report"],
                name="explain_detections",
            ),
            node(
                plot_evaluation,
                [
                    "scores",
                    "anomaly_maps",
                    "image_store",
                    "model",
                    "evaluation_report",
                    "explanations",
                    "params:evaluation",
                    "params:category",
                    "params:data_source",
                ],
                "evaluation_figures",
                name="plot_evaluation",
            ),
            node(
                export_submission,
                ["scores", "anomaly_maps", "model", "params:category"],
                ["submission", "submission_summary"],
                name="export_submission",
            ),
        ]
    )
