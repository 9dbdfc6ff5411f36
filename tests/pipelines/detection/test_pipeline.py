"""The training template: its wiring, its per-category/per-detector copies and their catalog entries."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from kedro.io.catalog_config_resolver import CatalogConfigResolver

from madfh_pipeline.pipeline_registry import namespaced, per_detector
from madfh_pipeline.pipelines.detection import create_pipeline

CATALOG = Path(__file__).resolve().parents[3] / "conf" / "base" / "catalog.yml"


def catalog_resolver() -> CatalogConfigResolver:
    """The dataset factories of conf/base/catalog.yml (entries that need ``${globals:...}`` left out)."""
    config = yaml.safe_load(CATALOG.read_text())
    return CatalogConfigResolver({k: v for k, v in config.items() if "${" not in yaml.safe_dump(v)})


def test_template_wiring() -> None:
    template = create_pipeline()
    assert [n.name for n in template.nodes] == ["fit_detector", "calibrate_thresholds"]
    assert template.inputs() == {"manifest", "image_store", "params:detector", "params:runtime", "params:thresholds"}
    assert template.outputs() == {"model", "training_metrics"}
    assert set(template.all_outputs()) == {"fitted_model", "training_metrics", "model"}
    fit, calibrate = template.nodes
    assert fit.inputs == ["manifest", "image_store", "params:detector", "params:runtime"]
    assert fit.outputs == ["fitted_model", "training_metrics"]
    assert calibrate.inputs == ["fitted_model", "manifest", "image_store", "params:thresholds", "params:runtime"]
    assert calibrate.outputs == ["model"]


def test_per_category_per_detector_copy() -> None:
    pipe = namespaced(per_detector(create_pipeline(), "patchcore"), "wallplugs")
    assert [n.name for n in pipe.nodes] == [
        "wallplugs.patchcore.fit_detector",
        "wallplugs.patchcore.calibrate_thresholds",
    ]
    assert pipe.inputs() == {
        "wallplugs.manifest",
        "wallplugs.image_store",
        "params:detection.models.patchcore",
        "params:detection.runtime",
        "params:detection.thresholds",
    }
    assert pipe.outputs() == {"wallplugs.patchcore.model", "wallplugs.patchcore.training_metrics"}
    assert "wallplugs.patchcore.fitted_model" in pipe.datasets()
    for n in pipe.nodes:
        assert n.tags == {"wallplugs", "patchcore"}
        assert n.namespace == "wallplugs.patchcore"
        assert not re.search(r"[(\[]", n.name), f"node without an explicit name: {n.name}"


def test_two_detectors_share_the_category_inputs_only() -> None:
    pipe = namespaced(
        per_detector(create_pipeline(), "autoencoder") + per_detector(create_pipeline(), "patchcore"), "walnuts"
    )
    assert len(pipe.nodes) == 4
    assert pipe.outputs() == {
        "walnuts.autoencoder.model",
        "walnuts.autoencoder.training_metrics",
        "walnuts.patchcore.model",
        "walnuts.patchcore.training_metrics",
    }
    assert {"walnuts.manifest", "walnuts.image_store"} <= pipe.inputs()
    assert {"params:detection.models.autoencoder", "params:detection.models.patchcore"} <= pipe.inputs()


@pytest.mark.parametrize("detector", ["autoencoder", "patchcore"])
def test_every_dataset_has_a_catalog_entry(detector: str) -> None:
    resolver = catalog_resolver()
    pipe = namespaced(per_detector(create_pipeline(), detector), "sheet_metal")
    for name in pipe.datasets():
        if not name.startswith("params:"):
            assert resolver.match_dataset_pattern(name) is not None, name
    fitted = resolver.resolve_pattern(f"sheet_metal.{detector}.fitted_model")
    assert fitted == {"type": "kedro.io.MemoryDataset", "copy_mode": "assign"}  # torch modules are never deep-copied
    model = resolver.resolve_pattern(f"sheet_metal.{detector}.model")
    assert model["type"] == "madfh_pipeline.datasets.DetectorDataset"
    assert model["filepath"] == f"data/06_models/sheet_metal/{detector}.pt"
    assert model["versioned"] is True
    metrics = resolver.resolve_pattern(f"sheet_metal.{detector}.training_metrics")
    assert metrics["type"] == "kedro_mlflow.io.metrics.MlflowMetricsHistoryDataset"
    assert metrics["prefix"] == f"sheet_metal.{detector}"
