"""Native-resolution pixel metrics: cross-checked against anomalib on real data, and their memory measured.

Why this benchmark: the MVTec AD 2 server scores anomaly maps at the native image size against the original masks.
``madfh_pipeline.metrics.StreamingPixelMetrics`` does that in bounded memory on a score grid, with an error bound it
computes itself. This script shows, on real maps of real defects, that the streaming values, our exact functions
(every pixel gathered and sorted) and an *independent* implementation agree, and that the streaming memory stays
small at wallplugs scale.

Subcommands:

``crosscheck``
    BSData's test_public (120 good + 167 bad, 1130×460 RGB) in the MVTec AD 2 layout, made by
    ``.venv/bin/python bench/bsdata.py convert --dest <root>``. The project's PatchCore (its default config:
    EfficientNet-Lite0 ImageNet weights, 1 % coreset capped at 2,048 patches) is fitted on train/good at 256×256
    (stretched with ``Geometry.plan(...).apply``), scores validation/good and test_public; each 256² map is brought
    back to 1130×460 with ``Geometry.invert`` (bilinear, float32). On these native maps and the original masks we
    compute AU-PRO@0.05, AU-PRO@0.3 and pixel AUROC three ways: streaming (grid from a sample of the canvas maps,
    refined until every bound is below ``--tolerance``), our exact functions, and anomalib 2.7's ``AUPRO`` /
    ``AUROC`` run in a separate interpreter (``--anomalib-python``, a venv with ``anomalib==2.7.0``). Also: SegF1 at
    the benchmark's threshold (mean + 3σ of the validation pixels) streaming vs exact, the canvas ("fast") mode
    numbers, and the metrics of the float16-quantised maps the server would read (exact, on the float16 grid).
``memory``
    150 synthetic 2448×2048 map/mask pairs (wallplugs' test_public: 60 good + 90 bad), each rendered on a 1024²
    canvas and resized to native size on the fly, never all in memory, through ``streaming_pixel_metrics``;
    reports the process's peak RSS (``ru_maxrss``). ``--mode exact --images N`` measures the exact functions on N
    such images instead, for the per-pixel cost they would have at full size.

    .venv/bin/python bench/bsdata.py convert --dest /tmp/bsdata_root
    .venv/bin/python bench/metrics_crosscheck.py crosscheck --root /tmp/bsdata_root
    .venv/bin/python bench/metrics_crosscheck.py memory
    .venv/bin/python bench/metrics_crosscheck.py memory --mode exact --images 15

The anomalib side (``anomalib-worker``) imports nothing from the project, only numpy, torch and anomalib.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

logger = logging.getLogger("bench.metrics_crosscheck")

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_ROOT = BENCH_DIR.parent / "data" / "01_raw" / "bsdata_mvtec"
DEFAULT_ANOMALIB_PYTHON = Path("/work/venvs/crosscheck/bin/python")
FPR_LIMITS = (0.05, 0.3)
#: The agreement the cross-check demands between any two implementations.
AGREEMENT = 0.005


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------------------------------------------
# anomalib worker: runs in the cross-check venv, imports nothing from the project
# ----------------------------------------------------------------------------------------------------------------------


def anomalib_worker(args: argparse.Namespace) -> None:
    """Compute anomalib's AUPRO at each limit and AUROC on the saved native maps; write JSON.

    Definitions as implemented in anomalib 2.7 (``anomalib/metrics/aupro.py``, ``auroc.py``): AUPRO labels the
    ground truth with ``cv2.connectedComponents`` (8-connectivity), gives each region pixel the weight
    ``1 / region size``, sorts *all* pixels of all images by score (descending), takes cumulative sums (FPR over all
    background pixels, PRO over the number of regions), keeps the last point of every run of equal scores, prepends
    (0, 0), cuts at ``fpr_limit`` with linear interpolation and divides the trapezoid area by the last FPR, i.e. by the
    limit. No binning, no sigmoid. AUROC is torchmetrics' ``BinaryROC`` (exact, all thresholds) + trapezoid; it
    applies a sigmoid to predictions outside [0, 1], so the maps are min-max rescaled to [0, 1] first (monotone).
    """
    import anomalib
    import torch
    import torchmetrics
    from anomalib.metrics import AUPRO, AUROC

    maps = np.load(args.maps, mmap_mode="r")
    masks = np.load(args.masks, mmap_mode="r")
    n = maps.shape[0]
    batch = 16
    out: dict[str, Any] = {
        "versions": {
            "anomalib": anomalib.__version__,
            "torch": torch.__version__,
            "torchmetrics": torchmetrics.__version__,
        },
        "n_images": int(n),
        "shape": list(maps.shape[1:]),
        "au_pro": {},
        "seconds": {},
    }

    def batches(rescale: tuple[float, float] | None = None) -> Iterator[SimpleNamespace]:
        for start in range(0, n, batch):
            chunk = np.array(maps[start : start + batch], dtype=np.float32)
            if rescale is not None:
                lo, hi = rescale
                chunk = ((chunk.astype(np.float64) - lo) / (hi - lo)).astype(np.float32)
            target = torch.from_numpy(np.array(masks[start : start + batch], dtype=np.uint8))
            yield SimpleNamespace(anomaly_map=torch.from_numpy(chunk), gt_mask=target)

    for limit in args.limits:
        started = time.perf_counter()
        metric = AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=limit)
        for item in batches():
            metric.update(item)
        out["au_pro"][str(limit)] = float(metric.compute())
        out["seconds"][f"au_pro_{limit}"] = time.perf_counter() - started
        del metric
        gc.collect()

    lo = float(min(float(np.min(maps[i])) for i in range(n)))
    hi = float(max(float(np.max(maps[i])) for i in range(n)))
    started = time.perf_counter()
    auroc = AUROC(fields=["anomaly_map", "gt_mask"], validate_args=False)
    for item in batches((lo, hi)):
        auroc.update(item)
    out["pixel_auroc"] = float(auroc.compute())
    out["seconds"]["pixel_auroc"] = time.perf_counter() - started
    out["pixel_auroc_rescale"] = [lo, hi]
    out["peak_rss_mib"] = peak_rss_mib()
    Path(args.out).write_text(json.dumps(out, indent=2))


# ----------------------------------------------------------------------------------------------------------------------
# BSData: real maps of real defects
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class TestImage:
    """One test_public image: name, label (1 = bad), image path, native mask path (None for good)."""

    name: str
    label: int
    path: Path
    mask_path: Path | None


def _pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})


def list_test(category_dir: Path) -> list[TestImage]:
    """test_public good then bad, with the bad images' masks (``ground_truth/bad/<stem>_mask.png``)."""
    items = [TestImage(f"good/{p.name}", 0, p, None) for p in _pngs(category_dir / "test_public" / "good")]
    for p in _pngs(category_dir / "test_public" / "bad"):
        mask = category_dir / "test_public" / "ground_truth" / "bad" / f"{p.stem}_mask.png"
        if not mask.is_file():
            raise FileNotFoundError(f"ground-truth mask of {p} is missing: {mask}")
        items.append(TestImage(f"bad/{p.name}", 1, p, mask))
    return items


