"""Wiring of the demo data template; instantiated once per category namespace."""

from kedro.pipeline import Pipeline, node, pipeline

from madfh_pipeline.pipelines.demo_data.nodes import generate_demo_category


def create_pipeline(**kwargs: object) -> Pipeline:
    return pipeline(
        [
            node(
                generate_demo_category,
                ["params:category", "params:demo_data"],
                "demo_images",
                name="generate_demo_category",
            )
        ]
    )
