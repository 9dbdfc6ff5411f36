"""Evaluation with the benchmark's own protocol, figures for MLflow, and the MVTec AD 2 submission export.

All metrics are computed on the model canvas (the preprocessed resolution), on test_public good and bad together,
overall and per lighting condition; thresholds are the ones stored with the model (from validation/good only). A
defective image whose mask is missing or broken raises :class:`~madfh_pipeline.metrics.MaskError` naming the file:
it is never silently scored as good.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

import cv2
import matplotlib

matplotlib.use("Agg")  # headless: figures only go to files and MLflow
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from madfh_pipeline import metrics as M  # noqa: E402
from madfh_pipeline.datasets.image_store import ImageStore  # noqa: E402
from madfh_pipeline.datasets.map_store import MapStore  # noqa: E402
from madfh_pipeline.imaging import GEOMETRY_COLUMNS, Geometry  # noqa: E402
from madfh_pipeline.models.base import AnomalyDetector, resolve_device  # noqa: E402
from madfh_pipeline.streaming import image_batches  # noqa: E402

logger = logging.getLogger(__name__)

PRIVATE_SPLITS = ("test_private", "test_private_mixed")


def map_key(relpath: str) -> str:
    return str(PurePosixPath("maps") / PurePosixPath(relpath).with_suffix(".npy"))


def score_images(
    model: AnomalyDetector,
    manifest: pd.DataFrame,
    store: ImageStore,
    maps: MapStore,
    evaluation: dict[str, Any],
    runtime: dict[str, Any],
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score every image of the evaluated splits, writing each anomaly map to the map store.

    Returns one row per image (split, label, lighting, score, map key) and the inference speed as metrics.
    """
    splits = list(evaluation.get("splits", ["validation", "test_public"])) + list(PRIVATE_SPLITS)
    rows = manifest[manifest["split"].isin(splits)]
    device = resolve_device(runtime.get("device", "auto"))
    model.to(device)
    scores: dict[str, float] = {}
    progress = tqdm(total=len(rows), desc=f"score {model.name}", unit="img", disable=None)
    start = time.perf_counter()
    for chunk, batch in image_batches(store, rows["relpath"].tolist(), int(runtime.get("batch_size", 8))):
        with torch.no_grad():
            out = model.predict(batch.to(device))
        for key, score, anomaly_map in zip(chunk, out.scores, out.maps, strict=True):
            scores[key] = float(score)
            maps.write_map(map_key(key), anomaly_map)
        progress.update(len(chunk))
    progress.close()
    seconds = time.perf_counter() - start
    table = rows[["relpath", "split", "label", "lighting", "has_mask", "mask_relpath", *GEOMETRY_COLUMNS]].copy()
    table["score"] = table["relpath"].map(scores)
    table["map_key"] = table["relpath"].map(map_key)
    table["predicted_anomalous"] = (
        table["score"] >= model.thresholds.image if model.thresholds.image is not None else False
    )
    speed = {
        "inference_seconds": {"value": seconds, "step": 0},
        "inference_images_per_s": {"value": len(rows) / seconds if seconds > 0 else 0.0, "step": 0},
    }
    logger.info(
        "Scored %d images with %s in %.1f s (%.2f images/s).",
        len(rows),
        model.name,
        seconds,
        len(rows) / max(seconds, 1e-9),
    )
    return table.reset_index(drop=True), speed


