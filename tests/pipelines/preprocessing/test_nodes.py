"""Tests of the preprocessing nodes on tiny MVTec AD 2 trees: validation, resizing, incremental re-runs, reports.

``preprocess_images`` returns a plan; ``_run`` carries it out through the store (what the image store dataset does
when the node's output is saved) and summarises it, as the pipeline's next node does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest

from madfh_pipeline import workers as worker_module
from madfh_pipeline.datasets import ImageStore, ImageWrites, MVTecAD2Dataset
from madfh_pipeline.imaging import read_image
from madfh_pipeline.pipelines.preprocessing.nodes import (
    NoUsableDataError,
    build_manifest,
    build_validation_report,
    preprocess_images,
    summarize_preprocessing,
    validate_layout,
)
from madfh_pipeline.workers import process_image

ALL_IMAGES = [
    "train/good/000_regular.png",
    "train/good/001_regular.png",
    "train/good/002_regular.png",
    "train/good/003_regular.png",
    "validation/good/000_regular.png",
    "validation/good/001_regular.png",
    "test_public/bad/000_regular.png",
    "test_public/bad/001_overexposed.png",
    "test_public/good/000_regular.png",
    "test_public/good/001_overexposed.png",
    "test_private/000_regular.png",
    "test_private_mixed/000_mixed.png",
]
MASKS = ["test_public/ground_truth/bad/000_regular_mask.png", "test_public/ground_truth/bad/001_overexposed_mask.png"]


@pytest.fixture
def raw_root(tmp_path: Path, make_mvtec_tree: Callable[..., Path]) -> Path:
    make_mvtec_tree(tmp_path / "raw", "widget", width=48, height=40, channels=1)
    return tmp_path / "raw"


@pytest.fixture
def category(make_category: Callable[..., dict]) -> dict[str, Any]:
    return make_category("widget", 48, 40, 1)


def _listing(root: Path, name: str = "widget") -> pd.DataFrame:
    return MVTecAD2Dataset(path=str(root), category=name).load()


def _run(
    root: Path, category: dict, params: dict, store: ImageStore, name: str = "widget"
) -> tuple[pd.DataFrame, dict[str, Any]]:
    checked = validate_layout(_listing(root, name), category)
    store.apply(preprocess_images(checked, params, category))
    return summarize_preprocessing(store, checked, params, category)


def _status(frame: pd.DataFrame) -> dict[str, str]:
    return dict(zip(frame["relpath"], frame["status"], strict=True))


def _problem(frame: pd.DataFrame, relpath: str) -> str:
    return frame.set_index("relpath").loc[relpath, "problem"]


def _write(path: Path, array: np.ndarray) -> None:
    assert cv2.imwrite(str(path), array)


def _bump_mtime(path: Path, seconds: int = 10) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 1_000_000_000))


# ---- validate_layout ----


def test_validate_layout_clean_tree(raw_root: Path, category: dict) -> None:
    checked = validate_layout(_listing(raw_root), category)
    assert sorted(checked["relpath"]) == sorted(ALL_IMAGES)  # masks travel with their images
    assert (checked["problem"] == "").all()
    bad = checked.set_index("relpath").loc["test_public/bad/000_regular.png"]
    assert bad["mask_bytes"] == (raw_root / "widget" / MASKS[0]).stat().st_size
    assert bad["mask_mtime_ns"] > 0
    train = checked.set_index("relpath").loc["train/good/000_regular.png"]
    assert (train["mask_bytes"], train["mask_mtime_ns"]) == (-1, -1)


def test_validate_layout_keeps_the_exact_mask_mtime(raw_root: Path, category: dict) -> None:
    mask = raw_root / "widget" / MASKS[0]
    mtime_ns = 1_700_000_000_123_456_789  # float64 would make it ...768
    os.utime(mask, ns=(mtime_ns, mtime_ns))
    checked = validate_layout(_listing(raw_root), category).set_index("relpath")
    assert checked.loc["test_public/bad/000_regular.png", "mask_mtime_ns"] == mtime_ns


def test_validate_layout_flags_every_kind_of_problem(
    raw_root: Path, category: dict, caplog: pytest.LogCaptureFixture
) -> None:
    cat = raw_root / "widget"
    (cat / "train/good/notes.txt").write_text("x")
    (cat / "validation/good/001_regular.png").write_bytes(b"")
    (cat / MASKS[1]).unlink()
    _write(cat / "test_public/ground_truth/bad/007_shift_2_mask.png", np.zeros((40, 48), np.uint8))
    with caplog.at_level(logging.WARNING, logger="madfh_pipeline"):
        checked = validate_layout(_listing(raw_root), category)
    problems = {r: p for r, p in zip(checked["relpath"], checked["problem"], strict=True) if p}
    assert problems == {
        "train/good/notes.txt": "stray file: not part of the MVTec AD 2 layout",
        "validation/good/001_regular.png": "empty file (0 bytes)",
        "test_public/bad/001_overexposed.png": f"missing ground-truth mask {MASKS[1]}",
        "test_public/ground_truth/bad/007_shift_2_mask.png": "mask without a matching image in test_public/bad",
    }
    assert len(checked) == len(ALL_IMAGES) + 2  # + the stray file and the orphan mask
    for rel in problems:
        assert any(rel in r.getMessage() and "[widget] skipping" in r.getMessage() for r in caplog.records), rel


def test_unknown_lighting_tokens_are_summarised_in_one_warning(
    raw_root: Path, category: dict, caplog: pytest.LogCaptureFixture
) -> None:
    cat = raw_root / "widget"
    os.rename(cat / "test_public/good/000_regular.png", cat / "test_public/good/000_flash.png")
    os.rename(cat / "test_public/good/001_overexposed.png", cat / "test_public/good/001_flash.png")
    os.rename(cat / "test_public/bad/000_regular.png", cat / "test_public/bad/000_strobe.png")
    os.rename(cat / MASKS[0], cat / "test_public/ground_truth/bad/000_strobe_mask.png")
    with caplog.at_level(logging.INFO, logger="madfh_pipeline"):
        checked = validate_layout(_listing(raw_root), category)
    assert (checked["problem"] == "").all()  # kept, and evaluated as their own lighting groups
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("[widget] 3 test_public images carry lighting tokens outside regular, overexposed")
    assert "'flash' (2), 'strobe' (1)" in warnings[0]


def test_names_without_a_lighting_token_are_one_info_line(
    raw_root: Path, category: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """A user's own file names (no NNN_<lighting>): fine, said once, never a warning per file."""
    cat = raw_root / "widget"
    for i, path in enumerate(sorted((cat / "test_public/good").glob("*.png"))):
        os.rename(path, path.with_name(f"part_{i}.png"))
    with caplog.at_level(logging.INFO, logger="madfh_pipeline"):
        checked = validate_layout(_listing(raw_root), category)
    assert (checked["problem"] == "").all()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    (line,) = [r.getMessage() for r in caplog.records if "no lighting token" in r.getMessage()]
    assert line.startswith("[widget] 2 of 4 test_public images have no lighting token in their name")
    assert set(checked.loc[checked["relpath"].str.contains("part_"), "lighting"]) == {""}


