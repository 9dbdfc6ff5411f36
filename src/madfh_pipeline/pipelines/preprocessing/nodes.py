"""Preprocessing: validate the raw MVTec AD 2 files, resize them, and build the split manifest.

One decode per image: validation that needs pixels (corrupt file, wrong size, bad mask) happens in the same worker
that resizes, because decoding a 5-megapixel PNG costs more than everything else together. Bad files are skipped and
named in the report; the run only fails when no usable image is left.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from madfh_pipeline.categories import LIGHTING_TOKENS, SPLITS, CategorySpec
from madfh_pipeline.datasets.image_store import ImageStore
from madfh_pipeline.imaging import GEOMETRY_COLUMNS
from madfh_pipeline.workers import process_image, process_pool

logger = logging.getLogger(__name__)

#: Columns that decide whether an earlier output can be reused for a source file.
_FINGERPRINT_COLUMNS = ("bytes", "mtime_ns", "mask_bytes", "mask_mtime_ns", "content_hash", "settings")


class NoUsableDataError(RuntimeError):
    """Every image of a category was skipped: nothing to train or evaluate on."""


def _settings(preprocessing: dict[str, Any], category: CategorySpec) -> dict[str, Any]:
    """Global preprocessing parameters with the category's overrides applied."""
    settings = dict(preprocessing) | dict(category.preprocessing)
    channels = settings.get("output_channels") or category.channels
    if channels not in (1, 3):
        raise ValueError(f"output_channels must be 1, 3 or null, got {channels!r}.")
    settings["output_channels"] = channels
    return settings


def validate_layout(raw_manifest: pd.DataFrame, category: dict[str, Any]) -> pd.DataFrame:
    """File-system checks that need no decoding: stray files, empty files, missing masks, unknown lighting.

    Returns the image rows with a ``problem`` column (empty when fine) plus one row per stray file, so the report can
    name every file that will not be used.
    """
    spec = CategorySpec(**category)
    if raw_manifest.empty or not (raw_manifest["role"] == "image").any():
        raise NoUsableDataError(
            f"No images found for category '{spec.name}' in the MVTec AD 2 layout (expected train/good/*.png, "
            "validation/good/*.png, test_public/{good,bad}/*.png ...). Check the raw data root."
        )
    frame = raw_manifest.copy()
    frame["problem"] = ""
    images = frame["role"] == "image"
    frame.loc[frame["role"] == "stray", "problem"] = "stray file: not part of the MVTec AD 2 layout"
    masks = frame[frame["role"] == "mask"]
    # The mask's own stat is part of its image's fingerprint, so a replaced mask re-processes the image.
    # Plain dicts, not Series.map: a NaN for image rows without a mask would push int64 nanoseconds through float64.
    mask_bytes = dict(zip(masks["relpath"], masks["bytes"], strict=True))
    mask_mtime = dict(zip(masks["relpath"], masks["mtime_ns"], strict=True))
    frame["mask_bytes"] = [int(mask_bytes.get(r, -1)) for r in frame["mask_relpath"]]
    frame["mask_mtime_ns"] = [int(mask_mtime.get(r, -1)) for r in frame["mask_relpath"]]
    used_masks = set(frame.loc[images & (frame["mask_relpath"] != ""), "mask_relpath"])
    orphan = frame.index.isin(masks.index[~masks["relpath"].isin(used_masks)])
    frame.loc[orphan, "problem"] = "mask without a matching image in test_public/bad"
    frame.loc[images & (frame["bytes"] == 0), "problem"] = "empty file (0 bytes)"
    missing_mask = images & (frame["label"] == "bad") & ~frame["mask_exists"] & (frame["problem"] == "")
    frame.loc[missing_mask, "problem"] = "missing ground-truth mask " + frame.loc[missing_mask, "mask_relpath"]
    unknown = images & (frame["split"] == "test_public") & ~frame["lighting"].isin(LIGHTING_TOKENS)
    for rel, token in frame.loc[unknown, ["relpath", "lighting"]].itertuples(index=False):
        logger.warning("'%s': lighting token '%s' is not one of %s; kept.", rel, token, ", ".join(LIGHTING_TOKENS))
    for rel, problem in frame.loc[frame["problem"] != "", ["relpath", "problem"]].itertuples(index=False):
        logger.warning("[%s] skipping '%s': %s", spec.name, rel, problem)
    # Masks that belong to an image travel with that image's row; only problem masks stay as rows of their own.
    keep = images | (frame["problem"] != "")
    return frame[keep].reset_index(drop=True)