def _masks_and_maps(
    rows: pd.DataFrame, store: ImageStore, maps: MapStore
) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Ground truth and maps cropped to the image content (letterbox padding is not part of the image)."""
    masks, anomaly_maps, names = [], [], []
    for row in rows.itertuples(index=False):
        content = Geometry.from_row(row).content
        anomaly_map = maps.read_map(row.map_key)
        if row.label == "bad":
            if not row.has_mask:
                raise M.MaskError(f"Defective image '{row.relpath}' has no ground-truth mask: it cannot be scored.")
            path = store.path(row.mask_relpath)
            if not path.is_file():
                raise M.MaskError(f"Ground-truth mask '{path}' of '{row.relpath}' is missing.")
            mask = M.validate_mask(store.read(row.mask_relpath, channels=1), anomaly_map.shape, str(path))
        else:
            mask = np.zeros(anomaly_map.shape, dtype=bool)
        masks.append(mask[content])
        anomaly_maps.append(anomaly_map[content])
        names.append(row.relpath)
    return masks, anomaly_maps, names


def _metric_set(rows: pd.DataFrame, store: ImageStore, maps: MapStore, model: AnomalyDetector) -> dict[str, float]:
    labels = (rows["label"] == "bad").astype(int).to_numpy()
    scores = rows["score"].to_numpy(dtype=np.float64)
    out: dict[str, float] = {"n_images": float(len(rows)), "n_bad": float(labels.sum())}
    out["image_auroc"] = M.image_auroc(labels, scores)
    out["image_aupr"] = M.image_aupr(labels, scores)
    if model.thresholds.image is not None:
        out["class_f1"] = M.class_f1(labels, scores, model.thresholds.image)
    masks, anomaly_maps, names = _masks_and_maps(rows, store, maps)
    out["pixel_auroc"] = M.pixel_auroc(masks, anomaly_maps, names=names)
    pro = M.au_pro_at_limits(masks, anomaly_maps, fpr_limits=(0.05, 0.3), names=names)
    out["au_pro_005"] = pro[0.05]
    out["au_pro_03"] = pro[0.3]
    if model.thresholds.pixel is not None:
        prf = M.seg_prf(masks, anomaly_maps, model.thresholds.pixel, names=names)
        out |= {"seg_f1": prf.f1, "seg_precision": prf.precision, "seg_recall": prf.recall}
    return out


def compute_metrics(
    scores: pd.DataFrame, store: ImageStore, maps: MapStore, model: AnomalyDetector
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Benchmark metrics on test_public (overall and per lighting) and false-alarm rates on validation.

    Returns the report (for 08_reporting) and the same numbers as MLflow metrics. NaN metrics (e.g. no defect in a
    lighting group) are kept in the report and left out of MLflow, which rejects them.
    """
    report: dict[str, Any] = {
        "model": model.name,
        "thresholds": model.thresholds.to_dict(),
        "test_public": {},
        "validation": {},
    }
    test = scores[scores["split"] == "test_public"]
    if test.empty:
        logger.warning("No test_public images: only validation false-alarm rates are reported.")
    else:
        report["test_public"]["all"] = _metric_set(test, store, maps, model)
        for lighting, group in test.groupby("lighting"):
            report["test_public"][str(lighting)] = _metric_set(group, store, maps, model)
    val = scores[scores["split"] == "validation"]
    if not val.empty and model.thresholds.image is not None:
        report["validation"] = {
            "n_images": float(len(val)),
            "image_false_alarm_rate": float((val["score"] >= model.thresholds.image).mean()),
            "mean_score": float(val["score"].mean()),
        }
    flat: dict[str, Any] = {}
    for split in ("test_public", "validation"):
        section = report[split]
        items = (
            section.items()
            if split == "validation"
            else ((f"{g}.{k}", v) for g, m in section.items() for k, v in m.items())
        )
        for key, value in items:
            if isinstance(value, float) and math.isfinite(value):
                flat[f"{split}.{key}"] = {"value": value, "step": 0}
    overall = report["test_public"].get("all", {})
    report = _json_safe(report)
    logger.info(
        "%s on test_public: image AUROC %.3f, AU-PRO@0.05 %.3f, SegF1 %.3f.",
        model.name,
        overall.get("image_auroc", float("nan")),
        overall.get("au_pro_005", float("nan")),
        overall.get("seg_f1", float("nan")),
    )
    return report, flat


