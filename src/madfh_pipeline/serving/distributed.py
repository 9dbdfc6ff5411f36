"""Batch inspection of a folder of images spread over Dask workers: a LocalCluster here, a plant's cluster there.

Why Dask distributed (and not Ray): it is pure Python, pip-installable next to the project, and the same
``Client`` code runs against a ``LocalCluster`` on one machine and against a scheduler address on a real cluster
(``dask-scheduler`` + ``dask-worker`` on the line PCs, ``dask-kubernetes``' operator or the Dask Helm chart on
Kubernetes) — the only change is ``scheduler_address`` in the parameters. The work is embarrassingly parallel (one
image → one record), so Dask's task scheduling and worker plugins are all that is needed; Ray's actors, object store
and its own cluster runtime would be more to install and operate for no gain here.

How the work is spread, and why:

- **The model is loaded once per worker**, by a :class:`InspectionModelPlugin` registered with the client: its
  ``setup`` runs on every worker (also on workers that join later), sets torch to ``torch_threads`` threads (one by
  default: N single-threaded workers beat one N-threaded process for per-image work, and they do not fight over
  cores) and loads the :class:`~madfh_pipeline.inspection.InspectionModel` from a folder the workers can read or an
  MLflow model URI (``models:/madfh-<category>@champion``; the workers then need ``MLFLOW_TRACKING_URI``).
  Loading is timed separately from inspection.
- **Paths cross the wire, not pixels**: a task carries a few file paths, the worker reads, hashes, decodes and
  inspects them and sends back small records (no maps; ``maps_dir`` makes the workers write them to shared storage).
  On a real cluster the folder must be mounted at the same path on every worker.
- **A bad file is a record, not a crash**: a file that cannot be read or decoded (or that the model refuses) gives a
  record with ``error`` set; the job goes on. The same function (:func:`inspect_file`) runs in the single-process path
  (:func:`inspect_paths`), so both give the same records.

Worker pools stay out of long-lived processes: :func:`inspect_folder` refuses to start a LocalCluster from any thread
but the main one (a model server's request threads, the review app's script thread), where spawning worker processes
is unsafe (see DESIGN.md §5). Such processes pass the ``scheduler_address`` of a cluster started elsewhere, or run
``python -m madfh_pipeline.serving batch`` as a job of its own.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from distributed import WorkerPlugin

from madfh_pipeline.categories import IMAGE_SUFFIXES
from madfh_pipeline.inspection import InspectionModel, InvalidImageError, decode_image

logger = logging.getLogger(__name__)

PLUGIN_NAME = "madfh-inspection-model"
#: Columns of a batch record, in order (the inspection fields of InspectionResult.to_record plus the file facts).
RECORD_COLUMNS: tuple[str, ...] = (
    "path",
    "content_hash",
    "bytes",
    "score",
    "threshold",
    "pixel_threshold",
    "decision",
    "review_low",
    "review_high",
    "explanation",
    "n_regions",
    "regions",
    "width",
    "height",
    "input_channels",
    "processing_ms",
    "cpu_ms",
    "model_version",
    "map_path",
    "mask_path",
    "error",
    "error_kind",
    "worker",
    "torch_threads",
)


# --------------------------------------------------------------------------------------------------------------------
# One file
# --------------------------------------------------------------------------------------------------------------------


def load_model(source: str | Path, device: str = "cpu") -> InspectionModel:
    """An inspection model from a folder (:meth:`InspectionModel.save`) or an MLflow model URI."""
    text = str(source)
    if text.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        from madfh_pipeline.serving.pyfunc import load_inspection_model

        return load_inspection_model(text, device)
    return InspectionModel.load(Path(text), device)


def _empty_record(path: str) -> dict[str, Any]:
    return dict.fromkeys(RECORD_COLUMNS) | {"path": path, "error": "", "error_kind": ""}


def inspect_file(model: InspectionModel, path: str | Path, maps_dir: str | Path | None = None) -> dict[str, Any]:
    """Read, hash, decode and inspect one file; every failure becomes the record's ``error`` (never raised).

    ``error_kind`` is ``input`` for a file that cannot be read or is refused as an image, ``model`` for a failure
    inside the model (its traceback goes to the log). With ``maps_dir``, the canvas anomaly map is written as
    ``<hash>.npy`` (float16) and the native region mask as ``<hash>_mask.png`` (0/255), named by content hash so
    equal files share them and nothing is overwritten by another file of the same name.
    """
    record = _empty_record(str(path))
    started_cpu = time.thread_time()
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return record | {"error": f"cannot read file: {exc}", "error_kind": "input"}
    record["bytes"] = len(data)
    record["content_hash"] = hashlib.blake2b(data, digest_size=16).hexdigest()
    try:
        image = decode_image(data, model.settings.limits)
        result = model.inspect(image, image_id=str(path))
    except InvalidImageError as exc:
        return record | {"error": str(exc), "error_kind": "input"}
    except Exception as exc:  # the model failed on a valid image: recorded and logged, the job goes on
        logger.warning("Inspection of '%s' failed: %s\n%s", path, exc, traceback.format_exc())
        return record | {"error": f"{type(exc).__name__}: {exc}", "error_kind": "model"}
    inspected = result.to_record()
    inspected.pop("image_id")
    record |= inspected
    if maps_dir is not None:
        import cv2

        folder = Path(maps_dir)
        folder.mkdir(parents=True, exist_ok=True)
        map_path = folder / f"{record['content_hash']}.npy"
        mask_path = folder / f"{record['content_hash']}_mask.png"
        np.save(map_path, result.anomaly_map.astype(np.float16))
        cv2.imwrite(str(mask_path), result.region_mask.astype(np.uint8) * 255)
        record |= {"map_path": str(map_path), "mask_path": str(mask_path)}
    record["cpu_ms"] = 1000.0 * (time.thread_time() - started_cpu)
    return record


def inspect_paths(
    model: InspectionModel, paths: Iterable[str | Path], maps_dir: str | Path | None = None
) -> pd.DataFrame:
    """The single-process path: the same records as the distributed one, in input order."""
    import torch

    threads = torch.get_num_threads()
    rows = [inspect_file(model, path, maps_dir) | {"worker": "local", "torch_threads": threads} for path in paths]
    return pd.DataFrame(rows, columns=list(RECORD_COLUMNS))


def list_images(folder: str | Path, recursive: bool = True, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files under ``folder`` by suffix (sorted): a corrupt ``.png`` is listed and becomes an error record."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"No folder '{folder}' to inspect.")
    pattern = "**/*" if recursive else "*"
    wanted = {s.lower() for s in suffixes}
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in wanted)


# --------------------------------------------------------------------------------------------------------------------
# Dask
# --------------------------------------------------------------------------------------------------------------------


class InspectionModelPlugin(WorkerPlugin):
    """Loads the inspection model once on each worker (and on workers that join later); one torch thread each."""

    name = PLUGIN_NAME

    def __init__(self, source: str, torch_threads: int = 1) -> None:
        self.source = str(source)
        self.torch_threads = int(torch_threads)
        self.model: InspectionModel | None = None
        self.load_seconds = 0.0

    def setup(self, worker: Any) -> None:
        import cv2
        import torch

        torch.set_num_threads(self.torch_threads)
        cv2.setNumThreads(1)
        started = time.perf_counter()
        self.model = load_model(self.source)
        self.load_seconds = time.perf_counter() - started
        logger.info("Worker %s loaded %s in %.1f s.", worker.address, self.model.version, self.load_seconds)

    def teardown(self, worker: Any) -> None:
        self.model = None


def _inspect_chunk(paths: list[str], maps_dir: str | None) -> list[dict[str, Any]]:
    """A Dask task: inspect a few files with the worker's model (module level, so it pickles by reference)."""
    import torch
    from distributed import get_worker

    worker = get_worker()
    plugin = worker.plugins.get(PLUGIN_NAME)
    if plugin is None or plugin.model is None:
        raise RuntimeError(f"Worker {worker.address} has no inspection model: register InspectionModelPlugin first.")
    if torch.get_num_threads() != plugin.torch_threads:  # thread settings are process-wide; keep them as asked
        torch.set_num_threads(plugin.torch_threads)
    threads = torch.get_num_threads()
    return [
        inspect_file(plugin.model, path, maps_dir) | {"worker": worker.address, "torch_threads": threads}
        for path in paths
    ]


