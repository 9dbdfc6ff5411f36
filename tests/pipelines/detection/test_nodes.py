"""Tests of the detection nodes: fitting on train/good and calibrating thresholds on validation/good only."""

from __future__ import annotations

import math
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from kedro_mlflow.io.metrics import MlflowMetricsHistoryDataset

from madfh_pipeline.datasets import ImageStore
from madfh_pipeline.imaging import Geometry, ImageReadError
from madfh_pipeline.models.autoencoder import AutoencoderDetector
from madfh_pipeline.models.base import AnomalyDetector, DetectorOutput, Thresholds
from madfh_pipeline.pipelines.detection.nodes import calibrate_thresholds, fit_detector

SIZE = 32
DETECTOR = {
    "name": "autoencoder",
    "config": {"input_size": 32, "depth": 3, "epochs": 2, "latent_dim": 16, "batch_size": 4, "smoothing_sigma": 1.0},
}
RUNTIME = {"device": "cpu", "batch_size": 2}
THRESHOLDS = {"pixel_k": 2.0, "image_rule": "mean_std", "image_k": 1.5, "image_percentile": 90.0}
COUNTS = {"train": 4, "validation": 3, "test_public_good": 2, "test_public_bad": 2, "test_private": 1}
LIGHTING = ("regular", "overexposed")


def _good(rng: np.random.Generator) -> np.ndarray:
    return np.clip(128 + rng.integers(-12, 13, (SIZE, SIZE)), 0, 255).astype(np.uint8)


def _row(category: str, relpath: str, split: str, label: str, lighting: str, mask_relpath: str = "") -> dict:
    """One manifest row with the columns of preprocessing's ``build_manifest`` (identity geometry)."""
    return {
        "category": category,
        "relpath": relpath,
        "split": split,
        "official_split": split,
        "label": label,
        "lighting": lighting,
        "has_mask": bool(mask_relpath),
        "mask_relpath": mask_relpath,
        "path": f"/raw/{category}/{relpath}",
        "src_width": SIZE,
        "src_height": SIZE,
        "dst_width": SIZE,
        "dst_height": SIZE,
        "scale_x": 1.0,
        "scale_y": 1.0,
        "pad_x": 0,
        "pad_y": 0,
    }


def build_store(root: Path, counts: dict[str, int] = COUNTS, seed: int = 0) -> tuple[pd.DataFrame, ImageStore]:
    """A processed store (uniform texture for good, a bright blob with its mask for bad) and its manifest."""
    rng = np.random.default_rng(seed)
    store = ImageStore(root)
    rows = []
    for split in ("train", "validation"):
        for i in range(counts.get(split, 0)):
            rows.append(_row("widget", f"{split}/good/{i:03d}_regular.png", split, "good", "regular"))
            store.write(rows[-1]["relpath"], _good(rng))
    for label in ("good", "bad"):
        for i in range(counts.get(f"test_public_{label}", 0)):
            name = f"{i:03d}_{LIGHTING[i % 2]}"
            image = _good(rng)
            mask_rel = ""
            if label == "bad":
                mask = np.zeros((SIZE, SIZE), np.uint8)
                mask[8 + 4 * i : 16 + 4 * i, 10:18] = 255
                image[mask > 0] = 255
                mask_rel = f"test_public/ground_truth/bad/{name}_mask.png"
                store.write(mask_rel, mask)
            rows.append(
                _row("widget", f"test_public/{label}/{name}.png", "test_public", label, LIGHTING[i % 2], mask_rel)
            )
            store.write(rows[-1]["relpath"], image)
    for i in range(counts.get("test_private", 0)):
        rows.append(_row("widget", f"test_private/{i:03d}_regular.png", "test_private", "unknown", "regular"))
        store.write(rows[-1]["relpath"], _good(rng))
    manifest = pd.DataFrame(rows)
    for col in ("src_width", "src_height", "dst_width", "dst_height", "pad_x", "pad_y"):
        manifest[col] = manifest[col].astype("int64")
    return manifest, store


def mlflow_rows(metrics: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, value, step) as kedro-mlflow's MlflowMetricsHistoryDataset would log them (raises on a bad format)."""
    dataset = MlflowMetricsHistoryDataset(prefix="widget.autoencoder")
    return list(chain.from_iterable(dataset._build_args_list_from_metric_item(k, v) for k, v in metrics.items()))