def test_validate_layout_raises_on_an_empty_folder(tmp_path: Path, category: dict) -> None:
    (tmp_path / "widget").mkdir()
    with pytest.raises(NoUsableDataError, match=r"No images found for category 'widget'"):
        validate_layout(_listing(tmp_path), category)


def test_validate_layout_raises_when_only_stray_files(tmp_path: Path, category: dict) -> None:
    (tmp_path / "widget/images").mkdir(parents=True)
    _write(tmp_path / "widget/images/a.png", np.zeros((40, 48), np.uint8))
    with pytest.raises(NoUsableDataError, match="Check the raw data root"):
        validate_layout(_listing(tmp_path), category)


# ---- preprocess_images: bad files ----


def test_bad_files_are_skipped_and_named(
    raw_root: Path, category: dict, preprocessing_params: dict, tmp_path: Path
) -> None:
    cat = raw_root / "widget"
    (cat / "train/good/001_regular.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage garbage garbage")
    _write(cat / "train/good/002_regular.png", np.zeros((40, 50), np.uint8))
    grey_mask = np.zeros((40, 48), np.uint8)
    grey_mask[:5], grey_mask[5:10] = 128, 255
    _write(cat / MASKS[0], grey_mask)
    _write(cat / MASKS[1], np.zeros((20, 20), np.uint8))
    (cat / "test_private/000_regular.png").write_bytes(b"")
    frame, stats = _run(raw_root, category, preprocessing_params, ImageStore(tmp_path / "store"))
    skipped = frame[frame["status"] == "skipped"].set_index("relpath")["problem"].to_dict()
    assert set(skipped) == {
        "train/good/001_regular.png",
        "train/good/002_regular.png",
        "test_public/bad/000_regular.png",
        "test_public/bad/001_overexposed.png",
        "test_private/000_regular.png",
    }
    assert skipped["train/good/001_regular.png"].startswith("Image file is corrupt or not an image: '")
    assert str(cat / "train/good/001_regular.png") in skipped["train/good/001_regular.png"]
    assert skipped["train/good/002_regular.png"] == "size 50x40 does not match the category's 48x40"
    assert skipped["test_public/bad/000_regular.png"] == f"mask {MASKS[0]} is not binary (3 distinct values)"
    assert skipped["test_public/bad/001_overexposed.png"] == f"mask {MASKS[1]} is 20x20, image is 48x40"
    assert skipped["test_private/000_regular.png"] == "empty file (0 bytes)"
    assert (stats["n_processed"], stats["n_skipped"], stats["n_unchanged"]) == (7, 5, 0)
    assert stats["n_files"] == 12
    store = ImageStore(tmp_path / "store")
    assert not store.exists("train/good/001_regular.png")
    assert not store.exists(MASKS[0])
    assert store.exists("train/good/000_regular.png")


