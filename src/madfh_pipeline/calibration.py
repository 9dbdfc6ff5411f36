"""The benchmark's threshold rule in one place: thresholds from defect-free data only.

Pixel threshold = mean + k·σ of every anomaly-map pixel of validation/good images (the MVTec AD 2 baselines use
k = 3; letterbox padding is not image content and must be cropped off by the caller); image threshold = the same
rule over their image scores, or a percentile of them. Used by the training pipeline, the serving demo model and the
benchmarks, so a threshold means the same thing wherever it was computed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from madfh_pipeline.metrics import mean_std_threshold, percentile_threshold
from madfh_pipeline.models.base import Thresholds

IMAGE_RULES = ("mean_std", "percentile")


def thresholds_from_normal(
    maps: Iterable[np.ndarray], scores: np.ndarray | Iterable[float], rule: Mapping[str, Any] | None = None
) -> Thresholds:
    """Thresholds from the maps (content only) and image scores of defect-free images.

    ``rule``: the ``detection.thresholds`` parameters — ``pixel_k`` (3.0), ``image_rule`` (``mean_std`` or
    ``percentile``), ``image_k`` (3.0), ``image_percentile`` (99.0).
    """
    rule = dict(rule or {})
    image_rule = rule.get("image_rule", "mean_std")
    if image_rule not in IMAGE_RULES:
        raise ValueError(f"Unknown image threshold rule '{image_rule}': use 'mean_std' or 'percentile'.")
    k = float(rule.get("pixel_k", 3.0))
    pixel, pixel_mean, pixel_std = mean_std_threshold(maps, k=k)
    image_scores = np.asarray(list(scores) if not isinstance(scores, np.ndarray) else scores, dtype=np.float64)
    if image_rule == "mean_std":
        image, image_mean, image_std = mean_std_threshold(image_scores, k=float(rule.get("image_k", 3.0)))
    else:
        image = percentile_threshold(image_scores, float(rule.get("image_percentile", 99.0)))
        image_mean, image_std = float(image_scores.mean()), float(image_scores.std())
    return Thresholds(
        pixel=float(pixel),
        image=float(image),
        rule=f"pixel: mean+{k}std of validation/good pixels; image: {image_rule} of validation/good scores",
        stats={
            "pixel_mean": float(pixel_mean),
            "pixel_std": float(pixel_std),
            "image_mean": float(image_mean),
            "image_std": float(image_std),
            "n_validation": float(image_scores.size),
        },
    )