def _validation_batch(manifest: pd.DataFrame, store: ImageStore) -> torch.Tensor:
    keys = manifest.loc[(manifest["split"] == "validation") & (manifest["label"] == "good"), "relpath"]
    images = np.stack([store.read(k) for k in keys]).astype(np.float32) / 255.0
    return torch.from_numpy(images[:, None])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, ImageStore]:
    return build_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def fitted(data: tuple[pd.DataFrame, ImageStore]) -> tuple[AnomalyDetector, dict[str, Any]]:
    manifest, store = data
    return fit_detector(manifest, store, DETECTOR, RUNTIME)


def test_manifest_has_the_preprocessing_columns(data: tuple[pd.DataFrame, ImageStore]) -> None:
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


def test_fit_returns_a_fitted_model(fitted: tuple[AnomalyDetector, dict[str, Any]]) -> None:
    model, _ = fitted
    assert isinstance(model, AutoencoderDetector)
    assert model.name == "autoencoder"
    assert model.config["input_size"] == 32 and model.config["latent_dim"] == 16 and model.config["depth"] == 3
    assert model.in_channels == 1
    out = model.predict(torch.full((2, 1, SIZE, SIZE), 0.5))
    assert out.maps.shape == (2, SIZE, SIZE) and out.scores.shape == (2,)


def test_fit_metrics_are_in_mlflow_history_format(fitted: tuple[AnomalyDetector, dict[str, Any]]) -> None:
    _, metrics = fitted
    assert metrics["n_train"] == {"value": 4, "step": 0}
    assert metrics["fit_seconds"]["step"] == 0 and metrics["fit_seconds"]["value"] > 0
    assert [m["step"] for m in metrics["train_loss"]] == [0, 1]  # one step per epoch
    assert all(0 < m["value"] < 1 for m in metrics["train_loss"])
    rows = mlflow_rows(metrics)
    assert {key for key, _, _ in rows} >= {
        "widget.autoencoder.fit_seconds",
        "widget.autoencoder.n_train",
        "widget.autoencoder.train_loss",
    }
    for key, value, step in rows:
        assert isinstance(value, int | float) and math.isfinite(value), key
        assert isinstance(step, int), key


def test_fit_reads_only_train_good(tmp_path: Path) -> None:
    manifest, store = build_store(tmp_path / "store")
    for key in manifest.loc[manifest["split"] != "train", "relpath"]:
        store.path(key).write_bytes(b"corrupt")  # reading any of these would raise ImageReadError
    model, metrics = fit_detector(manifest, store, DETECTOR, RUNTIME)
    assert metrics["n_train"] == {"value": 4, "step": 0}
    assert model.thresholds == Thresholds()  # calibration is the next node's job
    store.path("train/good/002_regular.png").write_bytes(b"corrupt")
    with pytest.raises(ImageReadError, match=r"train/good/002_regular\.png"):
        fit_detector(manifest, store, DETECTOR, RUNTIME)


def test_fit_without_train_images_is_a_clear_error(data: tuple[pd.DataFrame, ImageStore]) -> None:
    manifest, store = data
    with pytest.raises(ValueError, match="No usable train/good images for 'autoencoder'"):
        fit_detector(manifest[manifest["split"] != "train"], store, DETECTOR, RUNTIME)


def test_unknown_detector_is_a_clear_error(data: tuple[pd.DataFrame, ImageStore]) -> None:
    manifest, store = data
    with pytest.raises(ValueError, match="Unknown detector 'nope'"):
        fit_detector(manifest, store, {"name": "nope"}, RUNTIME)


def test_pixel_and_image_thresholds_follow_the_mean_std_rule(
    data: tuple[pd.DataFrame, ImageStore], fitted: tuple[AnomalyDetector, dict[str, Any]]
) -> None:
    manifest, store = data
    model = calibrate_thresholds(fitted[0], manifest, store, THRESHOLDS, RUNTIME)
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


def test_percentile_image_rule(
    data: tuple[pd.DataFrame, ImageStore], fitted: tuple[AnomalyDetector, dict[str, Any]]
) -> None:
    manifest, store = data
    params = THRESHOLDS | {"image_rule": "percentile", "image_percentile": 90.0}
    model = calibrate_thresholds(fitted[0], manifest, store, params, RUNTIME)
    scores = model.predict(_validation_batch(manifest, store)).scores.astype(np.float64)
    np.testing.assert_allclose(model.thresholds.image, np.percentile(scores, 90.0), rtol=1e-5)
    assert model.thresholds.image < scores.max()
    assert "percentile" in model.thresholds.rule


