"""Which fusion rule for the hybrid detector: concatenation with per-source normalisation, or late fusion of maps?

MiniCPM-V's weights are not on our machines, so the choice is measured with a second *offline CNN source* standing in
for the VLM: EfficientNet-Lite0's deeper, coarser stages (``blocks.5``, stride 32: semantic, low resolution, like a
ViT's patch tokens) beside the hybrid's usual CNN source (``blocks.2`` + ``blocks.4``, stride 8). What this measures
is how each rule combines two sources of different resolution, width and scale — the property the choice depends on
— not how good MiniCPM-V's features are (that needs the real weights; docs/vlm.md).

Protocol (never tune on what is reported): BSData's test_public (120 good + 167 bad, real pitting) is split into two
seeded halves stratified by label; the rule is *chosen* on the selection half and every number is *reported* on the
other half. Single-source runs are the reference: a fusion rule is only worth having if it beats its best source.

    .venv/bin/python bench/fusion.py --root /path/to/converted/root      # after `bench/bsdata.py convert --dest ...`
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import ROOT, git_revision  # bench/common.py (the script directory is on sys.path)

from madfh_pipeline import metrics as M
from madfh_pipeline.imaging import Geometry, read_image
from madfh_pipeline.models.base import build_detector

logger = logging.getLogger("bench.fusion")

VARIANTS: dict[str, dict[str, Any]] = {
    "cnn only (blocks.2+4)": {"sources": ["cnn"]},
    "stand-in only (blocks.5)": {"sources": ["cnn2"]},
    "concat (per-source normalisation)": {"sources": ["cnn", "cnn2"], "fusion": "concat"},
    "late (z-scored maps)": {"sources": ["cnn", "cnn2"], "fusion": "late"},
}
BASE = {
    "cnn": {"backbone": "efficientnet_lite0", "layers": ["blocks.2", "blocks.4"]},
    "cnn2": {"backbone": "efficientnet_lite0", "layers": ["blocks.5"]},
    "max_bank_size": 8192,
    "bank_ratio": 0.05,
}


def _load(folder: Path, size: int, channels: int = 3) -> tuple[list[str], torch.Tensor]:
    names = sorted(p.name for p in folder.glob("*.png"))
    images = []
    for name in names:
        image = read_image(folder / name, channels)
        geometry = Geometry.plan(image.shape[1], image.shape[0], size, size, "stretch")
        images.append(geometry.apply(image))
    array = np.stack(images).astype(np.float32) / 255.0
    return names, torch.from_numpy(array).permute(0, 3, 1, 2)


def _masks(folder: Path, names: list[str], size: int) -> list[np.ndarray]:
    out = []
    for name in names:
        mask = read_image(folder / name.replace(".png", "_mask.png"), 1)
        out.append(Geometry.plan(mask.shape[1], mask.shape[0], size, size, "stretch").apply(mask, is_mask=True) > 0)
    return out


def _evaluate(labels: np.ndarray, scores: np.ndarray, masks: list[np.ndarray], maps: np.ndarray) -> dict[str, float]:
    pro = M.au_pro_at_limits(masks, list(maps), fpr_limits=(0.05, 0.3))
    return {
        "image_auroc": M.image_auroc(labels, scores),
        "pixel_auroc": M.pixel_auroc(masks, list(maps)),
        "au_pro_03": pro[0.3],
        "au_pro_005": pro[0.05],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="folder holding the converted 'bsdata' category")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "fusion.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    category = args.root / "bsdata"
    if not category.is_dir():
        raise SystemExit(f"No converted BSData at {category}: run `bench/bsdata.py convert --dest {args.root}` first.")
    _, train = _load(category / "train/good", args.size)
    good_names, good = _load(category / "test_public/good", args.size)
    bad_names, bad = _load(category / "test_public/bad", args.size)
    masks = [np.zeros((args.size, args.size), bool)] * len(good_names) + _masks(
        category / "test_public/ground_truth/bad", bad_names, args.size
    )
    test = torch.cat([good, bad])
    labels = np.array([0] * len(good_names) + [1] * len(bad_names))
    rng = np.random.default_rng(args.seed)
    select = np.zeros(len(labels), bool)
    for label in (0, 1):
        idx = np.flatnonzero(labels == label)
        select[rng.choice(idx, size=len(idx) // 2, replace=False)] = True
    results: dict[str, Any] = {"revision": git_revision(), "size": args.size, "variants": {}}
    torch.set_num_threads(2)
    for name, variant in VARIANTS.items():
        started = time.perf_counter()
        detector = build_detector("hybrid", BASE | variant)
        detector.fit(lambda: train.split(8))
        fit_s = time.perf_counter() - started
        outputs = [detector.predict(chunk) for chunk in test.split(8)]
        scores = np.concatenate([o.scores for o in outputs])
        maps = np.concatenate([o.maps for o in outputs])
        halves = {}
        for half, keep in (("selection", select), ("report", ~select)):
            halves[half] = _evaluate(
                labels[keep], scores[keep], [m for m, k in zip(masks, keep, strict=True) if k], maps[keep]
            )
        results["variants"][name] = halves | {"fit_seconds": fit_s, "seconds": time.perf_counter() - started}
        logger.info("%s: selection %s | report %s", name, halves["selection"], halves["report"])
    fused = [n for n in VARIANTS if VARIANTS[n].get("fusion")]
    chosen = max(fused, key=lambda n: results["variants"][n]["selection"]["au_pro_005"])
    results["chosen_on_selection_half"] = chosen
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    logger.info("Chosen on the selection half (AU-PRO@0.05): %s. Results in %s", chosen, args.output)


if __name__ == "__main__":
    main()
