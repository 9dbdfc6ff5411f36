"""Preprocessing throughput against a bare single-process reference, on the same files in the same run.

Generates N native-resolution wallplugs-like images (2448×2048 gray PNG), then times
  1. the bare reference: ``cv2.imread`` + ``cv2.resize`` (area) + ``cv2.imwrite`` in one process, and
  2. the preprocessing nodes (list, validate, decode, check, resize, write, index) with all cores,
  3. the same nodes again over the unchanged files (incremental skip),
and prints images/s of each and their ratios. Machines are noisy, so each timing is the best of ``--rounds``.

    python bench/preprocess.py --images 160 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2
from common import git_revision  # bench/common.py (the script directory is on sys.path)

from madfh_pipeline.categories import CategorySpec
from madfh_pipeline.datasets import ImageStore, MVTecAD2Dataset
from madfh_pipeline.demo.synth import SceneSpec, render_normal
from madfh_pipeline.imaging import write_png
from madfh_pipeline.pipelines.preprocessing.nodes import preprocess_images, validate_layout

logger = logging.getLogger("bench.preprocess")

CATEGORY = {"name": "wallplugs", "width": 2448, "height": 2048, "channels": 1}
PARAMS = {
    "target_width": 1024,
    "target_height": 1024,
    "mode": "stretch",
    "output_channels": None,
    "check_size": True,
    "incremental": True,
    "change_detection": "mtime",
    "workers": None,
}


def make_images(root: Path, n: int, seed: int) -> list[Path]:
    import numpy as np

    spec = SceneSpec("wallplugs", CATEGORY["width"], CATEGORY["height"], 1)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = root / "wallplugs" / "train" / "good" / f"{i:03d}_regular.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_png(path, render_normal(spec, rng))
        paths.append(path)
    return paths


def bare_reference(paths: list[Path], out: Path) -> float:
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        small = cv2.resize(image, (1024, 1024), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(out / path.name), small)
    return time.perf_counter() - start


def pipeline_run(root: Path, store_root: Path, fresh: bool) -> tuple[float, dict]:
    if fresh and store_root.exists():
        shutil.rmtree(store_root)
    start = time.perf_counter()
    manifest = MVTecAD2Dataset(str(root), "wallplugs").load()
    checked = validate_layout(manifest, CATEGORY)
    _, stats = preprocess_images(checked, PARAMS, CATEGORY, ImageStore(store_root))
    return time.perf_counter() - start, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("bench/results/preprocess.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    CategorySpec(**CATEGORY)  # validates the facts used here

    with tempfile.TemporaryDirectory(prefix="bench_pre_") as tmp:
        tmp_path = Path(tmp)
        paths = make_images(tmp_path / "raw", args.images, args.seed)
        for path in paths:  # warm the page cache so neither side pays for the first disk read
            path.read_bytes()
        ref_times, pipe_times, rerun_times = [], [], []
        for _ in range(args.rounds):
            ref_times.append(bare_reference(paths, tmp_path / "ref"))
            seconds, stats = pipeline_run(tmp_path / "raw", tmp_path / "store", fresh=True)
            assert stats["n_processed"] == len(paths), stats
            pipe_times.append(seconds)
            seconds, stats = pipeline_run(tmp_path / "raw", tmp_path / "store", fresh=False)
            assert stats["n_unchanged"] == len(paths) and stats["n_processed"] == 0, stats
            rerun_times.append(seconds)

    n = len(paths)
    result = {
        "git": git_revision(),
        "images": n,
        "size": f"{CATEGORY['width']}x{CATEGORY['height']} gray -> 1024x1024",
        "cores": os.cpu_count(),
        "reference_images_per_s": round(n / min(ref_times), 2),
        "pipeline_images_per_s": round(n / min(pipe_times), 2),
        "speedup_vs_reference": round(min(ref_times) / min(pipe_times), 2),
        "rerun_seconds": round(min(rerun_times), 3),
        "rerun_fraction_of_first_run": round(min(rerun_times) / min(pipe_times), 4),
        "rounds": args.rounds,
        "raw_seconds": {"reference": ref_times, "pipeline": pipe_times, "rerun": rerun_times},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    logger.warning(json.dumps({k: v for k, v in result.items() if k != "raw_seconds"}, indent=2))


if __name__ == "__main__":
    main()
