"""Validation of what callers pass in, with messages written for the person who typed it.

Everything is checked before a transaction starts, so a refused record costs no lock and leaves no trace; the
database's own constraints (CHECK, foreign keys, unique keys) then guard the same rules against any other writer.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np

from madfh_pipeline.feedback.errors import ValidationError
from madfh_pipeline.feedback.records import InspectionRecord
from madfh_pipeline.feedback.retrieval import encode_vector
from madfh_pipeline.feedback.schema import (
    ACTIONS,
    DECISIONS,
    NAME_LENGTH,
    VERDICTS,
    VERSION_LENGTH,
    utcnow,
)

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def required_text(value: Any, what: str, max_length: int) -> str:
    """Trimmed, non-empty text within the column's length."""
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"{what} is required (a non-empty text).")
    value = value.strip()
    if len(value) > max_length:
        raise ValidationError(f"{what} is longer than {max_length} characters.")
    return value


def category_name(value: Any, what: str) -> str:
    """A category name (the same rules as any required name of 64 characters)."""
    return required_text(value, what, NAME_LENGTH)


def optional_text(value: Any) -> str | None:
    """Trimmed text, or None for None and blank text (an empty description is no description)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(f"Expected text, got {type(value).__name__}.")
    value = value.strip()
    return value or None


def defect_name(value: Any) -> str:
    """Defect type names are compared trimmed, with single spaces and lower-case ("Scratch " == "scratch")."""
    if not isinstance(value, str):
        raise ValidationError(f"A defect type is a name, got {type(value).__name__}.")
    return required_text(" ".join(value.split()).lower(), "defect type", NAME_LENGTH)


def aware(value: datetime | None, what: str) -> datetime | None:
    """A timezone-aware datetime, or None; naive ones are refused rather than guessed."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise ValidationError(f"{what} must be a datetime, got {type(value).__name__}.")
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        raise ValidationError(f"{what} must be timezone-aware (e.g. datetime.now(UTC)); got {value.isoformat()}.")
    return value


def record_id(value: Any, what: str = "inspection id") -> int:
    """Ids as plain ints (numpy integers from a DataFrame included; SQLite cannot bind those)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValidationError(f"{what} must be an integer, got {value!r}.")
    return int(value)


def confidence_value(value: Any) -> int:
    """The operator's confidence: a whole number from 1 to 5 (booleans and floats refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= int(value) <= 5:
        raise ValidationError(f"confidence must be a whole number from 1 to 5, got {value!r}.")
    return int(value)


def verdict_of(verdict: str | None, action: str | None) -> str:
    """The verdict from a verdict and/or a review button; both given must agree."""
    if action is not None and action not in ACTIONS:
        raise ValidationError(f"Unknown action {action!r}; expected one of {tuple(ACTIONS)}.")
    if verdict is not None and verdict not in VERDICTS:
        raise ValidationError(f"Unknown verdict {verdict!r}; expected one of {VERDICTS}.")
    if verdict is None and action is None:
        raise ValidationError("Give a verdict (OK/NG) or an action (the review button).")
    if verdict is not None and action is not None and ACTIONS[action] != verdict:
        raise ValidationError(f"Action '{action}' records {ACTIONS[action]}, but the verdict given is {verdict}.")
    return verdict if verdict is not None else ACTIONS[action]  # type: ignore[index]


