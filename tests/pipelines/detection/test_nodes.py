"""Tests of the detection nodes: fitting on train/good (or reusing a model trained on exactly the same images),
and calibrating thresholds on validation/good only."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from kedro.io import Version

from madfh_pipeline.datasets import DetectorDataset, ImageStore, ModelCache
from madfh_pipeline.imaging import Geometry, ImageReadError
from madfh_pipeline.models.autoencoder import AutoencoderDetector
from madfh_pipeline.models.base import AnomalyDetector, DetectorOutput, Thresholds
from madfh_pipeline.pipelines.detection.nodes import (
    calibrate_thresholds,
    fit_detector,
    resolve_detector,
    training_fingerprint,
)

SIZE = 32
DETECTOR = {
    "name": "autoencoder",
    "config": {"input_size": 32, "depth": 3, "epochs": 2, "latent_dim": 16, "batch_size": 4, "smoothing_sigma": 1.0},
}
MEAN = {"name": "test_mean", "config": {"offset": 0.0}}
CATEGORY = {"name": "widget", "width": SIZE, "height": SIZE, "channels": 1}
RUNTIME = {"device": "cpu", "batch_size": 2}
THRESHOLDS = {"pixel_k": 2.0, "image_rule": "mean_std", "image_k": 1.5, "image_percentile": 90.0}

Data = tuple[pd.DataFrame, ImageStore]
Fitted = tuple[AnomalyDetector, dict[str, Any], dict[str, Any]]


def _validation_batch(manifest: pd.DataFrame, store: ImageStore) -> torch.Tensor:
    keys = manifest.loc[(manifest["split"] == "validation") & (manifest["label"] == "good"), "relpath"]
    images = np.stack([store.read(k) for k in keys]).astype(np.float32) / 255.0
    return torch.from_numpy(images[:, None])


def _fresh(model: AnomalyDetector) -> AnomalyDetector:
    """Forget an earlier calibration (the module-scoped model is calibrated by several tests)."""
    model.provenance = {k: v for k, v in model.provenance.items() if k != "calibration_fingerprint"}
    return model


def _empty_cache(root: Path) -> ModelCache:
    return ModelCache(root / "models" / "none.safetensors")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, make_processed_store: Callable[..., Data]) -> Data:
    return make_processed_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def fitted(data: Data, tmp_path_factory: pytest.TempPathFactory) -> Fitted:
    manifest, store = data
    return fit_detector(manifest, store, _empty_cache(tmp_path_factory.mktemp("cache")), DETECTOR, CATEGORY, RUNTIME)


def test_manifest_has_the_preprocessing_columns(data: Data) -> None:
    manifest, store = data
    assert list(manifest.columns) == [
        "category",
        "relpath",
        "split",
        "official_split",
        "label",
        "lighting",
        "has_mask",
        "mask_relpath",
        "path",
        "src_width",
        "src_height",
        "dst_width",
        "dst_height",
        "scale_x",
        "scale_y",
        "pad_x",
        "pad_y",
    ]
    assert all(store.exists(k) for k in [*manifest["relpath"], *manifest.loc[manifest["has_mask"], "mask_relpath"]])
    assert set(store.read_index()["relpath"]) == set(manifest["relpath"])  # fingerprinted as preprocessing does


# ---- resolving the detector entry ----


def test_resolve_detector_applies_the_category_overrides_key_by_key() -> None:
    entry = {"name": "patchcore", "config": {"max_bank_size": 256, "num_neighbors": 9}}
    category = CATEGORY | {"detection": {"patchcore": {"config": {"max_bank_size": 4096}}}}
    resolved = resolve_detector(entry, category)
    assert resolved["config"] == {"max_bank_size": 4096, "num_neighbors": 9}
    assert resolved["type"] == "patchcore"  # the registered detector defaults to the entry's name
    assert entry["config"]["max_bank_size"] == 256  # the global entry is not modified
    assert resolve_detector({"name": "pc3", "type": "patchcore"}, CATEGORY) == {
        "name": "pc3",
        "type": "patchcore",
        "config": {},
    }
    other = CATEGORY | {"detection": {"autoencoder": {"config": {"depth": 2}}}}
    assert resolve_detector(entry, other)["config"] == entry["config"]  # another detector's override


def test_resolve_detector_refuses_unknown_keys_and_a_missing_name() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['num_neighbors'\].*go under 'config'"):
        resolve_detector({"name": "patchcore", "num_neighbors": 3}, CATEGORY)
    with pytest.raises(ValueError, match="needs 'name: <key>'"):
        resolve_detector({"config": {}}, CATEGORY)


def test_training_fingerprint_follows_config_and_training_images(
    data: Data, tmp_path: Path, make_processed_store: Callable[..., Data], rewrite_images: Callable
) -> None:
    manifest, store = data
    keys = manifest.loc[manifest["split"] == "train", "relpath"].tolist()
    entry = resolve_detector(MEAN, CATEGORY)
    base = training_fingerprint(entry, store, keys)
    assert training_fingerprint(resolve_detector(MEAN, CATEGORY), store, keys) == base
    assert training_fingerprint(entry, store, keys[::-1]) == base  # order of the keys does not matter
    assert training_fingerprint(resolve_detector(MEAN | {"config": {"offset": 1.0}}, CATEGORY), store, keys) != base
    assert training_fingerprint(entry, store, keys[:-1]) != base
    copy_manifest, copy = make_processed_store(tmp_path / "copy")  # same pixels: same fingerprint
    assert training_fingerprint(entry, copy, keys) == base
    rewrite_images(copy, {keys[0]: np.zeros((SIZE, SIZE), np.uint8)})
    assert training_fingerprint(entry, copy, keys) != base
    test_key = copy_manifest.loc[copy_manifest["split"] == "test_public", "relpath"].iloc[0]
    copy_fp = training_fingerprint(entry, copy, keys)
    rewrite_images(copy, {test_key: np.zeros((SIZE, SIZE), np.uint8)})
    assert training_fingerprint(entry, copy, keys) == copy_fp  # test images do not decide a fit


# ---- fitting ----


def test_fit_returns_a_fitted_model_its_metrics_and_params(fitted: Fitted, mlflow_points: Callable) -> None:
    model, metrics, params = fitted
    assert isinstance(model, AutoencoderDetector)
    assert model.name == "autoencoder"
    assert model.config["input_size"] == 32 and model.config["latent_dim"] == 16 and model.config["depth"] == 3
    assert model.in_channels == 1
    out = model.predict(torch.full((2, 1, SIZE, SIZE), 0.5))
    assert out.maps.shape == (2, SIZE, SIZE) and out.scores.shape == (2,)
    assert metrics["n_train"] == 4.0 and metrics["reused_model"] == 0.0 and metrics["fit_seconds"] > 0
    assert len(metrics["train_loss"]) == 2 and all(0 < v < 1 for v in metrics["train_loss"])  # one per epoch
    points = mlflow_points(metrics)
    assert [step for key, _, step in points if key == "train_loss"] == [0, 1]
    assert {key for key, _, _ in points} >= {"fit_seconds", "n_train", "reused_model", "train_loss"}
    assert all(math.isfinite(value) for _, value, _ in points)
    assert params["detector"] == "autoencoder" and params["device"] == "cpu" and params["n_train"] == 4
    assert params["config"] == model.config  # every value that took effect, defaults included
    assert params["config"]["lr"] == 1e-4
    assert params["tags"] == {"reused_model": ""}
    provenance = model.provenance
    assert provenance["training_fingerprint"] == params["training_fingerprint"]
    assert (provenance["n_train"], provenance["category"], provenance["detector"]) == (4, "widget", "autoencoder")


def test_fit_reads_only_train_good(tmp_path: Path, make_processed_store: Callable[..., Data]) -> None:
    manifest, store = make_processed_store(tmp_path / "store")
    for key in manifest.loc[manifest["split"] != "train", "relpath"]:
        store.path(key).write_bytes(b"corrupt")  # reading any of these would raise ImageReadError
    model, metrics, _ = fit_detector(manifest, store, _empty_cache(tmp_path), DETECTOR, CATEGORY, RUNTIME)
    assert metrics["n_train"] == 4.0
    assert model.thresholds == Thresholds()  # calibration is the next node's job
    store.path("train/good/002_regular.png").write_bytes(b"corrupt")
    with pytest.raises(ImageReadError, match=r"train/good/002_regular\.png"):
        fit_detector(manifest, store, _empty_cache(tmp_path), DETECTOR, CATEGORY, RUNTIME)


def test_fit_without_train_images_is_a_clear_error(data: Data, tmp_path: Path) -> None:
    manifest, store = data
    with pytest.raises(ValueError, match="No usable train/good images for 'autoencoder'"):
        fit_detector(manifest[manifest["split"] != "train"], store, _empty_cache(tmp_path), DETECTOR, CATEGORY, RUNTIME)


def test_unknown_detector_is_a_clear_error(data: Data, tmp_path: Path) -> None:
    manifest, store = data
    with pytest.raises(ValueError, match="Unknown detector 'nope'"):
        fit_detector(manifest, store, _empty_cache(tmp_path), {"name": "nope"}, CATEGORY, RUNTIME)


def test_category_overrides_reach_the_fitted_model(data: Data, tmp_path: Path, mean_detector: type) -> None:
    manifest, store = data
    category = CATEGORY | {"detection": {"test_mean": {"config": {"offset": 2.5}}}}
    model, _, params = fit_detector(manifest, store, _empty_cache(tmp_path), MEAN, category, RUNTIME)
    assert isinstance(model, mean_detector)
    assert model.config["offset"] == 2.5 and params["config"]["offset"] == 2.5


# ---- reusing a saved model ----


def _save(model: AnomalyDetector, root: Path) -> str:
    dataset = DetectorDataset(str(root), version=Version(None, None))
    dataset.save(model)
    return dataset.resolve_save_version()


def test_a_model_trained_on_the_same_images_is_reused_not_refitted(
    data: Data, tmp_path: Path, mean_detector: type, caplog: pytest.LogCaptureFixture
) -> None:
    manifest, store = data
    root = tmp_path / "models" / "test_mean.safetensors"
    first, first_metrics, params = fit_detector(manifest, store, ModelCache(root), MEAN, CATEGORY, RUNTIME)
    assert first_metrics["reused_model"] == 0.0
    first.thresholds = Thresholds(pixel=0.3, image=0.4)  # saved after calibration, as the pipeline does
    version = _save(first, root)
    fits = mean_detector.fit_calls
    with caplog.at_level(logging.INFO, logger="madfh_pipeline.pipelines.detection.nodes"):
        again, metrics, again_params = fit_detector(manifest, store, ModelCache(root), MEAN, CATEGORY, RUNTIME)
    assert mean_detector.fit_calls == fits  # no fit happened
    assert metrics == {"fit_seconds": 0.0, "n_train": 4.0, "reused_model": 1.0}
    assert again_params["tags"] == {"reused_model": version}
    assert again_params["training_fingerprint"] == params["training_fingerprint"]
    assert again.thresholds == Thresholds(pixel=0.3, image=0.4)
    assert again.fingerprint == first.fingerprint  # so its maps can be reused too
    assert f"test_mean: reusing the model saved at version {version}" in caplog.text
    torch.testing.assert_close(again.mean, first.mean)


def test_changed_config_or_images_or_reuse_off_fit_again(
    data: Data,
    tmp_path: Path,
    mean_detector: type,
    make_processed_store: Callable[..., Data],
    rewrite_images: Callable,
) -> None:
    manifest, store = data
    root = tmp_path / "models" / "test_mean.safetensors"
    model, _, _ = fit_detector(manifest, store, ModelCache(root), MEAN, CATEGORY, RUNTIME)
    _save(model, root)
    fits = mean_detector.fit_calls
    fit_detector(manifest, store, ModelCache(root), MEAN, CATEGORY, RUNTIME | {"reuse_models": False})
    assert mean_detector.fit_calls == fits + 1
    other = MEAN | {"config": {"offset": 1.0}}
    _, metrics, _ = fit_detector(manifest, store, ModelCache(root), other, CATEGORY, RUNTIME)
    assert metrics["reused_model"] == 0.0 and mean_detector.fit_calls == fits + 2
    _, copy = make_processed_store(tmp_path / "copy")
    rewrite_images(copy, {"train/good/001_regular.png": np.full((SIZE, SIZE), 7, np.uint8)})
    _, metrics, _ = fit_detector(manifest, copy, ModelCache(root), MEAN, CATEGORY, RUNTIME)
    assert metrics["reused_model"] == 0.0 and mean_detector.fit_calls == fits + 3


# ---- calibration ----


class _Counting:
    """Wraps a detector and counts the images it scores."""

    def __init__(self, model: AnomalyDetector) -> None:
        self.model, self.calls = model, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def predict(self, batch: torch.Tensor) -> DetectorOutput:
        self.calls += len(batch)
        return self.model.predict(batch)


def test_calibration_metrics_are_the_thresholds(data: Data, fitted: Fitted) -> None:
    manifest, store = data
    model, metrics = calibrate_thresholds(_fresh(fitted[0]), manifest, store, THRESHOLDS, RUNTIME)
    stats = model.thresholds.stats
    assert metrics == {
        "threshold_pixel": model.thresholds.pixel,
        "threshold_image": model.thresholds.image,
        **{f"threshold_{k}": v for k, v in stats.items()},
    }
    assert metrics["threshold_n_validation"] == 3.0
    assert "calibration_fingerprint" in model.provenance


def test_calibration_is_skipped_when_model_rule_and_validation_images_are_unchanged(
    tmp_path: Path, make_processed_store: Callable[..., Data], rewrite_images: Callable, mean_detector: type
) -> None:
    manifest, store = make_processed_store(tmp_path / "store")
    model, _, _ = fit_detector(manifest, store, _empty_cache(tmp_path), MEAN, CATEGORY, RUNTIME)
    model, first = calibrate_thresholds(model, manifest, store, THRESHOLDS, RUNTIME)
    counting = _Counting(model)
    same, metrics = calibrate_thresholds(counting, manifest, store, THRESHOLDS, RUNTIME)
    assert counting.calls == 0 and metrics == first
    test_key = manifest.loc[manifest["split"] == "test_public", "relpath"].iloc[0]
    rewrite_images(store, {test_key: np.zeros((SIZE, SIZE), np.uint8)})  # a test image: irrelevant
    calibrate_thresholds(counting, manifest, store, THRESHOLDS, RUNTIME)
    assert counting.calls == 0
    calibrate_thresholds(counting, manifest, store, THRESHOLDS | {"pixel_k": 4.0}, RUNTIME)  # another rule
    assert counting.calls == 3
    rewrite_images(store, {"validation/good/000_regular.png": np.full((SIZE, SIZE), 200, np.uint8)})
    calibrate_thresholds(counting, manifest, store, THRESHOLDS | {"pixel_k": 4.0}, RUNTIME)  # a new validation image
    assert counting.calls == 6


def test_pixel_and_image_thresholds_follow_the_mean_std_rule(data: Data, fitted: Fitted) -> None:
    manifest, store = data
    model, _ = calibrate_thresholds(_fresh(fitted[0]), manifest, store, THRESHOLDS, RUNTIME)
    out = model.predict(_validation_batch(manifest, store))
    pixels = out.maps.astype(np.float64)
    scores = out.scores.astype(np.float64)
    assert pixels.shape == (3, SIZE, SIZE)
    t = model.thresholds
    np.testing.assert_allclose(t.pixel, pixels.mean() + 2.0 * pixels.std(), rtol=1e-5)
    np.testing.assert_allclose(t.image, scores.mean() + 1.5 * scores.std(), rtol=1e-5)
    np.testing.assert_allclose(t.stats["pixel_mean"], pixels.mean(), rtol=1e-5)
    np.testing.assert_allclose(t.stats["pixel_std"], pixels.std(), rtol=1e-5)
    np.testing.assert_allclose(t.stats["image_mean"], scores.mean(), rtol=1e-5)
    np.testing.assert_allclose(t.stats["image_std"], scores.std(), rtol=1e-5)
    assert t.stats["n_validation"] == 3.0
    assert "mean+2.0std" in t.rule and "mean_std" in t.rule
    assert isinstance(t.pixel, float) and isinstance(t.image, float)


def test_percentile_image_rule(data: Data, fitted: Fitted) -> None:
    manifest, store = data
    params = THRESHOLDS | {"image_rule": "percentile", "image_percentile": 90.0}
    model, _ = calibrate_thresholds(_fresh(fitted[0]), manifest, store, params, RUNTIME)
    scores = model.predict(_validation_batch(manifest, store)).scores.astype(np.float64)
    np.testing.assert_allclose(model.thresholds.image, np.percentile(scores, 90.0), rtol=1e-5)
    assert model.thresholds.image < scores.max()
    assert "percentile" in model.thresholds.rule


def test_defaults_are_three_sigma(data: Data, fitted: Fitted) -> None:
    manifest, store = data
    model, _ = calibrate_thresholds(_fresh(fitted[0]), manifest, store, {}, {"device": "cpu"})
    out = model.predict(_validation_batch(manifest, store))
    maps, scores = out.maps.astype(np.float64), out.scores.astype(np.float64)
    np.testing.assert_allclose(model.thresholds.pixel, maps.mean() + 3 * maps.std(), rtol=1e-5)
    np.testing.assert_allclose(model.thresholds.image, scores.mean() + 3 * scores.std(), rtol=1e-5)


def test_unknown_image_rule_is_refused(data: Data, fitted: Fitted) -> None:
    manifest, store = data
    with pytest.raises(ValueError, match="Unknown image threshold rule 'f1_optimal'"):
        calibrate_thresholds(_fresh(fitted[0]), manifest, store, THRESHOLDS | {"image_rule": "f1_optimal"}, RUNTIME)


def test_no_validation_images_is_a_clear_error(data: Data, fitted: Fitted) -> None:
    manifest, store = data
    with pytest.raises(ValueError, match="No validation/good images"):
        calibrate_thresholds(_fresh(fitted[0]), manifest[manifest["split"] != "validation"], store, THRESHOLDS, RUNTIME)


def test_thresholds_never_use_test_images(
    tmp_path: Path, data: Data, fitted: Fitted, make_processed_store: Callable[..., Data]
) -> None:
    manifest, _ = data
    model = fitted[0]
    copy_manifest, store = make_processed_store(tmp_path / "store")
    pd.testing.assert_frame_equal(copy_manifest.drop(columns="path"), manifest.drop(columns="path"))
    before = calibrate_thresholds(_fresh(model), manifest, store, THRESHOLDS, RUNTIME)[0].thresholds

    rng = np.random.default_rng(99)
    others = manifest[~manifest["split"].isin(["validation"])]
    for key in others["relpath"]:  # train, test_public (good and bad) and test_private all change
        store.write(key, rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8))
    after = calibrate_thresholds(_fresh(model), manifest, store, THRESHOLDS, RUNTIME)[0].thresholds
    assert after == before

    # the check can fail: changing a validation image does move the thresholds
    store.write(
        manifest.loc[manifest["split"] == "validation", "relpath"].iloc[0], np.full((SIZE, SIZE), 255, np.uint8)
    )
    moved = calibrate_thresholds(_fresh(model), manifest, store, THRESHOLDS, RUNTIME)[0].thresholds
    assert moved.pixel != before.pixel and moved.image != before.image


def test_only_good_validation_images_count(data: Data, fitted: Fitted) -> None:
    manifest, store = data
    before = calibrate_thresholds(_fresh(fitted[0]), manifest, store, THRESHOLDS, RUNTIME)[0].thresholds
    # a defective image wrongly placed in validation (label bad) must be ignored
    bad = manifest[manifest["label"] == "bad"].iloc[[0]].assign(split="validation")
    extended = pd.concat([manifest, bad], ignore_index=True)
    after = calibrate_thresholds(_fresh(fitted[0]), extended, store, THRESHOLDS, RUNTIME)[0].thresholds
    assert after == before


class _ImageAsMap:
    """A stand-in detector whose anomaly map is the image itself (so the expected statistics are known)."""

    name = "image_as_map"

    def __init__(self) -> None:
        self.thresholds = Thresholds()
        self.provenance: dict[str, Any] = {}

    def to(self, device: Any) -> _ImageAsMap:
        return self

    def predict(self, batch: torch.Tensor) -> DetectorOutput:
        maps = batch.mean(dim=1).numpy()
        return DetectorOutput(scores=maps.max(axis=(1, 2)), maps=maps)


def test_pixel_threshold_ignores_letterbox_padding(tmp_path: Path, make_manifest_row: Callable[..., dict]) -> None:
    geometry = Geometry.plan(64, 16, 32, 32, "letterbox")  # content 32x8 at rows 12-19
    top, height = geometry.pad_y, geometry.content_height
    assert (top, height) == (12, 8)
    rng = np.random.default_rng(4)
    store = ImageStore(tmp_path / "store")
    rows, contents = [], []
    for i in range(3):
        relpath = f"validation/good/{i:03d}_regular.png"
        image = np.zeros((SIZE, SIZE), np.uint8)
        image[top : top + height] = rng.integers(90, 160, (height, SIZE))
        store.write(relpath, image)
        contents.append(image[top : top + height].astype(np.float64) / 255.0)
        rows.append(make_manifest_row(relpath, "validation", "good", "regular") | geometry.to_dict())
    model, _ = calibrate_thresholds(_ImageAsMap(), pd.DataFrame(rows), store, {"pixel_k": 3.0}, RUNTIME)
    pixels = np.stack(contents)
    np.testing.assert_allclose(model.thresholds.pixel, pixels.mean() + 3.0 * pixels.std(), rtol=1e-5)