def test_unreadable_mask_is_skipped(raw_root: Path, category: dict, preprocessing_params: dict, tmp_path: Path) -> None:
    (raw_root / "widget" / MASKS[0]).write_bytes(b"not a png at all")
    frame, _ = _run(raw_root, category, preprocessing_params, ImageStore(tmp_path / "store"))
    problem = _problem(frame, "test_public/bad/000_regular.png")
    assert problem.startswith("unreadable mask: Image file is corrupt")
    assert MASKS[0] in problem


def test_check_size_false_accepts_other_sizes(
    raw_root: Path, category: dict, preprocessing_params: dict, tmp_path: Path
) -> None:
    _write(raw_root / "widget/train/good/002_regular.png", np.zeros((40, 50), np.uint8))
    frame, stats = _run(raw_root, category, preprocessing_params | {"check_size": False}, ImageStore(tmp_path / "s"))
    assert stats["n_skipped"] == 0
    row = frame.set_index("relpath").loc["train/good/002_regular.png"]
    assert (row["src_width"], row["src_height"], row["dst_width"], row["dst_height"]) == (50, 40, 32, 32)


def test_binary_0_1_masks_are_accepted_and_stored_as_0_255(
    raw_root: Path, category: dict, preprocessing_params: dict, tmp_path: Path
) -> None:
    mask = np.zeros((40, 48), np.uint8)
    mask[10:30, 10:30] = 1
    _write(raw_root / "widget" / MASKS[0], mask)
    store = ImageStore(tmp_path / "s")
    frame, _ = _run(raw_root, category, preprocessing_params, store)
    row = frame.set_index("relpath").loc["test_public/bad/000_regular.png"]
    assert row["status"] == "processed" and row["mask_pixels"] == 400
    assert set(np.unique(store.read(MASKS[0])).tolist()) == {0, 255}


# ---- preprocess_images: the plan ----


def test_preprocess_images_returns_a_plan_and_writes_nothing(
    raw_root: Path, category: dict, preprocessing_params: dict, tmp_path: Path
) -> None:
    checked = validate_layout(_listing(raw_root), category)
    plan = preprocess_images(checked, preprocessing_params, category)
    assert isinstance(plan, ImageWrites)
    assert plan.worker is process_image and plan.workers == 1 and plan.incremental
    assert plan.label == "preprocess widget"
    assert sorted(t["relpath"] for t in plan.tasks) == sorted(ALL_IMAGES)
    bad = next(t for t in plan.tasks if t["relpath"] == "test_public/bad/000_regular.png")
    assert bad["outputs"] == ["test_public/bad/000_regular.png", MASKS[0]]  # the mask is written with its image
    assert len({t["fingerprint"] for t in plan.tasks}) == len(plan.tasks)
    other = preprocess_images(checked, preprocessing_params | {"target_width": 16}, category)
    assert {t["fingerprint"] for t in other.tasks}.isdisjoint(t["fingerprint"] for t in plan.tasks)  # settings count
    assert not (tmp_path / "store").exists()  # planning writes nothing