def _json_safe(value: Any) -> Any:
    """NaN (e.g. AUROC of a lighting group without defects) becomes null: strict JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _overlay(image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray | None, vmax: float) -> np.ndarray:
    rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image.copy()
    heat = np.clip(anomaly_map / max(vmax, 1e-12), 0, 1)
    colour = (plt.get_cmap("jet")(heat)[:, :, :3] * 255).astype(np.uint8)
    blended = cv2.addWeighted(rgb, 0.55, colour, 0.45, 0)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(blended, contours, -1, (255, 255, 255), max(1, image.shape[0] // 256))
    return blended


def _pick_examples(test: pd.DataFrame, per_group: int) -> Iterator[tuple[str, pd.Series]]:
    bad = test[test["label"] == "bad"].sort_values("score")
    good = test[test["label"] == "good"].sort_values("score", ascending=False)
    for _, row in bad.head(per_group).iterrows():
        yield "worst miss", row
    for _, row in good.head(per_group).iterrows():
        yield "false alarm", row
    for _, row in bad.tail(per_group).iloc[::-1].iterrows():
        yield "detected", row


def plot_evaluation(
    scores: pd.DataFrame, store: ImageStore, maps: MapStore, model: AnomalyDetector, evaluation: dict[str, Any]
) -> dict[str, Figure]:
    """ROC and PRO curves, score histograms of good vs bad, and a grid of heat-map overlays with GT contours.

    The grid shows the defective images scored lowest (worst misses), the good images scored highest (false alarms)
    and the best detections, so a reviewer sees failure modes first.
    """
    figures: dict[str, Figure] = {}
    test = scores[scores["split"] == "test_public"]
    val = scores[scores["split"] == "validation"]
    labels = (test["label"] == "bad").astype(int).to_numpy()

    fig, ax = plt.subplots(figsize=(5, 5))
    if 0 < labels.sum() < len(labels):
        fpr, tpr, _ = roc_curve(labels, test["score"].to_numpy())
        ax.plot(fpr, tpr, label=f"AUROC {M.image_auroc(labels, test['score'].to_numpy()):.3f}")
        ax.legend(loc="lower right")
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{model.name}: image ROC (test_public)")
    figures["roc.png"] = fig

    fig, ax = plt.subplots(figsize=(5, 5))
    if labels.sum():
        masks, anomaly_maps, names = _masks_and_maps(test, store, maps)
        fprs, pros = M.pro_curve(masks, anomaly_maps, names=names)
        keep = fprs <= 0.3
        ax.plot(fprs[keep], pros[keep])
        ax.axvline(0.05, ls=":", c="grey")
    ax.set(xlabel="false positive rate", ylabel="per-region overlap", title=f"{model.name}: PRO curve (FPR ≤ 0.3)")
    figures["pro_curve.png"] = fig

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(scores["score"].to_numpy(), bins=30)
    for name, subset in (
        ("validation good", val),
        ("test good", test[test["label"] == "good"]),
        ("test bad", test[test["label"] == "bad"]),
    ):
        if len(subset):
            ax.hist(subset["score"], bins=bins, alpha=0.5, label=name)
    if model.thresholds.image is not None:
        ax.axvline(model.thresholds.image, c="k", ls="--", label="image threshold")
    ax.set(xlabel="image score", ylabel="images", title=f"{model.name}: score distributions")
    ax.legend()
    figures["score_histogram.png"] = fig

    per_group = int(evaluation.get("examples_per_group", 3))
    examples = list(_pick_examples(test, per_group))
    if examples:
        vmax = model.thresholds.pixel * 2 if model.thresholds.pixel else float(test["score"].max())
        cols = per_group
        fig, axes = plt.subplots(3, cols, figsize=(4 * cols, 12), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        counters = {"worst miss": 0, "false alarm": 0, "detected": 0}
        row_of = {"worst miss": 0, "false alarm": 1, "detected": 2}
        for group, row in examples:
            image = store.read(row["relpath"])
            mask = (
                store.read(row["mask_relpath"], channels=1) > 0 if row["label"] == "bad" and row["has_mask"] else None
            )
            ax = axes[row_of[group], counters[group]]
            ax.imshow(_overlay(image, maps.read_map(row["map_key"]), mask, vmax))
            ax.set_title(f"{group}: {PurePosixPath(row['relpath']).name}\nscore {row['score']:.3g}", fontsize=9)
            counters[group] += 1
        fig.suptitle(f"{model.name}: heat maps (white = ground truth)")
        fig.tight_layout()
        figures["heatmaps.png"] = fig
    for figure in figures.values():
        plt.close(figure)
    return figures


def export_submission(
    scores: pd.DataFrame, manifest: pd.DataFrame, maps: MapStore, submission: MapStore, model: AnomalyDetector
) -> dict[str, Any]:
    """Write the benchmark's submission files for test_private / test_private_mixed, when the category has them.

    One single-channel float16 TIFF per image at the native resolution (the inverse of the preprocessing geometry)
    under ``anomaly_images/<category>/<split>/``, and the map binarised at the stored pixel threshold as a 0/255 PNG
    under ``anomaly_images_thresholded/``, with the original file stems.
    """
    private = scores[scores["split"].isin(PRIVATE_SPLITS)]
    summary: dict[str, Any] = {"model": model.name, "written": {}, "threshold": model.thresholds.pixel}
    if private.empty:
        logger.info("No test_private images: nothing to export for the benchmark server.")
        return summary
    facts = manifest.set_index("relpath")
    for row in tqdm(list(private.itertuples(index=False)), desc=f"export {model.name}", unit="img", disable=None):
        geometry = Geometry.from_row(row)
        native = geometry.invert(maps.read_map(row.map_key))
        category = facts.at[row.relpath, "category"]
        stem = PurePosixPath(row.relpath).stem
        submission.write_tiff(f"anomaly_images/{category}/{row.split}/{stem}.tiff", native)
        if model.thresholds.pixel is not None:
            binary = np.where(native >= model.thresholds.pixel, 255, 0).astype(np.uint8)
            submission.write_png(f"anomaly_images_thresholded/{category}/{row.split}/{stem}.png", binary)
        summary["written"][row.split] = summary["written"].get(row.split, 0) + 1
    logger.info("Exported submission maps for %s: %s under %s.", model.name, summary["written"], submission.root)
    return summary
