"""Explainer nodes: training pairs grounded in the masks, LoRA fine-tuning, and explanations of flagged images.

MVTec AD 2 has no defect-type labels, so targets are written by the grounded describer from the ground-truth masks
(where, how large, what shape, how many, darker or brighter); validation/good images teach "looks normal". Pairs are
split by physical part (all lighting variants of one part together), so the images that evaluate the explainer never
train it. Operators' descriptions from the knowledge base join through ``operator`` records (the hook the feedback
pipeline uses), always on the training side of the same split rule.

Whenever no language model is available the grounded describer *is* the explanation; the learned explainer is an
option that must be switched on and whose base model must be on the machine (the run stops at once otherwise).
"""

from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from madfh_pipeline.datasets.image_store import ImageStore
from madfh_pipeline.datasets.map_store import MapStore
from madfh_pipeline.imaging import Geometry, read_image
from madfh_pipeline.models.base import AnomalyDetector
from madfh_pipeline.progress import progress

logger = logging.getLogger(__name__)


def _canvas_view(
    row: Any, store: ImageStore, mask_key: str | None
) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float]]:
    """Image and mask on the model canvas, cropped to the image content, with native pixels per canvas pixel.

    Explanations are computed at canvas resolution (a 1024² view of a 2448×2048 image: region positions, shapes and
    contrast are the same, five times fewer pixels); sizes are still reported in native pixels through the scale.
    """
    geometry = Geometry.from_row(row)
    content = geometry.content
    image = store.read(row.relpath)[content]
    mask = store.read(mask_key, channels=1)[content] > 0 if mask_key else None
    return image, mask, (1.0 / geometry.scale_x, 1.0 / geometry.scale_y)


#: The split folders of the MVTec AD 2 layout: a path ending in ``<split>/<label>/<file>`` names a data set image.
_SPLIT_FOLDERS = frozenset({"train", "validation", "test_public", "test_private", "test_private_mixed"})


def _store_key(image: str, store: ImageStore) -> str:
    """The store-relative key (``test_public/bad/003_regular.png``) of an image an operator described.

    Inspection records hold the path the station read: a file in the processed store, or the raw image in the data
    set's layout. Grounded pairs are grouped by the store key, so an operator's description must be grouped by the same
    key; otherwise it lands on its own side of the split and the part it describes can both train and evaluate the
    explainer. Paths outside both (new images from a line) keep their own key: they are in no evaluation set.
    """
    path = Path(image)
    try:
        return path.resolve().relative_to(Path(store.root).resolve()).as_posix()
    except ValueError:
        pass
    parts = path.parts
    if len(parts) >= 3 and parts[-3] in _SPLIT_FOLDERS:
        return "/".join(parts[-3:])
    return image


def _pair_sources(manifest: pd.DataFrame) -> pd.DataFrame:
    return manifest[
        ((manifest["split"] == "test_public") & (manifest["label"] == "bad") & manifest["has_mask"])
        | ((manifest["split"] == "validation") & (manifest["label"] == "good"))
    ]


