"""Kedro datasets over the knowledge base (:mod:`madfh_pipeline.feedback`) and the inspection model versions.

The knowledge base is a shared, long-lived store (operators write to it from the review app while pipelines run), so
the pipelines touch it only through these datasets, each with one meaning:

- :class:`InspectionRecordsDataset` — ``save(records)`` records inspections (idempotent by image and model version);
  ``load()`` reads the category's inspections back.
- :class:`ModelVersionsDataset` — ``save(registration)`` registers a model version; ``load()`` is the version
  inspection must use (pinned, else newest), so a node that runs after a registration sees it.
- :class:`KnowledgeBaseSnapshotDataset` — ``load()`` one consistent snapshot of a category (what the feedback
  pipeline learns from; reading it never blocks operators).
- :class:`InspectionModelStoreDataset` — the inspection model folders, one per version (content-addressed).

The database is the embedded SQLite file ``path`` unless ``credentials`` give a ``url`` (e.g. PostgreSQL for a plant
with several stations, in ``conf/local/credentials.yml`` under ``knowledge_base``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io import AbstractDataset, DatasetError

logger = logging.getLogger(__name__)


def _url(path: str | None, credentials: dict[str, Any] | None) -> str:
    if credentials and credentials.get("url"):
        return str(credentials["url"])
    if not path:
        raise DatasetError("A knowledge base dataset needs 'path' (embedded SQLite) or credentials with 'url'.")
    from madfh_pipeline.feedback import sqlite_url

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return sqlite_url(path)


_OPEN: dict[str, Any] = {}


def open_knowledge_base(path: str | None = None, credentials: dict[str, Any] | None = None) -> Any:
    """One :class:`~madfh_pipeline.feedback.KnowledgeBase` per URL and process (engines are pools; open once)."""
    from madfh_pipeline.feedback import KnowledgeBase

    url = _url(path, credentials)
    if url not in _OPEN:
        _OPEN[url] = KnowledgeBase(url)
    return _OPEN[url]


class _KnowledgeBaseDataset(AbstractDataset[Any, Any]):
    def __init__(
        self,
        category: str,
        path: str | None = None,
        credentials: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._category = category
        self._path = path
        self._credentials = credentials
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        where = "credentials url" if self._credentials and self._credentials.get("url") else self._path
        return {"category": self._category, "database": where}

    @property
    def kb(self) -> Any:
        return open_knowledge_base(self._path, self._credentials)


class InspectionRecordsDataset(_KnowledgeBaseDataset):
    """Inspections of one category: ``save`` a DataFrame of records, ``load`` them back (one row per inspection)."""

    def save(self, data: pd.DataFrame) -> None:
        from madfh_pipeline.feedback import InspectionRecord

        fields = set(InspectionRecord.__dataclass_fields__)
        records = []
        for row in data.to_dict("records"):
            values = {k: (None if _missing(v) else v) for k, v in row.items() if k in fields}
            records.append(InspectionRecord(**values))
        results = self.kb.record_inspections(records) if records else []
        created = sum(1 for r in results if getattr(r, "created", False))
        logger.info(
            "[%s] knowledge base: %d inspections recorded (%d new, %d already there).",
            self._category,
            len(records),
            created,
            len(records) - created,
        )

    def load(self) -> pd.DataFrame:
        return self.kb.snapshot(self._category).inspections


def _missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value)) if not hasattr(value, "__len__") or isinstance(value, str) else False
    except (TypeError, ValueError):
        return False


class ModelVersionsDataset(_KnowledgeBaseDataset):
    """``save({version, mlflow_run_id, detector, parent, notes, metrics})`` registers; ``load()`` the active one."""

    def save(self, data: dict[str, Any]) -> None:
        from madfh_pipeline.feedback import NotFoundError

        info = dict(data)
        version = info.pop("version")
        try:
            existing = self.kb.get_model_version(self._category, version)
        except NotFoundError:
            self.kb.register_model_version(self._category, version, exist_ok=True, **info)
            logger.info("[%s] knowledge base: model version %s registered.", self._category, version)
        else:  # versions are content-addressed: the same model from a later run is the same version
            logger.info(
                "[%s] knowledge base: model version %s is already registered (run %s); nothing to add.",
                self._category,
                version,
                existing.mlflow_run_id,
            )

    def load(self) -> Any:
        return self.kb.active_model_version(self._category)


class KnowledgeBaseSnapshotDataset(_KnowledgeBaseDataset):
    """One consistent read of a category's inspections, feedback, defect types and model versions."""

    def save(self, data: Any) -> None:
        raise DatasetError("A knowledge base snapshot is read-only; operators write through the review app.")

    def load(self) -> Any:
        return self.kb.snapshot(self._category)


