"""BSData (real ball-screw-drive pitting, pixel-labelled) in the MVTec AD 2 layout, and PatchCore measured on it.

Why this benchmark: MVTec AD 2 cannot be downloaded on our machines, the demo data are generated and ELPV has image
labels only. BSData (Schlagenhauf & Landwehr, CC BY-SA 4.0) has real surface defects with pixel masks, so it is
where localisation (pixel AUROC, AU-PRO) can be measured on real images and compared with anomalib's numbers.

Subcommands (``pipeline``, which runs ``kedro run`` on the converted category, is to follow):

``convert``
    Writes the 1130×460 RGB crops (``type == 2``, ``*_crop_2.jpg``) of a local BSData copy as category ``bsdata`` in
    the MVTec AD 2 layout (DESIGN.md §3): the 167 crops with pitting polygons go to ``test_public/bad`` with filled
    0/255 masks at native size; as *good* only the unlabelled crops taken before the first labelled pitting at the
    same spindle position (670: later images at a pitted position may show pitting nobody drew), split with a seed
    into train 500 / validation 50 / test_public 120. Counts are checked; a mapping file (original → new name) stays
    in the category folder; a second run with the same seed does nothing.
``direct``
    Resizes the converted images to a canvas with the project's geometry (``Geometry.plan(...).apply``: INTER_AREA
    for images, nearest for masks), fits PatchCore from the project on train/good, scores validation and
    test_public and computes with ``madfh_pipeline.metrics`` image AUROC, pixel AUROC, AU-PRO@0.3, AU-PRO@0.05 and
    SegF1 at mean + kσ of the validation pixel scores, on the canvas (named fast mode; ``--native-metrics`` adds the
    same metrics on maps resized back to 1130×460 against the original masks). Config variants (``--variant``,
    ``--sweep``) are scored on two seeded halves of test_public, stratified by label: a variant is *chosen* on the
    selection half and *reported* on the other, so the choice does not flatter the number. Works on any category in
    the layout (``--root``, ``--category``), e.g. a generated demo category at 1024².

    .venv/bin/python bench/bsdata.py convert --source /path/to/BSData          # or BSDATA_DIR=/path/to/BSData
    .venv/bin/python bench/bsdata.py direct                                   # default PatchCore, 256² stretched
    .venv/bin/python bench/bsdata.py direct --sweep                           # + the variant study (SWEEP)
    .venv/bin/python bench/bsdata.py direct --canvas 640x256                  # nearly native aspect (2.46:1)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from common import (  # bench/common.py (the script directory is on sys.path)
    PATCHCORE_SWEEP,
    ROOT,
    BackboneCache,
    fit_key,
    git_revision,
    parse_variant,
)

logger = logging.getLogger("bench.bsdata")

CATEGORY = "bsdata"
DEFAULT_SOURCE = Path("/work/data_ext/BSData")
DEFAULT_DEST = ROOT / "data" / "01_raw" / "bsdata_mvtec"
MAPPING_FILE = "bsdata_conversion.json"
MAPPING_FORMAT = "bsdata_mvtec_ad2/1"
NATIVE_SIZE = (1130, 460)  # width, height of the type-2 crops
EXPECTED = {"bad": 167, "good": 670}
SPLIT_SIZES = {"train": 500, "validation": 50, "test_public": 120}
HOW_TO_GET = (
    "Get BSData (CC BY-SA 4.0, ~120 MiB) with `git clone https://github.com/2Obe/BSData <dir>`, or with the search "
    "tool's `fetch github:2Obe/BSData` followed by `git -C <mirror> archive HEAD | tar -x -C <dir>`; then pass "
    "--source <dir> or set BSDATA_DIR=<dir>."
)

#: anomalib 2.7 on this split (DESIGN.md §3): 256×256 stretched, EfficientNet-Lite0 ImageNet weights, raw scores,
#: test_public 120 good + 167 bad.
ANOMALIB_REFERENCE: dict[str, dict[str, float]] = {
    "padim": {"image_auroc": 0.941, "pixel_auroc": 0.979, "au_pro_0.3": 0.681, "au_pro_0.05": 0.536},
    "patchcore_1pct": {"image_auroc": 0.940, "pixel_auroc": 0.982, "au_pro_0.3": 0.716, "au_pro_0.05": 0.540},
}
REFERENCE_BEST = {key: max(ref[key] for ref in ANOMALIB_REFERENCE.values()) for key in ANOMALIB_REFERENCE["padim"]}


class ConversionError(RuntimeError):
    """The source does not give the documented BSData subset (wrong copy, changed upstream data)."""


# --------------------------------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------------------------------


def resolve_source(source: Path | None) -> Path:
    """``--source``, else ``$BSDATA_DIR``, else the shared extract; one error saying how to get it when missing."""
    path = source or Path(os.environ.get("BSDATA_DIR") or DEFAULT_SOURCE)
    missing = [name for name in ("image_data.json", "data", "label") if not (path / name).exists()]
    if missing:
        raise SystemExit(f"No BSData copy at '{path}' (missing: {', '.join(missing)}). {HOW_TO_GET}")
    return path


def _position(name: str) -> str:
    """Spindle position of a crop: the 3rd and 4th ``_`` fields (``01_<time>_<pos>_<angle>_crop_2.jpg``)."""
    fields = name.split("_")
    return f"{fields[2]}_{fields[3]}"


def _time(name: str) -> str:
    """Capture time ``yymmddhhmmss`` (2nd field); fixed width, so string order is time order."""
    return name.split("_")[1]


def select_crops(source: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The labelled pitting crops (with their polygons) and the good crops, by the rules of DESIGN.md §3.

    Good = unlabelled and taken strictly before the first labelled pitting at the same position: the README does not
    promise that unlabelled images are defect-free, and pitting grows, so a later image at a pitted position may show
    pitting nobody drew. Raises :class:`ConversionError` when the counts differ from the documented 167 / 670.
    """
    entries = json.loads((source / "image_data.json").read_text())["images"]
    crops = [e for e in entries if e["type"] == 2 and e["filename"].endswith("_crop_2.jpg")]
    bad: list[dict[str, Any]] = []
    for entry in sorted((e for e in crops if e["annotations"]), key=lambda e: e["filename"]):
        label = json.loads((source / "label" / entry["annotations"]).read_text())
        polygons = [s["points"] for s in label["shapes"] if s["label"] == "Pitting" and s["shape_type"] == "polygon"]
        if not polygons:
            raise ConversionError(f"{entry['annotations']}: labelled crop without a pitting polygon.")
        size = (int(label["imageWidth"]), int(label["imageHeight"]))
        if size != NATIVE_SIZE:
            raise ConversionError(f"{entry['annotations']}: labelled size {size}, expected {NATIVE_SIZE}.")
        bad.append({"filename": entry["filename"], "label_file": entry["annotations"], "polygons": polygons})
    first_pitting: dict[str, str] = {}
    for entry in bad:
        position, taken = _position(entry["filename"]), _time(entry["filename"])
        first_pitting[position] = min(first_pitting.get(position, taken), taken)
    good = sorted(
        e["filename"]
        for e in crops
        if not e["annotations"] and _time(e["filename"]) < first_pitting.get(_position(e["filename"]), "9" * 12)
    )
    counts = {"bad": len(bad), "good": len(good)}
    logger.info(
        "BSData crops: %d type-2 crops, %d with pitting polygons, %d good (unlabelled, before the first pitting at "
        "their position; %d positions with pitting)",
        len(crops),
        counts["bad"],
        counts["good"],
        len(first_pitting),
    )
    if counts != EXPECTED:
        raise ConversionError(f"Expected {EXPECTED} crops, found {counts} in '{source}': is this the 2Obe/BSData copy?")
    return bad, good