def build_explainer_pairs(
    manifest: pd.DataFrame,
    store: ImageStore,
    explainer: dict[str, Any],
    operator: list[dict[str, Any]] | None = None,
) -> tuple[list[Any], list[Any], dict[str, float]]:
    """(train pairs, eval pairs, counts): composites of native images with their grounded descriptions.

    ``operator``: knowledge-base records (``image``, ``description``, ``confidence``, ...) whose descriptions join the
    training set — the hook for operators' words (issue: feedback loop).
    """
    from madfh_pipeline.explain.dataset import (
        build_training_pair,
        check_disjoint,
        mvtec_group_key,
        operator_training_pairs,
        split_pairs,
    )
    from madfh_pipeline.explain.describer import describe

    composite = explainer.get("composite") or {}
    size = int((explainer.get("learned") or {}).get("input_size", 384))
    split = explainer.get("split") or {}
    pairs = []
    sources = list(_pair_sources(manifest).itertuples(index=False))
    for row in progress(sources, desc="explainer pairs", unit="img"):
        image, mask, scale = _canvas_view(row, store, row.mask_relpath if row.label == "bad" else None)
        text = describe(mask, image, native_scale=scale, settings=explainer.get("describer")).text
        pairs.append(
            build_training_pair(
                row.relpath, image, mask, text, size=size, group=mvtec_group_key(row.relpath), **composite
            )
        )
    train, evaluation = split_pairs(pairs, float(split.get("eval_fraction", 0.3)), str(split.get("salt", "explainer")))
    if operator:
        extra = operator_training_pairs(
            operator,
            read_image,
            size=size,
            group_key=lambda image: mvtec_group_key(_store_key(image, store)),
            **composite,
        )
        extra_train, extra_eval = split_pairs(
            extra, float(split.get("eval_fraction", 0.3)), str(split.get("salt", "explainer"))
        )
        train += extra_train
        logger.info(
            "Explainer: %d operator descriptions joined the training set (%d held out with their part's images).",
            len(extra_train),
            len(extra_eval),
        )
    check_disjoint(train, evaluation)
    counts = {"n_train_pairs": float(len(train)), "n_eval_pairs": float(len(evaluation)), "n_pairs": float(len(pairs))}
    return train, evaluation, counts