def _worker_load_seconds(dask_worker: Any) -> float:
    return float(dask_worker.plugins[PLUGIN_NAME].load_seconds)


class DaskInspector:
    """Inspection over the workers of a Dask ``Client``; the model is loaded on every worker when this is built.

    ``load_seconds`` is the wall time of that registration and ``worker_load_seconds`` each worker's own load time,
    both kept apart from inspection throughput.
    """

    def __init__(self, client: Any, model_source: str | Path, torch_threads: int = 1) -> None:
        self.client = client
        started = time.perf_counter()
        client.register_plugin(InspectionModelPlugin(str(model_source), torch_threads), name=PLUGIN_NAME)
        self.load_seconds = time.perf_counter() - started
        self.worker_load_seconds: dict[str, float] = client.run(_worker_load_seconds)
        logger.info(
            "Inspection model loaded on %d worker(s) in %.1f s.", len(self.worker_load_seconds), self.load_seconds
        )

    @property
    def workers(self) -> list[str]:
        return sorted(self.worker_load_seconds)

    def run(
        self,
        paths: Sequence[str | Path],
        maps_dir: str | Path | None = None,
        chunk_size: int = 1,
        workers: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """Records of ``paths`` in input order. ``chunk_size`` files per task (1 balances best; raise it for
        thousands of tiny images), ``workers`` restricts the tasks to those worker addresses."""
        from distributed import as_completed

        names = [str(p) for p in paths]
        chunks = [names[i : i + chunk_size] for i in range(0, len(names), max(1, chunk_size))]
        futures = self.client.map(
            _inspect_chunk,
            chunks,
            maps_dir=None if maps_dir is None else str(maps_dir),
            pure=False,
            workers=list(workers) if workers else None,
            allow_other_workers=False,
        )
        position = {future.key: i for i, future in enumerate(futures)}
        done: dict[int, list[dict[str, Any]]] = {}
        for future, records in as_completed(futures, with_results=True):
            done[position[future.key]] = records
        rows = [record for i in range(len(chunks)) for record in done[i]]
        return pd.DataFrame(rows, columns=list(RECORD_COLUMNS))


def _check_main_thread() -> None:
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "Refusing to start a Dask LocalCluster outside the main thread: this looks like a long-lived process (a "
            "model server's request thread, the review app), where spawning worker processes is unsafe. Pass the "
            "scheduler_address of a cluster started on its own, or run `python -m madfh_pipeline.serving batch`."
        )


