"""Tests of ImageStore / ImageStoreDataset: relative-key PNG access, and carrying out ImageWrites plans.

A plan is a list of tasks (key, fingerprint, outputs) and a worker; the store runs only the tasks whose fingerprint
changed, keeps the rest, re-logs worker messages in the parent, and indexes what it did.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from kedro.io import DatasetError

from madfh_pipeline.datasets import ImageStore, ImageStoreDataset, ImageWrites
from madfh_pipeline.datasets.image_store import INDEX_FILE, LAST_WRITE_FILE


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


def test_store_is_lossless_for_every_accepted_source_suffix(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    image = np.random.default_rng(2).integers(0, 256, (16, 16), dtype=np.uint8)
    store.write("train/good/000_regular.jpg", image)
    assert store.path("train/good/000_regular.jpg").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(store.read("train/good/000_regular.jpg"), image)


# ---- carrying out a plan ----


class CountingWorker:
    """A worker that writes a constant image per output and records which tasks it ran.

    Tasks whose ``relpath`` is in ``bad`` come back ``skipped`` with a problem (as a corrupt file would), and every
    task may carry ``message`` for the parent's log.
    """

    def __init__(self, bad: tuple[str, ...] = ()) -> None:
        self.calls: list[str] = []
        self.bad = bad

    def __call__(self, task: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(task["relpath"])
        result: dict[str, Any] = {"relpath": task["relpath"], "status": "processed", "problem": "", "messages": []}
        if task.get("message"):
            result["messages"].append(task["message"])
        if task["relpath"] in self.bad:
            return result | {"status": "skipped", "problem": "corrupt"}
        store = ImageStore(task["store_root"])
        for key in task["outputs"]:
            store.write(key, np.full((4, 4), task["value"], np.uint8))
        return result | {"src_width": 4}


def _plan(worker: Callable[[dict[str, Any]], dict[str, Any]], version: dict[str, int], **kwargs: Any) -> ImageWrites:
    """Three images (the last with a mask); each fingerprint is the version the test gives it."""
    tasks = []
    for i, key in enumerate(("a/0.png", "a/1.png", "b/2.png")):
        outputs = [key] + (["gt/2_mask.png"] if key == "b/2.png" else [])
        tasks.append({"relpath": key, "fingerprint": f"v{version.get(key, 0)}", "outputs": outputs, "value": 10 * i})
    return ImageWrites(tasks=tasks, worker=worker, **kwargs)


def _statuses(store: ImageStore) -> dict[str, str]:
    index = store.read_index()
    return dict(zip(index["relpath"], index["status"], strict=True))


def test_apply_writes_every_task_and_indexes_it(tmp_path: Path) -> None:
    store, worker = ImageStore(tmp_path / "s"), CountingWorker()
    stats = store.apply(_plan(worker, {}))
    assert sorted(worker.calls) == ["a/0.png", "a/1.png", "b/2.png"]
    assert store.exists("gt/2_mask.png") and store.read("a/1.png")[0, 0] == 10
    assert _statuses(store) == dict.fromkeys(["a/0.png", "a/1.png", "b/2.png"], "processed")
    index = store.read_index()
    assert dict(zip(index["relpath"], index["fingerprint"], strict=True)) == dict.fromkeys(worker.calls, "v0")
    assert (index["src_width"] == 4).all()  # the worker's facts are indexed
    assert (stats["n_tasks"], stats["n_processed"], stats["n_unchanged"], stats["n_skipped"]) == (3, 3, 0, 0)
    assert stats["workers"] == 1
    assert store.last_write() == stats
    assert not (tmp_path / "s" / (INDEX_FILE + ".tmp")).exists()


def test_unchanged_tasks_are_not_run_again(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "s")
    store.apply(_plan(CountingWorker(), {}))
    again = CountingWorker()
    stats = store.apply(_plan(again, {}))
    assert again.calls == []
    assert (stats["n_processed"], stats["n_unchanged"]) == (0, 3)
    assert _statuses(store) == dict.fromkeys(["a/0.png", "a/1.png", "b/2.png"], "unchanged")
    assert (store.read_index()["src_width"] == 4).all()  # facts carried over from the run that wrote them
    # a third run is still a no-op: "unchanged" rows are reusable too
    third = CountingWorker()
    store.apply(_plan(third, {}))
    assert third.calls == []


def test_a_changed_fingerprint_or_a_missing_output_runs_that_task_only(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "s")
    store.apply(_plan(CountingWorker(), {}))
    changed = CountingWorker()
    store.apply(_plan(changed, {"a/1.png": 1}))
    assert changed.calls == ["a/1.png"]
    assert _statuses(store) == {"a/0.png": "unchanged", "a/1.png": "processed", "b/2.png": "unchanged"}
    store.path("gt/2_mask.png").unlink()  # an output deleted behind the store's back
    missing = CountingWorker()
    store.apply(_plan(missing, {"a/1.png": 1}))
    assert missing.calls == ["b/2.png"]
    assert store.exists("gt/2_mask.png")


def test_incremental_false_runs_everything(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "s")
    store.apply(_plan(CountingWorker(), {}))
    again = CountingWorker()
    assert store.apply(_plan(again, {}, incremental=False))["n_processed"] == 3
    assert len(again.calls) == 3


def test_known_bad_tasks_carry_over_without_being_run(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "s")
    store.apply(_plan(CountingWorker(bad=("a/1.png",)), {}))
    problems = dict(zip(store.read_index()["relpath"], store.read_index()["problem"], strict=True))
    assert problems["a/1.png"] == "corrupt" and not store.exists("a/1.png")
    again = CountingWorker()
    stats = store.apply(_plan(again, {}))
    assert again.calls == []  # a known-bad file with the same fingerprint is not decoded again
    assert _statuses(store)["a/1.png"] == "skipped"
    assert dict(zip(store.read_index()["relpath"], store.read_index()["problem"], strict=True))["a/1.png"] == "corrupt"
    assert (stats["n_unchanged"], stats["n_skipped"]) == (2, 1)
    fixed = CountingWorker()
    store.apply(_plan(fixed, {"a/1.png": 1}))  # the file was replaced: tried again
    assert fixed.calls == ["a/1.png"] and _statuses(store)["a/1.png"] == "processed"


def test_known_rows_are_indexed_without_work(tmp_path: Path) -> None:
    store, worker = ImageStore(tmp_path / "s"), CountingWorker()
    known = [{"relpath": "c/empty.png", "status": "skipped", "problem": "empty file (0 bytes)"}]
    stats = store.apply(_plan(worker, {}, known=known))
    assert "c/empty.png" not in worker.calls
    assert _statuses(store)["c/empty.png"] == "skipped"
    assert stats["n_skipped"] == 1


def test_worker_messages_reach_the_parents_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    plan = _plan(CountingWorker(), {}, label="preprocess widget")
    plan.tasks[2]["message"] = "Mask 'gt/2_mask.png' is empty although the image is in bad/."
    with caplog.at_level(logging.INFO, logger="madfh_pipeline.datasets.image_store"):
        ImageStore(tmp_path / "s").apply(plan)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["Mask 'gt/2_mask.png' is empty although the image is in bad/."]
    assert warnings[0].name == "madfh_pipeline.datasets.image_store"  # through logging, not bare stderr
    assert "messages" not in ImageStore(tmp_path / "s").read_index()  # log lines are not facts
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(m.startswith("preprocess widget: 3 to write, 0 unchanged") for m in infos)
    assert any(m.startswith("preprocess widget: wrote 3 images") for m in infos)


def test_unreadable_index_is_empty_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / INDEX_FILE).write_bytes(b"definitely not parquet")
    store = ImageStore(tmp_path)
    with caplog.at_level(logging.WARNING, logger="madfh_pipeline.datasets.image_store"):
        index = store.read_index()
    assert index.empty
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Ignoring unreadable store index" in warnings[0].getMessage()
    assert str(tmp_path / INDEX_FILE) in warnings[0].getMessage()
    worker = CountingWorker()
    store.apply(_plan(worker, {}))  # costs a full run, never wrong data
    assert len(worker.calls) == 3


def test_no_index_and_no_last_write_before_the_first_write(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "new")
    assert store.read_index().empty and store.last_write() == {}


# ---- read-only stores and the dataset ----


def test_read_only_store_refuses_every_write(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "raw", read_only=True)
    with pytest.raises(DatasetError, match="read-only"):
        store.write("a.png", np.zeros((2, 2), np.uint8))
    worker = CountingWorker()
    with pytest.raises(DatasetError, match="read-only"):
        store.apply(_plan(worker, {}))
    assert worker.calls == [] and not (tmp_path / "raw").exists()


def test_dataset_save_carries_out_a_plan_and_load_gives_the_store(tmp_path: Path) -> None:
    dataset = ImageStoreDataset(path=str(tmp_path / "s"), compression=4)
    assert not dataset.exists()
    worker = CountingWorker()
    dataset.save(_plan(worker, {}))
    assert len(worker.calls) == 3
    assert dataset.exists()  # once an index was written
    store = dataset.load()
    assert isinstance(store, ImageStore)
    assert store.root == tmp_path / "s" and store.compression == 4
    assert store.last_write()["n_processed"] == 3
    assert (tmp_path / "s" / LAST_WRITE_FILE).is_file()
    with pytest.raises(DatasetError, match="saves an ImageWrites plan, got ImageStore"):
        dataset.save(store)
    assert "compression" in str(dataset)


def test_read_only_dataset_loads_an_existing_folder_and_refuses_plans(tmp_path: Path) -> None:
    raw = tmp_path / "raw" / "widget"
    ImageStore(raw).write("test_public/ground_truth/bad/000_regular_mask.png", np.full((3, 3), 255, np.uint8))
    dataset = ImageStoreDataset(path=str(raw), read_only=True)
    assert dataset.exists()  # a folder is enough: it has no index
    store = dataset.load()
    assert store.read_only and store.read("test_public/ground_truth/bad/000_regular_mask.png").max() == 255
    with pytest.raises(DatasetError, match="read-only"):
        dataset.save(_plan(CountingWorker(), {}))
    missing = ImageStoreDataset(path=str(tmp_path / "nowhere"), read_only=True)
    assert not missing.exists()
    with pytest.raises(DatasetError, match="does not exist"):
        missing.load()


def test_index_is_a_plain_parquet_table(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "s")
    store.apply(_plan(CountingWorker(), {}))
    frame = pd.read_parquet(tmp_path / "s" / INDEX_FILE)
    assert {"relpath", "fingerprint", "status", "problem"} <= set(frame.columns)
