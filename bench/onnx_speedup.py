"""PatchCore inference at 1024²: ONNX Runtime feature extractor against the torch CPU path, in the same run.

Target (issue 13): ONNX Runtime ≥ 1.3× the throughput of the torch path, maps equal within the stated tolerance.

What is compared: one fitted PatchCore (default configuration, a bank of 4096 patches — the default cap, so the
exact kNN costs what it costs in production), scored twice on the same 1024² canvases — once as is (torch), once with
its embedding replaced by the exported ONNX graph (:mod:`madfh_pipeline.serving.onnx`). Everything after the
embedding (kNN, reweighting, fused upsample + blur) is the same torch code in both. Measured:

  * ``predict``: ``detector.predict`` on a pre-built canvas tensor, per image — the PatchCore path itself;
  * ``inspect``: ``InspectionModel.inspect`` end to end on the native 2448×2048 image (validation, resize, predict,
    map back to native size, regions, explanation) — what a served request costs.

Fairness: both run in this process with the same thread count (torch's ``get_num_threads()``, which the ONNX session
copies); rounds are interleaved (torch, onnx, onnx, torch, ...) so load changes on the shared machine hit both; the
first call of each path is a warm-up and not timed. The ONNX export time is reported separately.

    .venv/bin/python bench/onnx_speedup.py                 # 3 test images, 3 rounds (~8 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import ROOT, git_revision  # bench/common.py (the script directory is on sys.path)

logger = logging.getLogger("bench.onnx")
TARGET_SPEEDUP = 1.3
SIDE = 1024
ATOL, RTOL = 1e-3, 1e-5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3, help="test images")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train", type=int, default=4, help="training scenes (bank capped at 4096 patches)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "onnx_speedup.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")

    from madfh_pipeline.demo.synth import SceneSpec
    from madfh_pipeline.inspection import InspectionModel, InspectionSettings, to_tensor
    from madfh_pipeline.serving.demo import build_demo_model, render_normals

    started = time.perf_counter()
    torch_model = build_demo_model(
        category="wallplugs", width=2448, height=2048, channels=1, n_train=args.train, n_validation=3,
        canvas=(SIDE, SIDE), config={"coreset_ratio": 0.07, "max_bank_size": 4096, "pool_max_patches": 250_000},
    )  # fmt: skip
    fit_seconds = time.perf_counter() - started
    bank = int(torch_model.detector.get_state()["memory_bank"].shape[0])
    started = time.perf_counter()
    onnx_model = InspectionModel(  # runs on a copy of the detector: torch_model keeps the torch path
        torch_model.detector, torch_model.preprocessing, torch_model.category,
        InspectionSettings.from_mapping(torch_model.settings.to_dict() | {"runtime": "onnx"}),
    )  # fmt: skip
    export_seconds = time.perf_counter() - started
    images = render_normals(SceneSpec("wallplugs", 2448, 2048, 1), args.n, seed=7)
    canvases = [to_tensor([torch_model.preprocessing.to_canvas(image)[0]]) for image in images]
    models = {"torch": torch_model, "onnx": onnx_model}

    # Warm-up (not timed) and the equality check.
    outputs = {name: [m.detector.predict(c) for c in canvases] for name, m in models.items()}
    map_error = max(
        float(np.abs(a.maps - b.maps).max()) for a, b in zip(outputs["torch"], outputs["onnx"], strict=True)
    )
    score_error = max(
        float(np.abs(a.scores - b.scores).max()) for a, b in zip(outputs["torch"], outputs["onnx"], strict=True)
    )
    within = all(
        np.allclose(b.maps, a.maps, rtol=RTOL, atol=ATOL)
        for a, b in zip(outputs["torch"], outputs["onnx"], strict=True)
    )

    timings: dict[str, dict[str, list[float]]] = {n: {"predict": [], "inspect": []} for n in models}
    loads: list[float] = []
    for r in range(args.rounds):
        order = ["torch", "onnx"] if r % 2 == 0 else ["onnx", "torch"]
        for name in order:
            model = models[name]
            for canvas in canvases:
                t0 = time.perf_counter()
                with torch.no_grad():
                    model.detector.predict(canvas)
                timings[name]["predict"].append(time.perf_counter() - t0)
            for image in images:
                t0 = time.perf_counter()
                model.inspect(image)
                timings[name]["inspect"].append(time.perf_counter() - t0)
        loads.append(os.getloadavg()[0])
        logger.info(
            "round %d: predict torch %.2f s, onnx %.2f s per image (load %.1f)",
            r, statistics.median(timings["torch"]["predict"][-args.n :]),
            statistics.median(timings["onnx"]["predict"][-args.n :]), loads[-1],
        )  # fmt: skip

    def median(name: str, what: str) -> float:
        return statistics.median(timings[name][what])

    def per_round(what: str) -> list[float]:
        return [
            statistics.median(timings["torch"][what][r * args.n : (r + 1) * args.n])
            / statistics.median(timings["onnx"][what][r * args.n : (r + 1) * args.n])
            for r in range(args.rounds)
        ]

    summary: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git": git_revision(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "onnx_threads": vars(onnx_model.detector)["_embed"].threads,
        "canvas": SIDE,
        "bank_size": bank,
        "images": args.n,
        "rounds": args.rounds,
        "fit_seconds": fit_seconds,
        "onnx_export_seconds": export_seconds,
        "predict_seconds_torch": median("torch", "predict"),
        "predict_seconds_onnx": median("onnx", "predict"),
        "predict_speedup": median("torch", "predict") / median("onnx", "predict"),
        "predict_speedup_per_round": per_round("predict"),
        "inspect_seconds_torch": median("torch", "inspect"),
        "inspect_seconds_onnx": median("onnx", "inspect"),
        "inspect_speedup": median("torch", "inspect") / median("onnx", "inspect"),
        "inspect_speedup_per_round": per_round("inspect"),
        "max_abs_map_difference": map_error,
        "max_abs_score_difference": score_error,
        "maps_within_tolerance": within,
        "tolerance": {"atol": ATOL, "rtol": RTOL},
        "load_average": loads,
        "target_speedup": TARGET_SPEEDUP,
    }
    summary["target_met"] = summary["predict_speedup"] >= TARGET_SPEEDUP and within
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"summary": summary, "timings": timings}, indent=2, default=str))
    logger.info("summary: %s", json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
