"""Wiring of the evaluation template; one copy per detector, inside each category's namespace."""

from kedro.pipeline import Pipeline, node, pipeline

from madfh_pipeline.pipelines.evaluation.nodes import compute_metrics, export_submission, plot_evaluation, score_images


def create_pipeline(**kwargs: object) -> Pipeline:
    return pipeline(
        [
            node(
                score_images,
                ["model", "manifest", "image_store", "anomaly_maps", "params:evaluation", "params:runtime"],
                ["scores", "inference_metrics"],
                name="score_images",
            ),
            node(
                compute_metrics,
                ["scores", "image_store", "anomaly_maps", "model"],
                ["evaluation_report", "evaluation_metrics"],
                name="compute_metrics",
            ),
            node(
                plot_evaluation,
                ["scores", "image_store", "anomaly_maps", "model", "params:evaluation"],
                "evaluation_figures",
                name="plot_evaluation",
            ),
            node(
                export_submission,
                ["scores", "manifest", "anomaly_maps", "submission", "model"],
                "submission_summary",
                name="export_submission",
            ),
        ]
    )