def polygon_mask(polygons: Sequence[Sequence[Sequence[float]]], width: int, height: int) -> np.ndarray:
    """Filled 0/255 mask, drawn like labelme's own ``shape_to_mask`` (PIL polygon with outline, float vertices)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for points in polygons:
        draw.polygon([(float(x), float(y)) for x, y in points], outline=255, fill=255)
    return np.asarray(canvas, dtype=np.uint8)


def plan_conversion(bad: list[dict[str, Any]], good: list[str], seed: int) -> list[dict[str, Any]]:
    """Target path of every crop: good ones split by a seeded permutation, bad ones numbered in name (= time) order."""
    rng = np.random.default_rng(seed)
    order = [good[i] for i in rng.permutation(len(good))]
    plan: list[dict[str, Any]] = []
    start = 0
    for split, size in SPLIT_SIZES.items():
        folder = f"{split}/good"
        plan += [
            {"source": name, "target": f"{folder}/{i:03d}_regular.png"}
            for i, name in enumerate(order[start : start + size])
        ]
        start += size
    plan += [
        {
            "source": entry["filename"],
            "target": f"test_public/bad/{i:03d}_regular.png",
            "mask": f"test_public/ground_truth/bad/{i:03d}_regular_mask.png",
            "label_file": entry["label_file"],
            "polygons": entry["polygons"],
        }
        for i, entry in enumerate(bad)
    ]
    return plan


def _conversion_done(category_dir: Path, seed: int) -> bool:
    """True when ``category_dir`` holds a complete conversion with ``seed``; an error when it holds something else."""
    mapping = category_dir / MAPPING_FILE
    if not category_dir.exists():
        return False
    if not mapping.is_file():
        raise SystemExit(
            f"'{category_dir}' exists but was not written by this script (no {MAPPING_FILE}); move it away or choose "
            "another --dest."
        )
    info = json.loads(mapping.read_text())
    if info.get("format") != MAPPING_FORMAT or info.get("seed") != seed:
        raise SystemExit(
            f"'{category_dir}' holds a conversion with seed {info.get('seed')} (format {info.get('format')}); run "
            f"with --force to replace it by seed {seed}, or choose another --dest."
        )
    absent = [f["target"] for f in info["files"] if not (category_dir / f["target"]).is_file()]
    absent += [f["mask"] for f in info["files"] if f.get("mask") and not (category_dir / f["mask"]).is_file()]
    if absent:
        raise SystemExit(
            f"'{category_dir}' is incomplete ({len(absent)} files missing, e.g. {absent[0]}); use --force."
        )
    return True


def convert(source: Path, dest: Path, seed: int, force: bool = False) -> Path:
    """Write the category and its mapping file; returns the category folder. Idempotent for the same seed.

    Files are written into a sibling temporary folder that is renamed at the end, so an interrupted run never leaves
    a half-converted category that a later run (or the pipeline) would take for complete.
    """
    from madfh_pipeline.imaging import read_image, write_png

    category_dir = dest / CATEGORY
    if force and category_dir.exists() and (category_dir / MAPPING_FILE).is_file():
        logger.info("--force: removing the earlier conversion in %s", category_dir)
        shutil.rmtree(category_dir)
    if _conversion_done(category_dir, seed):
        logger.info("'%s' already holds the conversion with seed %d: nothing to do.", category_dir, seed)
        return category_dir

    bad, good = select_crops(source)
    plan = plan_conversion(bad, good, seed)
    staging = dest / f".{CATEGORY}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    started = time.perf_counter()
    for item in plan:
        image = read_image(source / "data" / item["source"], channels=3)
        if (image.shape[1], image.shape[0]) != NATIVE_SIZE:
            raise ConversionError(f"{item['source']}: size {image.shape[1]}×{image.shape[0]}, expected {NATIVE_SIZE}.")
        target = staging / item["target"]
        target.parent.mkdir(parents=True, exist_ok=True)
        write_png(target, image)
        if "mask" in item:
            mask = polygon_mask(item.pop("polygons"), *NATIVE_SIZE)
            item["mask_pixels"] = int(np.count_nonzero(mask))
            (staging / item["mask"]).parent.mkdir(parents=True, exist_ok=True)
            write_png(staging / item["mask"], mask)
    counts = {
        "train/good": SPLIT_SIZES["train"],
        "validation/good": SPLIT_SIZES["validation"],
        "test_public/good": SPLIT_SIZES["test_public"],
        "test_public/bad": len(bad),
    }
    written = {key: len(list((staging / key).glob("*.png"))) for key in counts}
    if written != counts:
        raise ConversionError(f"Wrote {written}, expected {counts}.")
    defect_px = [item["mask_pixels"] for item in plan if "mask_pixels" in item]
    info = {
        "format": MAPPING_FORMAT,
        "seed": seed,
        "source": str(source),
        "licence": "CC BY-SA 4.0 (BSData, Schlagenhauf & Landwehr, https://github.com/2Obe/BSData)",
        "rules": "type == 2 crops (*_crop_2.jpg); bad = with pitting polygons; good = unlabelled and taken before the "
        "first labelled pitting at the same spindle position (name fields 3-4; field 2 = time)",
        "counts": counts,
        "defect_pixels": {
            "min": min(defect_px),
            "median": float(np.median(defect_px)),
            "max": max(defect_px),
        },
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
        "git": git_revision(),
        "files": plan,
    }
    (staging / MAPPING_FILE).write_text(json.dumps(info, indent=1))
    staging.rename(category_dir)
    logger.info(
        "Converted BSData to %s in %.1f s: %s; defect sizes %d-%d px (median %.0f); mapping in %s",
        category_dir,
        time.perf_counter() - started,
        counts,
        info["defect_pixels"]["min"],
        info["defect_pixels"]["max"],
        info["defect_pixels"]["median"],
        MAPPING_FILE,
    )
    return category_dir


# --------------------------------------------------------------------------------------------------------------------
# direct evaluation
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Canvas:
    """Images of one category placed on the model canvas, with what the metrics need."""

    train: list[np.ndarray]
    validation: list[np.ndarray]
    test: list[np.ndarray]
    labels: np.ndarray  # 1 = bad
    masks: list[np.ndarray]  # bool, canvas size (all False for good images)
    names: list[str]
    geometries: list[Any]  # madfh_pipeline.imaging.Geometry per test image
    native_masks: list[np.ndarray] = field(default_factory=list)  # bool, native size (only with --native-metrics)


def _list(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.glob("*.png"))
    if not files:
        raise SystemExit(f"No PNG files in '{folder}'. Run `bench/bsdata.py convert` first (or check --root).")
    return files


def load_canvas(
    category_dir: Path, width: int, height: int, mode: str, native_masks: bool = False, max_train: int | None = None
) -> Canvas:
    """Read every split and place it on a ``width × height`` canvas with the project's geometry."""
    from madfh_pipeline.imaging import Geometry, read_image

    def place(path: Path, is_mask: bool = False) -> tuple[np.ndarray, Any]:
        image = read_image(path, channels=1 if is_mask else None)
        geometry = Geometry.plan(image.shape[1], image.shape[0], width, height, mode)  # type: ignore[arg-type]
        return geometry.apply(image, is_mask=is_mask), geometry

    started = time.perf_counter()
    train_files = _list(category_dir / "train" / "good")[:max_train]
    train = [place(p)[0] for p in train_files]
    validation = [place(p)[0] for p in _list(category_dir / "validation" / "good")]
    test, labels, masks, names, geometries, native = [], [], [], [], [], []
    for label, folder in ((0, "good"), (1, "bad")):
        for path in _list(category_dir / "test_public" / folder):
            image, geometry = place(path)
            test.append(image)
            geometries.append(geometry)
            labels.append(label)
            names.append(f"{folder}/{path.name}")
            if label == 0:
                masks.append(np.zeros((height, width), dtype=bool))
                if native_masks:
                    native.append(np.zeros((geometry.src_height, geometry.src_width), dtype=bool))
                continue
            mask_path = category_dir / "test_public" / "ground_truth" / "bad" / f"{path.stem}_mask.png"
            masks.append(place(mask_path, is_mask=True)[0] > 0)
            if native_masks:
                native.append(read_image(mask_path, channels=1) > 0)
    logger.info(
        "Loaded %s on a %d×%d canvas (%s) in %.1f s: %d train, %d validation, %d test (%d bad)",
        category_dir.name,
        width,
        height,
        mode,
        time.perf_counter() - started,
        len(train),
        len(validation),
        len(test),
        sum(labels),
    )
    return Canvas(train, validation, test, np.asarray(labels), masks, names, geometries, native)


