"""Batch inspection throughput on a Dask LocalCluster: 1 worker against 2 workers, one torch thread each.

Target (issue 13): 2 workers ≥ 1.6× the images/s of 1 worker on this 2-core machine.

How the comparison is kept fair:
  * one LocalCluster of 2 single-threaded worker processes for the whole bench; the "1 worker" rounds pin every task
    to the first worker (``workers=[w0]``), so both configurations use the same warm processes, the same loaded
    model and the same scheduler — only the parallelism differs;
  * model loading is timed on its own (plugin registration) and excluded from throughput;
  * a warm-up pass runs every image once on each worker before any timed round (first-call costs: resample
    matrices, allocator growth, page cache);
  * the same images in every round; ``--rounds`` rounds, the order of the two configurations alternating per round
    (1-2, 2-1, ...) so a load change on the shared machine hits both; the ratio is reported per round and for the
    medians. The machine's load average is recorded with each round: other jobs on these 2 cores take CPU from the
    2-worker rounds first, so a ratio measured under load says more about the neighbours than about the code.

Images: ``--n`` wallplugs-like gray scenes at ``--native`` (default 1224×1024, half the real size) written as PNGs;
the model is a PatchCore fitted on other scenes of the same kind at a ``--canvas``² canvas (default 512).

    .venv/bin/python bench/dask_scaling.py                      # 16 images, 3 rounds (~5 min on 2 idle cores)
    .venv/bin/python bench/dask_scaling.py --n 32 --rounds 5 --quiet 0.3   # rounds only while the machine is quiet
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from common import ROOT, git_revision  # bench/common.py (the script directory is on sys.path)

logger = logging.getLogger("bench.distributed")
TARGET_RATIO = 1.6


def make_images(folder: Path, n: int, width: int, height: int, seed: int) -> list[Path]:
    from madfh_pipeline.demo.synth import SceneSpec, render_normal

    folder.mkdir(parents=True, exist_ok=True)
    spec = SceneSpec("wallplugs", width, height, 1)
    paths = []
    for i in range(n):
        path = folder / f"{i:04d}.png"
        if not path.is_file():
            cv2.imwrite(str(path), render_normal(spec, np.random.default_rng([seed, i])))
        paths.append(path)
    return paths


_TICK = os.sysconf("SC_CLK_TCK")


def _busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: everything but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / _TICK


def _own_seconds(pids: list[int]) -> float:
    """CPU seconds (user + system) of our own processes: this one, the scheduler's, the workers'."""
    total = 0.0
    for pid in pids:
        try:
            parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(parts[11]) + int(parts[12])) / _TICK
    return total


def foreign_cores(pids: list[int], seconds: float = 2.0) -> float:
    """Cores' worth of CPU other jobs used over ``seconds`` (all busy time minus ours)."""
    busy, own, started = _busy_seconds(), _own_seconds(pids), time.perf_counter()
    time.sleep(seconds)
    elapsed = time.perf_counter() - started
    return max(0.0, (_busy_seconds() - busy) - (_own_seconds(pids) - own)) / elapsed


