"""Anomaly maps and benchmark submission files: written by the nodes' outputs, streamed by the nodes downstream.

Same reasoning as :mod:`madfh_pipeline.datasets.image_store`: a category's maps at 1024² are hundreds of megabytes,
so they are never one in-memory node output. The scoring node returns a :class:`MapWrites` plan — which images, a
fingerprint of what decides each map (model identity + image fingerprint), and a function that scores a list of keys
lazily in batches — and :class:`MapStoreDataset` carries it out: it runs the model only on images whose map is missing
or stale, writes each map as it comes, and indexes image scores next to the maps. The export node likewise returns
``{file: callable}`` for :class:`SubmissionDataset`. The DAG therefore shows model → maps → metrics / figures / export.

Maps are stored as float32 by default: float16 (half the disk) rounds nearby scores into ties, which moves the
metrics the benchmark ranks by; ``map_dtype: float16`` is available where disk matters more.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import tifffile
from kedro.io import AbstractDataset, DatasetError

from madfh_pipeline.imaging import write_png
from madfh_pipeline.progress import progress

logger = logging.getLogger(__name__)

SCORES_FILE = "_scores.parquet"
LAST_WRITE_FILE = "_last_write.json"


def map_key(relpath: str) -> str:
    """Where the map of image ``relpath`` lives in a map store."""
    return str(PurePosixPath("maps") / PurePosixPath(relpath).with_suffix(".npy"))


@dataclass
class MapWrites:
    """What a scoring node asks a :class:`MapStore` to write.

    ``items`` are ``(image key, fingerprint)`` pairs; ``compute(keys)`` yields ``(key, image score, map)`` — or
    ``(key, score, map, extra)`` with a dict of further columns for the index (a decision, an explanation, an error:
    then the map may be ``None`` and the score NaN) — for the keys that need scoring, in any batching it likes (it is
    only called for those). ``model`` names the model in the index.
    """

    items: list[tuple[str, str]]
    compute: Callable[[list[str]], Iterator[tuple[Any, ...]]]
    model: str = ""
    incremental: bool = True
    label: str = "score"


class MapStore:
    """Relative-key access to anomaly maps (``.npy``) and the image scores indexed next to them."""

    def __init__(self, root: str | Path, map_dtype: str = "float32") -> None:
        self.root = Path(root)
        self.map_dtype = np.dtype(map_dtype)

    def __repr__(self) -> str:
        return f"MapStore(root='{self.root}')"

    def _target(self, key: str) -> Path:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def write_map(self, key: str, anomaly_map: np.ndarray) -> None:
        np.save(self._target(key), np.asarray(anomaly_map).astype(self.map_dtype), allow_pickle=False)

    def read_map(self, key: str) -> np.ndarray:
        path = self.root / key
        if not path.is_file():
            raise FileNotFoundError(f"Anomaly map '{path}' is missing: run the scoring node for this model first.")
        return np.load(path, allow_pickle=False).astype(np.float32)

    def scores(self) -> pd.DataFrame:
        """One row per image the last write covered: ``relpath``, ``score``, ``map_key``, ``fingerprint``."""
        path = self.root / SCORES_FILE
        if not path.is_file():
            raise FileNotFoundError(f"No scores in '{self.root}': run the scoring node for this model first.")
        return pd.read_parquet(path)

    def last_write(self) -> dict[str, Any]:
        path = self.root / LAST_WRITE_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def apply(self, writes: MapWrites) -> dict[str, Any]:
        """Score what changed, keep what did not, and index every image's score with its map."""
        previous: dict[str, dict[str, Any]] = {}
        if writes.incremental and (self.root / SCORES_FILE).is_file():
            try:
                previous = {r["relpath"]: r for r in self.scores().to_dict("records")}
            except (OSError, ValueError) as exc:
                logger.warning("Ignoring unreadable score index in '%s' (%s); scoring everything.", self.root, exc)
        rows: dict[str, dict[str, Any]] = {}
        todo: list[str] = []
        fingerprints = dict(writes.items)
        for key, fingerprint in writes.items:
            old = previous.get(key)
            kept_map = bool(old is not None and (not old["map_key"] or (self.root / old["map_key"]).is_file()))
            if old is not None and old["fingerprint"] == fingerprint and kept_map:
                rows[key] = old
            else:
                todo.append(key)
        started = time.perf_counter()
        if todo:
            bar = progress(total=len(todo), desc=writes.label, unit="img")
            for item in writes.compute(todo):
                key, score, anomaly_map = item[:3]
                extra = dict(item[3]) if len(item) > 3 else {}
                if anomaly_map is not None:
                    self.write_map(map_key(key), anomaly_map)
                rows[key] = {
                    "relpath": key,
                    "score": float(score),
                    "map_key": map_key(key) if anomaly_map is not None else "",
                    "fingerprint": fingerprints[key],
                    "model": writes.model,
                    **extra,
                }
                bar.update()
            bar.close()
        seconds = time.perf_counter() - started
        missing = [k for k, _ in writes.items if k not in rows]
        if missing:
            raise DatasetError(f"{writes.label}: the scorer returned no map for {len(missing)} image(s): {missing[:5]}")
        frame = pd.DataFrame([rows[k] for k, _ in writes.items])
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / (SCORES_FILE + ".tmp")
        frame.to_parquet(tmp, index=False)
        tmp.replace(self.root / SCORES_FILE)
        stats = {
            "n_images": len(writes.items),
            "n_scored": len(todo),
            "n_reused": len(writes.items) - len(todo),
            "seconds": round(seconds, 3),
            "images_per_s": round(len(todo) / seconds, 3) if todo and seconds > 0 else 0.0,
        }
        (self.root / LAST_WRITE_FILE).write_text(json.dumps(stats, indent=2))
        if todo:
            logger.info(
                "%s: scored %d images in %.1f s (%.2f images/s), reused %d unchanged maps.",
                writes.label,
                len(todo),
                seconds,
                stats["images_per_s"],
                stats["n_reused"],
            )
        else:
            logger.info("%s: all %d maps reused (same model and images); no forward pass.", writes.label, len(rows))
        return stats


