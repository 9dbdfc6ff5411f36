"""Batch inspection on a real 2-worker Dask LocalCluster: the same records as the single-process path, a corrupt file
becomes an error record, one torch thread per worker, and no LocalCluster from a non-main thread."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from madfh_pipeline.inspection import InspectionModel
from madfh_pipeline.serving.distributed import inspect_folder, inspect_paths, list_images


@pytest.fixture(scope="module")
def image_folder(
    tmp_path_factory: pytest.TempPathFactory, good_images: list[np.ndarray], bad_image: np.ndarray
) -> Path:
    folder = tmp_path_factory.mktemp("batch")
    for i, image in enumerate([*good_images, bad_image, *good_images[:2]]):
        cv2.imwrite(str(folder / f"part_{i:02d}.png"), image)
    (folder / "sub").mkdir()
    cv2.imwrite(str(folder / "sub" / "part_99.jpg"), bad_image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    (folder / "part_50_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "notes.txt").write_text("not an image: not listed")
    return folder


@pytest.mark.slow
def test_two_workers_give_the_single_process_records(
    demo_model: InspectionModel, model_folder: Path, image_folder: Path, tmp_path: Path
) -> None:
    records = inspect_folder(model_folder, image_folder, n_workers=2, maps_dir=tmp_path / "maps")
    local = inspect_paths(demo_model, list_images(image_folder))
    assert list(records["path"]) == list(local["path"]) and len(records) == 9
    assert not records["path"].str.endswith(".txt").any()

    corrupt = records[records["path"].str.endswith("_corrupt.png")].iloc[0]
    assert corrupt["error_kind"] == "input" and "corrupt or truncated" in corrupt["error"]
    assert pd.isna(corrupt["score"]) and isinstance(corrupt["content_hash"], str)

    ok = records[records["error"] == ""]
    assert len(ok) == 8
    np.testing.assert_allclose(ok["score"], local.loc[ok.index, "score"], rtol=1e-5, atol=1e-4)
    assert list(ok["decision"]) == list(local.loc[ok.index, "decision"])
    assert list(ok["content_hash"]) == list(local.loc[ok.index, "content_hash"])
    assert set(ok["torch_threads"]) == {1}
    assert ok["worker"].nunique() == 2, "the images must be spread over both workers"
    assert (ok[ok["path"].str.contains("part_04|part_99")]["decision"] == "NG").all()
    saved = np.load(ok.iloc[0]["map_path"])
    assert saved.dtype == np.float16 and saved.shape == (80, 96)


def test_no_local_cluster_from_a_server_thread(model_folder: Path, image_folder: Path) -> None:
    errors: list[BaseException] = []

    def request_thread() -> None:
        try:
            inspect_folder(model_folder, image_folder, n_workers=1)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    thread = threading.Thread(target=request_thread)
    thread.start()
    thread.join(timeout=60)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert "scheduler_address" in str(errors[0])


def test_an_empty_folder_is_an_error(model_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No images"):
        inspect_folder(model_folder, tmp_path)
