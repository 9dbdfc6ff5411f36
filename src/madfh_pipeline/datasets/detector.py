"""Kedro datasets for fitted detectors: the versioned model file, and the cache of earlier versions a fit may reuse.

Model files are safetensors + a JSON header (:mod:`madfh_pipeline.models.base`): they cannot execute code on load.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io import AbstractDataset, AbstractVersionedDataset, Version

from madfh_pipeline import tracking
from madfh_pipeline.models.base import AnomalyDetector, ModelFileError, load_detector, read_header, save_detector

logger = logging.getLogger(__name__)


class DetectorDataset(AbstractVersionedDataset[AnomalyDetector, AnomalyDetector]):
    """Saves with :func:`save_detector`, loads to ``device``; versioned so every run keeps the model it trained.

    With ``category`` and ``detector`` set, a saved model is also logged to that detector's nested MLflow run
    (folder ``model/``), so the run that produced a number holds the model that produced it.
    """

    def __init__(
        self,
        filepath: str,
        device: str = "cpu",
        category: str | None = None,
        detector: str | None = None,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(filepath=PurePosixPath(filepath), version=version, exists_function=self._file_exists)
        self._device = device
        self._category, self._detector = category, detector
        self.metadata = metadata

    @staticmethod
    def _file_exists(path: str) -> bool:
        return Path(path).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version, "device": self._device}

    def _exists(self) -> bool:
        try:
            return self._exists_function(str(self._get_load_path()))
        except Exception:  # no version saved yet
            return False

    def load(self) -> AnomalyDetector:
        return load_detector(self._get_load_path(), device=self._device)

    def save(self, data: AnomalyDetector) -> None:
        path = Path(self._get_save_path())
        source = getattr(data, "source_file", None)
        if source is not None and _unchanged(data, Path(source)):
            # A reused model that calibration did not change: the new version is a hard link to the file it was
            # loaded from (same bytes), so an unchanged re-run costs no disk; a copy where links are not possible.
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, path)
            except OSError:
                shutil.copy2(source, path)
        else:
            save_detector(data, path)
        if self._category and self._detector:
            tracking.log_artifact(self._category, self._detector, path, "model")


def _unchanged(detector: AnomalyDetector, source: Path) -> bool:
    """Whether ``detector`` is exactly what ``source`` holds (same class, config, training, thresholds)."""
    if not source.is_file():
        return False
    try:
        header = read_header(source)
    except ModelFileError:
        return False
    return (
        header.get("name") == detector.name
        and header.get("config") == detector.config
        and header.get("thresholds") == detector.thresholds.to_dict()
        and header.get("provenance") == detector.provenance
    )


class ModelCache:
    """The saved versions of one detector, newest first, looked up by what they were trained on.

    A fit node asks :meth:`find` for a model whose training fingerprint (effective config + the training images'
    fingerprints) equals the one it is about to train; if there is one, retraining would reproduce it, so it is
    reused and the run says so. Reading is by header only (no tensors) until a match is found.
    """

    def __init__(self, root: str | Path, device: str = "cpu") -> None:
        self.root = Path(root)
        self.device = device

    def __repr__(self) -> str:
        return f"ModelCache(root='{self.root}')"

    def versions(self) -> list[Path]:
        """Model files under ``root/<version>/<file name>``, newest version first (Kedro's sortable version names)."""
        if not self.root.is_dir():
            return []
        files = [v / self.root.name for v in self.root.iterdir() if (v / self.root.name).is_file()]
        return sorted(files, key=lambda p: p.parent.name, reverse=True)

    def find(self, training_fingerprint: str) -> tuple[AnomalyDetector, str] | None:
        """The newest saved model trained on exactly this fingerprint, with its version, or ``None``."""
        for path in self.versions():
            try:
                header = read_header(path)
            except ModelFileError as exc:
                logger.info("Not reusing '%s': %s", path, exc)
                continue
            if (header.get("provenance") or {}).get("training_fingerprint") == training_fingerprint:
                try:
                    detector = load_detector(path, device=self.device)
                except (ValueError, ModelFileError) as exc:  # e.g. saved by a version whose config keys changed
                    logger.info("Not reusing '%s': it no longer loads (%s).", path, exc)
                    continue
                detector.source_file = str(path)  # lets an unchanged re-save link instead of copying
                return detector, path.parent.name
        return None


class ModelCacheDataset(AbstractDataset[None, ModelCache]):
    """Read-only view of a versioned model folder (the ``filepath`` of a :class:`DetectorDataset`)."""

    def __init__(self, filepath: str, device: str = "cpu", metadata: dict[str, Any] | None = None) -> None:
        self._root = Path(filepath)
        self._device = device
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._root)}

    def _exists(self) -> bool:
        return True  # an empty cache is a valid cache

    def load(self) -> ModelCache:
        return ModelCache(self._root, self._device)

    def save(self, data: None) -> None:
        raise NotImplementedError("ModelCacheDataset is read-only: models are saved through DetectorDataset.")