def test_files_with_layout_problems_are_not_planned(raw_root: Path, category: dict, preprocessing_params: dict) -> None:
    (raw_root / "widget/validation/good/001_regular.png").write_bytes(b"")
    (raw_root / "widget" / MASKS[1]).unlink()
    plan = preprocess_images(validate_layout(_listing(raw_root), category), preprocessing_params, category)
    planned = {t["relpath"] for t in plan.tasks}
    assert "validation/good/001_regular.png" not in planned and "test_public/bad/001_overexposed.png" not in planned
    assert len(planned) == len(ALL_IMAGES) - 2


def test_an_empty_mask_is_a_warning_in_the_parents_log(
    raw_root: Path, category: dict, preprocessing_params: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write(raw_root / "widget" / MASKS[0], np.zeros((40, 48), np.uint8))
    with caplog.at_level(logging.WARNING):
        frame, _ = _run(raw_root, category, preprocessing_params, ImageStore(tmp_path / "store"))
    (record,) = [r for r in caplog.records if "is empty although the image is in bad/" in r.getMessage()]
    assert record.levelno == logging.WARNING and record.name == "madfh_pipeline.datasets.image_store"
    assert MASKS[0] in record.getMessage()
    assert frame.set_index("relpath").loc["test_public/bad/000_regular.png", "status"] == "processed"


def test_summary_never_drops_an_image_the_store_did_not_index(
    raw_root: Path, category: dict, preprocessing_params: dict, tmp_path: Path
) -> None:
    checked = validate_layout(_listing(raw_root), category)
    plan = preprocess_images(checked, preprocessing_params, category)
    plan.tasks = [t for t in plan.tasks if t["relpath"] != "train/good/003_regular.png"]  # lost on the way
    store = ImageStore(tmp_path / "store")
    store.apply(plan)
    frame, stats = summarize_preprocessing(store, checked, preprocessing_params, category)
    row = frame.set_index("relpath").loc["train/good/003_regular.png"]
    assert (row["status"], row["problem"]) == ("skipped", "not written by preprocessing (see the log)")
    assert (stats["n_processed"], stats["n_skipped"], stats["n_files"]) == (11, 1, 12)
    assert stats["workers"] == 1 and stats["seconds"] >= 0


# ---- preprocess_images: outputs ----


def test_outputs_have_the_target_size_and_binary_masks(
    raw_root: Path, category: dict, preprocessing_params: dict, tmp_path: Path
) -> None:
    store = ImageStore(tmp_path / "store")
    params = preprocessing_params | {"target_width": 24, "target_height": 20}
    frame, stats = _run(raw_root, category, params, store)
    assert _status(frame) == dict.fromkeys(ALL_IMAGES, "processed")
    assert (stats["n_processed"], stats["n_skipped"], stats["n_unchanged"]) == (12, 0, 0)
    assert stats["settings"] == {"target_width": 24, "target_height": 20, "mode": "stretch", "output_channels": 1}
    assert stats["workers"] == 1 and stats["category"] == "widget"
    for rel in ALL_IMAGES:
        out = store.read(rel)
        assert out.shape == (20, 24), rel  # gray stays gray
    for rel in MASKS:
        mask = store.read(rel)
        assert mask.shape == (20, 24)
        assert set(np.unique(mask).tolist()) == {0, 255}
    row = frame.set_index("relpath").loc["test_public/bad/000_regular.png"]
    assert row["mask_pixels"] == 6 * 8  # the tree's rectangle, counted at native size
    assert (row["scale_x"], row["scale_y"], row["pad_x"], row["pad_y"]) == (0.5, 0.5, 0, 0)
    # the index holds image rows only, with everything needed for the next run
    index = store.read_index()
    assert sorted(index["relpath"]) == sorted(ALL_IMAGES)
    assert {"fingerprint", "status", "problem", "src_width", "dst_width", "scale_x", "pad_y"} <= set(index)


def test_gray_to_rgb_on_request(raw_root: Path, category: dict, preprocessing_params: dict, tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    _run(raw_root, category, preprocessing_params | {"output_channels": 3}, store)
    image = store.read("train/good/000_regular.png")
    assert image.shape == (32, 32, 3)
    np.testing.assert_array_equal(image[..., 0], image[..., 2])  # gray replicated
    assert store.read(MASKS[0]).shape == (32, 32)  # masks stay single-channel


def test_rgb_category_stays_rgb(
    tmp_path: Path, make_mvtec_tree: Callable[..., Path], make_category: Callable[..., dict], preprocessing_params: dict
) -> None:
    make_mvtec_tree(tmp_path / "raw", "nuts", width=40, height=30, channels=3)
    store = ImageStore(tmp_path / "store")
    frame, stats = _run(tmp_path / "raw", make_category("nuts", 40, 30, 3), preprocessing_params, store, "nuts")
    assert stats["n_processed"] == 12 and stats["settings"]["output_channels"] == 3
    assert store.read("validation/good/000_regular.png").shape == (32, 32, 3)
    assert (frame["src_channels"] == 3).all()


def test_invalid_output_channels_is_refused(raw_root: Path, category: dict, preprocessing_params: dict) -> None:
    checked = validate_layout(_listing(raw_root), category)
    with pytest.raises(ValueError, match="output_channels must be 1, 3 or null, got 2"):
        preprocess_images(checked, preprocessing_params | {"output_channels": 2}, category)


def test_letterbox_pads_wide_images(
    tmp_path: Path, make_mvtec_tree: Callable[..., Path], make_category: Callable[..., dict], preprocessing_params: dict
) -> None:
    make_mvtec_tree(tmp_path / "raw", "sheet", width=64, height=16, channels=1)
    # per-category override of the global mode, like sheet_metal in conf/base
    category = make_category("sheet", 64, 16, 1, preprocessing={"mode": "letterbox"})
    store = ImageStore(tmp_path / "store")
    frame, stats = _run(tmp_path / "raw", category, preprocessing_params, store, "sheet")
    assert stats["settings"]["mode"] == "letterbox"
    row = frame.set_index("relpath").loc["train/good/000_regular.png"]
    assert (row["scale_x"], row["scale_y"], row["pad_x"], row["pad_y"]) == (0.5, 0.5, 0, 12)
    image = store.read("train/good/000_regular.png")
    assert image.shape == (32, 32)
    assert (image[:12] == 0).all() and (image[20:] == 0).all()
    assert (image[12:20] > 0).all()  # the tree's images are >= 40 everywhere
    mask = store.read(MASKS[0])
    assert (mask[:12] == 0).all() and (mask[20:] == 0).all() and (mask[12:20] == 255).any()


def test_split_selection(raw_root: Path, category: dict, preprocessing_params: dict, tmp_path: Path) -> None:
    frame, stats = _run(
        raw_root, category, preprocessing_params | {"splits": ["train", "test_public"]}, ImageStore(tmp_path / "s")
    )
    assert sorted(frame["relpath"]) == sorted(r for r in ALL_IMAGES if r.startswith(("train/", "test_public/")))
    assert stats["n_processed"] == 8


# ---- incremental re-runs ----


def _forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"decoded {args[0]} although nothing changed")

    monkeypatch.setattr(worker_module, "read_image", fail)


def test_second_run_processes_nothing(
    raw_root: Path, category: dict, preprocessing_params: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cat = raw_root / "widget"
    (cat / "train/good/001_regular.png").write_bytes(b"corrupt")
    (cat / MASKS[1]).unlink()
    store = ImageStore(tmp_path / "store")
    first, _ = _run(raw_root, category, preprocessing_params, store)
    _forbid_decoding(monkeypatch)
    second, stats = _run(raw_root, category, preprocessing_params, store)
    assert (stats["n_processed"], stats["n_unchanged"], stats["n_skipped"]) == (0, 10, 2)
    expected = dict.fromkeys(ALL_IMAGES, "unchanged") | {
        "train/good/001_regular.png": "skipped",
        "test_public/bad/001_overexposed.png": "skipped",
    }
    assert _status(second) == expected
    # known-bad files keep their problem (the corrupt one was not decoded again: read_image is patched to fail)
    assert _problem(second, "train/good/001_regular.png") == _problem(first, "train/good/001_regular.png")
    assert "corrupt" in _problem(second, "train/good/001_regular.png")
    assert _problem(second, "test_public/bad/001_overexposed.png") == f"missing ground-truth mask {MASKS[1]}"
    # the facts of unchanged rows are carried over, so the manifest can be built from the second run alone
    cols = ["relpath", "src_width", "src_height", "dst_width", "dst_height", "scale_x", "pad_y", "mask_pixels"]
    usable = first["status"] == "processed"
    pd.testing.assert_frame_equal(
        second.loc[second["status"] == "unchanged", cols].reset_index(drop=True),
        first.loc[usable, cols].reset_index(drop=True),
        check_dtype=False,
    )
    report, _, _ = build_validation_report(second, stats, category)
    manifest = build_manifest(second, report, {"extra_validation": 0, "seed": 0})
    assert len(manifest) == 10
    # a third run is still a no-op (the index now holds "unchanged" rows)
    third, stats3 = _run(raw_root, category, preprocessing_params, store)
    assert (stats3["n_processed"], stats3["n_unchanged"], stats3["n_skipped"]) == (0, 10, 2)


def test_touching_one_file_reprocesses_exactly_that_one(
    raw_root: Path, category: dict, preprocessing_params: dict, tmp_path: Path
) -> None:
    store = ImageStore(tmp_path / "store")
    _run(raw_root, category, preprocessing_params, store)
    _bump_mtime(raw_root / "widget/validation/good/001_regular.png")
    frame, stats = _run(raw_root, category, preprocessing_params, store)
    assert (stats["n_processed"], stats["n_unchanged"]) == (1, 11)
    assert [r for r, s in _status(frame).items() if s == "processed"] == ["validation/good/001_regular.png"]


def test_touching_a_mask_reprocesses_its_image(
    raw_root: Path, category: dict, preprocessing_params: dict, tmp_path: Path
) -> None:
    store = ImageStore(tmp_path / "store")
    _run(raw_root, category, preprocessing_params, store)
    _bump_mtime(raw_root / "widget" / MASKS[1])
    frame, stats = _run(raw_root, category, preprocessing_params, store)
    assert [r for r, s in _status(frame).items() if s == "processed"] == ["test_public/bad/001_overexposed.png"]


def test_fixed_file_is_processed_again(
    raw_root: Path, category: dict, preprocessing_params: dict, tmp_path: Path
) -> None:
    path = raw_root / "widget/train/good/003_regular.png"
    good = path.read_bytes()
    path.write_bytes(b"corrupt")
    store = ImageStore(tmp_path / "store")
    first, _ = _run(raw_root, category, preprocessing_params, store)
    assert _status(first)["train/good/003_regular.png"] == "skipped"
    path.write_bytes(good)
    _bump_mtime(path)
    second, stats = _run(raw_root, category, preprocessing_params, store)
    assert _status(second)["train/good/003_regular.png"] == "processed"
    assert _problem(second, "train/good/003_regular.png") == ""
    assert (stats["n_processed"], stats["n_unchanged"], stats["n_skipped"]) == (1, 11, 0)


def test_missing_output_is_processed_again(
    raw_root: Path, category: dict, preprocessing_params: dict, tmp_path: Path
) -> None:
    store = ImageStore(tmp_path / "store")
    _run(raw_root, category, preprocessing_params, store)
    store.path("train/good/000_regular.png").unlink()
    store.path(MASKS[0]).unlink()
    frame, stats = _run(raw_root, category, preprocessing_params, store)
    processed = sorted(r for r, s in _status(frame).items() if s == "processed")
    assert processed == ["test_public/bad/000_regular.png", "train/good/000_regular.png"]
    assert store.exists(MASKS[0])


def test_changed_settings_reprocess_everything(
    raw_root: Path, category: dict, preprocessing_params: dict, tmp_path: Path
) -> None:
    store = ImageStore(tmp_path / "store")
    _run(raw_root, category, preprocessing_params, store)
    frame, stats = _run(raw_root, category, preprocessing_params | {"target_width": 16}, store)
    assert (stats["n_processed"], stats["n_unchanged"]) == (12, 0)
    assert store.read("train/good/000_regular.png").shape == (32, 16)
    _, stats = _run(raw_root, category, preprocessing_params | {"target_width": 16, "mode": "letterbox"}, store)
    assert stats["n_processed"] == 12


def test_incremental_false_reprocesses_everything(
    raw_root: Path, category: dict, preprocessing_params: dict, tmp_path: Path
) -> None:
    store = ImageStore(tmp_path / "store")
    _run(raw_root, category, preprocessing_params, store)
    _, stats = _run(raw_root, category, preprocessing_params | {"incremental": False}, store)
    assert (stats["n_processed"], stats["n_unchanged"]) == (12, 0)


def test_unreadable_index_means_a_full_run(
    raw_root: Path, category: dict, preprocessing_params: dict, tmp_path: Path
) -> None:
    store = ImageStore(tmp_path / "store")
    _run(raw_root, category, preprocessing_params, store)
    (tmp_path / "store/_index.parquet").write_bytes(b"garbage")
    _, stats = _run(raw_root, category, preprocessing_params, store)
    assert (stats["n_processed"], stats["n_unchanged"]) == (12, 0)


def test_content_hash_ignores_mtime_but_sees_content(
    raw_root: Path, category: dict, preprocessing_params: dict, tmp_path: Path
) -> None:
    params = preprocessing_params | {"change_detection": "content_hash"}
    store = ImageStore(tmp_path / "store")
    _run(raw_root, category, params, store)
    assert store.read_index()["fingerprint"].str.match(r"[0-9a-f]{32}\|").all()  # the content, not size + time
    touched = raw_root / "widget/train/good/000_regular.png"
    _bump_mtime(touched)  # same bytes, new time: unchanged
    frame, stats = _run(raw_root, category, params, store)
    assert (stats["n_processed"], stats["n_unchanged"]) == (0, 12)
    # same size, different content (one pixel flipped), old mtime restored: processed again
    changed = raw_root / "widget/train/good/001_regular.png"
    stat = changed.stat()
    image = read_image(changed)
    image[0, 0] ^= 0xFF
    _write(changed, image)
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    frame, stats = _run(raw_root, category, params, store)
    assert [r for r, s in _status(frame).items() if s == "processed"] == ["train/good/001_regular.png"]


def test_one_and_two_workers_give_identical_outputs(
    raw_root: Path, category: dict, preprocessing_params: dict, tmp_path: Path
) -> None:
    (raw_root / "widget/train/good/001_regular.png").write_bytes(b"corrupt")  # a problem found inside a worker
    runs = {}
    for workers in (1, 2):
        store = ImageStore(tmp_path / f"store{workers}")
        frame, stats = _run(raw_root, category, preprocessing_params | {"workers": workers}, store)
        assert stats["workers"] == workers
        files = {p.relative_to(store.root).as_posix(): p.read_bytes() for p in store.root.rglob("*.png")}
        runs[workers] = (frame, files)
    assert len(runs[1][1]) == 13  # 11 images + 2 masks
    assert runs[1][1] == runs[2][1]
    pd.testing.assert_frame_equal(runs[1][0], runs[2][0])
    assert _problem(runs[2][0], "train/good/001_regular.png").startswith("Image file is corrupt")


# ---- report ----


def _report_inputs(raw_root: Path, category: dict, params: dict, tmp_path: Path) -> tuple[pd.DataFrame, dict]:
    cat = raw_root / "widget"
    (cat / "train/good/001_regular.png").write_bytes(b"corrupt")
    (cat / MASKS[1]).unlink()
    (cat / "stray.txt").write_text("x")
    return _run(raw_root, category, params, ImageStore(tmp_path / "store"))


def test_validation_report(raw_root: Path, category: dict, preprocessing_params: dict, tmp_path: Path) -> None:
    frame, stats = _report_inputs(raw_root, category, preprocessing_params, tmp_path)
    report, markdown, metrics = build_validation_report(frame, stats, category)
    assert (report["category"], report["n_images_found"], report["n_usable"], report["n_skipped"]) == (
        "widget",
        12,
        10,
        3,
    )
    assert report["counts"] == {
        "train/good": {"found": 4, "usable": 3, "skipped": 1},
        "validation/good": {"found": 2, "usable": 2, "skipped": 0},
        "test_public/bad": {"found": 2, "usable": 1, "skipped": 1},
        "test_public/good": {"found": 2, "usable": 2, "skipped": 0},
        "test_private/unknown": {"found": 1, "usable": 1, "skipped": 0},
        "test_private_mixed/unknown": {"found": 1, "usable": 1, "skipped": 0},
    }
    assert [s["file"] for s in report["skipped"]] == [
        "stray.txt",
        "test_public/bad/001_overexposed.png",
        "train/good/001_regular.png",
    ]
    assert report["skipped"][0]["problem"] == "stray file: not part of the MVTec AD 2 layout"
    assert report["stats"] is stats
    assert markdown.startswith("# Validation report: widget\n\n12 images found, 10 usable, 3 files skipped.")
    assert "| train/good | 4 | 3 | 1 |" in markdown
    assert "## Skipped files" in markdown
    for entry in report["skipped"]:
        assert f"- `{entry['file']}`: {entry['problem']}" in markdown
    assert set(metrics) == {
        "n_images",
        "n_usable",
        "n_skipped",
        "n_processed",
        "n_unchanged",
        "images_per_s",
        "seconds",
    }
    for value in metrics.values():
        assert set(value) == {"value", "step"} and value["step"] == 0 and isinstance(value["value"], float)
    assert metrics["n_skipped"] == {"value": 3.0, "step": 0}
    assert metrics["n_usable"] == {"value": 10.0, "step": 0}
    assert metrics["n_processed"]["value"] == 10.0 and metrics["n_unchanged"]["value"] == 0.0


def test_clean_report_says_so(raw_root: Path, category: dict, preprocessing_params: dict, tmp_path: Path) -> None:
    frame, stats = _run(raw_root, category, preprocessing_params, ImageStore(tmp_path / "store"))
    report, markdown, _ = build_validation_report(frame, stats, category)
    assert report["skipped"] == [] and report["n_skipped"] == 0
    assert "No file was skipped." in markdown and "## Skipped files" not in markdown


# ---- manifest ----


@pytest.fixture
def processed(raw_root: Path, category: dict, preprocessing_params: dict, tmp_path: Path) -> tuple[pd.DataFrame, dict]:
    frame, stats = _report_inputs(raw_root, category, preprocessing_params, tmp_path)
    report, _, _ = build_validation_report(frame, stats, category)
    return frame, report


def test_manifest_keeps_official_splits(processed: tuple[pd.DataFrame, dict]) -> None:
    frame, report = processed
    manifest = build_manifest(frame, report, {"extra_validation": 0, "seed": 42})
    assert len(manifest) == 10
    assert (manifest["split"] == manifest["official_split"]).all()
    assert manifest["split"].value_counts().to_dict() == {
        "train": 3,
        "validation": 2,
        "test_public": 3,
        "test_private": 1,
        "test_private_mixed": 1,
    }
    assert "train/good/001_regular.png" not in set(manifest["relpath"])
    assert manifest["has_mask"].sum() == 1
    row = manifest.set_index("relpath").loc["test_public/bad/000_regular.png"]
    assert bool(row["has_mask"]) and row["mask_relpath"] == MASKS[0]
    assert manifest["src_width"].dtype == np.int64 and manifest["scale_x"].dtype == np.float64
    assert (manifest["dst_width"] == 32).all() and (manifest["src_height"] == 40).all()
    assert list(manifest.columns[:6]) == ["category", "relpath", "split", "official_split", "label", "lighting"]


@pytest.mark.parametrize(("extra", "n_moved"), [(0.5, 2), (2, 2), (1, 1), (0.1, 0)])
def test_extra_validation_is_seeded_and_recorded(
    processed: tuple[pd.DataFrame, dict], extra: float, n_moved: int
) -> None:
    frame, report = processed
    manifest = build_manifest(frame, report, {"extra_validation": extra, "seed": 3})
    moved = manifest[manifest["official_split"] != manifest["split"]]
    assert len(moved) == n_moved
    assert (moved["official_split"] == "train").all() and (moved["split"] == "validation").all()
    assert (manifest["split"] == "validation").sum() == 2 + n_moved
    again = build_manifest(frame, report, {"extra_validation": extra, "seed": 3})
    pd.testing.assert_frame_equal(manifest, again)


def test_extra_validation_seed_decides_which(processed: tuple[pd.DataFrame, dict]) -> None:
    frame, report = processed
    picks = {
        tuple(m.loc[m["split"] != m["official_split"], "relpath"])
        for m in (build_manifest(frame, report, {"extra_validation": 1, "seed": s}) for s in range(12))
    }
    assert len(picks) == 3  # with 12 seeds every one of the 3 usable train images gets picked at some point


def test_extra_validation_cannot_take_all_of_train(processed: tuple[pd.DataFrame, dict]) -> None:
    frame, report = processed
    with pytest.raises(ValueError, match=r"extra_validation=3 would move all 3 train images of 'widget'"):
        build_manifest(frame, report, {"extra_validation": 3, "seed": 0})


def test_manifest_without_usable_images_raises(
    raw_root: Path, category: dict, preprocessing_params: dict, tmp_path: Path
) -> None:
    for path in (raw_root / "widget").rglob("*.png"):
        if "ground_truth" not in path.parts:
            path.write_bytes(b"corrupt")
    frame, stats = _run(raw_root, category, preprocessing_params, ImageStore(tmp_path / "store"))
    report, _, _ = build_validation_report(frame, stats, category)
    assert report["n_usable"] == 0
    with pytest.raises(NoUsableDataError, match=r"No usable image is left for category 'widget': all 12 were skipped"):
        build_manifest(frame, report, {"extra_validation": 0, "seed": 0})
