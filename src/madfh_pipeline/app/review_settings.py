"""The uncertainty band per category: written by the app's Settings page, read by the inspection pipeline.

The band is the inspection core's ``review_band_std`` (:class:`madfh_pipeline.inspection.InspectionSettings`): the
half-width of the REVIEW band around the image threshold, in standard deviations of the validation/good image scores
(OK below ``threshold − w``, NG at or above ``threshold + w``, REVIEW between, ``w = review_band_std · σ``). σ units,
not a fraction of the threshold, because detectors' scores live on unrelated scales; 0 means the plain threshold.

Storage: one JSON file, ``<first data root>/09_knowledge_base/review_settings.json`` (next to the embedded knowledge
base), because the knowledge base has no settings table yet and this package may not change its schema. A Kedro
``json.JSONDataset`` reads it as it is, and this module imports no Streamlit, so the pipeline can call
:func:`load_review_settings`. A category without an entry keeps the pipeline's configured ``review_band_std``.
Shape (``version`` guards future changes)::

    {
        "version": 1,
        "categories": {
            "wallplugs": {"review_band_std": 1.5, "updated_by": "anna", "updated_at": "2026-03-02T08:00:00+00:00"}
        },
    }
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SETTINGS_VERSION = 1
#: A band wider than this many σ would send most normal parts to review: refused as a typo.
MAX_BAND_STD = 10.0


class ReviewSettingsError(ValueError):
    """A settings file or value that cannot be used; the message says what is wrong."""


def check_band(value: Any, where: str = "review_band_std") -> float:
    """A valid band half-width in σ (a finite number in [0, MAX_BAND_STD])."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ReviewSettingsError(f"{where} must be a number, got {value!r}.")
    if not 0 <= value <= MAX_BAND_STD:
        raise ReviewSettingsError(f"{where} must be between 0 and {MAX_BAND_STD:g} standard deviations, got {value}.")
    return float(value)


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"version": SETTINGS_VERSION, "categories": {}}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReviewSettingsError(f"Review settings file {path} is not valid JSON: {exc}.") from exc
    if not isinstance(content, dict) or content.get("version") != SETTINGS_VERSION:
        raise ReviewSettingsError(f"Review settings file {path} is not version {SETTINGS_VERSION} of the format.")
    if not isinstance(content.get("categories"), dict):
        raise ReviewSettingsError(f"Review settings file {path} has no 'categories' object.")
    return content


def load_review_settings(path: Path) -> dict[str, float]:
    """``review_band_std`` of each category that has one (an absent file means none has)."""
    bands = {}
    for category, entry in _read(path)["categories"].items():
        if isinstance(entry, dict) and "review_band_std" in entry:
            bands[category] = check_band(entry["review_band_std"], f"review_band_std of {category} in {path}")
    return bands


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on a side file, so two operators saving at once do not lose each other's change."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with (path.parent / f".{path.name}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def save_review_band(path: Path, category: str, band_std: float | None, operator: str) -> None:
    """Set (or with ``None`` remove) the band of ``category``; the file is replaced atomically."""
    if not operator.strip():
        raise ReviewSettingsError("Enter your name before changing settings.")
    with _locked(path):
        content = _read(path)
        if band_std is None:
            content["categories"].pop(category, None)
        else:
            content["categories"][category] = {
                "review_band_std": check_band(band_std),
                "updated_by": operator.strip(),
                "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    logger.info("REVIEW band of %s set to %s σ by %s (%s).", category, band_std, operator, path)
