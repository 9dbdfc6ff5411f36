"""Catalog datasets that write into a detector's nested MLflow run (see :mod:`madfh_pipeline.tracking`).

They take ``category`` and ``detector`` from the catalog factory (``{category}.{detector}.evaluation_metrics``), so a
node never knows about MLflow: it returns plain dicts, figures or reports, and the catalog decides where they go.
Outside a tracked run (tracking disabled, a notebook) metrics and params are dropped with a debug message and
artifacts are still written to their local file.
"""

from __future__ import annotations

import logging
from copy import deepcopy
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from madfh_pipeline import tracking

logger = logging.getLogger(__name__)


class DetectorMetricsDataset(AbstractDataset[dict[str, Any], dict[str, Any]]):
    """``save({key: number | {"value", "step"} | [history]})`` logs to the detector's run under ``prefix + key``."""

    def __init__(self, category: str, detector: str, prefix: str = "", metadata: dict[str, Any] | None = None) -> None:
        self._category, self._detector, self._prefix = category, detector, prefix
        self._last: dict[str, Any] | None = None
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"category": self._category, "detector": self._detector, "prefix": self._prefix}

    def load(self) -> dict[str, Any]:
        if self._last is None:
            raise DatasetError(f"Metrics of {self._category}/{self._detector} are logged to MLflow, not stored here.")
        return self._last

    def save(self, data: dict[str, Any]) -> None:
        self._last = data
        count = tracking.log_metrics(self._category, self._detector, {f"{self._prefix}{k}": v for k, v in data.items()})
        if not tracking.active():
            logger.debug("No MLflow run: %d metric(s) of %s/%s not logged.", len(data), self._category, self._detector)
        else:
            logger.debug("Logged %d metric value(s) to %s/%s.", count, self._category, self._detector)


class DetectorParamsDataset(AbstractDataset[dict[str, Any], dict[str, Any]]):
    """``save(nested dict)`` logs the flattened parameters that took effect, and ``tags`` if the dict has that key."""

    def __init__(self, category: str, detector: str, metadata: dict[str, Any] | None = None) -> None:
        self._category, self._detector = category, detector
        self._last: dict[str, Any] | None = None
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"category": self._category, "detector": self._detector}

    def load(self) -> dict[str, Any]:
        if self._last is None:
            raise DatasetError(f"Parameters of {self._category}/{self._detector} are logged to MLflow only.")
        return self._last

    def save(self, data: dict[str, Any]) -> None:
        self._last = deepcopy(data)
        params = dict(data)
        tags = params.pop("tags", {}) or {}
        tracking.log_params(self._category, self._detector, params)
        if tags:
            tracking.set_tags(self._category, self._detector, tags)


class DetectorArtifactDataset(AbstractDataset[Any, Any]):
    """Saves through a wrapped dataset (JSON report, figures, ...) and logs what it wrote to the detector's run.

    Args:
        category, detector: Which nested run.
        dataset: The wrapped dataset's config (``type`` and ``filepath`` at least), as in kedro-mlflow's
            ``MlflowArtifactDataset``.
        artifact_path: Folder in the run's artifacts (flat, e.g. ``figures``); ``None`` for the root.
    """

    def __init__(
        self,
        category: str,
        detector: str,
        dataset: dict[str, Any],
        artifact_path: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if "filepath" not in dataset:
            raise DatasetError("DetectorArtifactDataset needs the wrapped dataset's 'filepath'.")
        self._category, self._detector = category, detector
        self._filepath = Path(dataset["filepath"])
        self._artifact_path = artifact_path
        self._dataset = AbstractDataset.from_config(f"{category}.{detector}.artifact", deepcopy(dataset))
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {
            "category": self._category,
            "detector": self._detector,
            "filepath": str(self._filepath),
            "artifact_path": self._artifact_path,
        }

    def _exists(self) -> bool:
        return self._dataset.exists()

    def load(self) -> Any:
        return self._dataset.load()

    def save(self, data: Any) -> None:
        self._dataset.save(data)
        if self._filepath.exists():
            tracking.log_artifact(self._category, self._detector, self._filepath, self._artifact_path)