def test_defaults_are_three_sigma(
    data: tuple[pd.DataFrame, ImageStore], fitted: tuple[AnomalyDetector, dict[str, Any]]
) -> None:
    manifest, store = data
    model = calibrate_thresholds(fitted[0], manifest, store, {}, {"device": "cpu"})
    out = model.predict(_validation_batch(manifest, store))
    maps, scores = out.maps.astype(np.float64), out.scores.astype(np.float64)
    np.testing.assert_allclose(model.thresholds.pixel, maps.mean() + 3 * maps.std(), rtol=1e-5)
    np.testing.assert_allclose(model.thresholds.image, scores.mean() + 3 * scores.std(), rtol=1e-5)


def test_unknown_image_rule_is_refused(
    data: tuple[pd.DataFrame, ImageStore], fitted: tuple[AnomalyDetector, dict[str, Any]]
) -> None:
    manifest, store = data
    with pytest.raises(ValueError, match="Unknown image threshold rule 'f1_optimal'"):
        calibrate_thresholds(fitted[0], manifest, store, THRESHOLDS | {"image_rule": "f1_optimal"}, RUNTIME)


def test_no_validation_images_is_a_clear_error(
    data: tuple[pd.DataFrame, ImageStore], fitted: tuple[AnomalyDetector, dict[str, Any]]
) -> None:
    manifest, store = data
    with pytest.raises(ValueError, match="No validation/good images"):
        calibrate_thresholds(fitted[0], manifest[manifest["split"] != "validation"], store, THRESHOLDS, RUNTIME)


def test_thresholds_never_use_test_images(
    tmp_path: Path, data: tuple[pd.DataFrame, ImageStore], fitted: tuple[AnomalyDetector, dict[str, Any]]
) -> None:
    manifest, _ = data
    model = fitted[0]
    copy_manifest, store = build_store(tmp_path / "store")
    pd.testing.assert_frame_equal(copy_manifest.drop(columns="path"), manifest.drop(columns="path"))
    before = calibrate_thresholds(model, manifest, store, THRESHOLDS, RUNTIME).thresholds

    rng = np.random.default_rng(99)
    others = manifest[~manifest["split"].isin(["validation"])]
    for key in others["relpath"]:  # train, test_public (good and bad) and test_private all change
        store.write(key, rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8))
    after = calibrate_thresholds(model, manifest, store, THRESHOLDS, RUNTIME).thresholds
    assert after == before

    # the check can fail: changing a validation image does move the thresholds
    store.write(
        manifest.loc[manifest["split"] == "validation", "relpath"].iloc[0], np.full((SIZE, SIZE), 255, np.uint8)
    )
    moved = calibrate_thresholds(model, manifest, store, THRESHOLDS, RUNTIME).thresholds
    assert moved.pixel != before.pixel and moved.image != before.image


def test_only_good_validation_images_count(
    data: tuple[pd.DataFrame, ImageStore], fitted: tuple[AnomalyDetector, dict[str, Any]]
) -> None:
    manifest, store = data
    before = calibrate_thresholds(fitted[0], manifest, store, THRESHOLDS, RUNTIME).thresholds
    # a defective image wrongly placed in validation (label bad) must be ignored
    bad = manifest[manifest["label"] == "bad"].iloc[[0]].assign(split="validation")
    extended = pd.concat([manifest, bad], ignore_index=True)
    after = calibrate_thresholds(fitted[0], extended, store, THRESHOLDS, RUNTIME).thresholds
    assert after == before


class _ImageAsMap:
    """A stand-in detector whose anomaly map is the image itself (so the expected statistics are known)."""

    name = "image_as_map"

    def __init__(self) -> None:
        self.thresholds = Thresholds()

    def to(self, device: Any) -> _ImageAsMap:
        return self

    def predict(self, batch: torch.Tensor) -> DetectorOutput:
        maps = batch.mean(dim=1).numpy()
        return DetectorOutput(scores=maps.max(axis=(1, 2)), maps=maps)


def test_pixel_threshold_ignores_letterbox_padding(tmp_path: Path) -> None:
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
        rows.append(_row("widget", relpath, "validation", "good", "regular") | geometry.to_dict())
    model = calibrate_thresholds(_ImageAsMap(), pd.DataFrame(rows), store, {"pixel_k": 3.0}, RUNTIME)
    pixels = np.stack(contents)
    np.testing.assert_allclose(model.thresholds.pixel, pixels.mean() + 3.0 * pixels.std(), rtol=1e-5)
