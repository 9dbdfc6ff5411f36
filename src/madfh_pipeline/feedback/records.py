"""Plain records that the store API takes and returns (no SQLAlchemy objects leak out of the package).

Rows for a person (a case, a queue item, a similar case) are frozen dataclasses; tables for pipelines and dashboards
are pandas DataFrames. Callers therefore never hold a database session, and a record read in one thread can be shown
in another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np


def image_content_id(source: bytes | str | Path) -> str:
    """The stable id of an image: the SHA-256 (hex) of its file's bytes.

    Content, not path: the same photo copied to another station or renamed is the same record, and a re-shot part is
    a new one. ``source`` is the bytes or a file path (read in 1 MiB chunks).
    """
    digest = hashlib.sha256()
    if isinstance(source, bytes):
        digest.update(source)
    else:
        with Path(source).open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelVersionInfo:
    """A registered model version (see :class:`madfh_pipeline.feedback.schema.ModelVersion`)."""

    id: int
    category: str
    version: str
    mlflow_run_id: str | None
    detector: str | None
    parent_version: str | None
    created_at: datetime
    notes: str | None
    metrics: dict[str, Any] | None
    is_champion: bool


@dataclass(frozen=True)
class DefectTypeInfo:
    """One defect type of a category's list."""

    id: int
    category: str
    name: str
    description: str | None
    active: bool
    created_at: datetime


@dataclass(frozen=True)
class InspectionRecord:
    """What the inspection pipeline records for one image (input of ``record_inspection(s)``).

    A scored image has ``score``, ``threshold`` and a decision ``OK``/``NG``/``REVIEW``; an unreadable one has
    ``decision="ERROR"`` and ``error`` (no score). ``embedding`` (1-D, any float dtype, stored as float32) needs
    ``embedding_space``, the name of the feature extractor that produced it. ``inspected_at`` defaults to now (UTC).
    """

    image_id: str
    image_path: str
    category: str
    model_version: str
    decision: str
    score: float | None = None
    threshold: float | None = None
    map_path: str | None = None
    explanation: str | None = None
    processing_time_s: float | None = None
    inspected_at: datetime | None = None
    error: str | None = None
    embedding: np.ndarray | Sequence[float] | None = None
    embedding_space: str | None = None
    attributes: dict[str, Any] | None = None


@dataclass(frozen=True)
class RecordedInspection:
    """Result of recording an inspection: its id, and whether this call created it (``False``: it existed)."""

    id: int
    created: bool


@dataclass(frozen=True)
class InspectionInfo:
    """A stored inspection (the embedding itself stays in the database; ``embedding_space`` says if there is one)."""

    id: int
    image_id: str
    image_path: str
    category: str
    model_version: str
    score: float | None
    threshold: float | None
    decision: str
    map_path: str | None
    explanation: str | None
    processing_time_s: float | None
    inspected_at: datetime
    recorded_at: datetime
    error: str | None
    embedding_space: str | None
    attributes: dict[str, Any] | None

    @property
    def margin(self) -> float | None:
        """Distance of the score from the threshold, relative to the threshold (the review queue's order)."""
        return relative_margin(self.score, self.threshold)


def relative_margin(score: float | None, threshold: float | None) -> float | None:
    """``|score − threshold| / |threshold|`` (absolute distance when the threshold is 0); None without a score.

    Relative, so that items of detectors with different score scales (PatchCore ≈ 30, an autoencoder's MSE ≈ 0.01)
    are ordered by how close to the decision boundary they are, not by raw units.
    """
    if score is None or threshold is None:
        return None
    distance = abs(score - threshold)
    return distance if threshold == 0 else distance / abs(threshold)


@dataclass(frozen=True)
class FeedbackInfo:
    """One stored verdict."""

    id: int
    inspection_id: int
    verdict: str
    outcome: str
    defect_type: str | None
    description: str | None
    region_mask_path: str | None
    region_polygon: list[list[list[float]]] | None
    confidence: int
    operator: str
    session: str | None
    created_at: datetime


@dataclass(frozen=True)
class Resolution:
    """How an item's verdicts resolve (see :mod:`madfh_pipeline.feedback.resolution` for the rule).

    ``label`` is ``OK``/``NG``, or None when the operators' current verdicts are tied (disputed: needs another
    operator). ``conflict`` is true whenever the operators' current verdicts disagree, even when a label resolved.
    """

    label: str | None
    policy: str
    n_feedback: int
    n_operators: int
    votes_ok: int
    votes_ng: int
    conflict: bool
    defect_type: str | None
    last_feedback_at: datetime | None

    @property
    def disputed(self) -> bool:
        return self.n_feedback > 0 and self.label is None


@dataclass(frozen=True)
class Case:
    """An inspection with every verdict given on it (oldest first) and how they resolve."""

    inspection: InspectionInfo
    feedback: tuple[FeedbackInfo, ...]
    resolution: Resolution


@dataclass(frozen=True)
class QueueItem:
    """One entry of the review queue; ``exploration`` marks an item served for representative labels, not by margin."""

    inspection: InspectionInfo
    margin: float | None
    resolution: Resolution
    exploration: bool = False


@dataclass(frozen=True)
class SimilarCase:
    """A past case similar to a query, with its verdicts.

    ``source`` is ``image`` (embedding similarity), ``explanation`` or ``feedback`` (text similarity, ``matched_text``
    is the text that matched). ``similarity`` is the cosine similarity in [-1, 1].
    """

    case: Case
    similarity: float
    source: str
    matched_text: str | None = None
