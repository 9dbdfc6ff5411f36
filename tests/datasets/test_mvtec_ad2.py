"""Tests of MVTecAD2Dataset: the manifest it lists, the errors for missing data, and writing a tree."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from madfh_pipeline.datasets import MissingRawDataError, MVTecAD2Dataset
from madfh_pipeline.datasets.mvtec_ad2 import MANIFEST_COLUMNS
from madfh_pipeline.imaging import read_image


def _render(rel: str, value: int, mask_rel: str | None = None) -> Callable[[], dict[str, np.ndarray]]:
    """A bundle renderer that unpickles in a worker process.

    Built from ``dict`` (a builtin) rather than a function of this module: workers cannot import test modules.
    """
    out = {rel: np.full((8, 10), value, np.uint8)}
    if mask_rel:
        mask = np.zeros((8, 10), np.uint8)
        mask[2:4, 3:6] = 255
        out[mask_rel] = mask
    return functools.partial(dict, out)


def test_manifest_rows_and_columns(tmp_path: Path, make_mvtec_tree: Callable[..., Path]) -> None:
    make_mvtec_tree(tmp_path, "widget")
    frame = MVTecAD2Dataset(path=str(tmp_path), category="widget").load()
    assert list(frame.columns) == list(MANIFEST_COLUMNS)
    assert len(frame) == 14  # 12 images + 2 masks
    assert frame["category"].eq("widget").all()
    assert list(frame["relpath"]) == [
        "train/good/000_regular.png",
        "train/good/001_regular.png",
        "train/good/002_regular.png",
        "train/good/003_regular.png",
        "validation/good/000_regular.png",
        "validation/good/001_regular.png",
        "test_public/bad/000_regular.png",
        "test_public/bad/001_overexposed.png",
        "test_public/ground_truth/bad/000_regular_mask.png",
        "test_public/ground_truth/bad/001_overexposed_mask.png",
        "test_public/good/000_regular.png",
        "test_public/good/001_overexposed.png",
        "test_private/000_regular.png",
        "test_private_mixed/000_mixed.png",
    ]
    by_rel = frame.set_index("relpath")
    bad = by_rel.loc["test_public/bad/001_overexposed.png"]
    assert (bad["role"], bad["split"], bad["label"], bad["lighting"], bad["stem"]) == (
        "image",
        "test_public",
        "bad",
        "overexposed",
        "001_overexposed",
    )
    assert bad["mask_relpath"] == "test_public/ground_truth/bad/001_overexposed_mask.png"
    assert bad["mask_path"] == str(tmp_path / "widget" / "test_public/ground_truth/bad/001_overexposed_mask.png")
    assert bool(bad["mask_exists"]) is True
    assert bad["path"] == str(tmp_path / "widget" / "test_public/bad/001_overexposed.png")
    mask = by_rel.loc["test_public/ground_truth/bad/000_regular_mask.png"]
    assert (mask["role"], mask["split"], mask["label"], mask["stem"], mask["lighting"]) == (
        "mask",
        "test_public",
        "bad",
        "000_regular",
        "regular",
    )
    assert mask["mask_relpath"] == "" and not mask["mask_exists"]
    train = by_rel.loc["train/good/002_regular.png"]
    assert (train["role"], train["split"], train["label"], train["lighting"]) == ("image", "train", "good", "regular")
    assert train["mask_relpath"] == "" and train["mask_path"] == "" and not train["mask_exists"]
    assert by_rel.loc["test_private/000_regular.png", "label"] == "unknown"
    assert by_rel.loc["test_private_mixed/000_mixed.png", "lighting"] == "mixed"
    stat = (tmp_path / "widget/train/good/002_regular.png").stat()
    assert (train["bytes"], train["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns)


def test_missing_mask_is_flagged(tmp_path: Path, make_mvtec_tree: Callable[..., Path]) -> None:
    cat = make_mvtec_tree(tmp_path, "widget")
    (cat / "test_public/ground_truth/bad/001_overexposed_mask.png").unlink()
    frame = MVTecAD2Dataset(path=str(tmp_path), category="widget").load().set_index("relpath")
    assert bool(frame.loc["test_public/bad/001_overexposed.png", "mask_exists"]) is False
    assert bool(frame.loc["test_public/bad/000_regular.png", "mask_exists"]) is True
    assert frame.loc["test_public/bad/001_overexposed.png", "mask_relpath"].endswith("001_overexposed_mask.png")


def test_stray_files_are_rows_and_hidden_files_are_ignored(
    tmp_path: Path, make_mvtec_tree: Callable[..., Path]
) -> None:
    cat = make_mvtec_tree(tmp_path, "widget")
    (cat / "train/good/notes.txt").write_text("hello")
    (cat / "train/bad").mkdir()
    (cat / "train/bad/000_regular.png").write_bytes((cat / "train/good/000_regular.png").read_bytes())
    (cat / "readme.png").write_bytes(b"")
    (cat / "test_public/ground_truth/bad/000_regular.png").write_bytes(b"x")  # mask without _mask suffix
    (cat / ".DS_Store").write_bytes(b"junk")
    (cat / "train/good/._000_regular.png").write_bytes(b"junk")
    frame = MVTecAD2Dataset(path=str(tmp_path), category="widget").load()
    stray = frame[frame["role"] == "stray"]
    assert sorted(stray["relpath"]) == [
        "readme.png",
        "test_public/ground_truth/bad/000_regular.png",
        "train/bad/000_regular.png",
        "train/good/notes.txt",
    ]
    assert (stray["split"] == "").all() and (stray["label"] == "").all() and (stray["lighting"] == "").all()
    assert not frame["relpath"].str.contains("DS_Store|/\\._", regex=True).any()
    assert len(frame) == 14 + 4


def test_missing_root_names_the_path_and_how_to_get_the_data(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    hint = "Download MVTec AD 2 from mvtec.com, or run the demo."
    dataset = MVTecAD2Dataset(path=str(root), category="wallplugs", hint=hint)
    assert not dataset.exists()
    with pytest.raises(MissingRawDataError) as info:
        dataset.load()
    message = str(info.value)
    assert f"MVTec AD 2 raw data root not found: '{root}'" in message
    assert f"'{root / 'wallplugs'}/train/good/*.png'" in message
    assert "Download MVTec AD 2" in message


def test_missing_category_folder_names_the_folder(tmp_path: Path, make_mvtec_tree: Callable[..., Path]) -> None:
    make_mvtec_tree(tmp_path, "widget")
    with pytest.raises(MissingRawDataError, match=rf"category folder not found: '{tmp_path / 'gizmo'}'.*Download"):
        MVTecAD2Dataset(path=str(tmp_path), category="gizmo", hint="Download it.").load()


def test_hint_of_the_base_config_reaches_the_error(tmp_path: Path) -> None:
    import yaml

    globals_yml = Path(__file__).resolve().parents[2] / "conf" / "base" / "globals.yml"
    hint = yaml.safe_load(globals_yml.read_text())["raw_hint"]
    with pytest.raises(MissingRawDataError, match=r"Download MVTec AD 2 \(https://www\.mvtec\.com"):
        MVTecAD2Dataset(path=str(tmp_path / "x"), category="wallplugs", hint=hint).load()


def test_empty_category_folder_gives_an_empty_manifest(tmp_path: Path) -> None:
    (tmp_path / "widget").mkdir()
    dataset = MVTecAD2Dataset(path=str(tmp_path), category="widget")
    assert dataset.exists()
    frame = dataset.load()
    assert frame.empty and list(frame.columns) == list(MANIFEST_COLUMNS)


def test_save_writes_arrays_in_the_layout(tmp_path: Path) -> None:
    gray = np.arange(80, dtype=np.uint8).reshape(8, 10)
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[..., 0] = 255
    dataset = MVTecAD2Dataset(path=str(tmp_path), category="widget", workers=1)
    dataset.save({"train/good/000_regular.png": gray, "test_private/000_regular.png": rgb})
    np.testing.assert_array_equal(read_image(tmp_path / "widget/train/good/000_regular.png"), gray)
    np.testing.assert_array_equal(read_image(tmp_path / "widget/test_private/000_regular.png"), rgb)


@pytest.mark.parametrize("workers", [1, 2])
def test_save_renders_callable_bundles(tmp_path: Path, workers: int) -> None:
    bundles = {
        "train/good/000_regular.png": _render("train/good/000_regular.png", 10),
        "train/good/001_regular.png": _render("train/good/001_regular.png", 20),
        "test_public/bad/000_shift_1.png": _render(
            "test_public/bad/000_shift_1.png", 30, "test_public/ground_truth/bad/000_shift_1_mask.png"
        ),
    }
    MVTecAD2Dataset(path=str(tmp_path), category="widget", workers=workers).save(bundles)
    cat = tmp_path / "widget"
    written = sorted(p.relative_to(cat).as_posix() for p in cat.rglob("*.png"))
    assert written == [
        "test_public/bad/000_shift_1.png",
        "test_public/ground_truth/bad/000_shift_1_mask.png",
        "train/good/000_regular.png",
        "train/good/001_regular.png",
    ]
    assert (read_image(cat / "train/good/001_regular.png") == 20).all()
    assert (read_image(cat / "test_public/bad/000_shift_1.png") == 30).all()
    assert int(read_image(cat / "test_public/ground_truth/bad/000_shift_1_mask.png").sum()) == 6 * 255
    # what was written reads back as a manifest with the mask found
    frame = MVTecAD2Dataset(path=str(tmp_path), category="widget").load().set_index("relpath")
    assert bool(frame.loc["test_public/bad/000_shift_1.png", "mask_exists"]) is True
    assert frame.loc["test_public/bad/000_shift_1.png", "lighting"] == "shift_1"


def test_hidden_folders_are_ignored_like_hidden_files(tmp_path: Path, make_mvtec_tree: Callable[..., Path]) -> None:
    cat = make_mvtec_tree(tmp_path, "widget")
    hidden = cat / "train/good/.ipynb_checkpoints"
    hidden.mkdir()
    (hidden / "000_regular-checkpoint.png").write_bytes((cat / "train/good/000_regular.png").read_bytes())
    frame = MVTecAD2Dataset(path=str(tmp_path), category="widget").load()
    assert len(frame) == 14
    assert (frame["role"] != "stray").all()
