"""MLflow layout made for comparing detectors: one parent run per ``kedro run``, one nested run per (category, detector).

Why nested runs: the runs table compares *rows*. With every detector in one run (183 metrics named
``wallplugs.patchcore.test_public.overexposed.au_pro_005``) PatchCore and the autoencoder could not be sorted against
each other, nor against a re-run with other parameters. Each detector run therefore carries short metric keys
(``image_auroc``, ``au_pro_005``, ``seg_f1``, ``<metric>.<lighting>``), its thresholds, the parameters that took effect,
its model file and figures, and the tags ``category``, ``detector``, ``data_source``, ``git_commit``, ``kedro_env``; the
parent keeps what is shared (preprocessing, the run's tags). kedro-mlflow owns the parent run; this module creates
the children under it with :class:`mlflow.MlflowClient` (no second "active run", so kedro-mlflow's run handling is
untouched) and closes them when the pipeline ends (:mod:`madfh_pipeline.hooks`).

Everything here is a no-op when no MLflow run is active (tracking disabled, a notebook calling nodes directly).
"""

from __future__ import annotations

import logging
import math
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunStatus

logger = logging.getLogger(__name__)

#: MLflow's limit on a parameter value's length.
_MAX_PARAM = 6000


@dataclass
class _RunContext:
    parent_run_id: str | None = None
    experiment_id: str | None = None
    tracking_uri: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    name_suffix: str = ""
    children: dict[tuple[str, str], str] = field(default_factory=dict)


_CONTEXT = _RunContext()


def git_commit(path: str | Path) -> str:
    """The commit the code ran at (``-dirty`` when the work tree has changes), or ``unknown`` outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def start(parent_run_id: str, tags: Mapping[str, str], name_suffix: str = "") -> None:
    """Remember the parent run (kedro-mlflow's) and the tags every detector run inherits."""
    run = mlflow.get_run(parent_run_id)
    _CONTEXT.parent_run_id = parent_run_id
    _CONTEXT.experiment_id = run.info.experiment_id
    _CONTEXT.tracking_uri = mlflow.get_tracking_uri()
    _CONTEXT.tags = {str(k): str(v) for k, v in tags.items()}
    _CONTEXT.name_suffix = name_suffix
    _CONTEXT.children = {}


def active() -> bool:
    return _CONTEXT.parent_run_id is not None


def _client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=_CONTEXT.tracking_uri)


def detector_run_id(category: str, detector: str) -> str | None:
    """The nested run of ``(category, detector)`` in the current ``kedro run``, created on first use."""
    if _CONTEXT.parent_run_id is None:
        return None
    key = (category, detector)
    if key not in _CONTEXT.children:
        tags = _CONTEXT.tags | {
            "mlflow.parentRunId": _CONTEXT.parent_run_id,
            "category": category,
            "detector": detector,
            "model": detector,
        }
        run = _client().create_run(
            _CONTEXT.experiment_id,
            run_name=f"{category} · {detector}{_CONTEXT.name_suffix}",
            tags=tags,
        )
        _CONTEXT.children[key] = run.info.run_id
        logger.debug("MLflow run %s for %s/%s under %s.", run.info.run_id, category, detector, _CONTEXT.parent_run_id)
    return _CONTEXT.children[key]


def finish(status: str = "FINISHED") -> list[str]:
    """Close every detector run of this ``kedro run`` (``FINISHED`` or ``FAILED``); returns their ids."""
    ids = list(_CONTEXT.children.values())
    if ids:
        client = _client()
        for run_id in ids:
            client.set_terminated(run_id, RunStatus.to_string(getattr(RunStatus, status)))
    _CONTEXT.parent_run_id = None
    _CONTEXT.children = {}
    return ids


def children() -> dict[tuple[str, str], str]:
    return dict(_CONTEXT.children)


def _metric_points(key: str, value: Any, now: int) -> Iterable[Metric]:
    """``value`` may be a number, ``{"value", "step"}``, or a list of either (a history, step = position)."""
    if isinstance(value, Mapping):
        value, step = value.get("value"), int(value.get("step", 0))
        items = [(value, step)]
    elif isinstance(value, list | tuple):
        items = [(v["value"], int(v.get("step", i))) if isinstance(v, Mapping) else (v, i) for i, v in enumerate(value)]
    else:
        items = [(value, 0)]
    for v, step in items:
        if isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(float(v)):
            yield Metric(key, float(v), now, step)


def log_metrics(category: str, detector: str, metrics: Mapping[str, Any]) -> int:
    """Log metrics to the detector's run; NaN (e.g. no defect in a lighting group) is left out. Returns the count."""
    run_id = detector_run_id(category, detector)
    if run_id is None:
        return 0
    now = int(time.time() * 1000)
    points = [m for key, value in metrics.items() for m in _metric_points(key, value, now)]
    client = _client()
    for start_at in range(0, len(points), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=points[start_at : start_at + 1000])
    return len(points)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def log_params(category: str, detector: str, params: Mapping[str, Any]) -> int:
    run_id = detector_run_id(category, detector)
    if run_id is None:
        return 0
    items = [Param(k, str(v)[:_MAX_PARAM]) for k, v in flatten(params).items()]
    client = _client()
    for start_at in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start_at : start_at + 100])
    return len(items)


def set_tags(category: str, detector: str, tags: Mapping[str, Any]) -> None:
    run_id = detector_run_id(category, detector)
    if run_id is not None:
        client = _client()
        for key, value in tags.items():
            client.set_tag(run_id, key, str(value))


def log_artifact(category: str, detector: str, local_path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file or a folder's files to the detector's run, at ``artifact_path`` (flat: no repeated folder names)."""
    run_id = detector_run_id(category, detector)
    if run_id is None:
        return
    local_path = Path(local_path)
    client = _client()
    if local_path.is_dir():
        for file in sorted(p for p in local_path.rglob("*") if p.is_file()):
            sub = file.parent.relative_to(local_path).as_posix()
            parts = [p for p in (artifact_path, None if sub == "." else sub) if p]
            client.log_artifact(run_id, str(file), "/".join(parts) or None)
    else:
        client.log_artifact(run_id, str(local_path), artifact_path)


def log_text(category: str, detector: str, text: str, artifact_file: str) -> None:
    run_id = detector_run_id(category, detector)
    if run_id is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        path.write_text(text)
        parent = str(Path(artifact_file).parent)
        _client().log_artifact(run_id, str(path), None if parent == "." else parent)


def run_url(run_id: str, experiment_id: str | None = None, ui: str = "http://127.0.0.1:5000") -> str:
    experiment_id = experiment_id or _CONTEXT.experiment_id or mlflow.get_run(run_id).info.experiment_id
    return f"{ui}/#/experiments/{experiment_id}/runs/{run_id}"