def wait_for_quiet(pids: list[int], threshold: float, timeout: float) -> float:
    """Wait (up to ``timeout`` s) until other jobs use less than ``threshold`` cores; returns the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        reading = foreign_cores(pids)
        if reading < threshold or time.monotonic() > deadline:
            return reading
        if int(time.monotonic()) % 60 < 3:  # a line a minute, not one per probe
            logger.info("other jobs use %.2f cores (threshold %.2f): waiting", reading, threshold)
        time.sleep(1.0)


def timed_round(inspector: Any, paths: list[Path], workers: list[str] | None, pids: list[int]) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    busy, own = _busy_seconds(), _own_seconds(pids)
    started = time.perf_counter()
    records = inspector.run(paths, workers=workers)
    seconds = time.perf_counter() - started
    foreign = max(0.0, (_busy_seconds() - busy) - (_own_seconds(pids) - own)) / seconds
    errors = int((records["error"] != "").sum())
    if errors:
        raise RuntimeError(f"{errors} error record(s) in a timed round: {records['error'].unique()}")
    return {
        "workers": len(workers) if workers else len(inspector.workers),
        "seconds": seconds,
        "images_per_s": len(paths) / seconds,
        "cpu_seconds": float(records["cpu_ms"].sum()) / 1000.0,
        "workers_used": int(records["worker"].nunique()),
        "torch_threads": sorted(int(t) for t in records["torch_threads"].unique()),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "foreign_cores": foreign,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="images per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--native", default="1224x1024", help="native WxH of the images")
    parser.add_argument("--canvas", type=int, default=512, help="square canvas the model works at")
    parser.add_argument("--train", type=int, default=8, help="training scenes of the model")
    parser.add_argument(
        "--quiet", type=float, default=None, help="wait before each round until other jobs use < this many cores"
    )
    parser.add_argument("--wait-timeout", type=float, default=1800.0, help="longest wait for --quiet, seconds")
    parser.add_argument("--cache", type=Path, default=None, help="keep images and model here between runs")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "dask_scaling.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")

    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)  # after the import, which sets its own levels

    from madfh_pipeline.serving.demo import build_demo_model
    from madfh_pipeline.serving.distributed import DaskInspector

    width, height = (int(v) for v in args.native.lower().split("x"))
    work = args.cache or Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    paths = make_images(work / "images", args.n, width, height, seed=1)
    model_dir = work / f"model_{width}x{height}_{args.canvas}_{args.train}"
    if not (model_dir / "inspection.json").is_file():
        started = time.perf_counter()
        model = build_demo_model(
            category="wallplugs", width=width, height=height, channels=1, n_train=args.train, n_validation=4,
            canvas=(args.canvas, args.canvas), config={"coreset_ratio": 0.05, "max_bank_size": 2048},
        )  # fmt: skip
        model.save(model_dir)
        logger.info("Model fitted and saved in %.1f s.", time.perf_counter() - started)

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    try:
        inspector = DaskInspector(client, model_dir, torch_threads=1)
        first = inspector.workers[0]
        pids = [os.getpid(), *client.run(os.getpid).values()]  # this process runs the scheduler too
        for worker in inspector.workers:  # warm-up: every image once on each worker
            inspector.run(paths, workers=[worker])
        rounds = []
        for r in range(args.rounds):
            order = [[first], None] if r % 2 == 0 else [None, [first]]
            for workers in order:
                quiet = wait_for_quiet(pids, args.quiet, args.wait_timeout) if args.quiet is not None else None
                result = timed_round(inspector, paths, workers, pids) | {"round": r, "foreign_before": quiet}
                rounds.append(result)
                logger.info(
                    "round %d, %d worker(s): %.2f images/s (%.1f s; other jobs used %.2f cores, load %.1f→%.1f)",
                    r, result["workers"], result["images_per_s"], result["seconds"], result["foreign_cores"],
                    result["load_before"], result["load_after"],
                )  # fmt: skip
        load_seconds, worker_load = inspector.load_seconds, inspector.worker_load_seconds
    finally:
        client.close()
        cluster.close()

    one = [x["images_per_s"] for x in rounds if x["workers"] == 1]
    two = [x["images_per_s"] for x in rounds if x["workers"] == 2]
    per_round = [b / a for a, b in zip(one, two, strict=True)]
    ratio = statistics.median(two) / statistics.median(one)
    cpu_per_image = {
        n: statistics.median(x["cpu_seconds"] / args.n for x in rounds if x["workers"] == n) for n in (1, 2)
    }
    summary = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git": git_revision(),
        "cpus": os.cpu_count(),
        "images": args.n,
        "native": [width, height],
        "canvas": args.canvas,
        "rounds": args.rounds,
        "model_load_seconds": load_seconds,
        "worker_load_seconds": worker_load,
        "images_per_s_1_worker": statistics.median(one),
        "images_per_s_2_workers": statistics.median(two),
        "scaling_ratio": ratio,
        "scaling_ratio_per_round": per_round,
        "cpu_seconds_per_image": cpu_per_image,
        "foreign_cores_median": {
            n: statistics.median(x["foreign_cores"] for x in rounds if x["workers"] == n) for n in (1, 2)
        },
        "target_ratio": TARGET_RATIO,
        "target_met": ratio >= TARGET_RATIO,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"summary": summary, "rounds": rounds}, indent=2, default=str))
    logger.info("summary: %s", json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