class InspectionModelStoreDataset(AbstractDataset[Any, Any]):
    """Inspection model folders ``<path>/<version>/`` (safetensors + JSON); ``save`` writes one, ``load`` the store."""

    def __init__(self, path: str, device: str = "cpu", metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self._device = device
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}

    def _exists(self) -> bool:
        return self._path.is_dir()

    def save(self, data: Any) -> None:
        InspectionModelStore(self._path, self._device).add(data)

    def load(self) -> InspectionModelStore:
        return InspectionModelStore(self._path, self._device)


def _safe_version(version: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in version)


class InspectionModelStore:
    """Versioned inspection models on disk; a version is written once (same version → same content)."""

    def __init__(self, root: str | Path, device: str = "cpu") -> None:
        self.root = Path(root)
        self.device = device

    def folder(self, version: str) -> Path:
        return self.root / _safe_version(version)

    def add(self, model: Any) -> Path:
        folder = self.folder(model.version)
        if (folder / "inspection.json").is_file():
            logger.info("Inspection model %s is already stored in %s.", model.version, folder)
            return folder
        tmp = folder.with_name(folder.name + ".tmp")
        model.save(tmp)
        tmp.replace(folder)
        return folder

    def load(self, version: str) -> Any:
        from madfh_pipeline.inspection import InspectionModel

        folder = self.folder(version)
        if not folder.is_dir():
            raise DatasetError(
                f"Inspection model version '{version}' is not in {self.root}; it is registered in the knowledge base "
                "but its folder is missing (copied database without the model files?)."
            )
        return InspectionModel.load(folder, device=self.device)


class KnowledgeBaseDataset(_KnowledgeBaseDataset):
    """The knowledge base itself, for nodes that *read* from it (similar past cases); writes go through the
    datasets above, so every write is a node output the DAG shows."""

    def save(self, data: Any) -> None:
        raise DatasetError("Write to the knowledge base through InspectionRecordsDataset / ModelVersionsDataset.")

    def load(self) -> Any:
        return self.kb


class ReviewSettingsDataset(AbstractDataset[None, dict[str, float]]):
    """The review band per category that operators set in the app (``{category: review_band_std}``; empty if unset)."""

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}

    def _exists(self) -> bool:
        return True

    def save(self, data: None) -> None:
        raise DatasetError("Review settings are written by the review app's Settings page.")

    def load(self) -> dict[str, float]:
        from madfh_pipeline.app.review_settings import load_review_settings

        return load_review_settings(self._filepath) if self._filepath.is_file() else {}


class NotificationsDataset(AbstractDataset[pd.DataFrame, None]):
    """``save(records)`` posts a JSON message per NG record to the webhook in credentials (``notifications``).

    No URL configured: nothing is sent (logged once). Failures are retried with back-off in a background thread and
    logged; they never fail the run (the records are already in the knowledge base), and saving waits at most
    ``timeout_s`` for the queue to drain.
    """

    def __init__(
        self, credentials: dict[str, Any] | None = None, timeout_s: float = 30.0, metadata: dict[str, Any] | None = None
    ) -> None:
        self._credentials = credentials or {}
        self._timeout_s = timeout_s
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"webhook": bool(self._credentials.get("webhook_url"))}

    def load(self) -> None:
        raise DatasetError("Notifications are sent, not stored.")

    def save(self, data: pd.DataFrame) -> None:
        from madfh_pipeline.notify import notifier_from_credentials

        notifier = notifier_from_credentials(self._credentials)
        ng = data[data["decision"] == "NG"] if len(data) else data
        if notifier is None:
            logger.info("No webhook configured (credentials notifications.webhook_url): %d NG not notified.", len(ng))
            return
        with notifier:
            sent = notifier.notify_ng(ng.to_dict("records"))
        logger.info("Queued %d NG notifications to the webhook.", sent)