def inspect_folder(
    model_source: str | Path,
    folder: str | Path,
    scheduler_address: str | None = None,
    n_workers: int = 2,
    torch_threads: int = 1,
    chunk_size: int = 1,
    maps_dir: str | Path | None = None,
    recursive: bool = True,
) -> pd.DataFrame:
    """Inspect every image under ``folder`` on a Dask cluster and return one record per file (input order).

    ``scheduler_address`` (e.g. ``tcp://dask-scheduler:8786``, from the parameters): an existing cluster; ``None``
    starts a LocalCluster of ``n_workers`` single-threaded worker processes for this call and closes it after.
    """
    from distributed import Client, LocalCluster

    paths = list_images(folder, recursive)
    if not paths:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_SUFFIXES)}) under '{folder}'.")
    cluster = None
    if scheduler_address is None:
        _check_main_thread()
        cluster = LocalCluster(n_workers=int(n_workers), threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster if cluster is not None else scheduler_address)
    try:
        started = time.perf_counter()
        inspector = DaskInspector(client, model_source, torch_threads)
        records = inspector.run(paths, maps_dir, chunk_size)
        seconds = time.perf_counter() - started - inspector.load_seconds
        failed = int((records["error"] != "").sum())
        logger.info(
            "Inspected %d file(s) on %d worker(s) in %.1f s (%.2f images/s, model loading %.1f s not included); "
            "%d error record(s).",
            len(records),
            len(inspector.workers),
            seconds,
            len(records) / max(seconds, 1e-9),
            inspector.load_seconds,
            failed,
        )
        return records
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
