"""Training: fit a detector on train/good, then calibrate its thresholds on validation/good.

Thresholds come from defect-free data only, as the benchmark demands: the pixel threshold is mean + k·σ of every
anomaly-map pixel on validation/good, the image threshold the same rule (or a percentile) over the validation image
scores. They are stored inside the saved model so evaluation, export and the inspection app all use the same ones.
"""

from __future__ import annotations

import logging
import time
from numbers import Real
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from madfh_pipeline.datasets.image_store import ImageStore
from madfh_pipeline.imaging import Geometry
from madfh_pipeline.metrics import mean_std_threshold, percentile_threshold
from madfh_pipeline.models.base import AnomalyDetector, Thresholds, build_detector, resolve_device
from madfh_pipeline.streaming import image_batches

logger = logging.getLogger(__name__)


def _keys(manifest: pd.DataFrame, split: str, label: str | None = "good") -> list[str]:
    rows = manifest[manifest["split"] == split]
    if label is not None:
        rows = rows[rows["label"] == label]
    return rows["relpath"].tolist()


def fit_detector(
    manifest: pd.DataFrame, store: ImageStore, detector: dict[str, Any], runtime: dict[str, Any]
) -> tuple[AnomalyDetector, dict[str, Any]]:
    """Fit the detector named in ``detector["name"]`` on the category's train/good images.

    Returns the fitted model and its training metrics (history per epoch as MLflow steps, plus fit time).
    """
    name = detector["name"]
    keys = _keys(manifest, "train")
    if not keys:
        raise ValueError(f"No usable train/good images for '{name}': see the validation report.")
    device = resolve_device(runtime.get("device", "auto"))
    model = build_detector(name, detector.get("config") or {}).to(device)
    batch_size = int(runtime.get("batch_size", 8))
    logger.info("Fitting %s on %d train/good images (device %s).", name, len(keys), device)

    def batches() -> Any:
        for _, batch in image_batches(store, keys, batch_size):
            yield batch.to(device, non_blocking=True)

    start = time.perf_counter()
    history = model.fit(batches)
    seconds = time.perf_counter() - start
    metrics: dict[str, Any] = {"fit_seconds": {"value": seconds, "step": 0}, "n_train": {"value": len(keys), "step": 0}}
    for key, values in history.items():
        if isinstance(values, list | tuple) and values and all(isinstance(v, Real) for v in values):
            metrics[f"train_{key}"] = [{"value": float(v), "step": i} for i, v in enumerate(values)]
        elif isinstance(values, Real):
            metrics[f"train_{key}"] = {"value": float(values), "step": 0}
    logger.info("Fitted %s in %.1f s.", name, seconds)
    return model, metrics


def calibrate_thresholds(
    model: AnomalyDetector,
    manifest: pd.DataFrame,
    store: ImageStore,
    thresholds: dict[str, Any],
    runtime: dict[str, Any],
) -> AnomalyDetector:
    """Set the model's pixel and image thresholds from validation/good (never from test data)."""
    keys = _keys(manifest, "validation")
    if not keys:
        raise ValueError("No validation/good images: thresholds cannot be calibrated from normal data.")
    # Letterbox padding is not part of any image: its pixels must not pull the pixel statistics down.
    content = {row.relpath: Geometry.from_row(row).content for row in manifest.itertuples(index=False)}
    device = resolve_device(runtime.get("device", "auto"))
    model.to(device)
    maps: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    progress = tqdm(total=len(keys), desc=f"calibrate {model.name}", unit="img", disable=None)
    for chunk, batch in image_batches(store, keys, int(runtime.get("batch_size", 8))):
        with torch.no_grad():
            out = model.predict(batch.to(device))
        maps.extend(m[content[key]].astype(np.float32) for key, m in zip(chunk, out.maps, strict=True))
        scores.append(out.scores.astype(np.float64))
        progress.update(len(chunk))
    progress.close()
    k = float(thresholds.get("pixel_k", 3.0))
    pixel, mean, std = mean_std_threshold(maps, k=k)
    image_scores = np.concatenate(scores)
    rule = thresholds.get("image_rule", "mean_std")
    if rule == "mean_std":
        image, image_mean, image_std = mean_std_threshold(image_scores, k=float(thresholds.get("image_k", 3.0)))
    elif rule == "percentile":
        image = percentile_threshold(image_scores, float(thresholds.get("image_percentile", 99.0)))
        image_mean, image_std = float(image_scores.mean()), float(image_scores.std())
    else:
        raise ValueError(f"Unknown image threshold rule '{rule}': use 'mean_std' or 'percentile'.")
    model.thresholds = Thresholds(
        pixel=float(pixel),
        image=float(image),
        rule=f"pixel: mean+{k}std of validation/good pixels; image: {rule} of validation/good scores",
        stats={
            "pixel_mean": float(mean),
            "pixel_std": float(std),
            "image_mean": float(image_mean),
            "image_std": float(image_std),
            "n_validation": float(len(keys)),
        },
    )
    logger.info("%s thresholds: pixel %.4g, image %.4g (%s).", model.name, pixel, image, model.thresholds.rule)
    return model
