"""A folder of processed images, handed to nodes as a store they stream through.

Why not a ``PartitionedDataset``: preprocessing writes hundreds of 1024² images from a process pool and must skip the
unchanged ones, and training must stream them in batches; materialising them as one node output would hold a whole
category in memory. The catalog still owns *where* and *how* (root folder, PNG compression); nodes only see this
store, which reads and writes by relative key.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from kedro.io import AbstractDataset, DatasetError

from madfh_pipeline.imaging import read_image, write_png

logger = logging.getLogger(__name__)

INDEX_FILE = "_index.parquet"


class ImageStore:
    """Relative-key access to a folder of PNG images plus an index of what was written from which source."""

    def __init__(self, root: str | Path, compression: int | None = None) -> None:
        self.root = Path(root)
        self.compression = compression

    def __repr__(self) -> str:
        return f"ImageStore(root='{self.root}')"

    def path(self, key: str) -> Path:
        return self.root / key

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def read(self, key: str, channels: int | None = None) -> np.ndarray:
        return read_image(self.path(key), channels)

    def write(self, key: str, array: np.ndarray) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_png(target, array, self.compression)

    def read_index(self) -> pd.DataFrame:
        """The rows written by the last preprocessing run (empty when there was none or it is unreadable)."""
        index = self.root / INDEX_FILE
        if not index.is_file():
            return pd.DataFrame()
        try:
            return pd.read_parquet(index)
        except (OSError, ValueError) as exc:  # a broken index only costs a full re-run, never wrong data
            logger.warning(
                "Ignoring unreadable preprocessing index '%s' (%s); every image is processed again.", index, exc
            )
            return pd.DataFrame()

    def write_index(self, frame: pd.DataFrame) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / (INDEX_FILE + ".tmp")
        frame.to_parquet(tmp, index=False)
        tmp.replace(self.root / INDEX_FILE)


class ImageStoreDataset(AbstractDataset[ImageStore, ImageStore]):
    """Catalog entry for an :class:`ImageStore`; ``load`` returns the store, ``save`` is refused.

    Args:
        path: Folder of the store.
        compression: PNG compression level 0–9 for writes; ``None`` (OpenCV's default) was both the fastest and
            the smallest in our measurements (see :func:`madfh_pipeline.imaging.write_png`).
    """

    def __init__(self, path: str, compression: int | None = None, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self._compression = compression
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "compression": self._compression}

    def _exists(self) -> bool:
        return (self._path / INDEX_FILE).is_file()

    def load(self) -> ImageStore:
        return ImageStore(self._path, self._compression)

    def save(self, data: ImageStore) -> None:
        raise DatasetError(f"{type(self).__name__} at '{self._path}' is written through the store it loads, not saved.")
