"""Tests of DetectorDataset (versioned safetensors files, logged to the detector's run) and of the model cache."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from kedro.io import DatasetError, Version

from madfh_pipeline.datasets import DetectorDataset, ModelCache, ModelCacheDataset
from madfh_pipeline.datasets import detector as detector_module
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
    filepath = tmp_path / "06_models" / f"{name}.safetensors"
    DetectorDataset(str(filepath), version=Version(None, None)).save(detector)
    versions = list(filepath.iterdir())
    assert len(versions) == 1 and (versions[0] / f"{name}.safetensors").is_file()  # <filepath>/<version>/<name>
    loaded = DetectorDataset(str(filepath), version=Version(None, None)).load()
    _assert_same_detector(loaded, detector)


def test_latest_version_is_loaded_and_older_ones_stay_reachable(tmp_path: Path, autoencoder: AnomalyDetector) -> None:
    filepath = str(tmp_path / "model.safetensors")
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
    dataset = DetectorDataset(str(tmp_path / "m.safetensors"), device="cpu")
    dataset.save(autoencoder)
    loaded = dataset.load()
    assert loaded.device == torch.device("cpu")
    _assert_same_detector(loaded, autoencoder)
    assert dataset._describe() == {"filepath": str(tmp_path / "m.safetensors"), "version": None, "device": "cpu"}


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(DatasetError, match=r"No saved detector at .*nowhere/model\.safetensors.*Run the training"):
        DetectorDataset(str(missing)).load()
    with pytest.raises(DatasetError, match=r"Did not find any versions.*nowhere/model\.safetensors"):
        DetectorDataset(str(missing), version=Version(None, None)).load()


def test_a_foreign_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(DatasetError, match="not a safetensors detector file"):
        DetectorDataset(str(path)).load()


@pytest.mark.parametrize("version", [None, Version(None, None)], ids=["plain", "versioned"])
def test_exists_after_save(tmp_path: Path, autoencoder: AnomalyDetector, version: Any) -> None:
    dataset = DetectorDataset(str(tmp_path / "m.safetensors"), version=version)
    assert not dataset.exists()
    dataset.save(autoencoder)
    assert DetectorDataset(str(tmp_path / "m.safetensors"), version=version).exists()


# ---- logging the model file to the detector's MLflow run ----


def test_saved_model_is_logged_to_its_detector_run(
    tmp_path: Path, autoencoder: AnomalyDetector, monkeypatch: pytest.MonkeyPatch
) -> None:
    logged: list[tuple[str, str, Path, str | None]] = []
    monkeypatch.setattr(
        detector_module.tracking,
        "log_artifact",
        lambda *args: logged.append(args),  # type: ignore[arg-type]
    )
    dataset = DetectorDataset(
        str(tmp_path / "ae.safetensors"), category="wallplugs", detector="autoencoder", version=Version(None, None)
    )
    dataset.save(autoencoder)
    ((category, detector, path, folder),) = logged
    assert (category, detector, folder) == ("wallplugs", "autoencoder", "model")
    assert Path(path).is_file() and Path(path).name == "ae.safetensors"
    DetectorDataset(str(tmp_path / "plain.safetensors")).save(autoencoder)  # no category/detector: nothing logged
    assert len(logged) == 1


# ---- the model cache: earlier versions, found by what they were trained on ----


def _versioned_saves(root: Path, detector: AnomalyDetector, fingerprints: list[str]) -> list[str]:
    versions = []
    for i, fingerprint in enumerate(fingerprints):
        detector.provenance = {"training_fingerprint": fingerprint}
        detector.thresholds = Thresholds(pixel=float(i))
        dataset = DetectorDataset(str(root), version=Version(None, None))
        dataset.save(detector)
        versions.append(dataset.resolve_save_version())
        time.sleep(0.002)  # versions are millisecond timestamps
    return versions


def test_cache_finds_a_model_by_training_fingerprint_newest_first(tmp_path: Path, mean_detector: type) -> None:
    detector = mean_detector()
    detector.fit(lambda: [torch.rand(2, 1, 8, 8)])
    root = tmp_path / "06_models" / "w" / "mean.safetensors"
    versions = _versioned_saves(root, detector, ["A", "B", "A"])
    cache = ModelCacheDataset(filepath=str(root)).load()
    assert isinstance(cache, ModelCache)
    assert [p.parent.name for p in cache.versions()] == versions[::-1]
    found, version = cache.find("A")
    assert version == versions[2] and found.thresholds.pixel == 2.0  # the newest of the two "A" models
    assert found.provenance == {"training_fingerprint": "A"}
    found, version = cache.find("B")
    assert version == versions[1] and found.thresholds.pixel == 1.0
    assert cache.find("C") is None


def test_cache_skips_files_it_cannot_read(
    tmp_path: Path, mean_detector: type, caplog: pytest.LogCaptureFixture
) -> None:
    detector = mean_detector()
    detector.fit(lambda: [torch.rand(2, 1, 8, 8)])
    root = tmp_path / "mean.safetensors"
    (version,) = _versioned_saves(root, detector, ["A"])
    newer = root / "9999-12-31T00.00.00.000Z"  # sorts first
    newer.mkdir()
    torch.save({"weights": torch.zeros(1)}, newer / root.name)  # a legacy pickle where a model should be
    with caplog.at_level(logging.INFO, logger="madfh_pipeline.datasets.detector"):
        found = ModelCache(root).find("A")
    assert found is not None and found[1] == version
    assert any("Not reusing" in r.getMessage() and str(newer) in r.getMessage() for r in caplog.records)


def test_empty_cache_and_read_only_dataset(tmp_path: Path) -> None:
    assert ModelCache(tmp_path / "never_saved.safetensors").versions() == []
    assert ModelCache(tmp_path / "never_saved.safetensors").find("A") is None
    dataset = ModelCacheDataset(filepath=str(tmp_path / "never_saved.safetensors"))
    assert dataset.exists()  # an empty cache is a valid cache
    with pytest.raises(DatasetError, match="read-only"):
        dataset.save({"model": "anything"})  # type: ignore[arg-type]
