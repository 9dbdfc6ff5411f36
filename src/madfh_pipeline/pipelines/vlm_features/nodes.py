"""The ``vlm_features`` stage: MiniCPM-V's vision tokens for every image, stored once, reused by the VLM detectors.

Incremental like preprocessing: each image's features carry a fingerprint of the image (its preprocessing
fingerprint) and of the model and settings; a re-run computes nothing unless one of them changed, and then the model is
not even loaded. Memory is bounded by the batch: images stream from the image store, features stream to disk.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pandas as pd
import torch

from madfh_pipeline.datasets.feature_store import FeatureStore, FeatureWrites, content_hash
from madfh_pipeline.datasets.image_store import ImageStore
from madfh_pipeline.models.base import stable_hash
from madfh_pipeline.models.vlm_detectors import VLM_DEFAULTS, VlmFeatureSource, vlm_settings
from madfh_pipeline.streaming import image_batches

logger = logging.getLogger(__name__)

#: Keys of ``params:vlm`` that are not model settings.
STAGE_KEYS = ("enabled", "disabled_reason", "splits")


def model_settings(vlm: dict[str, Any]) -> dict[str, Any]:
    """The MiniCPM-V settings of the ``vlm`` parameters (what a fingerprint and the detectors need)."""
    unknown = sorted(set(vlm) - set(VLM_DEFAULTS) - set(STAGE_KEYS))
    if unknown:
        raise ValueError(f"Unknown vlm parameter(s) {unknown}; valid: {', '.join([*VLM_DEFAULTS, *STAGE_KEYS])}.")
    return vlm_settings({k: v for k, v in vlm.items() if k in VLM_DEFAULTS})


def extract_vlm_features(
    manifest: pd.DataFrame, store: ImageStore, vlm: dict[str, Any], category: dict[str, Any]
) -> FeatureWrites:
    """Plan MiniCPM-V features (patch-token grid + pooled embedding) for the images of the configured splits."""
    settings = model_settings(vlm)
    splits = vlm.get("splits") or sorted(manifest["split"].unique())
    keys = manifest.loc[manifest["split"].isin(splits), "relpath"].tolist()
    index = store.read_index()
    images = dict(zip(index["relpath"], index["fingerprint"], strict=True)) if "fingerprint" in index else {}
    model_fp = stable_hash({k: v for k, v in settings.items() if k not in ("device", "batch_size")})
    items = [(key, f"{model_fp}|{images.get(key, '')}") for key in keys]
    batch_size = int(settings["batch_size"])

    def compute(todo: list[str]) -> Iterator[tuple[str, str, torch.Tensor, torch.Tensor]]:
        source = VlmFeatureSource(settings)  # loads MiniCPM-V here, only when something needs computing
        for chunk, batch in image_batches(store, todo, batch_size):
            grid, pooled = source.backbone.features(batch)
            for i, key in enumerate(chunk):
                yield key, content_hash(batch[i]), grid[i].float().cpu(), pooled[i].float().cpu()

    return FeatureWrites(
        items=items, compute=compute, source=str(settings["model"]), label=f"vlm features {category['name']}"
    )


def feature_metrics(features: FeatureStore) -> dict[str, Any]:
    """How many feature sets were computed and reused, for the run's MLflow metrics."""
    last = features.last_write()
    return {k: {"value": float(last.get(k, 0)), "step": 0} for k in ("n_images", "n_computed", "n_reused", "seconds")}
