"""Versioned Kedro dataset for a fitted detector (any registered :class:`AnomalyDetector`)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io import AbstractVersionedDataset, Version

from madfh_pipeline.models.base import AnomalyDetector, load_detector, save_detector


class DetectorDataset(AbstractVersionedDataset[AnomalyDetector, AnomalyDetector]):
    """Saves with :func:`save_detector` (class, config, state, thresholds), loads to ``device``.

    Versioned in the catalog so every training run keeps its model next to the MLflow run that produced it.
    """

    def __init__(
        self,
        filepath: str,
        device: str = "cpu",
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(filepath=PurePosixPath(filepath), version=version, exists_function=self._file_exists)
        self._device = device
        self.metadata = metadata

    @staticmethod
    def _file_exists(path: str) -> bool:
        return Path(path).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version, "device": self._device}

    def _exists(self) -> bool:
        return self._exists_function(str(self._get_load_path()))

    def load(self) -> AnomalyDetector:
        return load_detector(self._get_load_path(), device=self._device)

    def save(self, data: AnomalyDetector) -> None:
        save_detector(data, self._get_save_path())
