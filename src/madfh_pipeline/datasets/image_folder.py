"""A folder of new images to inspect (a line's drop folder, an upload folder, a split of a data set).

``load()`` lists the files — path, size, modification time and the content id (SHA-256 of the bytes, the knowledge
base's stable image id: the same photo renamed or copied to another station is the same record) — and never decodes
pixels; the inspection node decodes one image at a time and records unreadable files as errors.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io import AbstractDataset, DatasetError

logger = logging.getLogger(__name__)

DEFAULT_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
COLUMNS = ["path", "relpath", "bytes", "mtime_ns", "image_id"]


class ImageFolderDataset(AbstractDataset[None, pd.DataFrame]):
    """Read-only listing of image files under ``path`` (recursive by default; hidden files and folders skipped).

    Args:
        path: The folder. A missing folder is an error naming it (a misconfigured drop folder must not look empty).
        suffixes: File name endings that count as images (case-insensitive); other files are ignored and counted.
        recursive: Walk sub-folders.
        exclude: Path fragments to skip (e.g. ``ground_truth`` in an MVTec AD 2 split, whose masks are not parts).
    """

    def __init__(
        self,
        path: str,
        suffixes: list[str] | None = None,
        recursive: bool = True,
        exclude: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._path = Path(path)
        self._suffixes = tuple(s.lower() for s in (suffixes or DEFAULT_SUFFIXES))
        self._recursive = recursive
        self._exclude = tuple(exclude or ())
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "suffixes": self._suffixes, "recursive": self._recursive}

    def _exists(self) -> bool:
        return self._path.is_dir()

    def save(self, data: None) -> None:
        raise DatasetError(f"{type(self).__name__} lists '{self._path}'; it does not write.")

    def load(self) -> pd.DataFrame:
        from madfh_pipeline.feedback import image_content_id

        if not self._path.is_dir():
            raise DatasetError(f"Inspection folder '{self._path}' does not exist (set the inspection folder's path).")
        rows, ignored = [], 0
        for dirpath, dirnames, filenames in os.walk(self._path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if self._recursive else []
            for name in sorted(filenames):
                full = Path(dirpath) / name
                rel = full.relative_to(self._path).as_posix()
                if name.startswith(".") or any(part in rel for part in self._exclude):
                    continue
                if not name.lower().endswith(self._suffixes):
                    ignored += 1
                    continue
                stat = full.stat()
                rows.append(
                    {
                        "path": str(full),
                        "relpath": rel,
                        "bytes": int(stat.st_size),
                        "mtime_ns": int(stat.st_mtime_ns),
                        "image_id": image_content_id(full),
                    }
                )
        logger.info("Listed %d images in %s (%d other files ignored).", len(rows), self._path, ignored)
        return pd.DataFrame(rows, columns=COLUMNS)