def selection_halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two seeded halves of the test set, stratified by label: (selection, report) positions."""
    rng = np.random.default_rng(seed + 20_011)
    selection = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        selection.append(rng.choice(members, size=len(members) // 2, replace=False))
    chosen = np.sort(np.concatenate(selection))
    return chosen, np.setdiff1d(np.arange(len(labels)), chosen)


def batches(images: Sequence[np.ndarray], batch_size: int, device: Any) -> Iterator[Any]:
    from madfh_pipeline.streaming import to_tensor

    for start in range(0, len(images), batch_size):
        yield to_tensor(list(images[start : start + batch_size])).to(device)


def score_all(detector: Any, images: Sequence[np.ndarray], batch_size: int, device: Any) -> tuple[np.ndarray, list]:
    scores, maps = [], []
    for batch in batches(images, batch_size, device):
        out = detector.predict(batch)
        scores.append(out.scores)
        maps.extend(out.maps)
    return np.concatenate(scores).astype(np.float64), maps


def metrics_on(
    canvas: Canvas,
    index: np.ndarray,
    scores: np.ndarray,
    maps: list[np.ndarray],
    pixel_threshold: float,
    image_threshold: float,
    native: bool = False,
) -> dict[str, float]:
    """The benchmark's metrics on the test images at ``index`` (canvas content, or native size with ``native``)."""
    from madfh_pipeline import metrics

    labels = canvas.labels[index]
    if native:
        masks = [canvas.native_masks[i] for i in index]

        def pixel_maps() -> Iterator[np.ndarray]:
            return (canvas.geometries[i].invert(maps[i]) for i in index)
    else:
        masks = [canvas.masks[i][canvas.geometries[i].content] for i in index]

        def pixel_maps() -> Iterator[np.ndarray]:
            return (maps[i][canvas.geometries[i].content] for i in index)

    pro = metrics.au_pro_at_limits(masks, pixel_maps(), (0.05, 0.3))
    return {
        "image_auroc": round(metrics.image_auroc(labels, scores[index]), 4),
        "pixel_auroc": round(metrics.pixel_auroc(masks, pixel_maps()), 4),
        "au_pro_0.3": round(pro[0.3], 4),
        "au_pro_0.05": round(pro[0.05], 4),
        "seg_f1": round(metrics.seg_f1(masks, pixel_maps(), pixel_threshold), 4),
        "class_f1": round(metrics.class_f1(labels, scores[index], image_threshold), 4),
    }


