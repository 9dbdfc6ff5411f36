"""The training template: its wiring, its per-category/per-detector copies and their catalog entries."""

from __future__ import annotations

import re

import pytest
from kedro.io.catalog_config_resolver import CatalogConfigResolver

from madfh_pipeline.pipeline_registry import namespaced, per_detector
from madfh_pipeline.pipelines.detection import create_pipeline


def test_template_wiring() -> None:
    template = create_pipeline()
    assert [n.name for n in template.nodes] == ["fit_detector", "calibrate_thresholds"]
    assert template.inputs() == {
        "manifest",
        "image_store",
        "model_cache",
        "params:detector",
        "params:category",
        "params:runtime",
        "params:thresholds",
    }
    assert template.outputs() == {"model", "training_metrics", "detector_params", "calibration_metrics"}
    assert set(template.all_outputs()) == {
        "fitted_model",
        "training_metrics",
        "detector_params",
        "model",
        "calibration_metrics",
    }
    fit, calibrate = template.nodes
    assert fit.inputs == [
        "manifest",
        "image_store",
        "model_cache",
        "params:detector",
        "params:category",
        "params:runtime",
    ]
    assert fit.outputs == ["fitted_model", "training_metrics", "detector_params"]
    assert calibrate.inputs == ["fitted_model", "manifest", "image_store", "params:thresholds", "params:runtime"]
    assert calibrate.outputs == ["model", "calibration_metrics"]
    assert "model" not in fit.inputs  # the cache is read through its own dataset, never the model being written


def test_per_category_per_detector_copy() -> None:
    pipe = namespaced(per_detector(create_pipeline(), "patchcore"), "wallplugs")
    assert [n.name for n in pipe.nodes] == [
        "wallplugs.patchcore.fit_detector",
        "wallplugs.patchcore.calibrate_thresholds",
    ]
    assert pipe.inputs() == {
        "wallplugs.manifest",
        "wallplugs.image_store",
        "wallplugs.patchcore.model_cache",
        "params:categories.wallplugs",
        "params:detection.models.patchcore",
        "params:detection.runtime",
        "params:detection.thresholds",
    }
    assert pipe.outputs() == {
        "wallplugs.patchcore.model",
        "wallplugs.patchcore.training_metrics",
        "wallplugs.patchcore.detector_params",
        "wallplugs.patchcore.calibration_metrics",
    }
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
    assert {o for o in pipe.outputs() if o.endswith(".model")} == {
        "walnuts.autoencoder.model",
        "walnuts.patchcore.model",
    }
    assert {"walnuts.manifest", "walnuts.image_store"} <= pipe.inputs()
    assert {"walnuts.autoencoder.model_cache", "walnuts.patchcore.model_cache"} <= pipe.inputs()
    assert {"params:detection.models.autoencoder", "params:detection.models.patchcore"} <= pipe.inputs()


@pytest.mark.parametrize("detector", ["autoencoder", "patchcore"])
def test_every_dataset_has_a_catalog_entry(detector: str, catalog_resolver: CatalogConfigResolver) -> None:
    resolver = catalog_resolver
    pipe = namespaced(per_detector(create_pipeline(), detector), "sheet_metal")
    for name in pipe.datasets():
        if not name.startswith("params:"):
            assert resolver.match_dataset_pattern(name) is not None, name
    fitted = resolver.resolve_pattern(f"sheet_metal.{detector}.fitted_model")
    assert fitted == {"type": "kedro.io.MemoryDataset", "copy_mode": "assign"}  # torch modules are never deep-copied
    model = resolver.resolve_pattern(f"sheet_metal.{detector}.model")
    assert model["type"] == "madfh_pipeline.datasets.DetectorDataset"
    assert model["filepath"] == f"data/06_models/sheet_metal/{detector}.safetensors"
    assert model["versioned"] is True
    assert (model["category"], model["detector"]) == ("sheet_metal", detector)  # logged to the detector's run
    cache = resolver.resolve_pattern(f"sheet_metal.{detector}.model_cache")
    assert cache["type"] == "madfh_pipeline.datasets.ModelCacheDataset"
    assert cache["filepath"] == model["filepath"]  # the cache reads the versions the model dataset writes
    for name in ("training_metrics", "calibration_metrics"):
        metrics = resolver.resolve_pattern(f"sheet_metal.{detector}.{name}")
        assert metrics["type"] == "madfh_pipeline.datasets.DetectorMetricsDataset", name
        assert (metrics["category"], metrics["detector"]) == ("sheet_metal", detector)
    params = resolver.resolve_pattern(f"sheet_metal.{detector}.detector_params")
    assert params["type"] == "madfh_pipeline.datasets.DetectorParamsDataset"
