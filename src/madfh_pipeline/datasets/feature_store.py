"""Per-image feature grids (e.g. MiniCPM-V's vision tokens) in ``04_feature``: written by the ``vlm_features`` stage,
read by the detectors that fuse them.

One safetensors file per image (``grid`` float16 (D, h, w) with the spatial layout kept, ``pooled`` float32 (D',)),
indexed by image key, fingerprint (image + model + settings) and the *content hash* of the exact pixels the features
were computed from. Detectors look features up by content hash, not by file name: a detector only receives pixels
(that is what lets it be served), and a hash match guarantees the stored features belong to those very pixels.
Like the map store, the stage returns a plan (:class:`FeatureWrites`) and this dataset carries it out incrementally:
the model is only loaded and run for images whose features are missing or stale.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import torch
from kedro.io import AbstractDataset, DatasetError

from madfh_pipeline.progress import progress

logger = logging.getLogger(__name__)

INDEX_FILE = "_index.parquet"
LAST_WRITE_FILE = "_last_write.json"


def content_hash(image: torch.Tensor | np.ndarray) -> str:
    """Hash of an image's 8-bit pixels and shape: (C, H, W) floats in [0, 1], or uint8 (H, W[, C]) arrays.

    Both forms of the same decoded image hash alike, so a feature computed from the image store matches the batch a
    detector receives.
    """
    if isinstance(image, torch.Tensor):
        array = (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise ValueError(f"content_hash expects uint8 arrays or [0, 1] tensors, got {array.dtype}.")
        array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(array.shape).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def feature_key(relpath: str) -> str:
    return str(PurePosixPath("features") / PurePosixPath(relpath).with_suffix(".safetensors"))


@dataclass
class FeatureWrites:
    """What a feature stage asks a :class:`FeatureStore` to write.

    ``items``: ``(image key, fingerprint)``; ``compute(keys)`` yields ``(key, content hash, grid, pooled)`` for the
    keys that need it (and should load its model lazily, on first call, so that a fully reused run loads nothing).
    """

    items: list[tuple[str, str]]
    compute: Callable[[list[str]], Iterator[tuple[str, str, torch.Tensor, torch.Tensor]]]
    source: str = ""
    incremental: bool = True
    label: str = "features"


class FeatureStore:
    """Read access by image key or by content hash; ``apply`` writes a :class:`FeatureWrites` plan."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._by_hash: dict[str, str] | None = None

    def __repr__(self) -> str:
        return f"FeatureStore(root='{self.root}')"

    def index(self) -> pd.DataFrame:
        path = self.root / INDEX_FILE
        return pd.read_parquet(path) if path.is_file() else pd.DataFrame()

    def last_write(self) -> dict[str, Any]:
        path = self.root / LAST_WRITE_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def _read(self, file: str) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors.torch import load_file

        tensors = load_file(str(self.root / file))
        return tensors["grid"].float(), tensors["pooled"].float()

    def get(self, relpath: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(grid (D, h, w), pooled (D',))`` of an image key."""
        path = self.root / feature_key(relpath)
        if not path.is_file():
            raise FileNotFoundError(f"No features for '{relpath}' in {self.root}: run the vlm_features stage first.")
        return self._read(feature_key(relpath))

    def lookup(self, hashes: list[str]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Stored features of images with these content hashes (``None`` where there are none)."""
        if self._by_hash is None:
            index = self.index()
            self._by_hash = dict(zip(index["content_hash"], index["file"], strict=True)) if len(index) else {}
        return [self._read(self._by_hash[h]) if h in self._by_hash else None for h in hashes]

    def apply(self, writes: FeatureWrites) -> dict[str, Any]:
        from safetensors.torch import save_file

        previous: dict[str, dict[str, Any]] = {}
        if writes.incremental:
            previous = {r["relpath"]: r for r in self.index().to_dict("records")}
        rows: dict[str, dict[str, Any]] = {}
        todo: list[str] = []
        for key, fingerprint in writes.items:
            old = previous.get(key)
            if old is not None and old["fingerprint"] == fingerprint and (self.root / old["file"]).is_file():
                rows[key] = old
            else:
                todo.append(key)
        fingerprints = dict(writes.items)
        started = time.perf_counter()
        if todo:
            bar = progress(total=len(todo), desc=writes.label, unit="img")
            for key, digest, grid, pooled in writes.compute(todo):
                file = feature_key(key)
                target = self.root / file
                target.parent.mkdir(parents=True, exist_ok=True)
                save_file(
                    {
                        "grid": grid.detach().to(torch.float16).contiguous().cpu(),
                        "pooled": pooled.detach().float().cpu(),
                    },
                    str(target),
                    metadata={"source": writes.source, "relpath": key},
                )
                rows[key] = {
                    "relpath": key,
                    "fingerprint": fingerprints[key],
                    "content_hash": digest,
                    "file": file,
                    "grid_shape": json.dumps(list(grid.shape)),
                    "source": writes.source,
                }
                bar.update()
            bar.close()
        seconds = time.perf_counter() - started
        missing = [k for k, _ in writes.items if k not in rows]
        if missing:
            raise DatasetError(f"{writes.label}: no features were computed for {len(missing)} image(s): {missing[:5]}")
        self.root.mkdir(parents=True, exist_ok=True)
        frame = pd.DataFrame([rows[k] for k, _ in writes.items])
        tmp = self.root / (INDEX_FILE + ".tmp")
        frame.to_parquet(tmp, index=False)
        tmp.replace(self.root / INDEX_FILE)
        stats = {
            "n_images": len(writes.items),
            "n_computed": len(todo),
            "n_reused": len(writes.items) - len(todo),
            "seconds": round(seconds, 3),
            "images_per_s": round(len(todo) / seconds, 3) if todo and seconds > 0 else 0.0,
            "source": writes.source,
        }
        (self.root / LAST_WRITE_FILE).write_text(json.dumps(stats, indent=2))
        self._by_hash = None
        if todo:
            logger.info(
                "%s: computed features of %d images in %.1f s, reused %d.",
                writes.label,
                len(todo),
                seconds,
                len(rows) - len(todo),
            )
        else:
            logger.info(
                "%s: reused the stored features of all %d images (same images, model and settings); the model was not "
                "loaded and no forward pass ran.",
                writes.label,
                len(rows),
            )
        return stats


class FeatureStoreDataset(AbstractDataset[FeatureWrites, FeatureStore]):
    """Catalog entry for a :class:`FeatureStore` (``save`` a plan, ``load`` the store)."""

    def __init__(self, path: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}

    def _exists(self) -> bool:
        return (self._path / INDEX_FILE).is_file()

    def load(self) -> FeatureStore:
        return FeatureStore(self._path)

    def save(self, data: FeatureWrites) -> None:
        if not isinstance(data, FeatureWrites):
            raise DatasetError(f"{type(self).__name__} at '{self._path}' saves a FeatureWrites plan.")
        FeatureStore(self._path).apply(data)