def bootstrap_se(labels: np.ndarray, scores: np.ndarray, index: np.ndarray, seed: int, rounds: int = 300) -> float:
    """Bootstrap standard error of the image AUROC on ``index`` (resampled within each label).

    Why: a half of BSData's test set is 143 images, where AUROC moves by about ±0.015 from sampling alone; variants
    closer than that are not told apart, and the report should say so.
    """
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed + 7)
    y, s = labels[index], scores[index]
    groups = [np.flatnonzero(y == label) for label in (0, 1)]
    values = []
    for _ in range(rounds):
        pick = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        values.append(roc_auc_score(y[pick], s[pick]))
    return round(float(np.std(values)), 4)


def run_variant(
    name: str,
    config: dict[str, Any],
    canvas: Canvas,
    halves: tuple[np.ndarray, np.ndarray],
    args: argparse.Namespace,
    fitted: dict[str, Any],
    cache: BackboneCache | None,
) -> dict[str, Any]:
    """Fit (or reuse a fit with the same bank), score validation + test, compute the metrics on all/halves."""
    from madfh_pipeline.metrics import mean_std_threshold
    from madfh_pipeline.models.base import build_detector, resolve_device

    device = resolve_device(args.device)
    detector = build_detector("patchcore", config).to(device)
    hits_before = cache.hits if cache else 0
    if cache is not None:
        cache.wrap(detector)
    key = fit_key("patchcore", detector.config)
    fit_seconds, reused = 0.0, key in fitted
    if reused:
        detector.set_state(fitted[key])
    else:
        started = time.perf_counter()
        detector.fit(lambda: batches(canvas.train, args.batch_size, device))
        fit_seconds = time.perf_counter() - started
        fitted[key] = detector.get_state()
    started = time.perf_counter()
    val_scores, val_maps = score_all(detector, canvas.validation, args.batch_size, device)
    scores, maps = score_all(detector, canvas.test, args.batch_size, device)
    predict_seconds = time.perf_counter() - started
    content = canvas.geometries[0].content
    pixel_threshold, _, _ = mean_std_threshold((m[content] for m in val_maps), k=args.pixel_k)
    image_threshold, _, _ = mean_std_threshold(val_scores, k=args.pixel_k)
    selection, report = halves
    everything = np.arange(len(canvas.labels))
    result: dict[str, Any] = {
        "variant": name,
        "config": detector.config,
        "fit_reused": reused,
        "backbone_cached": bool(cache and cache.hits > hits_before),
        "fit_seconds": round(fit_seconds, 2),
        "predict_seconds": round(predict_seconds, 2),
        "predict_images_per_s": round((len(canvas.validation) + len(canvas.test)) / predict_seconds, 2),
        "fit_info": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in detector.fit_info.items()},
        "pixel_threshold": pixel_threshold,
        "image_threshold": image_threshold,
        "metrics": {
            "test": metrics_on(canvas, everything, scores, maps, pixel_threshold, image_threshold),
            "test_image_auroc_se": bootstrap_se(canvas.labels, scores, everything, args.select_seed),
            "selection_image_auroc_se": bootstrap_se(canvas.labels, scores, selection, args.select_seed),
            "report_image_auroc_se": bootstrap_se(canvas.labels, scores, report, args.select_seed),
            "selection": metrics_on(canvas, selection, scores, maps, pixel_threshold, image_threshold),
            "report": metrics_on(canvas, report, scores, maps, pixel_threshold, image_threshold),
        },
        "score_mean_good": float(scores[canvas.labels == 0].mean()),
        "score_mean_bad": float(scores[canvas.labels == 1].mean()),
    }
    if args.native_metrics:
        result["metrics"]["test_native"] = metrics_on(
            canvas, everything, scores, maps, pixel_threshold, image_threshold, native=True
        )
    if args.save_scores:
        result["scores"] = [round(float(s), 5) for s in scores]
    m = result["metrics"]
    logger.info(
        "%-24s test: img %.4f pix %.4f pro.3 %.4f pro.05 %.4f segF1 %.4f | sel img %.4f | rep img %.4f | fit %.1f s%s",
        name,
        m["test"]["image_auroc"],
        m["test"]["pixel_auroc"],
        m["test"]["au_pro_0.3"],
        m["test"]["au_pro_0.05"],
        m["test"]["seg_f1"],
        m["selection"]["image_auroc"],
        m["report"]["image_auroc"],
        fit_seconds,
        " (bank reused)" if reused else "",
    )
    return result