def _content_hash(path: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _run_tasks(tasks: list[dict[str, Any]], workers: int, label: str) -> list[dict[str, Any]]:
    if not tasks:
        return []
    progress = tqdm(total=len(tasks), desc=label, unit="img", disable=None)
    results: list[dict[str, Any]] = []
    if workers <= 1:
        for task in tasks:
            results.append(process_image(task))
            progress.update()
    else:
        with process_pool(workers) as pool:
            for result in pool.map(process_image, tasks, chunksize=1):
                results.append(result)
                progress.update()
    progress.close()
    return results


def preprocess_images(
    checked: pd.DataFrame, preprocessing: dict[str, Any], category: dict[str, Any], store: ImageStore
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Resize every usable image (and mask) into the store, skipping those unchanged since the last run.

    Returns the per-image table (status ``processed`` / ``unchanged`` / ``skipped`` with the problem) and run
    statistics. Unchanged means same size, modification time (or content hash, if configured) and settings.
    """
    spec = CategorySpec(**category)
    settings = _settings(preprocessing, spec)
    splits = settings.get("splits") or list(SPLITS)
    fingerprint = repr(
        sorted((k, settings[k]) for k in ("target_width", "target_height", "mode", "output_channels", "check_size"))
    )
    frame = checked.copy()
    frame = frame[(frame["role"] != "image") | frame["split"].isin(splits)].reset_index(drop=True)
    frame["settings"] = fingerprint
    use_hash = settings.get("change_detection", "mtime") == "content_hash"
    candidates = (frame["role"] == "image") & (frame["problem"] == "")
    frame["content_hash"] = ""
    if use_hash:
        frame.loc[candidates, "content_hash"] = [_content_hash(p) for p in frame.loc[candidates, "path"]]

    previous = store.read_index() if settings.get("incremental", True) else pd.DataFrame()
    unchanged = pd.Series(False, index=frame.index)
    if not previous.empty and set(_FINGERPRINT_COLUMNS) <= set(previous.columns):
        # Known-bad files that did not change keep their problem without being decoded again.
        prev = previous[previous["status"].isin(["processed", "unchanged", "skipped"])].set_index("relpath")
        compared = [c for c in _FINGERPRINT_COLUMNS if c != "mtime_ns" or not use_hash]
        for idx in frame.index[candidates]:
            rel = frame.at[idx, "relpath"]
            if rel not in prev.index:
                continue
            old = prev.loc[rel]
            if any(str(old[c]) != str(frame.at[idx, c]) for c in compared):
                continue
            if old["status"] == "skipped":
                frame.at[idx, "problem"] = old["problem"]
                continue
            mask_rel = frame.at[idx, "mask_relpath"]
            if store.exists(rel) and (not mask_rel or store.exists(mask_rel)):
                unchanged[idx] = True
    candidates = candidates & (frame["problem"] == "")

    todo = frame.index[candidates & ~unchanged]
    tasks = [
        {
            "relpath": frame.at[i, "relpath"],
            "path": frame.at[i, "path"],
            "mask_relpath": frame.at[i, "mask_relpath"],
            "mask_path": frame.at[i, "mask_path"] if frame.at[i, "mask_exists"] else "",
            "width": spec.width,
            "height": spec.height,
            "check_size": bool(settings.get("check_size", True)),
            "target_width": int(settings["target_width"]),
            "target_height": int(settings["target_height"]),
            "mode": settings["mode"],
            "channels": int(settings["output_channels"]),
            "store_root": str(store.root),
            "compression": store.compression,
        }
        for i in todo
    ]
    workers = int(settings.get("workers") or os.cpu_count() or 1)
    workers = max(1, min(workers, len(tasks)))
    logger.info(
        "[%s] %d images to process, %d unchanged since the last run (skipped), %d with problems; %d worker(s).",
        spec.name,
        len(tasks),
        int(unchanged.sum()),
        int((frame["problem"] != "").sum()),
        workers,
    )
    start = time.perf_counter()
    results = _run_tasks(tasks, workers, f"preprocess {spec.name}")
    seconds = time.perf_counter() - start

    frame["status"] = np.where(frame["problem"] != "", "skipped", "")
    frame.loc[unchanged[unchanged].index, "status"] = "unchanged"
    if not previous.empty and unchanged.any():
        carried = [c for c in previous.columns if c not in frame.columns]
        prev_rows = previous.set_index("relpath")
        for col in carried:
            frame.loc[unchanged, col] = frame.loc[unchanged, "relpath"].map(prev_rows[col])
    if results:
        res = pd.DataFrame(results).set_index("relpath")
        for col in res.columns:
            frame.loc[todo, col] = frame.loc[todo, "relpath"].map(res[col]).to_numpy()
    processed = int((frame["status"] == "processed").sum())
    stats = {
        "category": spec.name,
        "n_files": len(frame),
        "n_processed": processed,
        "n_unchanged": int((frame["status"] == "unchanged").sum()),
        "n_skipped": int((frame["status"] == "skipped").sum()),
        "seconds": round(seconds, 3),
        "images_per_s": round(processed / seconds, 3) if processed and seconds > 0 else 0.0,
        "workers": workers,
        "settings": {k: settings[k] for k in ("target_width", "target_height", "mode", "output_channels")},
    }
    logger.info(
        "[%s] processed %d images in %.1f s (%.2f images/s), %d unchanged and skipped, %d skipped for problems.",
        spec.name,
        processed,
        seconds,
        stats["images_per_s"],
        stats["n_unchanged"],
        stats["n_skipped"],
    )
    store.write_index(frame[frame["role"] == "image"].reset_index(drop=True))
    return frame, stats


def build_validation_report(
    processed: pd.DataFrame, stats: dict[str, Any], category: dict[str, Any]
) -> tuple[dict[str, Any], str, dict[str, dict[str, float]]]:
    """The validation report as JSON, as readable Markdown, and as MLflow metrics.

    Every file that is not used is named with the reason; counts are per split and label so a user sees at a
    glance whether e.g. all defective test images survived.
    """
    spec = CategorySpec(**category)
    images = processed[processed["role"] == "image"]
    usable = images[images["status"].isin(["processed", "unchanged"])]
    skipped = processed[processed["status"] == "skipped"].sort_values("relpath")
    counts: dict[str, dict[str, int]] = {}
    for (split, label), group in images.groupby(["split", "label"], sort=False):
        ok = group["status"].isin(["processed", "unchanged"])
        counts[f"{split}/{label}"] = {"found": len(group), "usable": int(ok.sum()), "skipped": int((~ok).sum())}
    report = {
        "category": spec.name,
        "n_images_found": len(images),
        "n_usable": len(usable),
        "n_skipped": len(skipped),
        "counts": counts,
        "skipped": [{"file": r, "problem": p} for r, p in skipped[["relpath", "problem"]].itertuples(index=False)],
        "stats": stats,
    }
    lines = [
        f"# Validation report: {spec.name}",
        "",
        f"{len(images)} images found, {len(usable)} usable, {len(skipped)} files skipped.",
        f"Processed {stats['n_processed']} ({stats['images_per_s']} images/s), {stats['n_unchanged']} unchanged.",
        "",
        "| split/label | found | usable | skipped |",
        "|---|---|---|---|",
        *[f"| {k} | {v['found']} | {v['usable']} | {v['skipped']} |" for k, v in counts.items()],
        "",
    ]
    if report["skipped"]:
        lines += ["## Skipped files", "", *[f"- `{s['file']}`: {s['problem']}" for s in report["skipped"]], ""]
    else:
        lines += ["No file was skipped.", ""]
    metrics = {
        "n_images": float(len(images)),
        "n_usable": float(len(usable)),
        "n_skipped": float(len(skipped)),
        "n_processed": float(stats["n_processed"]),
        "n_unchanged": float(stats["n_unchanged"]),
        "images_per_s": float(stats["images_per_s"]),
        "seconds": float(stats["seconds"]),
    }
    return report, "\n".join(lines), {k: {"value": v, "step": 0} for k, v in metrics.items()}


def build_manifest(processed: pd.DataFrame, report: dict[str, Any], splits: dict[str, Any]) -> pd.DataFrame:
    """The manifest of usable processed images with the final split of each.

    Keeps the official splits; optionally moves a seeded random part of train/good into validation (``extra_
    validation``: a fraction < 1 or a count), recording the official split in ``official_split``.
    """
    category = report["category"]
    manifest = processed[(processed["role"] == "image") & processed["status"].isin(["processed", "unchanged"])].copy()
    if manifest.empty:
        raise NoUsableDataError(
            f"No usable image is left for category '{category}': all {report['n_images_found']} were skipped. "
            f"See the validation report in data/08_reporting/ ({report['n_skipped']} problems named there)."
        )
    if report["n_skipped"]:
        logger.warning("[%s] %d file(s) skipped; the validation report names each.", category, report["n_skipped"])
    manifest["official_split"] = manifest["split"]
    extra = splits.get("extra_validation", 0) or 0
    train_idx = manifest.index[manifest["split"] == "train"]
    n_extra = int(round(extra * len(train_idx))) if 0 < extra < 1 else int(extra)
    if n_extra >= len(train_idx) and n_extra > 0:
        raise ValueError(f"extra_validation={extra} would move all {len(train_idx)} train images of '{category}'.")
    if n_extra > 0:
        rng = np.random.default_rng(int(splits.get("seed", 0)))
        moved = rng.choice(train_idx.to_numpy(), size=n_extra, replace=False)
        manifest.loc[moved, "split"] = "validation"
        logger.info("[%s] moved %d train images to validation (seed %s).", category, n_extra, splits.get("seed", 0))
    manifest["has_mask"] = manifest["mask_relpath"].astype(bool)
    columns = [
        "category",
        "relpath",
        "split",
        "official_split",
        "label",
        "lighting",
        "has_mask",
        "mask_relpath",
        "path",
        *GEOMETRY_COLUMNS,
    ]
    manifest = manifest[columns].reset_index(drop=True)
    for col in GEOMETRY_COLUMNS:
        manifest[col] = manifest[col].astype("float64" if col.startswith("scale") else "int64")
    return manifest
