"""Tests of MapStore / MapStoreDataset: float16 maps, submission TIFFs and PNGs, and errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from kedro.io import DatasetError

from madfh_pipeline.datasets import MapStore, MapStoreDataset


def _map(height: int = 5, width: int = 7) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 40, (height, width)).astype(np.float32)


def test_map_round_trip_is_float16_on_disk(tmp_path: Path) -> None:
    store = MapStore(tmp_path / "maps")
    anomaly_map = _map()
    store.write_map("maps/test_public/bad/000_regular.npy", anomaly_map)
    path = tmp_path / "maps/maps/test_public/bad/000_regular.npy"
    assert path.is_file()
    raw = np.load(path)
    assert raw.dtype == np.float16 and raw.shape == (5, 7)
    loaded = store.read_map("maps/test_public/bad/000_regular.npy")
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, anomaly_map.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(loaded, anomaly_map, rtol=2**-10)  # float16: 10-bit mantissa


def test_exact_values_survive(tmp_path: Path) -> None:
    store = MapStore(tmp_path)
    exact = np.array([[0.0, 0.5, 1.0], [2.0, 0.25, 1024.0]], np.float64)
    store.write_map("a.npy", exact)
    np.testing.assert_array_equal(store.read_map("a.npy"), exact.astype(np.float32))


def test_missing_map_error_names_the_path(tmp_path: Path) -> None:
    store = MapStore(tmp_path)
    with pytest.raises(FileNotFoundError, match="run the scoring node") as info:
        store.read_map("maps/validation/good/003_regular.npy")
    assert str(tmp_path / "maps/validation/good/003_regular.npy") in str(info.value)


def test_tiff_is_single_channel_float16(tmp_path: Path) -> None:
    store = MapStore(tmp_path / "submission")
    anomaly_map = _map(20, 40)
    store.write_tiff("anomaly_images/can/test_private/000_regular.tiff", anomaly_map)
    path = tmp_path / "submission/anomaly_images/can/test_private/000_regular.tiff"
    written = tifffile.imread(path)
    assert written.dtype == np.float16
    assert written.shape == (20, 40)
    np.testing.assert_array_equal(written, anomaly_map.astype(np.float16))
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 1
        assert tif.pages[0].samplesperpixel == 1


def test_png_is_binary_0_255(tmp_path: Path) -> None:
    store = MapStore(tmp_path)
    binary = np.zeros((6, 9), np.uint8)
    binary[1:3, 2:7] = 255
    store.write_png("anomaly_images_thresholded/can/test_private/000_regular.png", binary)
    read = cv2.imread(str(tmp_path / "anomaly_images_thresholded/can/test_private/000_regular.png"), -1)
    assert read.dtype == np.uint8 and read.shape == (6, 9)
    assert set(np.unique(read).tolist()) == {0, 255}
    np.testing.assert_array_equal(read, binary)


def test_repr(tmp_path: Path) -> None:
    assert repr(MapStore(tmp_path)) == f"MapStore(root='{tmp_path}')"


def test_dataset_loads_a_store_and_refuses_save(tmp_path: Path) -> None:
    dataset = MapStoreDataset(path=str(tmp_path / "maps"))
    assert not dataset.exists()
    store = dataset.load()
    assert isinstance(store, MapStore) and store.root == tmp_path / "maps"
    store.write_map("x.npy", _map())
    assert dataset.exists()
    with pytest.raises(DatasetError, match="written through the store it loads, not saved"):
        dataset.save(store)
    assert dataset._describe() == {"path": str(tmp_path / "maps")}