def build_report(args: argparse.Namespace, canvas: Canvas, halves: tuple, runs: list[dict[str, Any]]) -> dict:
    """Summary rows, the variant chosen on the selection half, and the default against anomalib's references."""
    summary = [
        {
            "variant": r["variant"],
            **{f"test_{k}": v for k, v in r["metrics"]["test"].items()},
            "selection_image_auroc": r["metrics"]["selection"]["image_auroc"],
            "report_image_auroc": r["metrics"]["report"]["image_auroc"],
            "selection_au_pro_0.05": r["metrics"]["selection"]["au_pro_0.05"],
            "report_au_pro_0.05": r["metrics"]["report"]["au_pro_0.05"],
            "fit_s": r["fit_seconds"],
            "predict_img_s": r["predict_images_per_s"],
            "bank": r["fit_info"].get("bank_size"),
        }
        for r in runs
    ]
    chosen = max(runs, key=lambda r: r["metrics"]["selection"]["image_auroc"]) if runs else None
    default = next((r for r in runs if r["variant"] == "default"), None)
    comparison = None
    if default is not None and chosen is not None:
        comparison = {
            "chosen_variant": chosen["variant"],
            "chosen_report_image_auroc": chosen["metrics"]["report"]["image_auroc"],
            "default_report_image_auroc": default["metrics"]["report"]["image_auroc"],
            "default_minus_chosen": round(
                default["metrics"]["report"]["image_auroc"] - chosen["metrics"]["report"]["image_auroc"], 4
            ),
            "within_0.01": default["metrics"]["report"]["image_auroc"]
            >= chosen["metrics"]["report"]["image_auroc"] - 0.01,
        }
    reference_check = None
    if default is not None and (args.width, args.height, args.resize_mode) == (256, 256, "stretch"):
        test = default["metrics"]["test"]
        reference_check = {
            key: {"default": test[key], "anomalib_best": ref, "met": test[key] >= ref}
            for key, ref in REFERENCE_BEST.items()
        }
    return {
        "benchmark": "bsdata_direct",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git": git_revision(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"},
        "canvas": {"width": args.width, "height": args.height, "mode": args.resize_mode},
        "split": {
            "train": len(canvas.train),
            "validation": len(canvas.validation),
            "test_good": int((canvas.labels == 0).sum()),
            "test_bad": int((canvas.labels == 1).sum()),
            "selection": len(halves[0]),
            "report": len(halves[1]),
        },
        "anomalib_reference": ANOMALIB_REFERENCE,
        "default_vs_anomalib": reference_check,
        "default_vs_chosen": comparison,
        "summary": summary,
        "runs": runs,
    }