def finite(value: Any, what: str) -> float:
    """A finite number as float (NaN or infinity in a score would poison every ordering)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValidationError(f"{what} must be a number, got {value!r}.")
    if not math.isfinite(float(value)):
        raise ValidationError(f"{what} must be finite, got {value!r}.")
    return float(value)


def in_range(
    value: Any, what: str, low: float, high: float, *, unit: str = "", error: type[ValueError] = ValidationError
) -> float:
    """A finite number in ``[low, high]``; ``error`` lets a caller outside the knowledge base raise its own class."""
    try:
        number = finite(value, what)
    except ValidationError as exc:
        raise error(str(exc)) from None
    if not low <= number <= high:
        raise error(f"{what} must be between {low:g} and {high:g}{unit}, got {value}.")
    return number


def polygons(value: Sequence[Any] | None) -> list[list[list[float]]] | None:
    """One polygon ``[[x, y], ...]`` or several, as a list of polygons of ``[x, y]`` floats (≥ 3 points, x, y ≥ 0)."""
    if value is None:
        return None
    try:
        array = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        array = None
    if array is not None and array.ndim == 2:
        polygons = [value]
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0:
        polygons = list(value)
    else:
        raise ValidationError("region_polygon must be [[x, y], ...] or a list of such polygons.")
    result = []
    for polygon in polygons:
        try:
            points = np.asarray(polygon, dtype=float)
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"A polygon must be a list of [x, y] numbers: {exc}.") from exc
        if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3:
            raise ValidationError(f"A polygon needs at least 3 [x, y] points, got shape {points.shape}.")
        if not np.all(np.isfinite(points)) or np.any(points < 0):
            raise ValidationError("Polygon coordinates must be finite, non-negative image pixel positions.")
        result.append(points.tolist())
    return result


def json_object(value: dict[str, Any] | None, what: str) -> dict[str, Any] | None:
    """A dict that survives a JSON round trip without NaN (PostgreSQL's JSON refuses NaN)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValidationError(f"{what} must be a dict, got {type(value).__name__}.")
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{what} must be plain JSON (no NaN, no objects): {exc}.") from exc


def inspection_values(record: InspectionRecord) -> dict[str, Any]:
    """Validate one record into column values (``model_version`` still the version string)."""
    image_id = record.image_id.lower() if isinstance(record.image_id, str) else record.image_id
    if not isinstance(image_id, str) or not _SHA256_RE.match(image_id):
        raise ValidationError(
            f"image_id must be the SHA-256 hex digest of the image file (image_content_id), got {record.image_id!r}."
        )
    if record.decision not in DECISIONS:
        raise ValidationError(f"Unknown decision {record.decision!r}; expected one of {DECISIONS}.")
    values: dict[str, Any] = {
        "image_id": image_id,
        "image_path": required_text(record.image_path, "image_path", 10_000),
        "category": category_name(record.category, "category"),
        "model_version": required_text(record.model_version, "model_version", VERSION_LENGTH),
        "decision": record.decision,
        "map_path": optional_text(record.map_path),
        "explanation": optional_text(record.explanation),
        "inspected_at": aware(record.inspected_at, "inspected_at") or utcnow(),
        "recorded_at": utcnow(),
        "attributes": json_object(record.attributes, "attributes"),
        "error": optional_text(record.error),
        "score": None,
        "threshold": None,
        "processing_time_s": None,
        "embedding": None,
        "embedding_dim": None,
        "embedding_space": None,
    }
    if record.decision == "ERROR":
        if values["error"] is None:
            raise ValidationError("An ERROR inspection needs the error text (why the file could not be scored).")
        if record.score is not None:
            raise ValidationError("An ERROR inspection has no score.")
        if record.threshold is not None:
            values["threshold"] = finite(record.threshold, "threshold")
    else:
        if values["error"] is not None:
            raise ValidationError(f"A {record.decision} inspection has no error text (use decision ERROR).")
        if record.score is None or record.threshold is None:
            raise ValidationError(f"A {record.decision} inspection needs its score and threshold.")
        values["score"] = finite(record.score, "score")
        values["threshold"] = finite(record.threshold, "threshold")
    if record.processing_time_s is not None:
        seconds = finite(record.processing_time_s, "processing_time_s")
        if seconds < 0:
            raise ValidationError("processing_time_s cannot be negative.")
        values["processing_time_s"] = seconds
    if record.embedding is not None:
        values["embedding"], values["embedding_dim"] = encode_vector(record.embedding)
        values["embedding_space"] = required_text(record.embedding_space, "embedding_space", VERSION_LENGTH)
    elif record.embedding_space is not None:
        raise ValidationError("embedding_space is given without an embedding.")
    return values
