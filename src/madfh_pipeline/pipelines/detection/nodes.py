"""Training: fit a detector on train/good, then calibrate its thresholds on validation/good.

Thresholds come from defect-free data only, as the benchmark demands: the pixel threshold is mean + k·σ of every
anomaly-map pixel on validation/good, the image threshold the same rule (or a percentile) over the validation image
scores. They are stored inside the saved model so evaluation, export and the inspection app all use the same ones.

A fit that would reproduce a saved model (same detector, same effective config, same training images byte for byte)
reuses that model instead, and says which one and why: a second ``make run`` with nothing changed trains nothing.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from numbers import Real
from typing import Any

import numpy as np
import pandas as pd
import torch

from madfh_pipeline import __version__
from madfh_pipeline.calibration import thresholds_from_normal
from madfh_pipeline.datasets.detector import ModelCache
from madfh_pipeline.datasets.feature_store import FeatureStore
from madfh_pipeline.datasets.image_store import ImageStore
from madfh_pipeline.imaging import Geometry
from madfh_pipeline.models.base import AnomalyDetector, Thresholds, build_detector, resolve_device, stable_hash
from madfh_pipeline.progress import progress
from madfh_pipeline.streaming import image_batches

logger = logging.getLogger(__name__)

#: Keys a ``detection.models.<key>`` entry may have.
DETECTOR_ENTRY_KEYS = ("name", "type", "module", "config", "enabled", "features")


def attach_features(model: AnomalyDetector, features: FeatureStore | None) -> None:
    """Give a detector that reads stored features (e.g. MiniCPM-V tokens) the store the pipeline wrote."""
    if features is not None and hasattr(model, "attach_features"):
        model.attach_features(features)


def _keys(manifest: pd.DataFrame, split: str, label: str | None = "good") -> list[str]:
    rows = manifest[manifest["split"] == split]
    if label is not None:
        rows = rows[rows["label"] == label]
    return rows["relpath"].tolist()


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) else value
        )
    return out


def resolve_detector(
    detector: Mapping[str, Any], category: Mapping[str, Any], vlm: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The detector entry that takes effect for this category: the global entry with the category's overrides.

    ``categories.<category>.detection.<key>`` overrides ``detection.models.<key>`` key by key (e.g. a larger bank
    for one product), like the per-category preprocessing overrides. The entry's ``name`` is its key; ``type`` the
    registered detector (default: the name); ``module`` imports a detector defined outside this package;
    ``features`` names the feature stores it reads (``vlm_features``). A detector that reads MiniCPM-V features gets
    the run's ``vlm`` model settings as its ``config.vlm`` unless its entry sets its own.
    """
    unknown = sorted(set(detector) - set(DETECTOR_ENTRY_KEYS))
    if unknown:
        raise ValueError(
            f"Detector entry '{detector.get('name', '?')}' has unknown key(s) {unknown}; valid keys: "
            f"{', '.join(DETECTOR_ENTRY_KEYS)} (the detector's own settings go under 'config')."
        )
    if "name" not in detector:
        raise ValueError("Every detection.models.<key> entry needs 'name: <key>' (nodes only see the entry).")
    overrides = ((category.get("detection") or {}).get(detector["name"])) or {}
    entry = _merge(detector, overrides)
    entry.setdefault("type", entry["name"])
    entry["config"] = dict(entry.get("config") or {})
    if vlm is not None and "vlm_features" in (entry.get("features") or []) and "vlm" not in entry["config"]:
        from madfh_pipeline.pipelines.vlm_features.nodes import model_settings

        entry["config"]["vlm"] = model_settings(dict(vlm))
    return entry


def _fingerprints(store: ImageStore, keys: list[str]) -> list[str]:
    """Per-image fingerprints (source bytes/time or content hash + settings) recorded by preprocessing."""
    index = store.read_index()
    table = dict(zip(index["relpath"], index["fingerprint"], strict=True)) if "fingerprint" in index else {}
    return [str(table.get(k, "")) for k in keys]


def training_fingerprint(entry: Mapping[str, Any], store: ImageStore, keys: list[str]) -> str:
    """What a fit depends on: detector type, effective config, the training images (byte-level fingerprints)."""
    return stable_hash(
        {
            "type": entry["type"],
            "module": entry.get("module"),
            "config": entry["config"],
            "images": sorted(zip(keys, _fingerprints(store, keys), strict=True)),
            "version": __version__,
        }
    )


