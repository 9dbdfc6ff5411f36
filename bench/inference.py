"""Detector speed and memory at 1024², against the bare backbone measured in the same run on the same images.

Why ratios: the machines are shared and noisy, so an absolute images/s says little; the product targets are stated
relative to what cannot be avoided, the frozen backbone's forward pass:
  * PatchCore inference (end to end: PNG from disk → tensor → predict → thresholded map) ≥ 0.70× the throughput of the
    bare backbone forward (PatchCore's own FeatureExtractor, images pre-loaded as tensors, no_grad);
  * PatchCore fit ≤ 2.0× the bare feature extraction (backbone forward) of the same training images;
  * peak memory < 8 GiB (each detector runs in its own spawned process and reports ``ru_maxrss`` there, plus
    ``torch.cuda.max_memory_allocated`` on CUDA).
The autoencoder (the prototype's 1024² baseline) is timed the same way for comparison. The bare backbone is measured
before and after the detectors (``--bare-rounds``) so that load changes on the machine show up as a spread.

Images: wallplugs-like scenes rendered at the native 2448×2048 (``madfh_pipeline.demo.synth.render_normal``), resized
with INTER_AREA to 1024² (what preprocessing does) and written as PNGs to a temporary ImageStore; training and test
images are distinct. So that a faster configuration cannot pass by missing small defects, the fitted detector also
scores ``--defective-images`` defective scenes (``render_pair``: 1-3 defects, some a few pixels wide) together with the
normal test scenes: image AUROC, pixel AUROC and AU-PRO at 1024² (``quality`` in the results; after the timings, so
they do not disturb them).

    .venv/bin/python bench/inference.py                        # 32 training, 16 test images, CPU
    .venv/bin/python bench/inference.py --train-images 300     # the size the targets are stated for
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import resource
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml
from common import (  # bench/common.py (the script directory is on sys.path)
    DEFAULT_PARAMS,
    ROOT,
    git_revision,
    load_detection_params,
)

logger = logging.getLogger("bench.inference")

SIDE = 1024
GIB = 1024**3
TARGETS = {"inference_ratio_min": 0.70, "fit_ratio_max": 2.0, "peak_memory_gib_max": 8.0}


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def make_images(root: Path, n_train: int, n_test: int, seed: int) -> tuple[list[str], list[str]]:
    """Render distinct train and test scenes into an ImageStore at ``root``; existing files are reused (``--cache``)."""
    from madfh_pipeline.datasets.image_store import ImageStore
    from madfh_pipeline.demo.synth import SceneSpec, render_normal

    store = ImageStore(root)
    spec = SceneSpec("wallplugs", 2448, 2048, 1)
    jobs = [(0, i, f"train/{i:04d}.png") for i in range(n_train)] + [(1, i, f"test/{i:04d}.png") for i in range(n_test)]
    started, rendered = time.perf_counter(), 0
    for split, i, key in jobs:
        if store.exists(key):
            continue
        rng = np.random.default_rng([seed, split, i])  # one stream per image: cached and fresh images are identical
        image = cv2.resize(render_normal(spec, rng), (SIDE, SIDE), interpolation=cv2.INTER_AREA)
        store.write(key, image)
        rendered += 1
    logger.info("Images ready in %s (%d rendered, %.1f s).", root, rendered, time.perf_counter() - started)
    keys = [key for _, _, key in jobs]
    return keys[:n_train], keys[n_train:]


def make_defective(root: Path, n: int, seed: int) -> tuple[list[str], list[str]]:
    """Render ``n`` defective scenes (``render_pair``: 1-3 defects, some down to a few pixels) with their masks.

    Why: speed alone would let a faster configuration that misses small defects pass. The same fitted detector is
    scored on these and on the normal test scenes, at 1024² — the resolution and defect sizes the demo data has.
    Masks go through the project's geometry (nearest), images through INTER_AREA, as preprocessing does.
    """
    from madfh_pipeline.datasets.image_store import ImageStore
    from madfh_pipeline.demo.synth import SceneSpec, render_pair
    from madfh_pipeline.imaging import Geometry

    store = ImageStore(root)
    spec = SceneSpec("wallplugs", 2448, 2048, 1)
    geometry = Geometry.plan(spec.width, spec.height, SIDE, SIDE, "stretch")
    images, masks = [f"bad/{i:04d}.png" for i in range(n)], [f"bad_mask/{i:04d}.png" for i in range(n)]
    started, rendered = time.perf_counter(), 0
    for i, (image_key, mask_key) in enumerate(zip(images, masks, strict=True)):
        if store.exists(image_key) and store.exists(mask_key):
            continue
        pair = render_pair(spec, np.random.default_rng([seed, 2, i]))
        store.write(image_key, geometry.apply(pair.image))
        store.write(mask_key, geometry.apply(pair.mask, is_mask=True))
        rendered += 1
    logger.info("Defective images ready (%d rendered, %.1f s).", rendered, time.perf_counter() - started)
    return images, masks


def _quality(
    detector: Any, store: Any, good: list[str], bad: list[str], masks: list[str], dev: Any, batch_size: int
) -> dict[str, float]:
    """Image AUROC, pixel AUROC and AU-PRO of ``detector`` on normal + defective 1024² scenes."""
    from madfh_pipeline import metrics
    from madfh_pipeline.streaming import image_batches

    scores, maps = [], []
    for _, batch in image_batches(store, good + bad, batch_size):
        out = detector.predict(batch.to(dev))
        scores.append(out.scores)
        maps.extend(out.maps)
    labels = np.array([0] * len(good) + [1] * len(bad))
    truth = [np.zeros((SIDE, SIDE), dtype=bool)] * len(good) + [store.read(key) > 0 for key in masks]
    pro = metrics.au_pro_at_limits(truth, maps, (0.05, 0.3))
    result: dict[str, Any] = {
        "images_good": len(good),
        "images_bad": len(bad),
        "image_auroc": metrics.image_auroc(labels, np.concatenate(scores)),
        "pixel_auroc": metrics.pixel_auroc(truth, maps),
        "au_pro_0.3": pro[0.3],
        "au_pro_0.05": pro[0.05],
    }
    if getattr(detector, "name", "") == "patchcore":
        result["image_auroc_by_rule"] = _patchcore_rules(detector, store, good + bad, labels, dev, batch_size)
    return result


#: Image-score rules compared on the same bank by the quality check (``image_score`` and, for map_top_mean, the area
#: in patches): the rule must hold for small defects at 1024², not only on 256² benchmarks.
QUALITY_RULES: tuple[tuple[str, float | None], ...] = (
    ("reweighted", None),
    ("patch_max", None),
    ("map_max", None),
    ("map_top_mean", 1),
    ("map_top_mean", 9),
    ("map_top_mean", 49),
)


def _patchcore_rules(
    detector: Any, store: Any, keys: list[str], labels: np.ndarray, dev: Any, batch_size: int
) -> dict[str, float]:
    """Image AUROC of every rule in :data:`QUALITY_RULES`, each a detector sharing ``detector``'s bank.

    The backbone features are computed once (``BackboneCache``), so the comparison costs only the kNN per rule.
    """
    from common import BackboneCache

    from madfh_pipeline import metrics
    from madfh_pipeline.streaming import image_batches

    cache, state = BackboneCache(), detector.get_state()
    out: dict[str, float] = {}
    for rule, patches in QUALITY_RULES:
        config = {**detector.config, "image_score": rule}
        if patches is not None:
            config["image_top_patches"] = patches
        sibling = type(detector)(config).to(dev)
        sibling.set_state(state)
        cache.wrap(sibling)
        scores = [sibling.predict(batch.to(dev)).scores for _, batch in image_batches(store, keys, batch_size)]
        out[rule if patches is None else f"{rule}_{patches:g}"] = metrics.image_auroc(labels, np.concatenate(scores))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Measurements (each runs in a spawned child process so its peak memory is its own)
# --------------------------------------------------------------------------------------------------------------------


def _rss_now() -> int:
    """Current resident set size in bytes (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _peak_memory(device: Any) -> dict[str, float]:
    """Peak RSS of this process (Linux reports ``ru_maxrss`` in KiB) and the CUDA allocator's peak."""
    import torch

    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
    if device.type == "cuda":
        out["cuda_peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    return out


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _micro_batch(device: Any, batch_size: int) -> int:
    """Images per backbone forward at 1024², the same rule PatchCore applies when its ``batch_size`` is None.

    (PatchCore's pixel budget: one 1024² image per forward on CPU, where larger batches fall out of cache; up to 8 on a
    GPU, bounded by the pipeline batch it is handed.)
    """
    return 1 if device.type == "cpu" else min(8, batch_size)


def _bare_forward(backbone: Any, store: Any, keys: list[str], dev: Any, step: int) -> float:
    """Seconds spent in the backbone forward alone (no_grad) over ``keys``.

    Each micro-batch is decoded and converted to a tensor before the clock starts, so only the forward is timed (the
    "pre-loaded tensors" reference) without holding a whole training set of 1024² float images in memory, which would
    distort the detector process's peak RSS.
    """
    import torch

    from madfh_pipeline.streaming import to_tensor

    total = 0.0
    for i in range(0, len(keys), step):
        x = to_tensor([store.read(k) for k in keys[i : i + step]]).to(dev)
        _sync(dev)
        started = time.perf_counter()
        with torch.no_grad():
            backbone(x)
        _sync(dev)
        total += time.perf_counter() - started
    return total


def _end_to_end(detector: Any, store: Any, keys: list[str], dev: Any, batch_size: int, threshold: float) -> dict:
    """The pipeline's inference loop: ``image_batches`` (PNG decode in a prefetch thread) → predict → binarise."""
    from madfh_pipeline.streaming import image_batches

    predict_seconds = threshold_seconds = 0.0
    flagged = 0
    _sync(dev)
    started = time.perf_counter()
    for _, batch in image_batches(store, keys, batch_size):
        t0 = time.perf_counter()
        out = detector.predict(batch.to(dev, non_blocking=True))
        t1 = time.perf_counter()
        flagged += int((out.maps >= threshold).sum())
        predict_seconds += t1 - t0
        threshold_seconds += time.perf_counter() - t1
    _sync(dev)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "predict_seconds": predict_seconds,
        "threshold_seconds": threshold_seconds,
        "io_wait_seconds": seconds - predict_seconds - threshold_seconds,
        "flagged_pixel_fraction": flagged / (len(keys) * SIDE * SIDE),
    }


def detector_worker(
    name: str,
    config: dict[str, Any],
    root: str,
    train_keys: list[str],
    test_keys: list[str],
    device: str,
    batch_size: int,
    pixel_k: float,
    rounds: int,
    bad_keys: list[str] | None = None,
    mask_keys: list[str] | None = None,
) -> dict[str, Any]:
    """Fit like the pipeline's ``fit_detector`` node, time end-to-end inference, report peak memory.

    For a detector with a ``backbone`` (PatchCore's FeatureExtractor) the bare-backbone reference is measured in the
    same process, right next to what it is compared with, because on a shared machine the load changes within
    minutes: bare extraction of the training images before the fit (and after it when ``rounds`` > 1), and bare
    forward over the test images before and after every end-to-end round (bare, e2e, bare, e2e, bare ...). The pixel
    threshold is mean + k·σ of the maps of two training images, scored before the timed loop (which warms up too).
    """
    from madfh_pipeline.datasets.image_store import ImageStore
    from madfh_pipeline.metrics import mean_std_threshold
    from madfh_pipeline.models.base import build_detector, resolve_device
    from madfh_pipeline.streaming import image_batches

    dev = resolve_device(device)
    store = ImageStore(root)
    rss_start = _rss_now()
    detector = build_detector(name, config).to(dev)
    rss_built = _rss_now()
    backbone = getattr(detector, "backbone", None)
    step = _micro_batch(dev, batch_size)

    bare_train: list[float] = []
    if backbone is not None:
        _bare_forward(backbone, store, test_keys[:step], dev, step)  # warm-up: first-call allocations
        bare_train.append(_bare_forward(backbone, store, train_keys, dev, step))

    def batches():
        for _, batch in image_batches(store, train_keys, batch_size):
            yield batch.to(dev, non_blocking=True)

    started = time.perf_counter()
    history = detector.fit(batches)
    _sync(dev)
    fit_seconds = time.perf_counter() - started
    fit_memory = _peak_memory(dev)
    if backbone is not None and rounds > 1:
        bare_train.append(_bare_forward(backbone, store, train_keys, dev, step))

    warm = next(iter(image_batches(store, train_keys[:2], 2)))[1].to(dev)
    threshold, _, _ = mean_std_threshold(detector.predict(warm).maps, k=pixel_k)

    bare_test: list[float] = []
    e2e: list[dict[str, float]] = []
    if backbone is not None:
        bare_test.append(_bare_forward(backbone, store, test_keys, dev, step))
    for _ in range(max(1, rounds)):
        e2e.append(_end_to_end(detector, store, test_keys, dev, batch_size, threshold))
        if backbone is not None:
            bare_test.append(_bare_forward(backbone, store, test_keys, dev, step))
    memory = _peak_memory(dev)
    interleaved = _interleaved(detector, store, test_keys, dev, step) if backbone is not None else None
    quality = _quality(detector, store, test_keys, bad_keys, mask_keys or [], dev, batch_size) if bad_keys else None

    n_test = len(test_keys)
    e2e_seconds = sum(r["seconds"] for r in e2e)
    result: dict[str, Any] = {
        "fit_seconds": fit_seconds,
        "infer_images_per_s": n_test * len(e2e) / e2e_seconds,
        "end_to_end_rounds": e2e,
        "rss_after_imports_gib": rss_start / GIB,
        "rss_after_build_gib": rss_built / GIB,
        "fit_peak_rss_gib": fit_memory["peak_rss_gib"],
        **memory,
    }
    if backbone is not None:
        result["bare"] = {
            "micro_batch": step,
            "train_feature_seconds": bare_train,
            "test_seconds": bare_test,
            "test_images_per_s": [n_test / t for t in bare_test],
        }
        # Each end-to-end round against the mean of the bare rounds just before and after it.
        result["inference_ratio_per_round"] = [
            (n_test / r["seconds"]) / (2 * n_test / (bare_test[i] + bare_test[i + 1])) for i, r in enumerate(e2e)
        ]
        result["inference_vs_bare_backbone"] = sum(bare_test) / len(bare_test) / (e2e_seconds / len(e2e))
        result["fit_vs_bare_feature_extraction"] = fit_seconds / (sum(bare_train) / len(bare_train))
        result["fit_ratio_range"] = [fit_seconds / max(bare_train), fit_seconds / min(bare_train)]
    if interleaved:
        result["interleaved"] = interleaved
    if quality:
        result["quality"] = quality
    fit_info = getattr(detector, "fit_info", None)
    if fit_info:
        result["fit_info"] = dict(fit_info)  # numbers, plus e.g. bank_capped_by (a key name or None)
    if "loss" in history:
        result["train_loss_per_epoch"] = [float(v) for v in history["loss"]]
    return result


def _interleaved(detector: Any, store: Any, keys: list[str], dev: Any, step: int) -> dict[str, float]:
    """Backbone forward and full ``predict`` alternately on the same decoded image, in the same process.

    Why: this exposes both to the same load image by image, so it is the least noisy estimate of what PatchCore adds
    to the backbone (projection, pooling, kNN, map upsampling and blur). It excludes PNG decoding.
    """
    import torch

    from madfh_pipeline.streaming import to_tensor

    backbone_seconds = predict_seconds = 0.0
    for i in range(0, len(keys), step):
        x = to_tensor([store.read(k) for k in keys[i : i + step]]).to(dev)
        _sync(dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            detector.backbone(x)
        _sync(dev)
        t1 = time.perf_counter()
        detector.predict(x)
        _sync(dev)
        backbone_seconds += t1 - t0
        predict_seconds += time.perf_counter() - t1
    return {
        "backbone_seconds": backbone_seconds,
        "predict_seconds": predict_seconds,
        "predict_vs_backbone_throughput": backbone_seconds / predict_seconds,
    }


def _child_entry(queue: Any, fn_name: str, kwargs: dict[str, Any]) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        queue.put(("ok", globals()[fn_name](**kwargs)))
    except BaseException as exc:  # reported in the parent with the child's message
        queue.put(("error", f"{type(exc).__name__}: {exc}"))
        raise


def in_child(fn_name: str, **kwargs: Any) -> dict[str, Any]:
    """Run ``fn_name(**kwargs)`` in a fresh spawned interpreter (clean peak RSS, no state shared with the parent)."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child_entry, args=(queue, fn_name, kwargs))
    started = time.perf_counter()
    process.start()
    status, payload = queue.get()  # read before join: a large result must not block the child's exit
    process.join()
    if status != "ok":
        raise RuntimeError(f"{fn_name} failed in its subprocess: {payload}")
    payload["process_seconds"] = time.perf_counter() - started
    return payload


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=32, help="images the detectors are fitted on")
    parser.add_argument("--test-images", type=int, default=16, help="images scored for the inference throughput")
    parser.add_argument(
        "--defective-images",
        type=int,
        default=16,
        help="defective scenes scored with the normal test images for image/pixel AUROC and AU-PRO (0: off)",
    )
    parser.add_argument("--detectors", nargs="+", default=["autoencoder", "patchcore"])
    parser.add_argument("--rounds", type=int, default=2, help="end-to-end rounds (bare backbone around each)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=None, help="default: the pipeline's runtime batch_size")
    parser.add_argument("--cache", type=Path, default=None, help="keep the rendered PNGs here (re-used next run)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="DETECTOR.KEY=VALUE",
        help="override a pipeline config value (YAML value), e.g. patchcore.embed_dim=null; repeatable",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "inference.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from madfh_pipeline.models.base import resolve_device

    device = str(resolve_device(args.device))
    detection = load_detection_params(args.params)
    models, runtime = detection["models"], detection["runtime"]
    for override in args.set:
        target, sep, value = override.partition("=")
        detector_key, _, config_key = target.partition(".")
        if not sep or detector_key not in models or not config_key:
            raise SystemExit(f"--set expects DETECTOR.KEY=VALUE with DETECTOR in {sorted(models)}, got '{override}'.")
        models[detector_key]["config"][config_key] = yaml.safe_load(value)
    batch_size = int(args.batch_size or runtime.get("batch_size", 4))
    pixel_k = float(detection["thresholds"].get("pixel_k", 3.0))

    detectors: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_inf_") as tmp:
        root = args.cache or Path(tmp) / "store"
        train_keys, test_keys = make_images(root, args.train_images, args.test_images, args.seed)
        bad_keys, mask_keys = make_defective(root, args.defective_images, args.seed)
        for key in train_keys + test_keys:  # warm the page cache: disk latency is not what we measure
            (root / key).read_bytes()
        for key in args.detectors:
            entry = models[key]
            logger.info("Measuring %s (%d train, %d test images, %s)...", key, len(train_keys), len(test_keys), device)
            detectors[key] = in_child(
                "detector_worker",
                name=entry["name"],
                config=entry["config"],
                root=str(root),
                train_keys=train_keys,
                test_keys=test_keys,
                device=device,
                batch_size=batch_size,
                pixel_k=pixel_k,
                rounds=args.rounds,
                bad_keys=bad_keys,
                mask_keys=mask_keys,
            )
            d = detectors[key]
            logger.info(
                "%s: fit %.1f s, inference %.3f images/s, peak RSS %.2f GiB",
                key,
                d["fit_seconds"],
                d["infer_images_per_s"],
                d["peak_rss_gib"],
            )

    summary: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    for key, d in detectors.items():
        peak = max(d["peak_rss_gib"], d.get("cuda_peak_allocated_gib", 0.0))
        summary[key] = {
            "fit_seconds": d["fit_seconds"],
            "infer_images_per_s": d["infer_images_per_s"],
            "peak_rss_gib": d["peak_rss_gib"],
            **({f"quality_{k}": v for k, v in d["quality"].items()} if "quality" in d else {}),
        }
        checks[f"{key}_peak_memory_gib"] = {
            "value": peak,
            "target": f"< {TARGETS['peak_memory_gib_max']}",
            "met": peak < TARGETS["peak_memory_gib_max"],
        }
        if "bare" not in d:
            continue
        bare = d["bare"]
        summary[key].update(
            bare_backbone_images_per_s=len(test_keys) * len(bare["test_seconds"]) / sum(bare["test_seconds"]),
            bare_train_feature_seconds=sum(bare["train_feature_seconds"]) / len(bare["train_feature_seconds"]),
            inference_vs_bare_backbone=d["inference_vs_bare_backbone"],
            fit_vs_bare_feature_extraction=d["fit_vs_bare_feature_extraction"],
            interleaved_predict_vs_backbone=d["interleaved"]["predict_vs_backbone_throughput"],
        )
        if key == "patchcore":
            ratio, fit_ratio = d["inference_vs_bare_backbone"], d["fit_vs_bare_feature_extraction"]
            checks["patchcore_inference_ratio"] = {
                "value": ratio,
                "per_round": d["inference_ratio_per_round"],
                "interleaved_predict_only": d["interleaved"]["predict_vs_backbone_throughput"],
                "target": f">= {TARGETS['inference_ratio_min']}",
                "met": ratio >= TARGETS["inference_ratio_min"],
            }
            checks["patchcore_fit_ratio"] = {
                "value": fit_ratio,
                "range_over_bare_rounds": d["fit_ratio_range"],
                "target": f"<= {TARGETS['fit_ratio_max']}",
                "met": fit_ratio <= TARGETS["fit_ratio_max"],
            }

    result = {
        "benchmark": "inference",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git": git_revision(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "device": device,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "image": f"wallplugs-like 2448x2048 gray -> {SIDE}x{SIDE} (INTER_AREA), PNG",
        "batch_size": batch_size,
        "configs": {key: models[key]["config"] for key in args.detectors},
        "summary": summary,
        "checks": checks,
        "detectors": detectors,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str))
    logger.info("summary: %s", json.dumps(summary, indent=2))
    logger.info("checks: %s", json.dumps(checks, indent=2))
    logger.info("Results written to %s", args.output)


if __name__ == "__main__":
    main()
