"""A folder of anomaly maps (float16 ``.npy``) and benchmark submission files, handed to nodes as a store.

Same reasoning as :mod:`madfh_pipeline.datasets.image_store`: a category's maps at 1024² are hundreds of megabytes,
so scoring writes them one by one and evaluation streams them back; the catalog decides where they live.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from kedro.io import AbstractDataset, DatasetError

from madfh_pipeline.imaging import write_png


class MapStore:
    """Relative-key access to anomaly maps and submission files below ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"MapStore(root='{self.root}')"

    def _target(self, key: str) -> Path:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def write_map(self, key: str, anomaly_map: np.ndarray) -> None:
        """float16 halves the disk and memory of float32 maps; ranks (all the metrics use) survive the rounding."""
        np.save(self._target(key), anomaly_map.astype(np.float16), allow_pickle=False)

    def read_map(self, key: str) -> np.ndarray:
        path = self.root / key
        if not path.is_file():
            raise FileNotFoundError(f"Anomaly map '{path}' is missing: run the scoring node for this model first.")
        return np.load(path, allow_pickle=False).astype(np.float32)

    def write_tiff(self, key: str, anomaly_map: np.ndarray) -> None:
        """Single-channel float16 TIFF, the MVTec AD 2 submission format."""
        tifffile.imwrite(self._target(key), anomaly_map.astype(np.float16))

    def write_png(self, key: str, image: np.ndarray) -> None:
        write_png(self._target(key), image)


class MapStoreDataset(AbstractDataset[MapStore, MapStore]):
    """Catalog entry for a :class:`MapStore`; ``load`` returns the store, ``save`` is refused."""

    def __init__(self, path: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}

    def _exists(self) -> bool:
        return self._path.is_dir()

    def load(self) -> MapStore:
        return MapStore(self._path)

    def save(self, data: MapStore) -> None:
        raise DatasetError(f"{type(self).__name__} at '{self._path}' is written through the store it loads, not saved.")
