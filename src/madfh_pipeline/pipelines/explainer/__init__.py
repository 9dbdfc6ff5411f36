"""The defect explainer: grounded training pairs and BLIP + PEFT LoRA fine-tuning, per category."""

from madfh_pipeline.pipelines.explainer.pipeline import create_pipeline

__all__ = ["create_pipeline"]
