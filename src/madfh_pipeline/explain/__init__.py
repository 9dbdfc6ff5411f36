"""Explanations of detected defects: grounded descriptions, training pairs, a LoRA-tuned captioner, text metrics.

Kedro-free. Modules:

- :mod:`.describer` — deterministic fixed-vocabulary text from a defect mask (+ image), and its parser;
- :mod:`.dataset` — model-input composites, training pairs, the hashed train/eval split, the knowledge-base hook;
- :mod:`.lora` — BLIP (or another vision-to-text model) + PEFT LoRA: train, save, load, generate;
- :mod:`.text_metrics` — BLEU (sacrebleu), ROUGE-L (rouge-score) and fact agreement.

Names are imported lazily, so ``from madfh_pipeline.explain import describe`` does not pull in transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # describer
    "Description": "describer",
    "DescriberSettings": "describer",
    "ParsedDescription": "describer",
    "ParsedRegion": "describer",
    "VOCABULARY": "describer",
    "canonical_text": "describer",
    "describe": "describer",
    "parse_description": "describer",
    # dataset
    "OperatorDescription": "dataset",
    "SplitLeakError": "dataset",
    "TrainingPair": "dataset",
    "assign_split": "dataset",
    "build_training_pair": "dataset",
    "check_disjoint": "dataset",
    "compose_input": "dataset",
    "mvtec_group_key": "dataset",
    "operator_training_pairs": "dataset",
    "split_pairs": "dataset",
    # lora
    "GenerationSettings": "lora",
    "LoraExplainer": "lora",
    "LoraSettings": "lora",
    "LossNotDecreasingError": "lora",
    "MissingBaseModelError": "lora",
    "NonFiniteLossError": "lora",
    "TrainableParameterError": "lora",
    "TrainingReport": "lora",
    "TrainSettings": "lora",
    # text metrics
    "TextMetrics": "text_metrics",
    "score_explanations": "text_metrics",
}

__all__ = list(_EXPORTS)  # noqa: PLE0605 (lazy exports: the names live in _EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
