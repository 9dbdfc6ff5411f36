"""Evaluation with the benchmark's own protocol, figures for MLflow, and the MVTec AD 2 submission export.

Metrics are computed on test_public good and bad together, overall and per lighting condition; thresholds are the
ones stored with the model (from validation/good only). Two resolutions (``evaluation.resolution``):

- ``native`` (default): each canvas map is brought back to the image's native size with the inverse of the
  preprocessing geometry (the submission export's transform), kept float32, and scored against the *original* mask —
  what the MVTec AD 2 server does. Pixel metrics stream image by image through a fine score grid, so memory does not
  grow with the test set; their exactness is stated and reported (see :mod:`madfh_pipeline.metrics`).
- ``canvas``: maps and the canvas masks (shrunk by nearest neighbour in preprocessing) at the model resolution, exact.
  A fast mode for development; its pixel metrics are logged as ``canvas.<metric>`` so they are never mistaken for
  benchmark numbers.

A defective image whose mask is missing or broken raises :class:`~madfh_pipeline.metrics.MaskError` naming the file:
it is never silently scored as good.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import PurePosixPath
from typing import Any

import cv2
import matplotlib
import numpy as np
import pandas as pd
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_curve

from madfh_pipeline import metrics as M  # noqa: E402
from madfh_pipeline.datasets.feature_store import FeatureStore  # noqa: E402
from madfh_pipeline.datasets.image_store import ImageStore  # noqa: E402
from madfh_pipeline.datasets.map_store import MapStore, MapWrites  # noqa: E402
from madfh_pipeline.imaging import GEOMETRY_COLUMNS, Geometry  # noqa: E402
from madfh_pipeline.models.base import AnomalyDetector, resolve_device  # noqa: E402
from madfh_pipeline.pipelines.detection.nodes import attach_features  # noqa: E402
from madfh_pipeline.pipelines.explainer.nodes import short_explanation  # noqa: E402
from madfh_pipeline.streaming import image_batches  # noqa: E402

logger = logging.getLogger(__name__)

PRIVATE_SPLITS = ("test_private", "test_private_mixed")
RESOLUTIONS = ("native", "canvas")
#: Headline metrics, in the order the run summary and the reports show them.
HEADLINE = ("image_auroc", "au_pro_005", "seg_f1")


def _image_fingerprints(store: ImageStore) -> dict[str, str]:
    index = store.read_index()
    return dict(zip(index["relpath"], index["fingerprint"], strict=True)) if "fingerprint" in index else {}


def score_images(
    model: AnomalyDetector,
    manifest: pd.DataFrame,
    store: ImageStore,
    evaluation: dict[str, Any],
    runtime: dict[str, Any],
    features: FeatureStore | None = None,
) -> MapWrites:
    """Plan the scoring of every image of the evaluated splits (and the private splits, for the export).

    The map store runs the model only on images whose map is missing or was made by another model or from another
    version of the image; each map's fingerprint is the model's fingerprint plus the image's.
    """
    splits = list(evaluation.get("splits", ["validation", "test_public"])) + list(PRIVATE_SPLITS)
    keys = manifest.loc[manifest["split"].isin(splits), "relpath"].tolist()
    images = _image_fingerprints(store)
    model_fp = model.fingerprint
    items = [(key, f"{model_fp}|{images.get(key, '')}") for key in keys]
    device = resolve_device(runtime.get("device", "auto"))
    batch_size = int(runtime.get("batch_size", 8))

    def compute(todo: list[str]) -> Iterator[tuple[str, float, np.ndarray]]:
        model.to(device)
        attach_features(model, features)
        for chunk, batch in image_batches(store, todo, batch_size):
            with torch.no_grad():
                out = model.predict(batch.to(device))
            yield from zip(chunk, out.scores.tolist(), out.maps, strict=True)

    return MapWrites(items=items, compute=compute, model=model.name, label=f"score {model.name}")


def collect_scores(
    maps: MapStore, manifest: pd.DataFrame, model: AnomalyDetector
) -> tuple[pd.DataFrame, dict[str, float]]:
    """One row per scored image (split, label, lighting, score, map key, decision) and the scoring speed."""
    scored = maps.scores()[["relpath", "score", "map_key"]]
    columns = ["relpath", "split", "label", "lighting", "has_mask", "mask_relpath", *GEOMETRY_COLUMNS]
    table = manifest[columns].merge(scored, on="relpath", how="inner", validate="one_to_one")
    threshold = model.thresholds.image
    table["predicted_anomalous"] = table["score"] >= threshold if threshold is not None else False
    last = maps.last_write()
    speed = {
        "inference_seconds": float(last.get("seconds", 0.0)),
        "inference_images_per_s": float(last.get("images_per_s", 0.0)),
        "n_scored": float(last.get("n_scored", 0)),
        "n_maps_reused": float(last.get("n_reused", 0)),
    }
    return table.reset_index(drop=True), speed


# --------------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------------


def _canvas_pairs(
    rows: pd.DataFrame, store: ImageStore, maps: MapStore
) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    """(mask, map, name) on the canvas, cropped to the image content (letterbox padding is not part of the image)."""
    for row in rows.itertuples(index=False):
        content = Geometry.from_row(row).content
        anomaly_map = maps.read_map(row.map_key)
        mask = _mask(row, store, anomaly_map.shape)
        yield mask[content], anomaly_map[content], row.relpath


def _native_pairs(rows: pd.DataFrame, raw: ImageStore, maps: MapStore) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    """(original mask, map at native size, name): the map goes back through the inverse preprocessing geometry."""
    for row in rows.itertuples(index=False):
        geometry = Geometry.from_row(row)
        native = geometry.invert(maps.read_map(row.map_key)).astype(np.float32, copy=False)
        yield _mask(row, raw, native.shape), native, row.relpath


def _mask(row: Any, store: ImageStore, shape: tuple[int, ...]) -> np.ndarray:
    if row.label != "bad":
        return np.zeros(shape, dtype=bool)
    if not row.has_mask:
        raise M.MaskError(f"Defective image '{row.relpath}' has no ground-truth mask: it cannot be scored.")
    path = store.path(row.mask_relpath)
    if not path.is_file():
        raise M.MaskError(f"Ground-truth mask '{path}' of '{row.relpath}' is missing.")
    return M.validate_mask(store.read(row.mask_relpath, channels=1), shape, str(path))


def _canvas_pixel_metrics(
    pairs: Iterator[tuple[np.ndarray, np.ndarray, str]], pixel_threshold: float | None
) -> dict[str, float]:
    """Exact metrics on the canvas (every pixel gathered and sorted): the fast mode, fine at model resolution."""
    masks, maps_, names = [], [], []
    for mask, amap, name in pairs:
        masks.append(mask)
        maps_.append(amap)
        names.append(name)
    out = {"pixel_auroc": M.pixel_auroc(masks, maps_, names=names)}
    pro = M.au_pro_at_limits(masks, maps_, fpr_limits=(0.05, 0.3), names=names)
    out |= {"au_pro_005": pro[0.05], "au_pro_03": pro[0.3]}
    if pixel_threshold is not None:
        prf = M.seg_prf(masks, maps_, pixel_threshold, names=names)
        out |= {"seg_f1": prf.f1, "seg_precision": prf.precision, "seg_recall": prf.recall}
    return out


#: A pass over the native maps is repeated on a refined grid when an error bound exceeds this.
NATIVE_TOLERANCE = 1e-3


def _native_pixel_metrics(
    test: pd.DataFrame,
    groups: dict[str, str | None],
    raw: ImageStore,
    maps: MapStore,
    pixel_threshold: float | None,
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Pixel metrics at native resolution for "all" and each lighting group, in one streaming pass per grid.

    Memory stays at one native image plus fixed-size histograms (see :class:`madfh_pipeline.metrics.
    StreamingPixelMetrics`), however large the test set. The score grid comes from a sample of the canvas maps
    (native maps are interpolated from them, so their values stay inside that range). Every metric is reported with
    its guaranteed error bound (``<metric>_bound``); a bound above :data:`NATIVE_TOLERANCE` triggers a second pass on a
    refined grid.
    """
    thresholds = [float(pixel_threshold)] if pixel_threshold is not None else []
    sampler = M.ScoreSampler()
    for row in test.itertuples(index=False):
        sampler.add(maps.read_map(row.map_key)[Geometry.from_row(row).content])
    grid: Any = M.score_grid(sampler, thresholds=thresholds)
    passes = 0
    while True:
        passes += 1
        parts: dict[str | None, M.StreamingPixelMetrics] = {}
        for mask, amap, name in _native_pairs(test, raw, maps):
            group = groups[name]
            if group not in parts:
                parts[group] = M.StreamingPixelMetrics(grid, thresholds, fpr_limits=(0.05, 0.3))
            parts[group].add(mask, amap, name=name)
        overall = M.StreamingPixelMetrics.merged(parts.values())
        refined = overall.refined_grid(NATIVE_TOLERANCE) if passes < 2 else None
        if refined is None:
            break
        logger.info("Native metrics: an error bound exceeded %g; second pass on a refined grid.", NATIVE_TOLERANCE)
        grid = refined
    results = {"all": overall.result(passes).as_metrics(pixel_threshold)}
    for group, acc in parts.items():
        if group is not None:
            results[group] = acc.result(passes).as_metrics(pixel_threshold)
    fprs, pros = overall.pro_curve()
    keep = fprs <= 0.3
    step = max(1, int(keep.sum()) // 2000)  # a readable curve for the report and the figure, not 26 k points
    curve = {"fpr": fprs[keep][::step].tolist(), "pro": pros[keep][::step].tolist(), "resolution": "native"}
    return results, {"pro_curve": curve, "grid_points": len(grid), "passes": passes}


def _image_metrics(rows: pd.DataFrame, model: AnomalyDetector) -> dict[str, float]:
    labels = (rows["label"] == "bad").astype(int).to_numpy()
    scores = rows["score"].to_numpy(dtype=np.float64)
    out: dict[str, float] = {"n_images": float(len(rows)), "n_bad": float(labels.sum())}
    both = 0 < labels.sum() < len(labels)  # a lighting group may hold one class only: undefined, not an error
    out["image_auroc"] = M.image_auroc(labels, scores) if both else math.nan
    out["image_aupr"] = M.image_aupr(labels, scores) if both else math.nan
    if model.thresholds.image is not None:
        prf = M.class_prf(labels, scores, model.thresholds.image)
        out |= {"class_f1": prf.f1, "image_recall": prf.recall}
        good = scores[labels == 0]
        out["image_false_alarm_rate"] = float((good >= model.thresholds.image).mean()) if good.size else math.nan
    return out


def _lighting_groups(test: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Per-lighting groups worth reporting: named ones, and only when there is more than one."""
    named = test[test["lighting"] != ""]
    groups = [(str(k), g) for k, g in named.groupby("lighting")]
    return groups if len(groups) > 1 else []


def compute_metrics(
    scores: pd.DataFrame,
    maps: MapStore,
    store: ImageStore,
    raw: ImageStore,
    model: AnomalyDetector,
    evaluation: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, float]]:
    """Benchmark metrics on test_public (overall and per lighting) and false-alarm rates on validation.

    Returns the report (for 08_reporting) and the MLflow metrics of the detector's run: ``image_auroc``,
    ``au_pro_005``, ``seg_f1``, ... for all of test_public, ``<metric>.<lighting>`` per lighting condition,
    ``val_false_alarm_rate``. In canvas mode pixel metrics are named ``canvas.<metric>``. NaN metrics (e.g. no defect
    in a lighting group) stay in the report as null and are left out of MLflow, which rejects them.
    """
    resolution = str(evaluation.get("resolution", "native"))
    if resolution not in RESOLUTIONS:
        raise ValueError(f"evaluation.resolution must be one of {RESOLUTIONS}, got {resolution!r}.")
    started = time.perf_counter()
    report: dict[str, Any] = {
        "model": model.name,
        "resolution": resolution,
        "thresholds": model.thresholds.to_dict(),
        "test_public": {},
        "validation": {},
    }
    test = scores[scores["split"] == "test_public"]
    if test.empty:
        logger.warning("No test_public images: only validation false-alarm rates are reported.")
    else:
        lighting = _lighting_groups(test)
        report["test_public"]["all"] = _image_metrics(test, model)
        for name, group in lighting:
            report["test_public"][name] = _image_metrics(group, model)
        pixel = model.thresholds.pixel
        if resolution == "canvas":
            report["test_public"]["all"] |= _canvas_pixel_metrics(_canvas_pairs(test, store, maps), pixel)
            for name, group in lighting:
                report["test_public"][name] |= _canvas_pixel_metrics(_canvas_pairs(group, store, maps), pixel)
        else:
            membership: dict[str, str | None] = dict.fromkeys(test["relpath"])
            for name, group in lighting:
                membership.update(dict.fromkeys(group["relpath"], name))
            pixel_results, extra = _native_pixel_metrics(test, membership, raw, maps, pixel)
            for name, values in pixel_results.items():
                report["test_public"][name] |= values
            report["pro_curve"] = extra.pop("pro_curve")
            report["native"] = extra
    val = scores[scores["split"] == "validation"]
    if not val.empty and model.thresholds.image is not None:
        report["validation"] = {
            "n_images": float(len(val)),
            "image_false_alarm_rate": float((val["score"] >= model.thresholds.image).mean()),
            "mean_score": float(val["score"].mean()),
        }
    flat = flat_metrics(report)
    report["seconds"] = time.perf_counter() - started
    overall = report["test_public"].get("all", {})
    logger.info(
        "%s on test_public (%s resolution): image AUROC %.3f, AU-PRO@0.05 %.3f, SegF1 %.3f (%.0f s).",
        model.name,
        resolution,
        overall.get("image_auroc", math.nan),
        overall.get("au_pro_005", math.nan),
        overall.get("seg_f1", math.nan),
        report["seconds"],
    )
    return _json_safe(report), flat


#: Pixel-level metrics: the ones whose value depends on the resolution they are computed at.
PIXEL_METRICS = (
    "pixel_auroc",
    "au_pro_005",
    "au_pro_03",
    "seg_f1",
    "seg_precision",
    "seg_recall",
    "au_pro_005_bound",
    "au_pro_03_bound",
    "pixel_auroc_bound",
)


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Short MLflow keys: ``<metric>`` for all of test_public, ``<metric>.<lighting>``, ``val_<metric>``."""
    canvas = report.get("resolution") == "canvas"
    flat: dict[str, float] = {}
    for group, values in report["test_public"].items():
        for key, value in values.items():
            name = f"canvas.{key}" if canvas and key in PIXEL_METRICS else key
            name = name if group == "all" else f"{name}.{group}"
            if isinstance(value, float) and math.isfinite(value):
                flat[name] = value
    for key, value in report.get("validation", {}).items():
        if isinstance(value, float) and math.isfinite(value):
            flat[f"val_{key}"] = value
    return flat


def _json_safe(value: Any) -> Any:
    """NaN (e.g. AUROC of a lighting group without defects) becomes null: strict JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------------------

#: Colours that stay apart for colour-blind readers (Okabe-Ito).
_COLOURS = {"validation good": "#0072B2", "test good": "#009E73", "test bad": "#D55E00"}
HEAT_CMAP = "inferno"


def _figure(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    """A figure outside pyplot: no global backend to set (so a notebook that imports this module keeps its inline
    plots), no figure registry to leak into over a long run, safe in a ThreadRunner."""
    squeeze = kwargs.pop("squeeze", True)
    fig = Figure(**kwargs)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def _title(model: AnomalyDetector, category: str, data_source: str, what: str) -> str:
    return f"{category} · {model.name} · {data_source} data\n{what}"


def pick_examples(test: pd.DataFrame, per_group: int, threshold: float | None) -> dict[str, pd.DataFrame]:
    """The heat-map grid's rows, chosen by the calibrated image threshold (not by rank).

    ``missed``: defective images scored below the threshold, lowest first; ``false alarm``: good images at or above
    it, highest first; ``detected``: defective images at or above it, highest first. A group may be empty (no miss at
    this threshold) and is then shown as such: an image above the threshold is never called a miss.
    """
    if threshold is None:
        raise ValueError("The heat-map grid needs the model's image threshold (calibrate the model first).")
    bad = test[test["label"] == "bad"]
    good = test[test["label"] == "good"]
    return {
        "missed": bad[bad["score"] < threshold].sort_values("score").head(per_group),
        "false alarm": good[good["score"] >= threshold].sort_values("score", ascending=False).head(per_group),
        "detected": bad[bad["score"] >= threshold].sort_values("score", ascending=False).head(per_group),
    }


def _overlay(image: np.ndarray, heat: np.ndarray, norm: Normalize) -> np.ndarray:
    rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image.copy()
    colour = (matplotlib.colormaps[HEAT_CMAP](norm(heat))[:, :, :3] * 255).astype(np.uint8)
    return cv2.addWeighted(rgb, 0.5, colour, 0.5, 0)


def _outline(canvas: np.ndarray, region: np.ndarray, colour: tuple[int, int, int], width: int) -> None:
    if region.any():
        contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, colour, width)


def plot_evaluation(
    scores: pd.DataFrame,
    maps: MapStore,
    store: ImageStore,
    model: AnomalyDetector,
    report: dict[str, Any],
    explanations: pd.DataFrame,
    evaluation: dict[str, Any],
    category: dict[str, Any],
    data_source: str,
) -> dict[str, Figure]:
    """ROC with the operating point, PRO curve with its AU-PRO, score distributions, and the heat-map grid.

    Every title names category, detector and data source; the grid's groups follow the calibrated threshold, and
    each flagged image shows its explanation under it.
    """
    name = str(category["name"])
    figures: dict[str, Figure] = {}
    test = scores[scores["split"] == "test_public"]
    val = scores[scores["split"] == "validation"]
    labels = (test["label"] == "bad").astype(int).to_numpy()
    overall = (report.get("test_public") or {}).get("all") or {}
    threshold = model.thresholds.image

    fig, ax = _figure(figsize=(5.5, 5.5))
    if 0 < labels.sum() < len(labels):
        fpr, tpr, _ = roc_curve(labels, test["score"].to_numpy())
        ax.plot(fpr, tpr, c="#0072B2", label=f"AUROC {M.image_auroc(labels, test['score'].to_numpy()):.3f}")
        if threshold is not None:
            predicted = test["score"].to_numpy() >= threshold
            op_fpr = float(predicted[labels == 0].mean())
            op_tpr = float(predicted[labels == 1].mean())
            ax.plot(
                [op_fpr],
                [op_tpr],
                "o",
                c="#D55E00",
                ms=9,
                label=f"image threshold {threshold:.4g}\n(FPR {op_fpr:.2f}, TPR {op_tpr:.2f})",
            )
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "needs good and bad test images", ha="center", va="center", transform=ax.transAxes)
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(xlabel="false positive rate (good images flagged)", ylabel="true positive rate (defects found)")
    ax.set_title(_title(model, name, data_source, "image ROC on test_public"), fontsize=10)
    figures["roc.png"] = fig

    fig, ax = _figure(figsize=(5.5, 5.5))
    curve = report.get("pro_curve")
    if curve is None and labels.sum():
        masks, maps_, names = [], [], []
        for mask, amap, n in _canvas_pairs(test, store, maps):
            masks.append(mask)
            maps_.append(amap)
            names.append(n)
        fprs, pros = M.pro_curve(masks, maps_, names=names)
        curve = {"fpr": fprs.tolist(), "pro": pros.tolist(), "resolution": "canvas"}
    if curve and len(curve["fpr"]):
        fprs, pros = np.asarray(curve["fpr"]), np.asarray(curve["pro"])
        keep = fprs <= 0.3
        label = f"PRO ({curve.get('resolution', report.get('resolution'))} resolution)"
        ax.plot(fprs[keep], pros[keep], c="#0072B2", label=label)
        ax.axvline(0.05, ls="--", c="#D55E00", label="FPR limit 0.05 (headline)")
        ax.fill_between(fprs[fprs <= 0.05], pros[fprs <= 0.05], alpha=0.2, color="#D55E00")
        text = f"AU-PRO@0.05 = {overall.get('au_pro_005', math.nan):.3f}\nAU-PRO@0.3 = {overall.get('au_pro_03', math.nan):.3f}"
        ax.text(0.97, 0.05, text, ha="right", va="bottom", transform=ax.transAxes, fontsize=10)
        ax.legend(loc="upper left")
        ax.set_xlim(0, 0.3)
        ax.set_ylim(0, 1)
    else:
        ax.text(0.5, 0.5, "no defect regions in test_public", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="false positive rate (defect-free pixels)", ylabel="per-region overlap")
    ax.set_title(_title(model, name, data_source, "PRO curve up to FPR 0.3"), fontsize=10)
    figures["pro_curve.png"] = fig

    fig, ax = _figure(figsize=(7, 4.5))
    bins = np.histogram_bin_edges(scores["score"].to_numpy(), bins=30)
    for label, subset in (
        ("validation good", val),
        ("test good", test[test["label"] == "good"]),
        ("test bad", test[test["label"] == "bad"]),
    ):
        if len(subset):
            ax.hist(
                subset["score"],
                bins=bins,
                histtype="step",
                linewidth=2,
                color=_COLOURS[label],
                label=f"{label} ({len(subset)})",
            )
    if threshold is not None:
        ax.axvline(threshold, c="k", ls="--", label=f"image threshold {threshold:.4g}")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="image score", ylabel="images")
    ax.set_title(_title(model, name, data_source, "image score distributions"), fontsize=10)
    ax.legend()
    figures["score_histogram.png"] = fig

    per_group = int(evaluation.get("examples_per_group", 3))
    if not test.empty and threshold is not None:
        texts = dict(zip(explanations["relpath"], explanations["grounded"], strict=True)) if len(explanations) else {}
        figures["heatmaps.png"] = _heatmap_grid(test, maps, store, model, per_group, name, data_source, texts)
    return figures


def _heatmap_grid(
    test: pd.DataFrame,
    maps: MapStore,
    store: ImageStore,
    model: AnomalyDetector,
    per_group: int,
    category: str,
    data_source: str,
    texts: dict[str, str] | None = None,
) -> Figure:
    threshold = float(model.thresholds.image)  # type: ignore[arg-type]
    pixel = model.thresholds.pixel
    groups = pick_examples(test, per_group, threshold)
    vmin = float(test["score"].min()) if pixel is None else 0.0
    vmax = 2 * pixel if pixel else float(test["score"].max())
    stats = model.thresholds.stats
    if pixel and "pixel_mean" in stats:  # from the normal mean to twice the threshold's distance above it
        vmin = float(stats["pixel_mean"])
        vmax = pixel + (pixel - vmin)
    norm = Normalize(vmin=vmin, vmax=vmax, clip=True)
    texts = texts or {}
    fig, axes = _figure(3, per_group, figsize=(4.4 * per_group + 1.6, 16.5), squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.87, top=0.91, bottom=0.05, hspace=0.55, wspace=0.08)
    for ax in axes.ravel():
        ax.axis("off")
    for row_index, (group, rows) in enumerate(groups.items()):
        title_prefix = {"missed": "MISSED", "false alarm": "FALSE ALARM", "detected": "DETECTED"}[group]
        if rows.empty:
            text = {
                "missed": "no defective image below\nthe image threshold",
                "false alarm": "no good image at or above\nthe image threshold",
                "detected": "no defective image at or above\nthe image threshold",
            }[group]
            axes[row_index, 0].text(
                0.5, 0.5, text, ha="center", va="center", fontsize=11, transform=axes[row_index, 0].transAxes
            )
            continue
        for col, row in enumerate(rows.itertuples(index=False)):
            image = store.read(row.relpath)
            heat = maps.read_map(row.map_key)
            canvas = _overlay(image, heat, norm)
            width = max(1, image.shape[0] // 256)
            if pixel is not None:
                _outline(canvas, heat >= pixel, (0, 255, 255), width)
            if row.label == "bad" and row.has_mask:
                _outline(canvas, store.read(row.mask_relpath, channels=1) > 0, (255, 255, 255), width)
            ax = axes[row_index, col]
            ax.imshow(canvas)
            relation = "≥" if row.score >= threshold else "<"
            ax.set_title(
                f"{title_prefix}: {PurePosixPath(row.relpath).name}\nscore {row.score:.4g} {relation} {threshold:.4g}",
                fontsize=9,
            )
            if row.relpath in texts:
                ax.text(
                    0.5,
                    -0.02,
                    short_explanation(texts[row.relpath]),
                    transform=ax.transAxes,
                    ha="center",
                    va="top",
                    fontsize=7.5,
                    wrap=True,
                )
    mappable = ScalarMappable(norm=norm, cmap=HEAT_CMAP)
    bar = fig.colorbar(mappable, cax=fig.add_axes((0.9, 0.3, 0.018, 0.4)))
    label = "anomaly score (pixel)"
    if pixel is not None:
        bar.ax.axhline(pixel, c="cyan", lw=3)
        label += f"\ncyan line: pixel threshold {pixel:.4g}"
    bar.set_label(label)
    fig.suptitle(
        f"{category} · {model.name} · {data_source} data: test_public at image threshold {threshold:.4g}\n"
        "white outline = ground truth, cyan outline = predicted region (map ≥ pixel threshold)",
        fontsize=11,
    )
    return fig


# --------------------------------------------------------------------------------------------------------------------
# Submission export
# --------------------------------------------------------------------------------------------------------------------


def _native_map(maps: MapStore, key: str, geometry: Geometry) -> np.ndarray:
    return geometry.invert(maps.read_map(key))


def _thresholded(maps: MapStore, key: str, geometry: Geometry, threshold: float) -> np.ndarray:
    # float64: numpy 2 would round a Python-float threshold to float32 and flip pixels that sit just below it
    return np.where(_native_map(maps, key, geometry).astype(np.float64) >= threshold, 255, 0).astype(np.uint8)


def export_submission(
    scores: pd.DataFrame, maps: MapStore, model: AnomalyDetector, category: dict[str, Any]
) -> tuple[dict[str, Callable[[], np.ndarray]], dict[str, Any]]:
    """Plan the benchmark's submission files for test_private / test_private_mixed, when the category has them.

    One single-channel float16 TIFF per image at the native resolution (the inverse of the preprocessing geometry)
    under ``anomaly_images/<category>/<split>/``, and the map binarised at the stored pixel threshold as a 0/255 PNG
    under ``anomaly_images_thresholded/``, with the original file stems. Files are rendered one at a time as the
    submission dataset writes them.
    """
    private = scores[scores["split"].isin(PRIVATE_SPLITS)]
    name = str(category["name"])
    files: dict[str, Callable[[], np.ndarray]] = {}
    summary: dict[str, Any] = {"model": model.name, "written": {}, "threshold": model.thresholds.pixel}
    if private.empty:
        logger.info("No test_private images: nothing to export for the benchmark server.")
        return files, summary
    for row in private.itertuples(index=False):
        geometry = Geometry.from_row(row)
        stem = PurePosixPath(row.relpath).stem
        files[f"anomaly_images/{name}/{row.split}/{stem}.tiff"] = partial(_native_map, maps, row.map_key, geometry)
        if model.thresholds.pixel is not None:
            files[f"anomaly_images_thresholded/{name}/{row.split}/{stem}.png"] = partial(
                _thresholded, maps, row.map_key, geometry, float(model.thresholds.pixel)
            )
        summary["written"][row.split] = summary["written"].get(row.split, 0) + 1
    logger.info("Exporting submission maps for %s: %s.", model.name, summary["written"])
    return files, summary
