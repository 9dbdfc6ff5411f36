"""The ``vlm_features`` stage without Kedro: the node's plan carried out by the real feature store, with a tiny random
MiniCPM-V (:func:`madfh_pipeline.models.vlm_tiny.save_tiny_random_minicpmv`, loaded through the real loader).

Checks the documented layout (``grid`` float16 (D, h, w), ``pooled`` (D',)), the lookup by content hash, and the
incremental contract: nothing is computed, and the model not even loaded, unless an image, the model or a setting
changed — and then exactly what depends on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open

from madfh_pipeline.datasets.feature_store import FeatureStore, content_hash, feature_key
from madfh_pipeline.models import vlm_detectors
from madfh_pipeline.models.vlm_tiny import TINY_PATCH_SIZE, TINY_VISION_WIDTH, save_tiny_random_minicpmv
from madfh_pipeline.pipelines.vlm_features.nodes import extract_vlm_features, feature_metrics, model_settings

CATEGORY = {"name": "widget", "width": 32, "height": 32, "channels": 1}
SIZE = 32  # the processed store's canvas


@pytest.fixture(scope="module")
def tiny_minicpmv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_random_minicpmv(tmp_path_factory.mktemp("tiny_minicpmv"))


@pytest.fixture
def vlm(tiny_minicpmv: Path) -> Iterator[dict[str, Any]]:
    """``params:vlm`` for the tiny model at the input size, on CPU; the process-wide model cache starts empty."""
    vlm_detectors._SHARED_VLM.clear()
    yield {
        "enabled": True,
        "disabled_reason": "",
        "model": str(tiny_minicpmv),
        "allow_random_weights": True,
        "image_size": "input",
        "device": "cpu",
        "dtype": "float32",
        "batch_size": 2,
    }
    vlm_detectors._SHARED_VLM.clear()


@pytest.fixture
def processed(
    tmp_path: Path, make_processed_store: Callable[..., tuple[pd.DataFrame, Any]]
) -> tuple[pd.DataFrame, Any]:
    return make_processed_store(tmp_path / "store", counts={"train": 3, "validation": 2, "test_private": 1})


def _extract(manifest: pd.DataFrame, store: Any, vlm: dict[str, Any], features: FeatureStore) -> dict[str, Any]:
    return features.apply(extract_vlm_features(manifest, store, vlm, CATEGORY))


def test_features_have_the_documented_layout_and_are_found_by_content_hash(
    tmp_path: Path, processed: tuple[pd.DataFrame, Any], vlm: dict[str, Any]
) -> None:
    manifest, store = processed
    features = FeatureStore(tmp_path / "features")
    stats = _extract(manifest, store, vlm, features)
    assert (stats["n_images"], stats["n_computed"], stats["n_reused"]) == (len(manifest), len(manifest), 0)
    assert stats["source"] == str(vlm["model"])
    index = features.index().set_index("relpath")
    assert sorted(index.index) == sorted(manifest["relpath"])
    side = SIZE // TINY_PATCH_SIZE
    for relpath, row in index.iterrows():
        assert row["file"] == feature_key(relpath)
        with safe_open(str(features.root / row["file"]), "pt") as handle:
            grid, pooled = handle.get_tensor("grid"), handle.get_tensor("pooled")
            assert handle.metadata()["relpath"] == relpath
        assert grid.dtype == torch.float16 and tuple(grid.shape) == (TINY_VISION_WIDTH, side, side)
        assert pooled.dtype == torch.float32 and tuple(pooled.shape) == (TINY_VISION_WIDTH,)
        assert json.loads(row["grid_shape"]) == [TINY_VISION_WIDTH, side, side]
        # pooled = mean of the grid's tokens (the backbone's "mean" pooling), so the layout really is (D, h, w)
        assert torch.allclose(grid.float().mean(dim=(1, 2)), pooled, atol=2e-2)
        # a detector receives pixels, not names: the same pixels find the same features
        pixels = store.read(relpath)
        assert row["content_hash"] == content_hash(pixels)
        assert row["content_hash"] == content_hash(torch.from_numpy(pixels).float().div(255.0)[None])
        (found,) = features.lookup([row["content_hash"]])
        assert found is not None
        assert torch.equal(found[0], grid.float()) and torch.equal(found[1], pooled)
    assert features.lookup([content_hash(np.zeros((SIZE, SIZE), np.uint8))]) == [None]
    metrics = feature_metrics(features)
    assert metrics["n_computed"] == {"value": float(len(manifest)), "step": 0}


def test_features_of_different_images_differ(
    tmp_path: Path, processed: tuple[pd.DataFrame, Any], vlm: dict[str, Any]
) -> None:
    manifest, store = processed
    features = FeatureStore(tmp_path / "features")
    _extract(manifest, store, vlm, features)
    pooled = [features.get(relpath)[1] for relpath in manifest["relpath"]]
    assert all(not torch.equal(pooled[0], other) for other in pooled[1:])


def test_a_second_run_computes_nothing_and_does_not_load_the_model(
    tmp_path: Path, processed: tuple[pd.DataFrame, Any], vlm: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    manifest, store = processed
    features = FeatureStore(tmp_path / "features")
    _extract(manifest, store, vlm, features)
    before = {relpath: features.get(relpath) for relpath in manifest["relpath"]}
    vlm_detectors._SHARED_VLM.clear()
    caplog.set_level("INFO")
    stats = _extract(manifest, store, vlm, features)
    assert (stats["n_computed"], stats["n_reused"]) == (0, len(manifest))
    assert not vlm_detectors._SHARED_VLM  # MiniCPM-V was never loaded
    assert "the model was not loaded and no forward pass ran" in caplog.text
    assert json.loads((features.root / "_last_write.json").read_text())["n_computed"] == 0
    for relpath, (grid, pooled) in before.items():
        again = features.get(relpath)
        assert torch.equal(again[0], grid) and torch.equal(again[1], pooled)


def test_a_changed_image_is_the_only_one_computed_again(
    tmp_path: Path,
    processed: tuple[pd.DataFrame, Any],
    vlm: dict[str, Any],
    rewrite_images: Callable[[Any, dict[str, np.ndarray]], None],
) -> None:
    manifest, store = processed
    features = FeatureStore(tmp_path / "features")
    _extract(manifest, store, vlm, features)
    changed = manifest["relpath"].iloc[0]
    old_hash = features.index().set_index("relpath").loc[changed, "content_hash"]
    rewrite_images(store, {changed: np.full((SIZE, SIZE), 200, np.uint8)})
    stats = _extract(manifest, store, vlm, features)
    assert (stats["n_computed"], stats["n_reused"]) == (1, len(manifest) - 1)
    new_hash = features.index().set_index("relpath").loc[changed, "content_hash"]
    assert new_hash == content_hash(store.read(changed)) != old_hash


def test_other_settings_recompute_every_image_and_only_the_configured_splits_are_planned(
    tmp_path: Path, processed: tuple[pd.DataFrame, Any], vlm: dict[str, Any]
) -> None:
    manifest, store = processed
    features = FeatureStore(tmp_path / "features")
    _extract(manifest, store, vlm, features)
    stats = _extract(manifest, store, vlm | {"layer": 1}, features)  # another encoder layer: other features
    assert stats["n_computed"] == len(manifest)
    stats = _extract(manifest, store, vlm | {"layer": 1, "batch_size": 1, "device": "cpu"}, features)
    assert stats["n_computed"] == 0  # how it is run (batch, device) does not change what it computes
    only = _extract(manifest, store, vlm | {"layer": 1, "splits": ["train"]}, features)
    assert only["n_images"] == int((manifest["split"] == "train").sum())


def test_unknown_vlm_settings_are_refused(vlm: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"Unknown vlm parameter\(s\) \['modle'\]"):
        model_settings(vlm | {"modle": "x"})
    assert model_settings(vlm)["model"] == vlm["model"]
