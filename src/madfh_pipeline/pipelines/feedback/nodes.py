"""The feedback pipeline: a knowledge-base snapshot and the active model version in, a new model version out.

The DAG never loops: it reads a *snapshot* of the knowledge base (operators keep working while it runs), learns from
the labels (:mod:`madfh_pipeline.feedback.learning`), and writes a new inspection model version whose parent is the
version the labels were given on. Inspection then uses the new version (the newest, unless a version is pinned). The
report — before and after on held-out labels — goes to ``data/08_reporting/<category>/feedback/report.json`` (the
review app shows it), to MLflow, and the operators' descriptions go to the explainer's training set.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import pandas as pd
import torch

from madfh_pipeline import tracking
from madfh_pipeline.datasets.knowledge_base import InspectionModelStore
from madfh_pipeline.feedback.learning import FeedbackSettings, apply_feedback
from madfh_pipeline.imaging import read_image
from madfh_pipeline.models.base import stable_hash

logger = logging.getLogger(__name__)


def labelled_images(snapshot: Any, active: Any, feedback: dict[str, Any]) -> pd.DataFrame:
    """Every image with an operator label (any model version's inspection; labels belong to images), one row each.

    ``label`` 1 = defect (NG), 0 = good; ``decision`` is the active version's decision when it inspected the image
    (else the latest decision), so "confirmed false alarm" means flagged by the model that will be changed.
    """
    policy = str(feedback.get("conflict_policy", "majority"))
    scores = snapshot.labelled_scores(snapshot.category, None, policy=policy)
    if scores.empty:
        return pd.DataFrame(columns=["image_id", "image_path", "label", "decision"])
    frame = scores.copy()
    frame["label"] = frame["is_defect"].astype(int)
    frame = frame[frame["decision"] != "ERROR"]
    # the active version's own inspection of an image first, else the latest one
    frame["_active"] = frame["model_version"] == active.version
    frame = frame.sort_values(["_active", "inspected_at"], ascending=False).drop_duplicates("image_id", keep="first")
    columns = [c for c in ("image_id", "image_path", "label", "decision", "score", "model_version") if c in frame]
    return frame[columns].reset_index(drop=True)


def learn_from_feedback(
    labelled: pd.DataFrame,
    models: InspectionModelStore,
    active: Any,
    feedback: dict[str, Any],
    category: dict[str, Any],
    inspection: dict[str, Any],
) -> tuple[Any, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(new inspection model, its registration, the report, MLflow metrics)."""
    if labelled.empty:
        raise ValueError(
            f"No operator labels for '{category['name']}' yet: review some inspections in the app first "
            "(make ui), then run the feedback pipeline."
        )
    model = models.load(active.version)
    settings = FeedbackSettings.from_mapping({k: v for k, v in feedback.items() if k not in ("conflict_policy",)})

    def load(path: str) -> torch.Tensor:
        canvas = model.prepare(read_image(path))[0]
        tensor = torch.from_numpy(np.ascontiguousarray(canvas)).float().div(255.0)
        return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)

    detector = copy.deepcopy(model.detector)
    detector, report = apply_feedback(detector, labelled, load, settings)
    labels_digest = stable_hash(sorted(zip(labelled["image_id"], labelled["label"].astype(int), strict=True)))
    detector.provenance = dict(detector.provenance) | {
        "parent_version": active.version,
        "feedback_labels": len(labelled),
        "lineage": {"parent": active.version, "labels": labels_digest},
    }
    model.detector = detector
    model.version = f"{detector.name}@{detector.fingerprint[:12]}"
    report_dict = {
        "category": category["name"],
        "recall": settings.recall,
        "model_version_before": active.version,
        "model_version_after": model.version,
        "n_feedback": len(labelled),
    } | report.to_dict()
    registration = {
        "version": model.version,
        "mlflow_run_id": tracking.detector_run_id(category["name"], "feedback"),
        "detector": detector.name,
        "parent": active.version,
        "notes": f"feedback of {len(labelled)} operator labels",
        "metrics": {f"after_{k}": v for k, v in report.after.items() if isinstance(v, float) and np.isfinite(v)},
    }
    from madfh_pipeline.pipelines.inspection.nodes import register_mlflow_model

    mlflow_version = register_mlflow_model(model, category["name"], "feedback", inspection, "never")
    if mlflow_version is not None:
        registration["metrics"]["mlflow_registered_version"] = mlflow_version
    metrics: dict[str, Any] = {}
    for when in ("before", "after"):
        for key, value in getattr(report, when).items():
            if isinstance(value, float) and np.isfinite(value):
                metrics[f"{when}.{key}"] = value
    # what each step decided and the numbers it decided on, so runs compare in the MLflow UI (reasons: report.json)
    for step, numbers in report.steps.items():
        for key, value in numbers.items():
            if isinstance(value, bool | int | float) and np.isfinite(float(value)):
                metrics[f"step.{step}.{key}"] = float(value)
    logger.info(
        "[%s] feedback: new version %s (parent %s); held-out false-alarm rate at %.0f%% recall %s → %s.",
        category["name"],
        model.version,
        active.version,
        100 * settings.recall,
        report.before.get("false_alarm_rate"),
        report.after.get("false_alarm_rate"),
    )
    return model, registration, report_dict, metrics


def operator_descriptions(snapshot: Any) -> list[dict[str, Any]]:
    """Operators' free-text descriptions (with image path and confidence) for the explainer's training set."""
    feedback = snapshot.feedback
    if feedback.empty or "description" not in feedback:
        return []
    rows = feedback[feedback["description"].fillna("").str.strip() != ""]
    inspections = snapshot.inspections.set_index("id") if "id" in snapshot.inspections else None
    out = []
    for row in rows.to_dict("records"):
        path = None
        if inspections is not None and row.get("inspection_id") in inspections.index:
            path = inspections.at[row["inspection_id"], "image_path"]
        out.append(
            {
                "image": path,
                "description": row["description"],
                "confidence": row.get("confidence"),
                "user": row.get("operator"),
                "anomaly_type": row.get("defect_type"),
            }
        )
    return out
