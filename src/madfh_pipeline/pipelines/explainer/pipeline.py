"""Wiring of the explainer template (category level); the per-detector explanation node is in evaluation."""

from kedro.pipeline import Pipeline, node, pipeline

from madfh_pipeline.pipelines.explainer.nodes import build_explainer_pairs, train_explainer


def create_pipeline(**kwargs: object) -> Pipeline:
    return pipeline(
        [
            node(
                build_explainer_pairs,
                ["manifest", "image_store", "params:explainer", "operator_descriptions"],
                ["explainer_pairs_train", "explainer_pairs_eval", "explainer_pair_counts"],
                name="build_explainer_pairs",
            ),
            node(
                train_explainer,
                ["explainer_pairs_train", "explainer_pairs_eval", "params:explainer"],
                ["explainer_model", "explainer_metrics", "explainer_params"],
                name="train_explainer",
            ),
        ]
    )