def canvas_maps(
    category_dir: Path, test: list[TestImage], size: int, cache: Path, max_train: int | None, batch_size: int
) -> dict[str, Any]:
    """Fit the project's PatchCore at ``size``² and score validation/good and test_public (cached by settings)."""
    key = f"{category_dir.name}_s{size}_t{max_train or 'all'}"
    cached = cache / f"{key}.npz"
    if cached.is_file():
        data = np.load(cached)
        logger.info("Canvas maps from cache %s", cached)
        return {k: data[k] for k in data.files}
    import torch

    from madfh_pipeline.imaging import Geometry, read_image
    from madfh_pipeline.models.base import build_detector
    from madfh_pipeline.streaming import to_tensor

    def canvas(path: Path) -> np.ndarray:
        image = read_image(path)
        return Geometry.plan(image.shape[1], image.shape[0], size, size, "stretch").apply(image)

    train_files = _pngs(category_dir / "train" / "good")[:max_train]
    val_files = _pngs(category_dir / "validation" / "good")
    train = [canvas(p) for p in train_files]
    detector = build_detector("patchcore", {"seed": 0})
    started = time.perf_counter()

    def train_batches() -> Iterator[torch.Tensor]:
        return (to_tensor(train[i : i + batch_size]) for i in range(0, len(train), batch_size))

    detector.fit(train_batches)
    fit_seconds = time.perf_counter() - started
    train.clear()

    def predict(files: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = [], []
        for i in range(0, len(files), batch_size):
            with torch.no_grad():
                out = detector.predict(to_tensor([canvas(p) for p in files[i : i + batch_size]]))
            maps.append(out.maps.astype(np.float32))
            scores.append(out.scores.astype(np.float32))
        return np.concatenate(maps), np.concatenate(scores)

    started = time.perf_counter()
    val_maps, _ = predict(val_files)
    test_maps, test_scores = predict([t.path for t in test])
    result = {
        "val_maps": val_maps,
        "test_maps": test_maps,
        "test_scores": test_scores,
        "fit_seconds": np.float64(fit_seconds),
        "predict_seconds": np.float64(time.perf_counter() - started),
        "n_train": np.int64(len(train_files)),
    }
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(cached, **result)
    logger.info("PatchCore fit on %d images in %.0f s; maps cached in %s", len(train_files), fit_seconds, cached)
    return result


def crosscheck(args: argparse.Namespace) -> None:
    """BSData test_public at native size: streaming vs exact vs anomalib (see the module docstring)."""
    from common import git_revision  # bench/common.py (the script directory is on sys.path)

    from madfh_pipeline import metrics as M
    from madfh_pipeline.imaging import Geometry, read_image

    category_dir = args.root / args.category
    if not category_dir.is_dir():
        raise SystemExit(f"{category_dir} not found: make it with `bench/bsdata.py convert --dest {args.root}`")
    test = list_test(category_dir)
    cm = canvas_maps(category_dir, test, args.size, args.cache, args.max_train, args.batch_size)
    test_maps, val_maps = cm["test_maps"], cm["val_maps"]
    threshold, _, _ = M.mean_std_threshold(val_maps, k=3.0)

    native_masks: list[np.ndarray] = []
    geometries: list[Geometry] = []
    for item in test:
        image = read_image(item.path)
        h, w = image.shape[:2]
        geometries.append(Geometry.plan(w, h, args.size, args.size, "stretch"))
        mask = read_image(item.mask_path, channels=1) if item.mask_path else np.zeros((h, w), np.uint8)
        native_masks.append(M.validate_mask(mask, (h, w), str(item.mask_path or item.path)))
    names = [t.name for t in test]

    def native(i: int) -> np.ndarray:
        return geometries[i].invert(test_maps[i]).astype(np.float32, copy=False)

    report: dict[str, Any] = {
        "benchmark": "metrics_crosscheck",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "git": git_revision(),
        "host": platform.node(),
        "data": {
            "category_dir": str(category_dir),
            "n_good": sum(1 for t in test if t.label == 0),
            "n_bad": sum(1 for t in test if t.label == 1),
            "native_shape": list(native_masks[0].shape),
            "native_pixels": int(sum(m.size for m in native_masks)),
            "defect_pixels": int(sum(int(m.sum()) for m in native_masks)),
        },
        "detector": {
            "name": "patchcore (project, default config, seed 0)",
            "canvas": f"{args.size}x{args.size} stretch",
            "n_train": int(cm["n_train"]),
            "fit_seconds": float(cm["fit_seconds"]),
            "seg_threshold_mean_plus_3std_validation": threshold,
        },
    }

    # -- canvas ("fast") mode: what the evaluation node computes today
    canvas_masks = [
        g.apply(m.astype(np.uint8), is_mask=True) > 0 for g, m in zip(geometries, native_masks, strict=True)
    ]
    started = time.perf_counter()
    canvas_pro = M.au_pro_at_limits(canvas_masks, list(test_maps), FPR_LIMITS)
    report["canvas_exact"] = {
        "au_pro": {str(k): v for k, v in canvas_pro.items()},
        "pixel_auroc": M.pixel_auroc(canvas_masks, list(test_maps)),
        "seg_f1": M.seg_prf(canvas_masks, list(test_maps), threshold).f1,
        "seconds": time.perf_counter() - started,
    }

    # -- streaming at native size: grid from a sample of the canvas maps, refined to the tolerance
    started = time.perf_counter()
    sampler = M.ScoreSampler(max_values=2_000_000, seed=0)
    for amap in test_maps:
        sampler.add(amap)
    grid = M.score_grid(sampler, thresholds=[threshold])

    def pairs() -> Iterator[M.PixelPair]:
        for i in range(len(test)):
            yield None, names[i], native_masks[i], native(i)

    stream = M.streaming_pixel_metrics(
        pairs, grid, thresholds=[threshold], tolerance=args.tolerance, max_passes=args.max_passes
    )["all"]
    report["native_streaming"] = {
        "au_pro": {str(k): v for k, v in stream.au_pro.items()},
        "au_pro_bound": {str(k): v for k, v in stream.au_pro_bound.items()},
        "pixel_auroc": stream.pixel_auroc,
        "pixel_auroc_bound": stream.pixel_auroc_bound,
        "passes": stream.passes,
        "grid_points_first_pass": int(grid.size),
        "grid_points_final": stream.n_edges,
        "n_regions": stream.n_regions,
        "seconds": time.perf_counter() - started,
    }
    seg_stream = stream.seg[threshold]
    report["native_streaming"]["seg"] = {
        "tp": seg_stream.tp,
        "fp": seg_stream.fp,
        "fn": seg_stream.fn,
        "f1": seg_stream.f1,
    }

    # -- exact at native size (every pixel gathered and sorted)
    native_maps = [native(i) for i in range(len(test))]
    started = time.perf_counter()
    exact_pro = M.au_pro_at_limits(native_masks, native_maps, FPR_LIMITS, names=names)
    exact_auroc = M.pixel_auroc(native_masks, native_maps, names=names)
    seg_exact = M.seg_prf(native_masks, native_maps, threshold, names=names)
    report["native_exact"] = {
        "au_pro": {str(k): v for k, v in exact_pro.items()},
        "pixel_auroc": exact_auroc,
        "seg": {"tp": seg_exact.tp, "fp": seg_exact.fp, "fn": seg_exact.fn, "f1": seg_exact.f1},
        "seconds": time.perf_counter() - started,
    }

    # -- float16: what the server reads from the submitted TIFFs (exact on the float16 grid)
    def pairs16() -> Iterator[M.PixelPair]:
        for i in range(len(test)):
            yield None, names[i], native_masks[i], native_maps[i].astype(np.float16)

    f16 = M.streaming_pixel_metrics(pairs16, M.float16_grid(), tolerance=None)["all"]
    report["native_float16_exact"] = {
        "au_pro": {str(k): v for k, v in f16.au_pro.items()},
        "pixel_auroc": f16.pixel_auroc,
        "max_bound": f16.max_bound,
        "distinct_float16_values_in_range": int(
            np.unique(
                np.concatenate([m.astype(np.float16).ravel() for m in native_maps[:: max(1, len(test) // 20)]])
            ).size
        ),
    }

    # -- anomalib (independent implementation), in its own interpreter
    if args.anomalib_python is not None:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            maps_file, masks_file, out_file = Path(tmp) / "maps.npy", Path(tmp) / "masks.npy", Path(tmp) / "out.json"
            stacked = np.lib.format.open_memmap(maps_file, "w+", np.float32, (len(test), *native_maps[0].shape))
            for i, amap in enumerate(native_maps):
                stacked[i] = amap
            stacked.flush()
            del stacked
            np.save(masks_file, np.stack(native_masks).astype(np.uint8))
            del native_maps
            gc.collect()
            command = [
                str(args.anomalib_python),
                str(Path(__file__).resolve()),
                "anomalib-worker",
                "--maps",
                str(maps_file),
                "--masks",
                str(masks_file),
                "--out",
                str(out_file),
                "--limits",
                *[str(v) for v in FPR_LIMITS],
            ]
            started = time.perf_counter()
            subprocess.run(command, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            report["anomalib"] = json.loads(out_file.read_text())
            report["anomalib"]["wall_seconds"] = time.perf_counter() - started

    report["agreement"] = _agreement(report)
    report["peak_rss_mib"] = peak_rss_mib()
    output = args.output or BENCH_DIR / "results" / "metrics_crosscheck.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=float))
    _log_summary(report)
    logger.info("Wrote %s", output)
    if not report["agreement"]["all_within"]:
        raise SystemExit(f"implementations disagree by more than {AGREEMENT}")


def _agreement(report: dict[str, Any]) -> dict[str, Any]:
    """Largest pairwise difference per metric between streaming, exact and anomalib (native size)."""
    rows: dict[str, dict[str, float]] = {}
    for limit in FPR_LIMITS:
        key = f"au_pro_{limit}"
        rows[key] = {
            "streaming": report["native_streaming"]["au_pro"][str(limit)],
            "exact": report["native_exact"]["au_pro"][str(limit)],
        }
        if "anomalib" in report:
            rows[key]["anomalib"] = report["anomalib"]["au_pro"][str(limit)]
    rows["pixel_auroc"] = {
        "streaming": report["native_streaming"]["pixel_auroc"],
        "exact": report["native_exact"]["pixel_auroc"],
    }
    if "anomalib" in report:
        rows["pixel_auroc"]["anomalib"] = report["anomalib"]["pixel_auroc"]
    spread = {k: max(v.values()) - min(v.values()) for k, v in rows.items()}
    bounds = {f"au_pro_{k}": v for k, v in report["native_streaming"]["au_pro_bound"].items()}
    bounds["pixel_auroc"] = report["native_streaming"]["pixel_auroc_bound"]
    within_bound = {k: abs(rows[k]["streaming"] - rows[k]["exact"]) <= bounds[k] + 1e-9 for k in rows}
    seg_equal = report["native_streaming"]["seg"] == report["native_exact"]["seg"]
    return {
        "values": rows,
        "max_difference": spread,
        "tolerance": AGREEMENT,
        "streaming_within_its_bound": within_bound,
        "seg_counts_equal": seg_equal,
        "all_within": all(v <= AGREEMENT for v in spread.values()) and all(within_bound.values()) and seg_equal,
    }


def _log_summary(report: dict[str, Any]) -> None:
    agreement = report["agreement"]
    logger.info("%-14s %12s %12s %12s %10s %10s", "metric", "streaming", "exact", "anomalib", "bound", "max diff")
    for key, values in agreement["values"].items():
        bound_key = "pixel_auroc_bound" if key == "pixel_auroc" else None
        bound = (
            report["native_streaming"][bound_key]
            if bound_key
            else report["native_streaming"]["au_pro_bound"][key.removeprefix("au_pro_")]
        )
        logger.info(
            "%-14s %12.6f %12.6f %12s %10.2g %10.2g",
            key,
            values["streaming"],
            values["exact"],
            f"{values['anomalib']:.6f}" if "anomalib" in values else "-",
            bound,
            agreement["max_difference"][key],
        )
    logger.info(
        "SegF1 at %.4g: streaming %s, exact %s; canvas mode AU-PRO@0.05 %.4f (native %.4f); float16 AU-PRO@0.05 %.4f",
        report["detector"]["seg_threshold_mean_plus_3std_validation"],
        report["native_streaming"]["seg"],
        report["native_exact"]["seg"],
        report["canvas_exact"]["au_pro"]["0.05"],
        report["native_exact"]["au_pro"]["0.05"],
        report["native_float16_exact"]["au_pro"]["0.05"],
    )


# ----------------------------------------------------------------------------------------------------------------------
# Memory at wallplugs scale (synthetic, generated on the fly)
# ----------------------------------------------------------------------------------------------------------------------

NATIVE = (2048, 2448)  # height, width of wallplugs
CANVAS = 1024


def synthetic_canvas(index: int, n_good: int) -> tuple[np.ndarray, np.ndarray]:
    """A 1024² canvas map and the native 2448×2048 mask of image ``index`` (deterministic; bad after ``n_good``).

    The map is a smooth random background (a 64² field upsampled) plus fine noise, with each defect (1-3 ellipses,
    drawn at native size) raised by a random amount on the canvas: many distinct scores, overlapping classes.
    """
    import cv2

    rng = np.random.default_rng(index)
    field = cv2.resize(
        rng.standard_normal((64, 64)).astype(np.float32), (CANVAS, CANVAS), interpolation=cv2.INTER_CUBIC
    )
    canvas = 30.0 + field + 0.3 * rng.standard_normal((CANVAS, CANVAS), dtype=np.float32)
    mask = np.zeros(NATIVE, np.uint8)
    if index >= n_good:
        for _ in range(int(rng.integers(1, 4))):
            centre = (int(rng.integers(100, NATIVE[1] - 100)), int(rng.integers(100, NATIVE[0] - 100)))
            axes = (int(rng.integers(3, 120)), int(rng.integers(3, 120)))
            cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
        small = cv2.resize(mask, (CANVAS, CANVAS), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        canvas += float(rng.uniform(0.5, 3.0)) * cv2.GaussianBlur(small, (0, 0), 2.0)
    return canvas.astype(np.float32), mask


def synthetic_native(canvas: np.ndarray) -> np.ndarray:
    """Canvas -> native, bilinear as ``Geometry.invert`` (stretch geometry: no padding to crop)."""
    import cv2

    return cv2.resize(canvas, (NATIVE[1], NATIVE[0]), interpolation=cv2.INTER_LINEAR)


def memory(args: argparse.Namespace) -> None:
    """Peak RSS of the streaming accumulator (or of the exact functions) on synthetic wallplugs-size pairs."""
    from madfh_pipeline import metrics as M

    n, n_good = args.images, args.good
    baseline = peak_rss_mib()
    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "metrics_crosscheck.memory",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": args.mode,
        "images": n,
        "good": min(n_good, n),
        "native_shape": list(NATIVE),
        "native_pixels": n * NATIVE[0] * NATIVE[1],
        "peak_rss_mib_after_imports": baseline,
    }
    if args.mode == "streaming":
        sampler = M.ScoreSampler(max_values=2_000_000, seed=0)
        for i in range(n):
            sampler.add(synthetic_canvas(i, n_good)[0])
        grid = M.score_grid(sampler, thresholds=[31.5])
        result["grid_points"] = int(grid.size)
        result["peak_rss_mib_after_grid"] = peak_rss_mib()

        def pairs() -> Iterator[M.PixelPair]:
            for i in range(n):
                canvas, mask = synthetic_canvas(i, n_good)
                yield (
                    ("regular", "overexposed", "underexposed")[i % 3],
                    f"synthetic_{i:03d}",
                    mask,
                    synthetic_native(canvas),
                )

        out = M.streaming_pixel_metrics(pairs, grid, thresholds=[31.5], tolerance=args.tolerance, max_passes=2)
        overall = out["all"]
        result |= {
            "passes": overall.passes,
            "grid_points_final": overall.n_edges,
            "groups": sorted(k for k in out if k != "all"),
            "au_pro": {str(k): v for k, v in overall.au_pro.items()},
            "au_pro_bound": {str(k): v for k, v in overall.au_pro_bound.items()},
            "pixel_auroc": overall.pixel_auroc,
            "pixel_auroc_bound": overall.pixel_auroc_bound,
            "seg_f1": overall.seg[31.5].f1,
            "accumulator_mib": M.StreamingPixelMetrics(np.unique(grid)).nbytes / 2**20,
        }
    else:
        masks, maps = [], []
        for i in range(n):
            canvas, mask = synthetic_canvas(i, n_good)
            masks.append(mask > 0)
            maps.append(synthetic_native(canvas))
        result["peak_rss_mib_inputs"] = peak_rss_mib()
        pro = M.au_pro_at_limits(masks, maps, FPR_LIMITS)
        result |= {"au_pro": {str(k): v for k, v in pro.items()}, "pixel_auroc": M.pixel_auroc(masks, maps)}
    result["seconds"] = time.perf_counter() - started
    result["peak_rss_mib"] = peak_rss_mib()
    if args.mode == "exact":
        inputs = result["peak_rss_mib_inputs"] - baseline
        result["metric_mib_per_mpixel"] = (result["peak_rss_mib"] - result["peak_rss_mib_inputs"]) / (
            result["native_pixels"] / 1e6
        )
        result["inputs_mib"] = inputs
    output = args.output or BENCH_DIR / "results" / f"metrics_memory_{args.mode}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2, default=float))
    logger.info("%s", json.dumps(result, indent=2, default=float))
    if args.mode == "streaming" and result["peak_rss_mib"] > 8 * 1024:
        raise SystemExit("streaming accumulator exceeded 8 GiB")


# ----------------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p_cross = sub.add_parser("crosscheck", help="BSData test_public: streaming vs exact vs anomalib at native size")
    p_cross.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="root of the converted layout")
    p_cross.add_argument("--category", default="bsdata")
    p_cross.add_argument("--size", type=int, default=256, help="square canvas side of the detector")
    p_cross.add_argument("--max-train", type=int, default=None, help="fit on the first N train/good images only")
    p_cross.add_argument("--batch-size", type=int, default=16)
    p_cross.add_argument("--cache", type=Path, default=BENCH_DIR / "results" / "metrics_crosscheck_cache")
    p_cross.add_argument("--tolerance", type=float, default=1e-3, help="largest acceptable streaming error bound")
    p_cross.add_argument("--max-passes", type=int, default=2)
    p_cross.add_argument(
        "--anomalib-python",
        type=Path,
        default=DEFAULT_ANOMALIB_PYTHON,
        help="interpreter of a venv with anomalib==2.7.0 (pass 'none' to skip)",
    )
    p_cross.add_argument("--workdir", type=Path, default=None, help="where the maps for anomalib are written (~0.8 GB)")
    p_cross.add_argument("--output", type=Path, default=None)

    p_mem = sub.add_parser("memory", help="peak RSS on synthetic 2448x2048 pairs generated on the fly")
    p_mem.add_argument("--mode", choices=["streaming", "exact"], default="streaming")
    p_mem.add_argument("--images", type=int, default=150)
    p_mem.add_argument("--good", type=int, default=60, help="the first N images are defect-free")
    p_mem.add_argument("--tolerance", type=float, default=1e-3)
    p_mem.add_argument("--output", type=Path, default=None)

    p_worker = sub.add_parser("anomalib-worker", help=argparse.SUPPRESS)
    p_worker.add_argument("--maps", required=True)
    p_worker.add_argument("--masks", required=True)
    p_worker.add_argument("--out", required=True)
    p_worker.add_argument("--limits", type=float, nargs="+", default=list(FPR_LIMITS))

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "anomalib-worker":
        anomalib_worker(args)
        return
    if args.command == "crosscheck":
        if str(args.anomalib_python).lower() == "none":
            args.anomalib_python = None
        elif not args.anomalib_python.is_file():
            raise SystemExit(f"{args.anomalib_python} not found: make a venv with anomalib==2.7.0 or pass 'none'")
        crosscheck(args)
    else:
        memory(args)


if __name__ == "__main__":
    main(sys.argv[1:])
