"""The review settings per category, written by the app's Settings page: the uncertainty band and the queue's
exploration share.

The band is read by the inspection pipeline; the exploration share by the review queue
(:mod:`madfh_pipeline.feedback.sampling` says why a share of the queue is served independently of the score; a
category without one gets :data:`DEFAULT_EXPLORE_SHARE`).

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
            "wallplugs": {
                "review_band_std": 1.5,
                "explore_share": 0.3,
                "updated_by": "anna",
                "updated_at": "2026-03-02T08:00:00+00:00",
            }
        },
    }
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from madfh_pipeline.feedback.sampling import check_share
from madfh_pipeline.feedback.validation import in_range

logger = logging.getLogger(__name__)

SETTINGS_VERSION = 1
#: A band wider than this many σ would send most normal parts to review: refused as a typo.
MAX_BAND_STD = 10.0
#: The review queue's exploration share where a category sets none (docs/performance.md, "Feedback loop").
DEFAULT_EXPLORE_SHARE = 0.3


class ReviewSettingsError(ValueError):
    """A settings file or value that cannot be used; the message says what is wrong."""


def check_band(value: Any, where: str = "review_band_std") -> float:
    """A valid band half-width in σ (a finite number in [0, MAX_BAND_STD])."""
    return in_range(value, where, 0.0, MAX_BAND_STD, unit=" standard deviations", error=ReviewSettingsError)


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


def load_explore_share(path: Path, category: str) -> float:
    """The exploration share of ``category``'s review queue: its own, else :data:`DEFAULT_EXPLORE_SHARE`."""
    entry = _read(path)["categories"].get(category)
    if not isinstance(entry, dict) or "explore_share" not in entry:
        return DEFAULT_EXPLORE_SHARE
    return check_share(entry["explore_share"], f"explore_share of {category} in {path}", ReviewSettingsError)


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
    _save(path, category, "review_band_std", None if band_std is None else check_band(band_std), operator)
    logger.info("REVIEW band of %s set to %s σ by %s (%s).", category, band_std, operator, path)


def save_explore_share(path: Path, category: str, share: float | None, operator: str) -> None:
    """Set (or with ``None`` reset to the default) the review queue's exploration share of ``category``."""
    _save(
        path,
        category,
        "explore_share",
        None if share is None else check_share(share, error=ReviewSettingsError),
        operator,
    )
    logger.info("Exploration share of %s set to %s by %s (%s).", category, share, operator, path)


def _save(path: Path, category: str, key: str, value: float | None, operator: str) -> None:
    """Set or remove one setting of ``category`` under the lock; an entry left without settings is dropped."""
    if not operator.strip():
        raise ReviewSettingsError("Enter your name before changing settings.")
    with _locked(path):
        content = _read(path)
        entry = content["categories"].get(category)
        entry = dict(entry) if isinstance(entry, dict) else {}
        if value is None:
            entry.pop(key, None)
        else:
            entry[key] = value
        if set(entry) - {"updated_by", "updated_at"}:
            entry |= {"updated_by": operator.strip(), "updated_at": datetime.now(UTC).isoformat(timespec="seconds")}
            content["categories"][category] = entry
        else:
            content["categories"].pop(category, None)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(temporary, path)
