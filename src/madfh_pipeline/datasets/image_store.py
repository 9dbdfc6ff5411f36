"""A folder of processed images: written by the preprocessing node's output, streamed by the nodes downstream.

Why not a ``PartitionedDataset``: preprocessing writes hundreds of 1024² images from a process pool and must skip the
unchanged ones, and training must stream them in batches; materialising them as one node output would hold a whole
category in memory. So the node returns a *plan* (:class:`ImageWrites`: one picklable task per image, with a
fingerprint of everything that decides its output) and this dataset's ``save`` carries it out: it runs the tasks whose
fingerprint changed in worker processes, keeps the others, and records what it did in the store's index. Downstream
nodes take the store as an input, so the DAG shows preprocess → image store → fit / score, and a partial run
(``--from-nodes``) can never read images that the plan did not produce.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from kedro.io import AbstractDataset, DatasetError

from madfh_pipeline.imaging import read_image, write_png
from madfh_pipeline.progress import progress

logger = logging.getLogger(__name__)

INDEX_FILE = "_index.parquet"
LAST_WRITE_FILE = "_last_write.json"

#: Statuses in the index: written now, kept from an earlier write (same fingerprint), or refused with a problem.
STATUSES = ("processed", "unchanged", "skipped")


@dataclass
class ImageWrites:
    """What a node asks an :class:`ImageStore` to write.

    Each task is a dict with ``relpath`` (its key), ``fingerprint`` (everything that decides the output: source
    size and time or content hash, settings) and ``outputs`` (the keys it writes), plus whatever ``worker`` needs.
    ``worker`` is a module-level function (it runs in worker processes) that returns a result dict with ``status``
    (``processed`` or ``skipped``), ``problem`` (empty when fine), ``messages`` (warnings for the parent's log) and
    any facts for the index. ``known`` rows are recorded as they are, without work (problems found before decoding).
    """

    tasks: list[dict[str, Any]]
    worker: Callable[[dict[str, Any]], dict[str, Any]]
    workers: int = 1
    incremental: bool = True
    label: str = "write"
    known: list[dict[str, Any]] = field(default_factory=list)


class ImageStore:
    """Relative-key access to a folder of PNG images plus an index of what was written from which source."""

    def __init__(self, root: str | Path, compression: int | None = None, read_only: bool = False) -> None:
        self.root = Path(root)
        self.compression = compression
        self.read_only = read_only

    def __repr__(self) -> str:
        return f"ImageStore(root='{self.root}')"

    def path(self, key: str) -> Path:
        return self.root / key

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def read(self, key: str, channels: int | None = None) -> np.ndarray:
        return read_image(self.path(key), channels)

    def write(self, key: str, array: np.ndarray) -> None:
        if self.read_only:
            raise DatasetError(f"{self!r} is read-only.")
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_png(target, array, self.compression)

    def read_index(self) -> pd.DataFrame:
        """The rows written by the last write (empty when there was none or it is unreadable)."""
        index = self.root / INDEX_FILE
        if not index.is_file():
            return pd.DataFrame()
        try:
            return pd.read_parquet(index)
        except (OSError, ValueError) as exc:  # a broken index only costs a full re-run, never wrong data
            logger.warning("Ignoring unreadable store index '%s' (%s); every image is processed again.", index, exc)
            return pd.DataFrame()

    def last_write(self) -> dict[str, Any]:
        """Statistics of the last write (processed / unchanged / skipped counts, seconds, images/s, workers)."""
        path = self.root / LAST_WRITE_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def _write_index(self, frame: pd.DataFrame, stats: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / (INDEX_FILE + ".tmp")
        frame.to_parquet(tmp, index=False)
        tmp.replace(self.root / INDEX_FILE)
        (self.root / LAST_WRITE_FILE).write_text(json.dumps(stats, indent=2))

    # ---------------------------------------------------------------- carrying out a plan
    def _reusable(self, writes: ImageWrites) -> dict[str, dict[str, Any]]:
        """Earlier index rows, by key, whose fingerprint still matches and whose outputs are all still there."""
        previous = self.read_index() if writes.incremental else pd.DataFrame()
        if previous.empty or not {"relpath", "fingerprint", "status"} <= set(previous.columns):
            return {}
        rows = {r["relpath"]: r for r in previous.to_dict("records")}
        reusable: dict[str, dict[str, Any]] = {}
        for task in writes.tasks:
            old = rows.get(task["relpath"])
            if old is None or old["fingerprint"] != task["fingerprint"] or old["status"] not in STATUSES:
                continue
            if old["status"] == "skipped" or all(self.exists(k) for k in task.get("outputs", [task["relpath"]])):
                reusable[task["relpath"]] = old
        return reusable

    def apply(self, writes: ImageWrites) -> dict[str, Any]:
        """Carry out a plan: run the changed tasks (in processes when ``workers`` > 1), keep the rest, index all."""
        if self.read_only:
            raise DatasetError(f"{self!r} is read-only.")
        from madfh_pipeline.workers import process_pool

        reusable = self._reusable(writes)
        todo = [
            task | {"store_root": str(self.root), "compression": self.compression}
            for task in writes.tasks
            if task["relpath"] not in reusable
        ]
        workers = max(1, min(int(writes.workers or os.cpu_count() or 1), len(todo)))
        logger.info(
            "%s: %d to write, %d unchanged since the last run (kept), %d known problems; %d worker(s).",
            writes.label,
            len(todo),
            sum(1 for r in reusable.values() if r["status"] != "skipped"),
            len(writes.known) + sum(1 for r in reusable.values() if r["status"] == "skipped"),
            workers,
        )
        results: list[dict[str, Any]] = []
        started = time.perf_counter()
        if todo:
            bar = progress(total=len(todo), desc=writes.label, unit="img")
            if workers <= 1:
                outputs = map(writes.worker, todo)
                for result in outputs:
                    results.append(result)
                    bar.update()
            else:
                with process_pool(workers) as pool:
                    for result in pool.map(writes.worker, todo, chunksize=1):
                        results.append(result)
                        bar.update()
            bar.close()
        seconds = time.perf_counter() - started
        for result in results:  # worker messages reach the parent's log (time, level, handlers), not bare stderr
            for message in result.pop("messages", []) or []:
                logger.warning("%s", message)
        fingerprints = {t["relpath"]: t["fingerprint"] for t in writes.tasks}
        rows: list[dict[str, Any]] = [dict(row) for row in writes.known]
        for old in reusable.values():
            rows.append(old | {"status": "unchanged" if old["status"] != "skipped" else "skipped"})
        for result in results:
            rows.append(result | {"fingerprint": fingerprints[result["relpath"]]})
        frame = pd.DataFrame(rows)
        counts = {s: int((frame["status"] == s).sum()) if len(frame) else 0 for s in STATUSES}
        stats = {
            "n_tasks": len(writes.tasks),
            "n_processed": counts["processed"],
            "n_unchanged": counts["unchanged"],
            "n_skipped": counts["skipped"],
            "seconds": round(seconds, 3),
            "images_per_s": round(counts["processed"] / seconds, 3) if counts["processed"] and seconds > 0 else 0.0,
            "workers": workers,
        }
        self._write_index(frame, stats)
        logger.info(
            "%s: wrote %d images in %.1f s (%.2f images/s), kept %d unchanged, %d skipped for problems.",
            writes.label,
            counts["processed"],
            seconds,
            stats["images_per_s"],
            counts["unchanged"],
            counts["skipped"],
        )
        return stats


class ImageStoreDataset(AbstractDataset[ImageWrites, ImageStore]):
    """Catalog entry for an :class:`ImageStore`: ``save`` carries out an :class:`ImageWrites` plan, ``load`` gives
    the store (its index says what was written).

    Args:
        path: Folder of the store.
        compression: PNG compression level 0–9 for writes; ``None`` (OpenCV's default) was both the fastest and
            the smallest in our measurements (see :func:`madfh_pipeline.imaging.write_png`).
        read_only: A store that is only read (e.g. the raw category folder, for its original masks).
    """

    def __init__(
        self,
        path: str,
        compression: int | None = None,
        read_only: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._path = Path(path)
        self._compression = compression
        self._read_only = read_only
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "compression": self._compression, "read_only": self._read_only}

    def _exists(self) -> bool:
        return self._path.is_dir() if self._read_only else (self._path / INDEX_FILE).is_file()

    def load(self) -> ImageStore:
        if self._read_only and not self._path.is_dir():
            raise DatasetError(f"Folder '{self._path}' does not exist.")
        return ImageStore(self._path, self._compression, read_only=self._read_only)

    def save(self, data: ImageWrites) -> None:
        if not isinstance(data, ImageWrites):
            raise DatasetError(
                f"{type(self).__name__} at '{self._path}' saves an ImageWrites plan, got {type(data).__name__}."
            )
        ImageStore(self._path, self._compression, read_only=self._read_only).apply(data)