def fit_detector(
    manifest: pd.DataFrame,
    store: ImageStore,
    cache: ModelCache,
    detector: dict[str, Any],
    category: dict[str, Any],
    runtime: dict[str, Any],
    features: FeatureStore | None = None,
    vlm: dict[str, Any] | None = None,
) -> tuple[AnomalyDetector, dict[str, Any], dict[str, Any]]:
    """Fit the detector on the category's train/good images, or reuse a saved model trained on exactly them.

    Returns the fitted model, its training metrics (history per epoch as MLflow steps, plus fit time) and the
    parameters that took effect (for the detector's MLflow run). ``features`` (the ``vlm_features`` store) is
    attached to detectors that read stored features.
    """
    entry = resolve_detector(detector, category, vlm)
    name = entry["name"]
    keys = _keys(manifest, "train")
    if not keys:
        raise ValueError(f"No usable train/good images for '{name}': see the validation report.")
    device = resolve_device(runtime.get("device", "auto"))
    # Built first so the fingerprint holds the *effective* config (the detector's defaults filled in): a saved model
    # is reused only when the defaults it was trained with are still the defaults.
    model = build_detector(entry["type"], entry["config"], entry.get("module"))
    fingerprint = training_fingerprint(entry | {"config": model.config}, store, keys)
    params = {
        "detector": entry["type"],
        "config": model.config,
        "device": str(device),
        "n_train": len(keys),
        "training_fingerprint": fingerprint,
    }
    reuse = bool(runtime.get("reuse_models", True))
    found = cache.find(fingerprint) if reuse else None
    if found is not None:
        model, version = found
        model.to(device)
        attach_features(model, features)
        logger.info(
            "%s: reusing the model saved at version %s: same detector, config and %d training images (fingerprint "
            "%s). Set detection.runtime.reuse_models: false to retrain anyway.",
            name,
            version,
            len(keys),
            fingerprint,
        )
        params["tags"] = {"reused_model": version}
        return model, {"fit_seconds": 0.0, "n_train": float(len(keys)), "reused_model": 1.0}, params

    model.to(device)
    attach_features(model, features)
    batch_size = int(runtime.get("batch_size", 8))
    logger.info("Fitting %s on %d train/good images (device %s).", name, len(keys), device)

    def batches() -> Any:
        for _, batch in image_batches(store, keys, batch_size):
            yield batch.to(device, non_blocking=True)

    start = time.perf_counter()
    history = model.fit(batches)
    seconds = time.perf_counter() - start
    model.provenance = {
        "training_fingerprint": fingerprint,
        "n_train": len(keys),
        "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "fit_seconds": seconds,
        "category": category["name"],
        "detector": name,
    }
    metrics: dict[str, Any] = {"fit_seconds": seconds, "n_train": float(len(keys)), "reused_model": 0.0}
    for key, values in history.items():
        if isinstance(values, list | tuple) and values and all(isinstance(v, Real) for v in values):
            metrics[f"train_{key}"] = [float(v) for v in values] if len(values) > 1 else float(values[0])
        elif isinstance(values, Real):
            metrics[f"train_{key}"] = float(values)
    logger.info("Fitted %s in %.1f s.", name, seconds)
    params["tags"] = {"reused_model": ""}
    return model, metrics, params


def calibrate_thresholds(
    model: AnomalyDetector,
    manifest: pd.DataFrame,
    store: ImageStore,
    thresholds: dict[str, Any],
    runtime: dict[str, Any],
    features: FeatureStore | None = None,
) -> tuple[AnomalyDetector, dict[str, float]]:
    """Set the model's pixel and image thresholds from validation/good (never from test data).

    A reused model whose thresholds came from the same validation images under the same rule keeps them.
    """
    attach_features(model, features)
    keys = _keys(manifest, "validation")
    if not keys:
        raise ValueError("No validation/good images: thresholds cannot be calibrated from normal data.")
    calibration = stable_hash(
        {
            "training": model.provenance.get("training_fingerprint"),
            "thresholds": thresholds,
            "images": sorted(zip(keys, _fingerprints(store, keys), strict=True)),
        }
    )
    if model.provenance.get("calibration_fingerprint") == calibration and model.thresholds.pixel is not None:
        logger.info("%s: thresholds reused (same model, validation images and rule).", model.name)
        return model, _threshold_metrics(model.thresholds)
    # Letterbox padding is not part of any image: its pixels must not pull the pixel statistics down.
    content = {row.relpath: Geometry.from_row(row).content for row in manifest.itertuples(index=False)}
    device = resolve_device(runtime.get("device", "auto"))
    model.to(device)
    maps: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    bar = progress(total=len(keys), desc=f"calibrate {model.name}", unit="img")
    for chunk, batch in image_batches(store, keys, int(runtime.get("batch_size", 8))):
        with torch.no_grad():
            out = model.predict(batch.to(device))
        maps.extend(m[content[key]].astype(np.float32) for key, m in zip(chunk, out.maps, strict=True))
        scores.append(out.scores.astype(np.float64))
        bar.update(len(chunk))
    bar.close()
    model.thresholds = thresholds_from_normal(maps, np.concatenate(scores), thresholds)
    model.provenance = dict(model.provenance) | {"calibration_fingerprint": calibration}
    logger.info(
        "%s thresholds: pixel %.4g, image %.4g (%s).",
        model.name,
        model.thresholds.pixel,
        model.thresholds.image,
        model.thresholds.rule,
    )
    return model, _threshold_metrics(model.thresholds)


def _threshold_metrics(thresholds: Thresholds) -> dict[str, float]:
    out = {"threshold_pixel": thresholds.pixel, "threshold_image": thresholds.image}
    out |= {f"threshold_{k}": v for k, v in thresholds.stats.items()}
    return {k: float(v) for k, v in out.items() if v is not None}