def train_explainer(
    train: Sequence[Any], evaluation: Sequence[Any], explainer: dict[str, Any]
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Fine-tune LoRA adapters on the train pairs; evaluate on pairs it never saw (loss and text metrics).

    Fails (never "succeeds") when a loss is not finite or the loss does not fall over the configured window.
    """
    from madfh_pipeline.explain.lora import LoraExplainer
    from madfh_pipeline.explain.text_metrics import score_explanations

    learned = explainer["learned"]
    model = LoraExplainer.from_base(
        learned["base_model"],
        model_class=learned["model_class"],
        processor_class=learned["processor_class"],
        local_files_only=bool(learned.get("local_files_only", True)),
        lora=learned.get("lora"),
        device=learned.get("training", {}).get("device", "auto"),
    )
    losses: list[float] = []
    report = model.fit(train, learned.get("training"), on_step=lambda step, loss: losses.append(float(loss)))
    metrics: dict[str, Any] = {"loss": losses, "train_steps": float(report.steps)}
    if evaluation:
        metrics["eval_loss"] = float(model.loss(evaluation))
        texts = model.explain([p.image for p in evaluation], learned.get("generation"))
        scored = score_explanations(texts, [p.text for p in evaluation], ids=[p.image_id for p in evaluation])
        metrics |= {f"eval_{k}": float(v) for k, v in scored.corpus.items() if isinstance(v, int | float)}
    params = {
        "detector": "explainer",
        "base_model": learned["base_model"],
        "model_class": learned["model_class"],
        "lora": learned.get("lora") or {},
        "training": learned.get("training") or {},
        "n_train_pairs": len(train),
        "n_eval_pairs": len(evaluation),
    }
    logger.info(
        "Explainer trained: %d steps, loss %.4f → %.4f; held-out loss %s.",
        report.steps,
        losses[0] if losses else math.nan,
        losses[-1] if losses else math.nan,
        f"{metrics.get('eval_loss', math.nan):.4f}",
    )
    return model, metrics, params


def explain_detections(
    scores: pd.DataFrame,
    maps: MapStore,
    store: ImageStore,
    model: AnomalyDetector,
    explainer: dict[str, Any],
    explainer_model: Any | None = None,
) -> tuple[pd.DataFrame, dict[str, float], str]:
    """A description for every test image the detector flags (score ≥ its image threshold), with text metrics.

    The grounded explanation describes the predicted region (the map at the pixel threshold, sizes in native
    pixels); with a learned explainer, its text for the same composite input is stored beside it. Where ground truth
    exists, both are scored against the grounded description of the true mask (BLEU, ROUGE-L, location and size
    agreement).
    """
    from madfh_pipeline.explain.dataset import compose_input
    from madfh_pipeline.explain.describer import describe
    from madfh_pipeline.explain.text_metrics import score_explanations

    threshold, pixel = model.thresholds.image, model.thresholds.pixel
    splits = explainer.get("splits") or ["test_public"]
    rows = scores[scores["split"].isin(splits)]
    flagged = rows[rows["score"] >= threshold] if threshold is not None else rows.iloc[:0]
    size = int((explainer.get("learned") or {}).get("input_size", 384))
    composite = explainer.get("composite") or {}
    settings = explainer.get("describer")
    records, composites = [], []
    for row in progress(list(flagged.itertuples(index=False)), desc=f"explain {model.name}", unit="img"):
        truth = row.mask_relpath if row.label == "bad" and row.has_mask else None
        image, true_mask, scale = _canvas_view(row, store, truth)
        heat = maps.read_map(row.map_key)[Geometry.from_row(row).content]
        predicted = heat >= pixel if pixel is not None else np.zeros(heat.shape, bool)
        grounded = describe(
            predicted, image, native_scale=scale, score=float(row.score), threshold=float(threshold), settings=settings
        )
        reference = ""
        if truth is not None:
            reference = describe(true_mask, image, native_scale=scale, settings=settings).text
        elif row.label == "good":
            reference = describe(None, image, native_scale=scale, settings=settings).text
        records.append(
            {
                "relpath": row.relpath,
                "split": row.split,
                "label": row.label,
                "lighting": row.lighting,
                "score": float(row.score),
                "threshold": float(threshold),
                "grounded": grounded.text,
                "reference": reference,
            }
        )
        if explainer_model is not None:
            composites.append(compose_input(image, predicted, size, **composite))
    table = pd.DataFrame(
        records, columns=["relpath", "split", "label", "lighting", "score", "threshold", "grounded", "reference"]
    )
    if explainer_model is not None:
        table["learned"] = explainer_model.explain(composites, (explainer.get("learned") or {}).get("generation"))
    metrics: dict[str, float] = {"explain.n_flagged": float(len(table))}
    scored = table[table["reference"] != ""]
    if len(scored):
        for column in ("grounded", "learned"):
            if column in table:
                result = score_explanations(scored[column].tolist(), scored["reference"].tolist())
                metrics |= {
                    f"explain.{column}.{k}": float(v) for k, v in result.corpus.items() if isinstance(v, int | float)
                }
    logger.info("%s: %d flagged test images explained.", model.name, len(table))
    return table, metrics, explanation_report(table, model)


def explanation_report(table: pd.DataFrame, model: AnomalyDetector) -> str:
    """Markdown next to the metrics: every flagged image, its score against the threshold, and the explanation(s)."""
    lines = [
        f"# Explanations: {model.name}",
        "",
        f"{len(table)} test images at or above the image threshold"
        + (f" {model.thresholds.image:.4g}." if model.thresholds.image is not None else "."),
        "",
        "| image | label | score | explanation (grounded) |" + (" learned |" if "learned" in table else ""),
        "|---|---|---|---|" + ("---|" if "learned" in table else ""),
    ]
    for row in table.itertuples(index=False):
        learned = f" {row.learned} |" if "learned" in table else ""
        lines.append(f"| `{row.relpath}` | {row.label} | {row.score:.4g} | {row.grounded} |{learned}")
    return "\n".join(lines) + "\n"


def short_explanation(text: str, width: int = 48, lines: int = 3) -> str:
    """The first lines of an explanation, wrapped for a figure panel."""
    wrapped = textwrap.wrap(text, width)
    return "\n".join(wrapped[:lines]) + (" …" if len(wrapped) > lines else "")
