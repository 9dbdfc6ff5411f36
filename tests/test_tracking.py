"""Nested MLflow runs per (category, detector) and the catalog datasets that write into them.

Runs against a real (SQLite) MLflow store: the detector runs are what the runs table compares, row by row.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import mlflow
import pytest
from kedro.io import DatasetError

from madfh_pipeline import tracking
from madfh_pipeline.datasets import DetectorArtifactDataset, DetectorMetricsDataset, DetectorParamsDataset


@pytest.fixture
def parent(tmp_path: Path, empty_mlflow_db: Path) -> Iterator[tuple[mlflow.MlflowClient, str]]:
    """A parent run (what kedro-mlflow opens) in a fresh database; tracking started under it, finished after."""
    shutil.copy2(empty_mlflow_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("tracking_test", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment)
    tracking.start(run.info.run_id, {"data_source": "demo", "kedro_env": "test"}, " · seed=1")
    try:
        yield client, run.info.run_id
    finally:
        tracking.finish("FINISHED")
        mlflow.set_tracking_uri(previous)


def test_everything_is_a_no_op_without_a_run(tmp_path: Path) -> None:
    assert not tracking.active()
    assert tracking.detector_run_id("wallplugs", "patchcore") is None
    assert tracking.log_metrics("wallplugs", "patchcore", {"a": 1.0}) == 0
    metrics = DetectorMetricsDataset(category="wallplugs", detector="patchcore")
    with pytest.raises(DatasetError, match="logged to MLflow"):
        metrics.load()
    metrics.save({"image_auroc": 0.9})
    assert metrics.load() == {"image_auroc": 0.9}  # the last value stays readable within the run
    report = DetectorArtifactDataset(
        category="wallplugs",
        detector="patchcore",
        dataset={"type": "json.JSONDataset", "filepath": str(tmp_path / "metrics.json")},
    )
    report.save({"a": 1})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"a": 1}  # the local file is still written


def test_one_nested_run_per_detector_with_the_shared_tags(parent: tuple[mlflow.MlflowClient, str]) -> None:
    client, parent_id = parent
    first = tracking.detector_run_id("wallplugs", "patchcore")
    assert tracking.detector_run_id("wallplugs", "patchcore") == first  # created once, then reused
    other = tracking.detector_run_id("wallplugs", "autoencoder")
    assert other != first
    run = client.get_run(first)
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == parent_id
    assert (tags["category"], tags["detector"], tags["data_source"], tags["kedro_env"]) == (
        "wallplugs",
        "patchcore",
        "demo",
        "test",
    )
    assert run.info.run_name == "wallplugs · patchcore · seed=1"
    assert tracking.children() == {("wallplugs", "patchcore"): first, ("wallplugs", "autoencoder"): other}
    closed = tracking.finish("FAILED")
    assert set(closed) == {first, other}
    assert client.get_run(first).info.status == "FAILED"
    assert not tracking.active() and tracking.children() == {}


def test_metrics_dataset_logs_short_keys_histories_and_drops_nan(parent: tuple[mlflow.MlflowClient, str]) -> None:
    client, _ = parent
    DetectorMetricsDataset(category="wallplugs", detector="patchcore").save(
        {
            "image_auroc": 0.875,
            "train_loss": [0.5, 0.25, 0.125],
            "au_pro_005.shift_1": math.nan,
            "n_scored": {"value": 8, "step": 2},
            "note": "not a number",
        }
    )
    run_id = tracking.children()[("wallplugs", "patchcore")]
    metrics = client.get_run(run_id).data.metrics
    assert metrics == {"image_auroc": 0.875, "train_loss": 0.125, "n_scored": 8.0}
    history = client.get_metric_history(run_id, "train_loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 0.5), (1, 0.25), (2, 0.125)]
    assert client.get_metric_history(run_id, "n_scored")[0].step == 2


def test_params_dataset_logs_flattened_params_and_tags(parent: tuple[mlflow.MlflowClient, str]) -> None:
    client, _ = parent
    data: dict[str, Any] = {
        "detector": "patchcore",
        "config": {"num_neighbors": 3, "layers": None, "backbone": {"name": "lite0"}},
        "tags": {"reused_model": "2026-11-30T21.00.00.000Z"},
    }
    dataset = DetectorParamsDataset(category="wallplugs", detector="patchcore")
    dataset.save(data)
    run = client.get_run(tracking.children()[("wallplugs", "patchcore")])
    assert run.data.params == {
        "detector": "patchcore",
        "config.num_neighbors": "3",
        "config.layers": "None",
        "config.backbone.name": "lite0",
    }
    assert run.data.tags["reused_model"] == "2026-11-30T21.00.00.000Z"
    assert dataset.load() == data and "tags" in data  # the caller's dict is not modified


def test_artifact_dataset_logs_files_and_flat_figure_folders(
    parent: tuple[mlflow.MlflowClient, str], tmp_path: Path
) -> None:
    client, _ = parent
    report = DetectorArtifactDataset(
        category="wallplugs",
        detector="patchcore",
        dataset={"type": "json.JSONDataset", "filepath": str(tmp_path / "r" / "metrics.json")},
    )
    report.save({"image_auroc": 0.9})
    assert report.exists() and report.load() == {"image_auroc": 0.9}
    figure, _ = plt.subplots()
    figures = DetectorArtifactDataset(
        category="wallplugs",
        detector="patchcore",
        dataset={"type": "matplotlib.MatplotlibDataset", "filepath": str(tmp_path / "r" / "figures")},
        artifact_path="figures",
    )
    figures.save({"roc.png": figure, "heatmaps.png": figure})
    plt.close(figure)
    run_id = tracking.children()[("wallplugs", "patchcore")]
    assert {a.path for a in client.list_artifacts(run_id)} == {"metrics.json", "figures"}
    assert sorted(a.path for a in client.list_artifacts(run_id, "figures")) == [
        "figures/heatmaps.png",
        "figures/roc.png",
    ]
    with pytest.raises(DatasetError, match="needs the wrapped dataset's 'filepath'"):
        DetectorArtifactDataset(category="c", detector="d", dataset={"type": "json.JSONDataset"})


def test_flatten() -> None:
    assert tracking.flatten({"a": {"b": 1, "c": {}}, "d": [1, 2]}) == {"a.b": 1, "a.c": {}, "d": [1, 2]}
