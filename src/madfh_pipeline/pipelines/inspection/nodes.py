"""Inspection: publish the calibrated detector as a versioned inspection model, score a folder of new images with
the category's *active* version (pinned, else newest), and record one row per image in the knowledge base.

The scoring itself is :meth:`madfh_pipeline.inspection.InspectionModel.inspect_batch` — the same code the REST model
and the distributed batch job run — so an operator sees the score the evaluation computed for the same file.
Incremental: an image already inspected by the same model version (same bytes) is not scored again; an unreadable
file becomes an error record with its path, never a crash of the run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch

from madfh_pipeline import tracking
from madfh_pipeline.datasets.knowledge_base import InspectionModelStore
from madfh_pipeline.datasets.map_store import MapStore, MapWrites
from madfh_pipeline.imaging import ImageReadError, read_image
from madfh_pipeline.models.base import AnomalyDetector

logger = logging.getLogger(__name__)


def inspection_settings(inspection: dict[str, Any]) -> dict[str, Any]:
    """The :class:`~madfh_pipeline.inspection.InspectionSettings` part of the ``inspection`` parameters."""
    keys = ("review_band_std", "top_regions", "describer", "runtime", "batch_size", "limits")  # not mlflow/batch
    return {k: inspection[k] for k in keys if k in inspection}


def publish_inspection_model(
    model: AnomalyDetector, category: dict[str, Any], preprocessing: dict[str, Any], inspection: dict[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """The calibrated detector with its category's geometry as an inspection model, and its registration.

    The version is content-addressed (detector + fingerprint): re-publishing an unchanged model registers nothing new.
    """
    from madfh_pipeline.inspection import InspectionModel

    version = f"{model.name}@{model.fingerprint[:12]}"
    published = InspectionModel.from_parameters(
        model, preprocessing, category, inspection_settings(inspection), version=version
    )
    registration = {
        "version": version,
        "mlflow_run_id": tracking.detector_run_id(category["name"], model.name),
        "detector": model.name,
        "parent": model.provenance.get("parent_version"),
        "notes": model.provenance.get("notes") or "calibrated on validation/good by the training pipeline",
        "metrics": {
            k: v
            for k, v in {"threshold_image": model.thresholds.image, "threshold_pixel": model.thresholds.pixel}.items()
            if v is not None
        },
    }
    mlflow_version = register_mlflow_model(published, category["name"], model.name, inspection, "if_missing")
    if mlflow_version is not None:
        registration["metrics"]["mlflow_registered_version"] = mlflow_version
    logger.info("[%s] inspection model %s published.", category["name"], version)
    return published, registration


def register_mlflow_model(
    model: Any, category: str, run_name: str, inspection: dict[str, Any], default_champion: str
) -> str | None:
    """Log the inspection model as an MLflow pyfunc in the given detector run and register it as madfh-<category>.

    Content-addressed (``reuse=True``): an unchanged model is not registered again. Returns the registered model
    version, or None when there is no MLflow run or registration is switched off.
    """
    settings = inspection.get("mlflow") or {}
    run_id = tracking.detector_run_id(category, run_name)
    if run_id is None or not settings.get("register", True):
        return None
    from madfh_pipeline.serving.pyfunc import log_inspection_model

    logged = log_inspection_model(model, run_id=run_id, champion=settings.get("champion", default_champion), reuse=True)
    logger.info(
        "[%s] MLflow: %s version %s (champion: %s).",
        category,
        logged.registered_model_name,
        logged.version,
        logged.champion_version,
    )
    return str(logged.version) if logged.version is not None else None


def _embedding(model: Any, image: np.ndarray) -> list[float] | None:
    """Pooled backbone features of the canvas (for similar past cases), when the detector has a backbone."""
    backbone = getattr(model.detector, "backbone", None)
    if backbone is None or not hasattr(backbone, "features"):
        return None
    canvas = model.prepare(image)[0]
    tensor = torch.from_numpy(np.ascontiguousarray(canvas)).float().div(255.0)
    tensor = tensor[None, None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)[None]
    with torch.no_grad():
        _, pooled = backbone.features(tensor)
    return pooled[0].float().cpu().tolist()


def inspect_images(
    listing: pd.DataFrame,
    models: InspectionModelStore,
    active: Any,
    inspection: dict[str, Any],
    review_settings: dict[str, float],
    category: dict[str, Any],
) -> MapWrites:
    """Plan the inspection of every listed image with the active model version (skipping ones it already saw).

    The REVIEW band is the one operators set for this category in the review app, else ``review_band_std``.
    """
    version = active.version
    band = review_settings.get(category["name"])
    limit = inspection.get("max_images")
    rows = listing.head(int(limit)) if limit else listing
    items = [(str(r.image_id), f"{version}|band={band}|{r.image_id}") for r in rows.itertuples(index=False)]
    paths = dict(zip(rows["image_id"].astype(str), rows["path"], strict=True))
    batch_size = int(inspection.get("batch_size", 4))
    with_embeddings = bool(inspection.get("embeddings", True))

    def compute(keys: list[str]) -> Iterator[tuple[Any, ...]]:
        model = models.load(version)
        if band is not None:
            from dataclasses import replace

            model.settings = replace(model.settings, review_band_std=float(band))
            logger.info("REVIEW band %.2f σ for %s (set in the review app).", band, category["name"])
        logger.info("Inspecting %d images with %s.", len(keys), version)
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            images, good = [], []
            for key in chunk:
                try:
                    images.append(read_image(paths[key]))
                    good.append(key)
                except (ImageReadError, FileNotFoundError, OSError) as exc:
                    logger.warning("Cannot inspect '%s': %s", paths[key], exc)
                    yield key, math.nan, None, {"decision": "ERROR", "error": str(exc), "path": paths[key]}
            if not good:
                continue
            try:
                results: list[Any] = model.inspect_batch(images, good)
            except ValueError:  # an image the model refuses (size, channels): inspect one by one, record the refusals
                results = []
                for key, image in zip(good, images, strict=True):
                    try:
                        results.append(model.inspect(image, key))
                    except ValueError as exc:
                        logger.warning("Cannot inspect '%s': %s", paths[key], exc)
                        yield key, math.nan, None, {"decision": "ERROR", "error": str(exc), "path": paths[key]}
                        results.append(None)
            for key, image, result in zip(good, images, results, strict=True):
                if result is None:
                    continue
                extra = result.to_record() | {"path": paths[key], "error": ""}
                extra.pop("image_id", None)
                extra.pop("score", None)
                if with_embeddings:
                    extra["embedding"] = _embedding(model, image)
                yield key, result.score, result.anomaly_map, extra

    return MapWrites(items=items, compute=compute, model=version, label=f"inspect {version}")


def record_inspections(
    maps: MapStore, listing: pd.DataFrame, active: Any, category: dict[str, Any], reader: Any
) -> tuple[pd.DataFrame, dict[str, dict[str, Any]], dict[str, Any], pd.DataFrame]:
    """Knowledge-base records, a JSON report per image (the original system's keys), run metrics, and the same
    records for the NG notifications.

    Report keys: ``anomaly_detection{is_anomaly, score, threshold, decision}``, ``similar_cases`` (past reviewed
    cases by image embedding, with their verdicts), ``generated_description``, ``processing_time``.
    """
    scored = maps.scores()
    table = scored.merge(
        listing[["image_id", "relpath"]].astype({"image_id": str}),
        left_on="relpath",
        right_on="image_id",
        how="left",
        suffixes=("", "_file"),
    )
    records, reports = [], {}
    space = None
    for row in table.to_dict("records"):
        image_id = row["relpath"]
        embedding = row.get("embedding")
        embedding = list(embedding) if embedding is not None and len(embedding) else None
        space = space or (f"{active.detector}/pooled" if embedding is not None else None)
        decision = row.get("decision") or "ERROR"
        error = row.get("error") or None
        record = {
            "image_id": image_id,
            "image_path": row.get("path"),
            "category": category["name"],
            "model_version": active.version,
            "decision": decision,
            "score": None if decision == "ERROR" else float(row["score"]),
            "threshold": None if decision == "ERROR" else float(row["threshold"]),
            "map_path": str(maps.root / row["map_key"]) if row.get("map_key") else None,
            "explanation": row.get("explanation"),
            "processing_time_s": (row.get("processing_ms") or 0.0) / 1000.0 if decision != "ERROR" else None,
            "error": error,
            "embedding": embedding,
            "embedding_space": space if embedding is not None else None,
            "attributes": {"file": row.get("relpath_file")},
        }
        records.append(record)
        similar = []
        if embedding is not None:
            try:
                for case in reader.similar_images(
                    category=category["name"], vector=np.asarray(embedding), embedding_space=space, k=3
                ):
                    similar.append(
                        {"image_id": case.image_id, "similarity": float(case.similarity), "verdict": case.verdict}
                    )
            except Exception as exc:  # similar cases are a help, not a requirement: say why they are missing
                logger.debug("No similar cases for %s: %s", image_id, exc)
        reports[image_id] = {
            "image": row.get("path"),
            "category": category["name"],
            "model_version": active.version,
            "anomaly_detection": {
                "is_anomaly": decision == "NG",
                "decision": decision,
                "score": record["score"],
                "threshold": record["threshold"],
            },
            "similar_cases": similar,
            "generated_description": record["explanation"],
            "processing_time": record["processing_time_s"],
            "error": error,
            "inspected_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    frame = pd.DataFrame(records)
    counts = frame["decision"].value_counts().to_dict() if len(frame) else {}
    values = {f"n_{k.lower()}": float(v) for k, v in counts.items()} | {"n_images": float(len(frame))}
    metrics = {k: {"value": v, "step": 0} for k, v in values.items()}
    logger.info("[%s] inspected %d images with %s: %s.", category["name"], len(frame), active.version, counts)
    return frame, reports, metrics, frame
