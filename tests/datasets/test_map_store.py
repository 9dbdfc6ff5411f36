"""Tests of MapStore / MapStoreDataset (anomaly maps, incremental scoring) and SubmissionDataset (benchmark files)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from kedro.io import DatasetError

from madfh_pipeline.datasets import MapStore, MapStoreDataset, MapWrites, SubmissionDataset
from madfh_pipeline.datasets.map_store import SCORES_FILE, map_key

KEYS = ("validation/good/000_regular.png", "test_public/bad/001_regular.png", "test_private/002_regular.png")


def _map(height: int = 5, width: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 40, (height, width)).astype(np.float32)


def test_map_key() -> None:
    assert map_key("test_public/bad/001_regular.png") == "maps/test_public/bad/001_regular.npy"
    assert map_key("a.jpg") == "maps/a.npy"


def test_maps_are_float32_by_default(tmp_path: Path) -> None:
    """float16 would round nearby scores into ties, which moves the ranking metrics."""
    store = MapStore(tmp_path / "maps")
    anomaly_map = _map() + np.float32(1e-4)  # not representable in float16
    store.write_map("maps/test_public/bad/000_regular.npy", anomaly_map)
    raw = np.load(tmp_path / "maps/maps/test_public/bad/000_regular.npy")
    assert raw.dtype == np.float32 and raw.shape == (5, 7)
    np.testing.assert_array_equal(store.read_map("maps/test_public/bad/000_regular.npy"), anomaly_map)


def test_float16_maps_on_request(tmp_path: Path) -> None:
    store = MapStore(tmp_path, map_dtype="float16")
    anomaly_map = _map()
    store.write_map("a.npy", anomaly_map)
    assert np.load(tmp_path / "a.npy").dtype == np.float16
    loaded = store.read_map("a.npy")
    assert loaded.dtype == np.float32  # always handed out as float32
    np.testing.assert_array_equal(loaded, anomaly_map.astype(np.float16).astype(np.float32))


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
    with pytest.raises(FileNotFoundError, match="No scores in"):
        store.scores()


def test_repr(tmp_path: Path) -> None:
    assert repr(MapStore(tmp_path)) == f"MapStore(root='{tmp_path}')"


# ---- carrying out a scoring plan ----


class Scorer:
    """``compute`` of a MapWrites plan: a constant map per key (its value depends on ``level``); records calls."""

    def __init__(self, level: float = 1.0) -> None:
        self.level = level
        self.calls: list[list[str]] = []

    def __call__(self, keys: list[str]) -> Iterator[tuple[str, float, np.ndarray]]:
        self.calls.append(list(keys))
        for key in keys:
            value = self.level + KEYS.index(key)
            yield key, value, np.full((3, 4), value, np.float32)


def _writes(scorer: Scorer, fingerprints: dict[str, str] | None = None, **kwargs: object) -> MapWrites:
    items = [(key, (fingerprints or {}).get(key, "model-a|img")) for key in KEYS]
    return MapWrites(items=items, compute=scorer, model="stub", **kwargs)


def test_apply_scores_everything_first_and_indexes_the_scores(tmp_path: Path) -> None:
    store, scorer = MapStore(tmp_path / "maps"), Scorer()
    stats = store.apply(_writes(scorer))
    assert scorer.calls == [list(KEYS)]
    scores = store.scores()
    assert scores["relpath"].tolist() == list(KEYS)  # in the plan's order
    assert scores["score"].tolist() == [1.0, 2.0, 3.0]
    assert scores["map_key"].tolist() == [map_key(k) for k in KEYS]
    assert set(scores["fingerprint"]) == {"model-a|img"} and set(scores["model"]) == {"stub"}
    np.testing.assert_array_equal(store.read_map(map_key(KEYS[1])), np.full((3, 4), 2.0, np.float32))
    assert (stats["n_images"], stats["n_scored"], stats["n_reused"]) == (3, 3, 0)
    assert store.last_write() == stats


def test_same_fingerprints_reuse_every_map(tmp_path: Path) -> None:
    store = MapStore(tmp_path / "maps")
    store.apply(_writes(Scorer()))
    again = Scorer(level=100.0)
    stats = store.apply(_writes(again))
    assert again.calls == []  # no forward pass at all
    assert (stats["n_scored"], stats["n_reused"]) == (0, 3)
    assert store.scores()["score"].tolist() == [1.0, 2.0, 3.0]


def test_only_changed_fingerprints_are_scored_again(tmp_path: Path) -> None:
    store = MapStore(tmp_path / "maps")
    store.apply(_writes(Scorer()))
    changed = Scorer(level=100.0)
    stats = store.apply(_writes(changed, {KEYS[1]: "model-a|new image"}))
    assert changed.calls == [[KEYS[1]]]
    assert store.scores()["score"].tolist() == [1.0, 101.0, 3.0]
    assert store.read_map(map_key(KEYS[1]))[0, 0] == 101.0 and store.read_map(map_key(KEYS[0]))[0, 0] == 1.0
    assert (stats["n_scored"], stats["n_reused"]) == (1, 2)
    model = Scorer(level=50.0)
    store.apply(_writes(model, dict.fromkeys(KEYS, "model-b|img")))  # another model: every map is stale
    assert model.calls == [list(KEYS)]


def test_a_deleted_map_is_scored_again(tmp_path: Path) -> None:
    store = MapStore(tmp_path / "maps")
    store.apply(_writes(Scorer()))
    (tmp_path / "maps" / map_key(KEYS[2])).unlink()
    again = Scorer()
    store.apply(_writes(again))
    assert again.calls == [[KEYS[2]]]


def test_incremental_false_scores_everything(tmp_path: Path) -> None:
    store = MapStore(tmp_path / "maps")
    store.apply(_writes(Scorer()))
    again = Scorer()
    assert store.apply(_writes(again, incremental=False))["n_scored"] == 3


def test_a_scorer_that_skips_an_image_is_an_error(tmp_path: Path) -> None:
    def partial(keys: list[str]) -> Iterator[tuple[str, float, np.ndarray]]:
        yield keys[0], 1.0, np.zeros((2, 2), np.float32)

    with pytest.raises(DatasetError, match=r"returned no map for 2 image\(s\)"):
        MapStore(tmp_path / "maps").apply(MapWrites(items=[(k, "x") for k in KEYS], compute=partial))


def test_dataset_save_applies_the_plan_and_load_gives_the_store(tmp_path: Path) -> None:
    dataset = MapStoreDataset(path=str(tmp_path / "maps"))
    assert not dataset.exists()
    dataset.save(_writes(Scorer()))
    assert dataset.exists() and (tmp_path / "maps" / SCORES_FILE).is_file()
    store = dataset.load()
    assert isinstance(store, MapStore) and store.root == tmp_path / "maps"
    assert len(store.scores()) == 3
    with pytest.raises(DatasetError, match="saves a MapWrites plan, got MapStore"):
        dataset.save(store)
    assert dataset._describe() == {"path": str(tmp_path / "maps"), "map_dtype": "float32"}
    half = MapStoreDataset(path=str(tmp_path / "half"), map_dtype="float16")
    half.save(_writes(Scorer()))
    assert np.load(tmp_path / "half" / map_key(KEYS[0])).dtype == np.float16


# ---- the submission tree ----


def test_submission_tiff_is_single_channel_float16_at_the_given_size(tmp_path: Path) -> None:
    dataset = SubmissionDataset(path=str(tmp_path / "submission"))
    anomaly_map = _map(20, 40)
    dataset.save({"anomaly_images/can/test_private/000_regular.tiff": lambda: anomaly_map})
    path = tmp_path / "submission/anomaly_images/can/test_private/000_regular.tiff"
    written = tifffile.imread(path)
    assert written.dtype == np.float16
    assert written.shape == (20, 40)
    np.testing.assert_array_equal(written, anomaly_map.astype(np.float16))
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 1
        assert tif.pages[0].samplesperpixel == 1


def test_submission_png_is_binary_0_255(tmp_path: Path) -> None:
    binary = np.zeros((6, 9), np.uint8)
    binary[1:3, 2:7] = 255
    SubmissionDataset(path=str(tmp_path)).save(
        {"anomaly_images_thresholded/can/test_private/000_regular.png": lambda: binary}
    )
    read = cv2.imread(str(tmp_path / "anomaly_images_thresholded/can/test_private/000_regular.png"), -1)
    assert read.dtype == np.uint8 and read.shape == (6, 9)
    assert set(np.unique(read).tolist()) == {0, 255}
    np.testing.assert_array_equal(read, binary)


def test_submission_renders_each_file_once_and_lists_them(tmp_path: Path) -> None:
    rendered: list[str] = []

    def render(name: str) -> np.ndarray:
        rendered.append(name)
        return np.zeros((2, 2), np.float32)

    files = {f"anomaly_images/x/test_private/{i:03d}.tiff": (lambda i=i: render(str(i))) for i in range(3)}
    dataset = SubmissionDataset(path=str(tmp_path / "sub"))
    assert not dataset.exists()
    dataset.save(files)
    assert rendered == ["0", "1", "2"]
    assert dataset.exists()
    assert dataset.load() == sorted(files)


def test_submission_refuses_other_file_types(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"only \.tiff and \.png"):
        SubmissionDataset(path=str(tmp_path)).save({"maps/a.npy": lambda: np.zeros((2, 2))})
