"""Preprocessing: validate the raw MVTec AD 2 files, resize them, and build the split manifest.

One decode per image: validation that needs pixels (corrupt file, wrong size, bad mask) happens in the same worker
that resizes, because decoding a 5-megapixel PNG costs more than everything else together. Bad files are skipped and
named in the report; the run only fails when no usable image is left.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import numpy as np
import pandas as pd

from madfh_pipeline.categories import LIGHTING_TOKENS, SPLITS, CategorySpec
from madfh_pipeline.datasets.image_store import ImageStore, ImageWrites
from madfh_pipeline.imaging import GEOMETRY_COLUMNS
from madfh_pipeline.workers import process_image

logger = logging.getLogger(__name__)


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
    name every file that will not be used. Lighting tokens outside MVTec AD 2's set (a user's own file names, or
    none at all) are summarised once per split, not once per file.
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
    _summarise_lighting(frame[images & (frame["split"] == "test_public")], spec.name)
    for rel, problem in frame.loc[frame["problem"] != "", ["relpath", "problem"]].itertuples(index=False):
        logger.warning("[%s] skipping '%s': %s", spec.name, rel, problem)
    # Masks that belong to an image travel with that image's row; only problem masks stay as rows of their own.
    keep = images | (frame["problem"] != "")
    return frame[keep].reset_index(drop=True)


def _summarise_lighting(test: pd.DataFrame, category: str) -> None:
    """One line per kind of lighting problem, however many files have it."""
    if test.empty:
        return
    untagged = test[test["lighting"] == ""]
    unknown = test[(test["lighting"] != "") & ~test["lighting"].isin(LIGHTING_TOKENS)]
    if len(untagged):
        logger.info(
            "[%s] %d of %d test_public images have no lighting token in their name (MVTec AD 2 names them "
            "NNN_<lighting>.png); they are evaluated together, without a per-lighting breakdown.",
            category,
            len(untagged),
            len(test),
        )
    if len(unknown):
        tokens = unknown["lighting"].value_counts()
        shown = ", ".join(f"'{t}' ({n})" for t, n in tokens.head(8).items())
        logger.warning(
            "[%s] %d test_public images carry lighting tokens outside %s: %s%s; each token is reported as its own "
            "group.",
            category,
            len(unknown),
            ", ".join(LIGHTING_TOKENS),
            shown,
            " ..." if len(tokens) > 8 else "",
        )


def _content_hash(path: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def preprocess_images(checked: pd.DataFrame, preprocessing: dict[str, Any], category: dict[str, Any]) -> ImageWrites:
    """Plan the resize of every usable image (and mask) into the category's image store.

    The plan holds one task per image with a fingerprint of what decides its output (source size and modification
    time, or content hash; the mask's; the settings); the image store runs only tasks whose fingerprint changed, in
    worker processes, and keeps the rest (see :class:`~madfh_pipeline.datasets.image_store.ImageWrites`).
    """
    spec = CategorySpec(**category)
    settings = _settings(preprocessing, spec)
    splits = settings.get("splits") or list(SPLITS)
    fingerprint = repr(
        sorted((k, settings[k]) for k in ("target_width", "target_height", "mode", "output_channels", "check_size"))
    )
    frame = checked[(checked["role"] == "image") & checked["split"].isin(splits) & (checked["problem"] == "")]
    use_hash = settings.get("change_detection", "mtime") == "content_hash"
    tasks = []
    for row in frame.itertuples(index=False):
        source = _content_hash(row.path) if use_hash else f"{row.bytes}:{row.mtime_ns}"
        mask = f"{row.mask_bytes}:{row.mask_mtime_ns}" if row.mask_exists else ""
        tasks.append(
            {
                "relpath": row.relpath,
                "fingerprint": f"{source}|{mask}|{fingerprint}",
                "outputs": [row.relpath] + ([row.mask_relpath] if row.mask_exists else []),
                "path": row.path,
                "mask_relpath": row.mask_relpath,
                "mask_path": row.mask_path if row.mask_exists else "",
                "width": spec.width,
                "height": spec.height,
                "check_size": bool(settings.get("check_size", True)),
                "target_width": int(settings["target_width"]),
                "target_height": int(settings["target_height"]),
                "mode": settings["mode"],
                "channels": int(settings["output_channels"]),
            }
        )
    return ImageWrites(
        tasks=tasks,
        worker=process_image,
        workers=int(settings.get("workers") or os.cpu_count() or 1),
        incremental=bool(settings.get("incremental", True)),
        label=f"preprocess {spec.name}",
    )


def summarize_preprocessing(
    store: ImageStore, checked: pd.DataFrame, preprocessing: dict[str, Any], category: dict[str, Any]
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """What preprocessing did, per file: the store's index joined with the layout checks, plus run statistics.

    Status ``processed`` (written now), ``unchanged`` (kept from an earlier run) or ``skipped`` (with the problem).
    """
    spec = CategorySpec(**category)
    settings = _settings(preprocessing, spec)
    splits = settings.get("splits") or list(SPLITS)
    index = store.read_index()
    frame = checked[(checked["role"] != "image") | checked["split"].isin(splits)].reset_index(drop=True)
    frame["status"] = np.where(frame["problem"] != "", "skipped", "")
    if not index.empty:
        results = index.drop(columns=[c for c in ("fingerprint", "outputs") if c in index.columns])
        results = results.rename(columns={"status": "_status", "problem": "_problem"})
        frame = frame.merge(results, on="relpath", how="left", validate="one_to_one")
        written = frame["_status"].notna() & (frame["problem"] == "")
        frame.loc[written, "status"] = frame.loc[written, "_status"]
        frame.loc[written, "problem"] = frame.loc[written, "_problem"].fillna("")
        frame = frame.drop(columns=["_status", "_problem"])
    lost = (frame["role"] == "image") & (frame["status"] == "")
    if lost.any():  # an image the plan covered must be in the index; say so rather than drop it quietly
        frame.loc[lost, ["status", "problem"]] = ["skipped", "not written by preprocessing (see the log)"]
    last = store.last_write()
    stats = {
        "category": spec.name,
        "n_files": len(frame),
        "n_processed": int((frame["status"] == "processed").sum()),
        "n_unchanged": int((frame["status"] == "unchanged").sum()),
        "n_skipped": int((frame["status"] == "skipped").sum()),
        "seconds": float(last.get("seconds", 0.0)),
        "images_per_s": float(last.get("images_per_s", 0.0)),
        "workers": int(last.get("workers", 0)),
        "settings": {k: settings[k] for k in ("target_width", "target_height", "mode", "output_channels")},
    }
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
