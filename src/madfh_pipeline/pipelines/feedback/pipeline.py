"""Wiring of the feedback template (category level); registered as ``feedback_<category>`` and ``feedback``."""

from kedro.pipeline import Pipeline, node, pipeline

from madfh_pipeline.pipelines.feedback.nodes import labelled_images, learn_from_feedback, operator_descriptions


def create_pipeline(**kwargs: object) -> Pipeline:
    return pipeline(
        [
            node(
                labelled_images,
                ["knowledge_base_snapshot", "model_version", "params:feedback"],
                "feedback_labels",
                name="labelled_images",
            ),
            node(
                learn_from_feedback,
                [
                    "feedback_labels",
                    "inspection_models",
                    "model_version",
                    "params:feedback",
                    "params:category",
                    "params:inspection",
                ],
                ["feedback_inspection_model", "feedback_model_version", "feedback_report", "feedback_metrics"],
                name="learn_from_feedback",
            ),
            node(
                operator_descriptions,
                "knowledge_base_snapshot",
                "operator_descriptions",
                name="operator_descriptions",
            ),
        ]
    )