def direct(args: argparse.Namespace) -> None:
    if args.canvas:
        width, height = (int(v) for v in args.canvas.lower().split("x"))
    else:
        width = height = int(args.size)
    args.width, args.height = width, height
    category_dir = args.root / args.category
    if not category_dir.is_dir():
        raise SystemExit(f"No category '{args.category}' under '{args.root}'. Run `bench/bsdata.py convert` first.")
    if args.stage1_block is not None:  # a study knob, not a product setting: the block size is fixed in PatchCore
        from madfh_pipeline.models import patchcore

        logger.info(
            "Coreset stage-1 block: %d patches (PatchCore's own: %d)", args.stage1_block, patchcore._STAGE1_BLOCK
        )
        patchcore._STAGE1_BLOCK = int(args.stage1_block)
    canvas = load_canvas(category_dir, width, height, args.resize_mode, args.native_metrics, args.max_train)
    halves = selection_halves(canvas.labels, args.select_seed)
    base = {}
    for override in args.set:
        key, sep, value = override.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got '{override}'.")
        base[key.strip()] = yaml.safe_load(value)
    specs = (
        ([] if args.no_default else ["default"]) + list(args.variant) + (list(PATCHCORE_SWEEP) if args.sweep else [])
    )
    output = args.output or ROOT / "bench" / "results" / f"{args.category}_{width}x{height}_{args.resize_mode}.json"
    runs: list[dict[str, Any]] = []
    fitted: dict[str, Any] = {}
    cache = BackboneCache() if args.cache_features else None
    for spec in specs:
        name, overrides = parse_variant(spec)
        run = run_variant(name, {**base, **overrides}, canvas, halves, args, fitted, cache)
        run["overrides"] = overrides
        runs.append(run)
        report = build_report(args, canvas, halves, runs)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=1, default=str))  # after every run: a stopped sweep keeps it
    report = build_report(args, canvas, halves, runs)
    if report["default_vs_anomalib"]:
        for key, check in report["default_vs_anomalib"].items():
            logger.info(
                "default %s %.4f vs anomalib best %.3f: %s",
                key,
                check["default"],
                check["anomalib_best"],
                "met" if check["met"] else "MISSED",
            )
    if report["default_vs_chosen"]:
        logger.info("default vs variant chosen on the selection half: %s", json.dumps(report["default_vs_chosen"]))
    logger.info("Results written to %s", output)


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p_convert = sub.add_parser("convert", help="write a local BSData copy as category 'bsdata' (MVTec AD 2 layout)")
    p_convert.add_argument(
        "--source", type=Path, default=None, help=f"BSData copy (default: $BSDATA_DIR, else {DEFAULT_SOURCE})"
    )
    p_convert.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="root the category folder goes under")
    p_convert.add_argument("--seed", type=int, default=0, help="seed of the good-image split")
    p_convert.add_argument("--force", action="store_true", help="replace an earlier conversion with another seed")

    p_direct = sub.add_parser("direct", help="fit and score PatchCore directly (no Kedro) on a converted category")
    p_direct.add_argument("--root", type=Path, default=DEFAULT_DEST, help="root holding the category folder")
    p_direct.add_argument("--category", default=CATEGORY)
    p_direct.add_argument("--size", type=int, default=256, help="square canvas side (ignored with --canvas)")
    p_direct.add_argument("--canvas", default=None, help="WxH canvas, e.g. 640x256 for nearly native aspect")
    p_direct.add_argument("--resize-mode", default="stretch", choices=["stretch", "letterbox"])
    p_direct.add_argument("--variant", action="append", default=[], help='"name;key=value;..." PatchCore overrides')
    p_direct.add_argument("--sweep", action="store_true", help="also run the variants of common.PATCHCORE_SWEEP")
    p_direct.add_argument("--no-default", action="store_true", help="skip the run with PatchCore's defaults")
    p_direct.add_argument("--set", action="append", default=[], help="KEY=VALUE applied to every run (YAML value)")
    p_direct.add_argument("--select-seed", type=int, default=0, help="seed of the selection/report halves")
    p_direct.add_argument("--pixel-k", type=float, default=3.0, help="SegF1 threshold: mean + k·std of validation")
    p_direct.add_argument("--native-metrics", action="store_true", help="also score maps resized to native size")
    p_direct.add_argument("--max-train", type=int, default=None, help="use only the first N training images")
    p_direct.add_argument("--batch-size", type=int, default=16)
    p_direct.add_argument("--device", default="auto")
    p_direct.add_argument(
        "--cache-features",
        action="store_true",
        help="compute backbone features once per layer set and reuse them across variants (fit times then exclude "
        "the backbone)",
    )
    p_direct.add_argument(
        "--stage1-block",
        type=int,
        default=None,
        help="study only: patches per block of the coreset's first stage (PatchCore fixes 16384; 1024 = one 256² image)",
    )
    p_direct.add_argument("--save-scores", action="store_true", help="keep per-image test scores in the JSON")
    p_direct.add_argument("--output", type=Path, default=None)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "convert":
        convert(resolve_source(args.source), args.dest, args.seed, args.force)
    elif args.command == "direct":
        direct(args)
    else:  # pragma: no cover - argparse rejects unknown commands
        parser.error(f"unknown command {args.command}")


if __name__ == "__main__":
    main(sys.argv[1:])