class MapStoreDataset(AbstractDataset[MapWrites, MapStore]):
    """Catalog entry for a :class:`MapStore`: ``save`` carries out a :class:`MapWrites` plan, ``load`` gives the store."""

    def __init__(self, path: str, map_dtype: str = "float32", metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self._map_dtype = map_dtype
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "map_dtype": self._map_dtype}

    def _exists(self) -> bool:
        return (self._path / SCORES_FILE).is_file()

    def load(self) -> MapStore:
        return MapStore(self._path, self._map_dtype)

    def save(self, data: MapWrites) -> None:
        if not isinstance(data, MapWrites):
            raise DatasetError(
                f"{type(self).__name__} at '{self._path}' saves a MapWrites plan, got {type(data).__name__}."
            )
        MapStore(self._path, self._map_dtype).apply(data)


class SubmissionDataset(AbstractDataset[Mapping[str, Callable[[], np.ndarray]], list[str]]):
    """The benchmark's submission tree: ``save({relative file: callable})`` renders and writes one file at a time.

    ``.tiff`` files are single-channel float16 TIFFs (the MVTec AD 2 format), ``.png`` files 8-bit images (the
    thresholded maps). ``load`` lists the files present.
    """

    def __init__(self, path: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}

    def _exists(self) -> bool:
        return self._path.is_dir()

    def load(self) -> list[str]:
        return sorted(str(p.relative_to(self._path)) for p in self._path.rglob("*") if p.is_file())

    def save(self, data: Mapping[str, Callable[[], np.ndarray]]) -> None:
        bar = progress(total=len(data), desc=f"export {self._path.name}", unit="file")
        for rel, render in data.items():
            target = self._path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            array = render()
            suffix = target.suffix.lower()
            if suffix in (".tif", ".tiff"):
                tifffile.imwrite(target, np.asarray(array, dtype=np.float16))
            elif suffix == ".png":
                write_png(target, np.asarray(array))
            else:
                raise DatasetError(f"Submission file '{rel}': only .tiff and .png are written.")
            bar.update()
        bar.close()
