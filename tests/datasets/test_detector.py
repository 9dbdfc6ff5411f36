"""Tests of DetectorDataset: versioned save/load round trips of fitted detectors, and clear errors."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from kedro.io import DatasetError, Version

from madfh_pipeline.datasets import DetectorDataset
from madfh_pipeline.models.base import AnomalyDetector, Thresholds, build_detector

TINY = {
    "autoencoder": {"input_size": 32, "depth": 3, "epochs": 2, "latent_dim": 16, "batch_size": 4},
    "patchcore": {"backbone": "efficientnet_lite0", "max_bank_size": 64, "pool_max_patches": 2000},
}


def _images(n: int, channels: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (0.4 + 0.2 * torch.rand(n, channels, size, size, generator=generator)).clamp(0, 1)


def _fitted(name: str) -> AnomalyDetector:
    channels, size = (1, 32) if name == "autoencoder" else (3, 64)
    detector = build_detector(name, TINY[name])
    train = _images(4, channels, size, seed=1)
    detector.fit(lambda: train.split(2))
    detector.thresholds = Thresholds(pixel=0.125, image=0.5, rule="test rule", stats={"pixel_mean": 0.01})
    return detector


@pytest.fixture(scope="module")
def autoencoder() -> AnomalyDetector:
    return _fitted("autoencoder")


def _probe(detector: AnomalyDetector) -> torch.Tensor:
    channels, size = (1, 32) if detector.name == "autoencoder" else (3, 64)
    probe = _images(3, channels, size, seed=5)
    probe[2, :, 4:12, 4:12] = 1.0  # a bright square: a non-trivial map
    return probe


def _assert_same_detector(loaded: AnomalyDetector, original: AnomalyDetector) -> None:
    assert type(loaded) is type(original)
    assert loaded.name == original.name
    assert loaded.config == original.config
    assert loaded.thresholds == original.thresholds
    probe = _probe(original)
    expected, got = original.predict(probe), loaded.predict(probe)
    np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.maps, expected.maps, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["autoencoder", "patchcore"])
def test_versioned_round_trip(tmp_path: Path, name: str, autoencoder: AnomalyDetector) -> None:
    detector = autoencoder if name == "autoencoder" else _fitted(name)
    filepath = tmp_path / "06_models" / f"{name}.pt"
    DetectorDataset(str(filepath), version=Version(None, None)).save(detector)
    versions = list(filepath.iterdir())
    assert len(versions) == 1 and (versions[0] / f"{name}.pt").is_file()  # <filepath>/<version>/<name>.pt
    loaded = DetectorDataset(str(filepath), version=Version(None, None)).load()
    _assert_same_detector(loaded, detector)


def test_latest_version_is_loaded_and_older_ones_stay_reachable(tmp_path: Path, autoencoder: AnomalyDetector) -> None:
    filepath = str(tmp_path / "model.pt")
    saved: list[str] = []
    for pixel in (1.0, 2.0):
        autoencoder.thresholds = Thresholds(pixel=pixel, image=pixel * 10)
        dataset = DetectorDataset(filepath, version=Version(None, None))
        dataset.save(autoencoder)
        saved.append(dataset.resolve_save_version())
        time.sleep(0.01)  # versions are millisecond timestamps
    assert saved[0] < saved[1]
    assert DetectorDataset(filepath, version=Version(None, None)).load().thresholds.pixel == 2.0
    assert DetectorDataset(filepath, version=Version(saved[0], None)).load().thresholds.image == 10.0


def test_unversioned_round_trip_and_device(tmp_path: Path, autoencoder: AnomalyDetector) -> None:
    autoencoder.thresholds = Thresholds(pixel=0.25, image=0.75, rule="r")
    dataset = DetectorDataset(str(tmp_path / "m.pt"), device="cpu")
    dataset.save(autoencoder)
    loaded = dataset.load()
    assert loaded.device == torch.device("cpu")
    _assert_same_detector(loaded, autoencoder)
    assert dataset._describe() == {"filepath": str(tmp_path / "m.pt"), "version": None, "device": "cpu"}


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(DatasetError, match=r"No saved detector at .*nowhere/model\.pt.*Run the training pipeline"):
        DetectorDataset(str(missing)).load()
    with pytest.raises(DatasetError, match=r"Did not find any versions.*nowhere/model\.pt"):
        DetectorDataset(str(missing), version=Version(None, None)).load()


def test_a_foreign_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(DatasetError, match="not a madfh_pipeline detector file"):
        DetectorDataset(str(path)).load()


@pytest.mark.parametrize("version", [None, Version(None, None)], ids=["plain", "versioned"])
def test_exists_after_save(tmp_path: Path, autoencoder: AnomalyDetector, version: Any) -> None:
    dataset = DetectorDataset(str(tmp_path / "m.pt"), version=version)
    assert not dataset.exists()
    dataset.save(autoencoder)
    assert DetectorDataset(str(tmp_path / "m.pt"), version=version).exists()
