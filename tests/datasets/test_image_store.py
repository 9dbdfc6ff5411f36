"""Tests of ImageStore / ImageStoreDataset: relative-key PNG access and the preprocessing index."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from kedro.io import DatasetError

from madfh_pipeline.datasets import ImageStore, ImageStoreDataset
from madfh_pipeline.datasets.image_store import INDEX_FILE


def test_gray_round_trip(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    image = np.random.default_rng(0).integers(0, 256, (9, 13), dtype=np.uint8)
    store.write("train/good/000_regular.png", image)
    assert store.path("train/good/000_regular.png") == tmp_path / "store/train/good/000_regular.png"
    assert store.exists("train/good/000_regular.png")
    assert not store.exists("train/good/001_regular.png")
    np.testing.assert_array_equal(store.read("train/good/000_regular.png"), image)


def test_rgb_round_trip_keeps_channel_order(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, compression=9)
    image = np.random.default_rng(1).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    image[0, 0] = (255, 0, 0)
    store.write("a/b.png", image)
    out = store.read("a/b.png")
    np.testing.assert_array_equal(out, image)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert store.read("a/b.png", channels=1).shape == (7, 5)


def test_index_round_trip(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "new")
    assert store.read_index().empty  # no index yet
    frame = pd.DataFrame({"relpath": ["x.png", "y.png"], "bytes": [1, 2], "status": ["processed", "skipped"]})
    store.write_index(frame)
    assert (tmp_path / "new" / INDEX_FILE).is_file()
    assert not (tmp_path / "new" / (INDEX_FILE + ".tmp")).exists()
    pd.testing.assert_frame_equal(store.read_index(), frame)


def test_unreadable_index_is_empty_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / INDEX_FILE).write_bytes(b"definitely not parquet")
    store = ImageStore(tmp_path)
    with caplog.at_level(logging.WARNING, logger="madfh_pipeline.datasets.image_store"):
        index = store.read_index()
    assert index.empty
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Ignoring unreadable preprocessing index" in warnings[0].getMessage()
    assert str(tmp_path / INDEX_FILE) in warnings[0].getMessage()


def test_dataset_loads_the_store_and_refuses_save(tmp_path: Path) -> None:
    dataset = ImageStoreDataset(path=str(tmp_path / "s"), compression=4)
    assert not dataset.exists()
    store = dataset.load()
    assert isinstance(store, ImageStore)
    assert store.root == tmp_path / "s" and store.compression == 4
    store.write_index(pd.DataFrame({"relpath": ["a.png"]}))
    assert dataset.exists()  # exists once an index was written
    with pytest.raises(DatasetError, match="is written through the store it loads, not saved"):
        dataset.save(store)
    assert "compression" in str(dataset)


def test_store_is_lossless_for_every_accepted_source_suffix(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    image = np.random.default_rng(2).integers(0, 256, (16, 16), dtype=np.uint8)
    store.write("train/good/000_regular.jpg", image)
    assert store.path("train/good/000_regular.jpg").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(store.read("train/good/000_regular.jpg"), image)
