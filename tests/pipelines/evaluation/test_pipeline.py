"""The evaluation template: wiring, per-category/per-detector copies, and a training + evaluation slice run."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from kedro.io import DataCatalog, MemoryDataset
from kedro.io.catalog_config_resolver import CatalogConfigResolver
from kedro.runner import SequentialRunner
from kedro_datasets.json import JSONDataset
from matplotlib.figure import Figure

from madfh_pipeline.datasets import (
    ImageStore,
    MapStore,
    MapStoreDataset,
    ModelCacheDataset,
    SubmissionDataset,
)
from madfh_pipeline.pipeline_registry import namespaced, per_detector
from madfh_pipeline.pipelines import detection, evaluation

CATALOG = Path(__file__).resolve().parents[3] / "conf" / "base" / "catalog.yml"
SIZE = 32
NODES = (
    "score_images",
    "collect_scores",
    "compute_metrics",
    "explain_detections",
    "plot_evaluation",
    "export_submission",
)
#: What evaluation leaves for the catalog (nothing else escapes the template).
OUTPUTS = (
    "evaluation_metrics",
    "evaluation_figures",
    "explanation_metrics",
    "explanation_report",
    "inference_metrics",
    "submission",
    "submission_summary",
)


def _node(pipe: Any, name: str) -> Any:
    (found,) = [n for n in pipe.nodes if n.name.endswith(name)]
    return found


def test_template_wiring() -> None:
    template = evaluation.create_pipeline()
    assert {n.name for n in template.nodes} == set(NODES)
    assert template.inputs() == {
        "model",
        "manifest",
        "image_store",
        "raw_masks",
        "params:evaluation",
        "params:runtime",
        "params:explainer",
        "params:category",
        "params:data_source",
    }
    assert template.outputs() == set(OUTPUTS)
    score = _node(template, "score_images")
    assert score.inputs == ["model", "manifest", "image_store", "params:evaluation", "params:runtime"]
    assert score.outputs == ["anomaly_maps"]  # the map store is written by the node's output, not into an input
    assert _node(template, "collect_scores").outputs == ["scores", "inference_metrics"]
    export = _node(template, "export_submission")
    assert export.outputs == ["submission", "submission_summary"]
    for name in ("collect_scores", "compute_metrics", "plot_evaluation", "export_submission"):
        assert "anomaly_maps" in _node(template, name).inputs, name


def test_per_category_per_detector_copy() -> None:
    pipe = namespaced(per_detector(evaluation.create_pipeline(), "patchcore"), "wallplugs")
    assert {n.name for n in pipe.nodes} == {f"wallplugs.patchcore.{n}" for n in NODES}
    assert pipe.inputs() == {
        "wallplugs.patchcore.model",
        "wallplugs.manifest",
        "wallplugs.image_store",
        "wallplugs.raw_masks",
        "params:evaluation",
        "params:detection.runtime",
        "params:explainer",
        "params:categories.wallplugs",
        "params:data_source",
    }
    assert pipe.outputs() == {f"wallplugs.patchcore.{o}" for o in OUTPUTS}
    for n in pipe.nodes:
        assert n.tags == {"wallplugs", "patchcore"}
        assert not re.search(r"[(\[]", n.name), n.name


def test_training_feeds_evaluation() -> None:
    """Training and evaluation of one detector chain through ``<category>.<detector>.model`` only."""
    pipe = namespaced(
        per_detector(detection.create_pipeline(), "patchcore")
        + per_detector(evaluation.create_pipeline(), "patchcore"),
        "wallplugs",
    )
    assert "wallplugs.patchcore.model" in pipe.all_outputs()
    assert "wallplugs.patchcore.model" not in pipe.inputs()
    assert pipe.inputs() == {
        "wallplugs.manifest",
        "wallplugs.image_store",
        "wallplugs.raw_masks",
        "wallplugs.patchcore.model_cache",
        "params:categories.wallplugs",
        "params:data_source",
        "params:detection.models.patchcore",
        "params:detection.runtime",
        "params:detection.thresholds",
        "params:evaluation",
        "params:explainer",
    }
    names = [n.name for n in pipe.nodes]
    assert names.index("wallplugs.patchcore.calibrate_thresholds") < names.index("wallplugs.patchcore.score_images")
    assert names.index("wallplugs.patchcore.score_images") < names.index("wallplugs.patchcore.compute_metrics")


def test_every_dataset_has_a_catalog_entry(catalog_resolver: CatalogConfigResolver) -> None:
    config = yaml.safe_load(CATALOG.read_text())
    resolver = catalog_resolver
    pipe = namespaced(per_detector(evaluation.create_pipeline(), "autoencoder"), "can")
    for name in pipe.datasets():
        if not name.startswith("params:") and name != "can.raw_masks":  # raw_masks: ${globals:raw_root}
            assert resolver.match_dataset_pattern(name) is not None, name
    assert "{category}.raw_masks" in config
    assert config["{category}.raw_masks"]["read_only"] is True
    maps = resolver.resolve_pattern("can.autoencoder.anomaly_maps")
    assert maps == {"type": "madfh_pipeline.datasets.MapStoreDataset", "path": "data/07_model_output/can/autoencoder"}
    submission = resolver.resolve_pattern("can.autoencoder.submission")
    assert submission["type"] == "madfh_pipeline.datasets.SubmissionDataset"
    figures = resolver.resolve_pattern("can.autoencoder.evaluation_figures")
    assert figures["type"] == "madfh_pipeline.datasets.DetectorArtifactDataset"
    assert (figures["category"], figures["detector"], figures["artifact_path"]) == ("can", "autoencoder", "figures")
    assert figures["dataset"]["type"] == "matplotlib.MatplotlibDataset"
    for name in ("evaluation_metrics", "inference_metrics"):
        metrics = resolver.resolve_pattern(f"can.autoencoder.{name}")
        assert metrics == {
            "type": "madfh_pipeline.datasets.DetectorMetricsDataset",
            "category": "can",
            "detector": "autoencoder",
        }, name
    report = resolver.resolve_pattern("can.autoencoder.evaluation_report")
    assert report["dataset"]["filepath"] == "data/08_reporting/can/autoencoder/metrics.json"


# ----------------------------------------------------------------------------------------------------------------------
# A slice run: training + evaluation of the autoencoder on a tiny generated store, with the real store datasets
# ----------------------------------------------------------------------------------------------------------------------

NS = "wallplugs.autoencoder"
AUTOENCODER = {"input_size": 32, "depth": 3, "epochs": 2, "latent_dim": 16, "batch_size": 4, "smoothing_sigma": 1.0}


def _catalog(tmp_path: Path, manifest: pd.DataFrame, store: ImageStore) -> DataCatalog:
    datasets: dict[str, Any] = {
        "wallplugs.manifest": MemoryDataset(manifest),
        "wallplugs.image_store": MemoryDataset(store, copy_mode="assign"),
        "wallplugs.raw_masks": MemoryDataset(ImageStore(store.root, read_only=True), copy_mode="assign"),
        f"{NS}.model_cache": ModelCacheDataset(filepath=str(tmp_path / "models" / "autoencoder.safetensors")),
        f"{NS}.anomaly_maps": MapStoreDataset(path=str(tmp_path / "maps")),
        f"{NS}.submission": SubmissionDataset(path=str(tmp_path / "submission")),
        "params:detection.models.autoencoder": MemoryDataset({"name": "autoencoder", "config": AUTOENCODER}),
        "params:detection.runtime": MemoryDataset({"device": "cpu", "batch_size": 4}),
        "params:detection.thresholds": MemoryDataset({"pixel_k": 3.0, "image_rule": "mean_std", "image_k": 3.0}),
        "params:evaluation": MemoryDataset(
            {"splits": ["validation", "test_public"], "examples_per_group": 2, "resolution": "canvas"}
        ),
        "params:explainer": MemoryDataset({"splits": ["test_public"]}),
        "params:categories.wallplugs": MemoryDataset(
            {"name": "wallplugs", "width": SIZE, "height": SIZE, "channels": 1}
        ),
        "params:data_source": MemoryDataset("demo"),
    }
    for name in ("fitted_model", "model", "evaluation_figures", "scores", "explanations"):
        datasets[f"{NS}.{name}"] = MemoryDataset(copy_mode="assign")
    # consumed by plot_evaluation, so a MemoryDataset would be released by the runner: a file, as in the catalog
    datasets[f"{NS}.evaluation_report"] = JSONDataset(filepath=str(tmp_path / "reporting" / "metrics.json"))
    return DataCatalog(datasets=datasets)


@pytest.fixture(scope="module")
def slice_run(
    tmp_path_factory: pytest.TempPathFactory, make_processed_store: Callable[..., tuple[pd.DataFrame, ImageStore]]
) -> tuple[Path, DataCatalog, dict[str, Any]]:
    tmp_path = tmp_path_factory.mktemp("slice")
    manifest, store = make_processed_store(
        tmp_path / "store", "wallplugs", SIZE, {"validation": 2, "test_private_mixed": 1}
    )
    catalog = _catalog(tmp_path, manifest, store)
    pipe = namespaced(
        per_detector(detection.create_pipeline(), "autoencoder")
        + per_detector(evaluation.create_pipeline(), "autoencoder"),
        "wallplugs",
    )
    outputs = SequentialRunner().run(pipe, catalog)
    return tmp_path, catalog, outputs


def test_slice_run_produces_every_output(slice_run: tuple[Path, DataCatalog, dict[str, Any]]) -> None:
    tmp_path, _, outputs = slice_run
    free = set(OUTPUTS) - {"submission"} | {"training_metrics", "detector_params", "calibration_metrics"}
    assert set(outputs) >= {f"{NS}.{o}" for o in free}
    assert (tmp_path / "reporting" / "metrics.json").is_file()


def test_slice_run_metrics_report(slice_run: tuple[Path, DataCatalog, dict[str, Any]]) -> None:
    _, catalog, _ = slice_run
    report = catalog.load(f"{NS}.evaluation_report")
    assert report["model"] == "autoencoder" and report["resolution"] == "canvas"
    thresholds = report["thresholds"]
    assert thresholds["pixel"] > thresholds["stats"]["pixel_mean"] > 0
    assert thresholds["stats"]["n_validation"] == 2.0
    assert set(report["test_public"]) == {"all", "regular", "overexposed"}
    expected = {
        "n_images",
        "n_bad",
        "image_auroc",
        "image_aupr",
        "class_f1",
        "image_recall",
        "image_false_alarm_rate",
        "pixel_auroc",
        "au_pro_005",
        "au_pro_03",
        "seg_f1",
        "seg_precision",
        "seg_recall",
    }
    for group in ("all", "regular", "overexposed"):
        assert set(report["test_public"][group]) == expected
    overall = report["test_public"]["all"]
    assert overall["n_images"] == 4.0 and overall["n_bad"] == 2.0
    assert overall["image_auroc"] == 1.0  # a saturated blob is trivially found, even by a 2-epoch autoencoder
    assert 0.0 <= overall["au_pro_005"] <= 1.0 and 0.0 <= overall["seg_f1"] <= 1.0
    assert set(report["validation"]) == {"n_images", "image_false_alarm_rate", "mean_score"}
    assert report["validation"]["n_images"] == 2.0

    flat = catalog.load(f"{NS}.evaluation_metrics")
    assert {"image_auroc", "canvas.au_pro_005", "canvas.seg_f1"} <= set(flat)
    assert {"image_auroc.regular", "canvas.au_pro_005.overexposed"} <= set(flat)
    assert {"val_image_false_alarm_rate", "val_mean_score"} <= set(flat)
    assert all(isinstance(v, float) and math.isfinite(v) for v in flat.values())
    assert flat["image_auroc"] == overall["image_auroc"]


def test_slice_run_training_and_inference_metrics(
    slice_run: tuple[Path, DataCatalog, dict[str, Any]], mlflow_points: Callable
) -> None:
    _, catalog, _ = slice_run
    training = catalog.load(f"{NS}.training_metrics")
    assert (training["n_train"], training["reused_model"]) == (4.0, 0.0) and training["fit_seconds"] > 0
    assert len(training["train_loss"]) == 2  # one value per epoch: MLflow steps 0 and 1
    steps = [step for key, _, step in mlflow_points(training) if key == "train_loss"]
    assert steps == [0, 1]
    params = catalog.load(f"{NS}.detector_params")
    assert params["detector"] == "autoencoder" and params["config"]["latent_dim"] == 16
    assert params["n_train"] == 4 and len(params["training_fingerprint"]) == 24
    calibration = catalog.load(f"{NS}.calibration_metrics")
    assert {"threshold_pixel", "threshold_image", "threshold_pixel_mean"} <= set(calibration)
    inference = catalog.load(f"{NS}.inference_metrics")
    assert set(inference) == {"inference_seconds", "inference_images_per_s", "n_scored", "n_maps_reused"}
    assert (inference["n_scored"], inference["n_maps_reused"]) == (8.0, 0.0)


def test_slice_run_files(slice_run: tuple[Path, DataCatalog, dict[str, Any]]) -> None:
    tmp_path, catalog, _ = slice_run
    maps = sorted(p.relative_to(tmp_path / "maps").as_posix() for p in (tmp_path / "maps").rglob("*.npy"))
    assert len(maps) == 8  # validation 2 + test_public 4 + private 2; train is never scored
    assert not any(m.startswith("maps/train/") for m in maps)
    assert len(MapStore(tmp_path / "maps").scores()) == 8
    summary = catalog.load(f"{NS}.submission_summary")
    assert summary["model"] == "autoencoder"
    assert summary["written"] == {"test_private": 1, "test_private_mixed": 1}
    assert (tmp_path / "submission/anomaly_images/wallplugs/test_private/000_regular.tiff").is_file()
    assert (tmp_path / "submission/anomaly_images_thresholded/wallplugs/test_private_mixed/000_mixed.png").is_file()
    figures = catalog.load(f"{NS}.evaluation_figures")
    assert set(figures) == {"roc.png", "pro_curve.png", "score_histogram.png", "heatmaps.png"}
    assert all(isinstance(f, Figure) for f in figures.values())


def test_slice_run_model_is_calibrated(slice_run: tuple[Path, DataCatalog, dict[str, Any]]) -> None:
    _, catalog, _ = slice_run
    report = catalog.load(f"{NS}.evaluation_report")
    # the intermediate model is released by the runner; its thresholds live on in the report
    assert report["thresholds"]["rule"].startswith("pixel: mean+3.0std of validation/good pixels")
    assert isinstance(report["thresholds"]["image"], float)
