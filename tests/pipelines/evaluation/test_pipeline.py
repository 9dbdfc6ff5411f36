"""The evaluation template: wiring, per-category/per-detector copies, and a training + evaluation slice run."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from kedro.io import DataCatalog, MemoryDataset
from kedro.io.catalog_config_resolver import CatalogConfigResolver
from kedro.runner import SequentialRunner
from matplotlib.figure import Figure

from madfh_pipeline.datasets import ImageStore, MapStore
from madfh_pipeline.pipeline_registry import namespaced, per_detector
from madfh_pipeline.pipelines import detection, evaluation

CATALOG = Path(__file__).resolve().parents[3] / "conf" / "base" / "catalog.yml"
SIZE = 32
NODES = ("score_images", "compute_metrics", "plot_evaluation", "export_submission")
OUTPUTS = ("evaluation_report", "evaluation_metrics", "evaluation_figures", "submission_summary", "inference_metrics")


def test_template_wiring() -> None:
    template = evaluation.create_pipeline()
    assert {n.name for n in template.nodes} == set(NODES)
    assert template.inputs() == {
        "model",
        "manifest",
        "image_store",
        "anomaly_maps",
        "submission",
        "params:evaluation",
        "params:runtime",
    }
    assert template.outputs() == set(OUTPUTS)
    [score] = [n for n in template.nodes if n.name == "score_images"]
    assert score.inputs == ["model", "manifest", "image_store", "anomaly_maps", "params:evaluation", "params:runtime"]
    assert score.outputs == ["scores", "inference_metrics"]


def test_per_category_per_detector_copy() -> None:
    pipe = namespaced(per_detector(evaluation.create_pipeline(), "patchcore"), "wallplugs")
    assert {n.name for n in pipe.nodes} == {f"wallplugs.patchcore.{n}" for n in NODES}
    assert pipe.inputs() == {
        "wallplugs.patchcore.model",
        "wallplugs.manifest",
        "wallplugs.image_store",
        "wallplugs.patchcore.anomaly_maps",
        "wallplugs.patchcore.submission",
        "params:evaluation",
        "params:detection.runtime",
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
        "wallplugs.patchcore.anomaly_maps",
        "wallplugs.patchcore.submission",
        "params:detection.models.patchcore",
        "params:detection.runtime",
        "params:detection.thresholds",
        "params:evaluation",
    }
    names = [n.name for n in pipe.nodes]
    assert names.index("wallplugs.patchcore.calibrate_thresholds") < names.index("wallplugs.patchcore.score_images")


def test_every_dataset_has_a_catalog_entry() -> None:
    config = yaml.safe_load(CATALOG.read_text())
    resolver = CatalogConfigResolver({k: v for k, v in config.items() if "${" not in yaml.safe_dump(v)})
    pipe = namespaced(per_detector(evaluation.create_pipeline(), "autoencoder"), "can")
    for name in pipe.datasets():
        if not name.startswith("params:"):
            assert resolver.match_dataset_pattern(name) is not None, name
    maps = resolver.resolve_pattern("can.autoencoder.anomaly_maps")
    assert maps == {"type": "madfh_pipeline.datasets.MapStoreDataset", "path": "data/07_model_output/can/autoencoder"}
    figures = resolver.resolve_pattern("can.autoencoder.evaluation_figures")
    assert figures["dataset"]["type"] == "matplotlib.MatplotlibDataset"
    metrics = resolver.resolve_pattern("can.autoencoder.evaluation_metrics")
    assert metrics["type"] == "kedro_mlflow.io.metrics.MlflowMetricsHistoryDataset"


# ----------------------------------------------------------------------------------------------------------------------
# A slice run: training + evaluation of the autoencoder on a tiny generated store
# ----------------------------------------------------------------------------------------------------------------------


def _tiny_store(root: Path) -> pd.DataFrame:
    """Uniform texture for good images, a bright blob (with its mask) for bad ones; manifest columns as preprocessing."""
    rng = np.random.default_rng(0)
    store = ImageStore(root)
    rows = []

    def add(relpath: str, split: str, label: str, lighting: str, image: np.ndarray, mask_rel: str = "") -> None:
        store.write(relpath, image)
        rows.append(
            {
                "category": "wallplugs",
                "relpath": relpath,
                "split": split,
                "official_split": split,
                "label": label,
                "lighting": lighting,
                "has_mask": bool(mask_rel),
                "mask_relpath": mask_rel,
                "path": f"/raw/wallplugs/{relpath}",
                **{"src_width": SIZE, "src_height": SIZE, "dst_width": SIZE, "dst_height": SIZE},
                **{"scale_x": 1.0, "scale_y": 1.0, "pad_x": 0, "pad_y": 0},
            }
        )

    def good() -> np.ndarray:
        return np.clip(128 + rng.integers(-10, 11, (SIZE, SIZE)), 0, 255).astype(np.uint8)

    for i in range(4):
        add(f"train/good/{i:03d}_regular.png", "train", "good", "regular", good())
    for i in range(2):
        add(f"validation/good/{i:03d}_regular.png", "validation", "good", "regular", good())
    for i, lighting in enumerate(("regular", "overexposed")):
        add(f"test_public/good/{i:03d}_{lighting}.png", "test_public", "good", lighting, good())
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[8:16, 10 + 4 * i : 18 + 4 * i] = 255
        image = good()
        image[mask > 0] = 255
        mask_rel = f"test_public/ground_truth/bad/{i:03d}_{lighting}_mask.png"
        store.write(mask_rel, mask)
        add(f"test_public/bad/{i:03d}_{lighting}.png", "test_public", "bad", lighting, image, mask_rel)
    add("test_private/000_regular.png", "test_private", "unknown", "regular", good())
    add("test_private_mixed/000_mixed.png", "test_private_mixed", "unknown", "mixed", good())
    return pd.DataFrame(rows)


def _catalog(tmp_path: Path, manifest: pd.DataFrame) -> DataCatalog:
    ns = "wallplugs.autoencoder"
    config = {"input_size": 32, "depth": 3, "epochs": 2, "latent_dim": 16, "batch_size": 4, "smoothing_sigma": 1.0}
    datasets: dict[str, Any] = {
        "wallplugs.manifest": MemoryDataset(manifest),
        "wallplugs.image_store": MemoryDataset(ImageStore(tmp_path / "store"), copy_mode="assign"),
        f"{ns}.anomaly_maps": MemoryDataset(MapStore(tmp_path / "maps"), copy_mode="assign"),
        f"{ns}.submission": MemoryDataset(MapStore(tmp_path / "submission"), copy_mode="assign"),
        f"{ns}.fitted_model": MemoryDataset(copy_mode="assign"),
        f"{ns}.model": MemoryDataset(copy_mode="assign"),
        f"{ns}.evaluation_figures": MemoryDataset(copy_mode="assign"),
        "params:detection.models.autoencoder": MemoryDataset({"name": "autoencoder", "config": config}),
        "params:detection.runtime": MemoryDataset({"device": "cpu", "batch_size": 4}),
        "params:detection.thresholds": MemoryDataset({"pixel_k": 3.0, "image_rule": "mean_std", "image_k": 3.0}),
        "params:evaluation": MemoryDataset({"splits": ["validation", "test_public"], "examples_per_group": 2}),
    }
    for name in ("training_metrics", "scores", *OUTPUTS):
        datasets.setdefault(f"{ns}.{name}", MemoryDataset())
    return DataCatalog(datasets=datasets)


@pytest.fixture(scope="module")
def slice_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DataCatalog, dict[str, Any]]:
    tmp_path = tmp_path_factory.mktemp("slice")
    manifest = _tiny_store(tmp_path / "store")
    catalog = _catalog(tmp_path, manifest)
    pipe = namespaced(
        per_detector(detection.create_pipeline(), "autoencoder")
        + per_detector(evaluation.create_pipeline(), "autoencoder"),
        "wallplugs",
    )
    outputs = SequentialRunner().run(pipe, catalog)
    return tmp_path, catalog, outputs


def test_slice_run_produces_every_output(slice_run: tuple[Path, DataCatalog, dict[str, Any]]) -> None:
    _, _, outputs = slice_run
    assert set(outputs) == {f"wallplugs.autoencoder.{o}" for o in (*OUTPUTS, "training_metrics")}


def test_slice_run_metrics_report(slice_run: tuple[Path, DataCatalog, dict[str, Any]]) -> None:
    _, catalog, _ = slice_run
    report = catalog.load("wallplugs.autoencoder.evaluation_report")
    assert report["model"] == "autoencoder"
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

    flat = catalog.load("wallplugs.autoencoder.evaluation_metrics")
    assert {"test_public.all.image_auroc", "test_public.all.au_pro_005", "test_public.all.seg_f1"} <= set(flat)
    assert {"test_public.regular.image_auroc", "test_public.overexposed.au_pro_005"} <= set(flat)
    assert {"validation.image_false_alarm_rate", "validation.mean_score"} <= set(flat)
    assert all(v["step"] == 0 and math.isfinite(v["value"]) for v in flat.values())
    assert flat["test_public.all.image_auroc"]["value"] == overall["image_auroc"]


def test_slice_run_training_and_inference_metrics(slice_run: tuple[Path, DataCatalog, dict[str, Any]]) -> None:
    _, catalog, _ = slice_run
    training = catalog.load("wallplugs.autoencoder.training_metrics")
    assert training["n_train"] == {"value": 4, "step": 0}
    assert [m["step"] for m in training["train_loss"]] == [0, 1]
    inference = catalog.load("wallplugs.autoencoder.inference_metrics")
    assert set(inference) == {"inference_seconds", "inference_images_per_s"}


def test_slice_run_files(slice_run: tuple[Path, DataCatalog, dict[str, Any]]) -> None:
    tmp_path, catalog, _ = slice_run
    maps = sorted(p.relative_to(tmp_path / "maps").as_posix() for p in (tmp_path / "maps").rglob("*.npy"))
    assert len(maps) == 8  # validation 2 + test_public 4 + private 2; train is never scored
    assert not any(m.startswith("maps/train/") for m in maps)
    summary = catalog.load("wallplugs.autoencoder.submission_summary")
    assert summary["model"] == "autoencoder"
    assert summary["written"] == {"test_private": 1, "test_private_mixed": 1}
    assert (tmp_path / "submission/anomaly_images/wallplugs/test_private/000_regular.tiff").is_file()
    assert (tmp_path / "submission/anomaly_images_thresholded/wallplugs/test_private_mixed/000_mixed.png").is_file()
    figures = catalog.load("wallplugs.autoencoder.evaluation_figures")
    assert set(figures) == {"roc.png", "pro_curve.png", "score_histogram.png", "heatmaps.png"}
    assert all(isinstance(f, Figure) for f in figures.values())


def test_slice_run_model_is_calibrated(slice_run: tuple[Path, DataCatalog, dict[str, Any]]) -> None:
    _, catalog, _ = slice_run
    report = catalog.load("wallplugs.autoencoder.evaluation_report")
    # the intermediate model is released by the runner; its thresholds live on in the report
    assert report["thresholds"]["rule"].startswith("pixel: mean+3.0std of validation/good pixels")
    assert isinstance(report["thresholds"]["image"], float)
