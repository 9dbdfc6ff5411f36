"""Tests of the evaluation nodes: scoring into a map store, exact benchmark metrics, figures and the export.

The metric tests use hand-made anomaly maps written straight to a MapStore and a stub model (a name and thresholds),
so every expected value below is computed by hand from the 4x4 maps.
"""

from __future__ import annotations

import math
from itertools import chain
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from kedro_mlflow.io.metrics import MlflowMetricsHistoryDataset
from matplotlib.figure import Figure

from madfh_pipeline.datasets import ImageStore, MapStore
from madfh_pipeline.imaging import GEOMETRY_COLUMNS, Geometry
from madfh_pipeline.metrics import MaskError
from madfh_pipeline.models.base import DetectorOutput, Thresholds
from madfh_pipeline.pipelines.evaluation.nodes import (
    compute_metrics,
    export_submission,
    map_key,
    plot_evaluation,
    score_images,
)

RUNTIME = {"device": "cpu", "batch_size": 2}


class StubModel:
    """What the evaluation nodes use of a detector: a name, thresholds, ``to`` and ``predict``.

    ``predict`` returns the channel mean of each image as its map and the map's mean as its score, so the test knows
    the exact map every image must get.
    """

    def __init__(self, pixel: float | None = 0.5, image: float | None = 0.45) -> None:
        self.name = "stub"
        self.thresholds = Thresholds(pixel=pixel, image=image)
        self.devices: list[torch.device] = []

    def to(self, device: Any) -> StubModel:
        self.devices.append(torch.device(device))
        return self

    def predict(self, batch: torch.Tensor) -> DetectorOutput:
        maps = batch.mean(dim=1).numpy()
        return DetectorOutput(scores=maps.mean(axis=(1, 2)), maps=maps)


def _row(relpath: str, split: str, label: str, lighting: str, mask_relpath: str = "", size: int = 4) -> dict:
    """A manifest row with the columns of preprocessing's ``build_manifest`` (identity geometry)."""
    return {
        "category": "widget",
        "relpath": relpath,
        "split": split,
        "official_split": split,
        "label": label,
        "lighting": lighting,
        "has_mask": bool(mask_relpath),
        "mask_relpath": mask_relpath,
        "path": f"/raw/widget/{relpath}",
        "src_width": size,
        "src_height": size,
        "dst_width": size,
        "dst_height": size,
        "scale_x": 1.0,
        "scale_y": 1.0,
        "pad_x": 0,
        "pad_y": 0,
    }


def _scores_table(rows: list[dict], scores: list[float]) -> pd.DataFrame:
    """The table ``score_images`` returns, for hand-made scores."""
    table = pd.DataFrame(rows)[["relpath", "split", "label", "lighting", "has_mask", "mask_relpath", *GEOMETRY_COLUMNS]]
    table = table.copy()
    table["score"] = scores
    table["map_key"] = table["relpath"].map(map_key)
    table["predicted_anomalous"] = table["score"] >= 0.45
    return table


def mlflow_rows(metrics: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, value, step) as kedro-mlflow's MlflowMetricsHistoryDataset would log them (raises on a bad format)."""
    dataset = MlflowMetricsHistoryDataset(prefix="widget.stub")
    return list(chain.from_iterable(dataset._build_args_list_from_metric_item(k, v) for k, v in metrics.items()))


# ----------------------------------------------------------------------------------------------------------------------
# score_images
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def scored_store(tmp_path: Path) -> tuple[pd.DataFrame, ImageStore]:
    """Images of every split with distinct grey levels (so each map is recognisable), 6x8 pixels."""
    store = ImageStore(tmp_path / "store")
    rng = np.random.default_rng(3)
    rows = [
        _row("train/good/000_regular.png", "train", "good", "regular"),
        _row("train/good/001_regular.png", "train", "good", "regular"),
        _row("validation/good/000_regular.png", "validation", "good", "regular"),
        _row("test_public/good/000_regular.png", "test_public", "good", "regular"),
        _row("test_public/bad/000_overexposed.png", "test_public", "bad", "overexposed", "gt/000_overexposed_mask.png"),
        _row("test_private/000_regular.png", "test_private", "unknown", "regular"),
        _row("test_private_mixed/000_mixed.png", "test_private_mixed", "unknown", "mixed"),
    ]
    for row in rows:
        store.write(row["relpath"], rng.integers(0, 256, (6, 8), dtype=np.uint8))
    return pd.DataFrame(rows), store


def test_score_images_writes_one_map_per_scored_image(
    tmp_path: Path, scored_store: tuple[pd.DataFrame, ImageStore]
) -> None:
    manifest, store = scored_store
    maps = MapStore(tmp_path / "maps")
    model = StubModel(image=0.5)
    table, speed = score_images(model, manifest, store, maps, {"splits": ["validation", "test_public"]}, RUNTIME)

    scored = manifest[manifest["split"] != "train"]
    assert table["relpath"].tolist() == scored["relpath"].tolist()
    assert list(table.columns) == [
        "relpath",
        "split",
        "label",
        "lighting",
        "has_mask",
        "mask_relpath",
        *GEOMETRY_COLUMNS,
        "score",
        "map_key",
        "predicted_anomalous",
    ]
    assert table.index.tolist() == list(range(len(scored)))
    assert table["map_key"].tolist() == [f"maps/{r[:-4]}.npy" for r in scored["relpath"]]
    written = sorted(p.relative_to(maps.root).as_posix() for p in maps.root.rglob("*") if p.is_file())
    assert written == sorted(table["map_key"])  # one map per image, none for train
    for row in table.itertuples():
        image = store.read(row.relpath).astype(np.float32) / 255.0
        np.testing.assert_allclose(maps.read_map(row.map_key), image, rtol=1e-3, atol=1e-6)
        assert row.score == pytest.approx(float(image.mean()), rel=1e-6)
        assert row.predicted_anomalous == (row.score >= 0.5)
    assert model.devices == [torch.device("cpu")]
    assert set(speed) == {"inference_seconds", "inference_images_per_s"}
    assert all(v["step"] == 0 and v["value"] >= 0 for v in speed.values())
    assert mlflow_rows(speed)


def test_score_images_always_scores_the_private_splits(
    tmp_path: Path, scored_store: tuple[pd.DataFrame, ImageStore]
) -> None:
    manifest, store = scored_store
    table, _ = score_images(
        StubModel(image=None), manifest, store, MapStore(tmp_path / "m"), {"splits": ["test_public"]}, RUNTIME
    )
    assert table["split"].tolist() == ["test_public", "test_public", "test_private", "test_private_mixed"]
    assert not table["predicted_anomalous"].any()  # no image threshold: nothing is flagged


# ----------------------------------------------------------------------------------------------------------------------
# compute_metrics on a hand-made case
# ----------------------------------------------------------------------------------------------------------------------

# 4x4 maps. Pixel threshold 0.5, image threshold 0.45.
#   A regular/good  score .1  all 0
#   B regular/bad   score .9  1.0 on its 2x2 defect (rows 0-1, cols 0-1)
#   C overexp./good score .5  0.6 at (0, 0)
#   D overexp./bad  score .4  1.0 on half its defect (row 2, cols 2-3) and 1.0 at (0, 0), (0, 1) outside it
#   E shift_1/good  score .2  all 0                        (a lighting group without defects: NaN metrics)
#   V1, V2 validation/good scores .3 and .5 (maps are never read for validation)


def _trapezoid_to(x: list[float], y: list[float], limit: float) -> float:
    """Normalised area under the polyline (x, y) from 0 to ``limit`` (interpolated), computed by hand."""
    area = 0.0
    for x0, y0, x1, y1 in zip(x[:-1], y[:-1], x[1:], y[1:], strict=True):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area / limit


@pytest.fixture
def hand_made(tmp_path: Path) -> tuple[pd.DataFrame, ImageStore, MapStore, list[dict]]:
    store = ImageStore(tmp_path / "store")
    maps = MapStore(tmp_path / "maps")
    mask_b = np.zeros((4, 4), np.uint8)
    mask_b[0:2, 0:2] = 255
    mask_d = np.zeros((4, 4), np.uint8)
    mask_d[2:4, 2:4] = 255
    map_a = np.zeros((4, 4), np.float32)
    map_b = (mask_b > 0).astype(np.float32)
    map_c = np.zeros((4, 4), np.float32)
    map_c[0, 0] = 0.6
    map_d = np.zeros((4, 4), np.float32)
    map_d[2, 2:4] = 1.0
    map_d[0, 0:2] = 1.0
    rows = [
        _row("validation/good/000_regular.png", "validation", "good", "regular"),
        _row("validation/good/001_regular.png", "validation", "good", "regular"),
        _row("test_public/good/000_regular.png", "test_public", "good", "regular"),
        _row("test_public/bad/001_regular.png", "test_public", "bad", "regular", "mask/001_regular_mask.png"),
        _row("test_public/good/002_overexposed.png", "test_public", "good", "overexposed"),
        _row(
            "test_public/bad/003_overexposed.png", "test_public", "bad", "overexposed", "mask/003_overexposed_mask.png"
        ),
        _row("test_public/good/004_shift_1.png", "test_public", "good", "shift_1"),
    ]
    store.write("mask/001_regular_mask.png", mask_b)
    store.write("mask/003_overexposed_mask.png", mask_d)
    for row, anomaly_map in zip(rows[2:], (map_a, map_b, map_c, map_d, map_a), strict=True):
        maps.write_map(map_key(row["relpath"]), anomaly_map)
        store.write(row["relpath"], np.full((4, 4), 100, np.uint8))  # only the heat-map figure reads images
    table = _scores_table(rows, [0.3, 0.5, 0.1, 0.9, 0.5, 0.4, 0.2])
    return table, store, maps, rows


EXPECTED_ALL = {
    "n_images": 5.0,
    "n_bad": 2.0,
    "image_auroc": 5 / 6,  # B beats A, C, E; D beats A, E only
    "image_aupr": 0.5 * 1 + 0.5 * 2 / 3,  # ranking B, C, D, E, A
    "class_f1": 0.5,  # B tp, C fp, D fn
    "pixel_auroc": (6 * (70 + 0.5 * 2) + 2 * (0.5 * 69)) / (8 * 72),  # 8 defect pixels, 72 defect-free
    "au_pro_005": _trapezoid_to([0, 2 / 72, 3 / 72, 1], [0, 0.75, 0.75, 1], 0.05),
    "au_pro_03": _trapezoid_to([0, 2 / 72, 3 / 72, 1], [0, 0.75, 0.75, 1], 0.3),
    "seg_f1": 12 / 17,  # tp 6, fp 3, fn 2
    "seg_precision": 6 / 9,
    "seg_recall": 6 / 8,
}
EXPECTED_REGULAR = {
    "n_images": 2.0,
    "n_bad": 1.0,
    "image_auroc": 1.0,
    "image_aupr": 1.0,
    "class_f1": 1.0,
    "pixel_auroc": 1.0,
    "au_pro_005": 1.0,
    "au_pro_03": 1.0,
    "seg_f1": 1.0,
    "seg_precision": 1.0,
    "seg_recall": 1.0,
}
EXPECTED_OVEREXPOSED = {
    "n_images": 2.0,
    "n_bad": 1.0,
    "image_auroc": 0.0,
    "image_aupr": 0.5,
    "class_f1": 0.0,
    "pixel_auroc": (2 * (26 + 0.5 * 2) + 2 * (0.5 * 25)) / (4 * 28),
    "au_pro_005": 0.175,  # (0,0) → (1/14, 0.5): 0.35 at FPR 0.05
    "au_pro_03": _trapezoid_to([0, 2 / 28, 3 / 28, 1], [0, 0.5, 0.5, 1], 0.3),
    "seg_f1": 4 / 9,  # tp 2, fp 3, fn 2
    "seg_precision": 2 / 5,
    "seg_recall": 2 / 4,
}


def _assert_metrics(got: dict[str, float], expected: dict[str, float]) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_compute_metrics_exact_values(hand_made: tuple[pd.DataFrame, ImageStore, MapStore, list[dict]]) -> None:
    table, store, maps, _ = hand_made
    model = StubModel(pixel=0.5, image=0.45)
    report, flat = compute_metrics(table, store, maps, model)
    assert report["model"] == "stub"
    assert report["thresholds"] == {"pixel": 0.5, "image": 0.45, "rule": "", "stats": {}}
    assert set(report["test_public"]) == {"all", "regular", "overexposed", "shift_1"}
    _assert_metrics(report["test_public"]["all"], EXPECTED_ALL)
    _assert_metrics(report["test_public"]["regular"], EXPECTED_REGULAR)
    _assert_metrics(report["test_public"]["overexposed"], EXPECTED_OVEREXPOSED)
    shift = report["test_public"]["shift_1"]
    assert shift["n_images"] == 1.0 and shift["n_bad"] == 0.0
    for key in ("image_auroc", "image_aupr", "class_f1", "pixel_auroc", "au_pro_005", "au_pro_03", "seg_f1"):
        assert shift[key] is None, key  # NaN is written as null: strict JSON has no NaN
    assert report["validation"] == {"n_images": 2.0, "image_false_alarm_rate": 0.5, "mean_score": pytest.approx(0.4)}

    assert flat["test_public.all.image_auroc"] == {"value": pytest.approx(5 / 6), "step": 0}
    assert flat["test_public.all.au_pro_005"]["value"] == pytest.approx(EXPECTED_ALL["au_pro_005"])
    assert flat["test_public.overexposed.seg_f1"]["value"] == pytest.approx(4 / 9)
    assert flat["validation.image_false_alarm_rate"] == {"value": 0.5, "step": 0}
    assert flat["test_public.shift_1.n_images"] == {"value": 1.0, "step": 0}
    assert "test_public.shift_1.image_auroc" not in flat  # NaN: kept in the report, left out of MLflow
    expected_keys = {
        f"test_public.{group}.{key}"
        for group, section in report["test_public"].items()
        for key, value in section.items()
        if value is not None
    } | {f"validation.{key}" for key in report["validation"]}
    assert set(flat) == expected_keys
    assert len(flat) == 3 * 11 + 2 + 3
    rows = mlflow_rows(flat)
    assert all(math.isfinite(value) and step == 0 for _, value, step in rows)


def test_compute_metrics_without_thresholds_skips_threshold_metrics(
    hand_made: tuple[pd.DataFrame, ImageStore, MapStore, list[dict]],
) -> None:
    table, store, maps, _ = hand_made
    report, flat = compute_metrics(table, store, maps, StubModel(pixel=None, image=None))
    assert not {"class_f1", "seg_f1", "seg_precision", "seg_recall"} & set(report["test_public"]["all"])
    assert report["test_public"]["all"]["image_auroc"] == pytest.approx(5 / 6)
    assert report["validation"] == {}
    assert not any(k.startswith("validation.") for k in flat)


def test_compute_metrics_without_test_public(hand_made: tuple[pd.DataFrame, ImageStore, MapStore, list[dict]]) -> None:
    table, store, maps, _ = hand_made
    report, flat = compute_metrics(table[table["split"] == "validation"], store, maps, StubModel())
    assert report["test_public"] == {}
    assert set(flat) == {"validation.n_images", "validation.image_false_alarm_rate", "validation.mean_score"}


def test_missing_mask_file_is_a_mask_error(hand_made: tuple[pd.DataFrame, ImageStore, MapStore, list[dict]]) -> None:
    table, store, maps, _ = hand_made
    store.path("mask/003_overexposed_mask.png").unlink()
    with pytest.raises(MaskError, match="missing") as info:
        compute_metrics(table, store, maps, StubModel())
    assert str(store.path("mask/003_overexposed_mask.png")) in str(info.value)


def test_bad_image_without_mask_is_never_scored_as_good(
    hand_made: tuple[pd.DataFrame, ImageStore, MapStore, list[dict]],
) -> None:
    table, store, maps, _ = hand_made
    table.loc[table["relpath"] == "test_public/bad/001_regular.png", ["has_mask", "mask_relpath"]] = (False, "")
    with pytest.raises(MaskError, match=r"test_public/bad/001_regular\.png.*no ground-truth mask"):
        compute_metrics(table, store, maps, StubModel())


def test_mask_of_the_wrong_size_is_a_mask_error(
    hand_made: tuple[pd.DataFrame, ImageStore, MapStore, list[dict]],
) -> None:
    table, store, maps, _ = hand_made
    store.write("mask/001_regular_mask.png", np.zeros((5, 4), np.uint8))
    with pytest.raises(MaskError, match=r"001_regular_mask\.png.*shape"):
        compute_metrics(table, store, maps, StubModel())


def test_missing_map_names_it(hand_made: tuple[pd.DataFrame, ImageStore, MapStore, list[dict]]) -> None:
    table, store, maps, _ = hand_made
    (maps.root / "maps/test_public/good/002_overexposed.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"002_overexposed\.npy"):
        compute_metrics(table, store, maps, StubModel())


# ----------------------------------------------------------------------------------------------------------------------
# plot_evaluation
# ----------------------------------------------------------------------------------------------------------------------


def test_plot_evaluation_returns_the_four_figures(
    hand_made: tuple[pd.DataFrame, ImageStore, MapStore, list[dict]],
) -> None:
    table, store, maps, _ = hand_made
    figures = plot_evaluation(table, store, maps, StubModel(), {"examples_per_group": 2})
    assert list(figures) == ["roc.png", "pro_curve.png", "score_histogram.png", "heatmaps.png"]
    assert all(isinstance(fig, Figure) for fig in figures.values())
    roc_ax = figures["roc.png"].axes[0]
    assert roc_ax.get_legend().get_texts()[0].get_text() == "AUROC 0.833"
    pro_line = figures["pro_curve.png"].axes[0].lines[0]
    assert max(pro_line.get_xdata()) <= 0.3
    assert pro_line.get_ydata()[-1] == pytest.approx(0.75)  # the PRO plateau before FPR 0.3
    histogram = figures["score_histogram.png"].axes[0]
    assert [t.get_text() for t in histogram.get_legend().get_texts()] == [
        "validation good",
        "test good",
        "test bad",
        "image threshold",
    ]
    assert histogram.lines[-1].get_xdata()[0] == pytest.approx(0.45)
    heat = figures["heatmaps.png"]
    titled = [ax.get_title() for ax in heat.axes if ax.get_title()]
    assert len(heat.axes) == 6  # 3 rows (worst misses, false alarms, detected) x 2
    assert titled[0].startswith("worst miss: 003_overexposed.png")
    assert sum(t.startswith("false alarm:") for t in titled) == 2
    assert any(t.startswith("detected: 001_regular.png") for t in titled)
    figures["heatmaps.png"].savefig(store.root / "heat.png")  # closed figures can still be saved by the dataset
    assert (store.root / "heat.png").stat().st_size > 0


# ----------------------------------------------------------------------------------------------------------------------
# export_submission
# ----------------------------------------------------------------------------------------------------------------------


def _private_case(tmp_path: Path) -> tuple[pd.DataFrame, pd.DataFrame, MapStore]:
    """Private images of native 40x20 letterboxed onto a 32x32 canvas (content 32x16 at pad_y 8)."""
    geometry = Geometry.plan(40, 20, 32, 32, "letterbox")
    assert (geometry.pad_x, geometry.pad_y, geometry.content_width, geometry.content_height) == (0, 8, 32, 16)
    maps = MapStore(tmp_path / "maps")
    rows = []
    canvases = {}
    left_half = np.full((32, 32), 9.0, np.float32)  # padding far above the threshold: it must be cropped away
    left_half[8:24, :16], left_half[8:24, 16:] = 1.0, 0.0
    constant = np.full((32, 32), 9.0, np.float32)
    constant[8:24, :] = 0.25
    for relpath, split, canvas in (
        ("test_private/000_regular.png", "test_private", left_half),
        ("test_private/001_overexposed.png", "test_private", constant),
        ("test_private_mixed/000_mixed.png", "test_private_mixed", left_half),
        ("test_public/good/000_regular.png", "test_public", constant),
    ):
        row = _row(relpath, split, "unknown" if split != "test_public" else "good", "regular", size=32)
        row |= geometry.to_dict()
        rows.append(row)
        canvases[relpath] = canvas
        maps.write_map(map_key(relpath), canvas)
    manifest = pd.DataFrame(rows)
    for col in ("src_width", "src_height", "dst_width", "dst_height", "pad_x", "pad_y"):
        manifest[col] = manifest[col].astype("int64")
    return manifest, _scores_table(rows, [0.1, 0.2, 0.3, 0.4]), maps


def test_export_writes_native_size_tiffs_and_thresholded_pngs(tmp_path: Path) -> None:
    manifest, table, maps = _private_case(tmp_path)
    submission = MapStore(tmp_path / "submission")
    summary = export_submission(table, manifest, maps, submission, StubModel(pixel=0.5))
    assert summary == {"model": "stub", "written": {"test_private": 2, "test_private_mixed": 1}, "threshold": 0.5}
    files = sorted(p.relative_to(submission.root).as_posix() for p in submission.root.rglob("*") if p.is_file())
    assert files == [
        "anomaly_images/widget/test_private/000_regular.tiff",
        "anomaly_images/widget/test_private/001_overexposed.tiff",
        "anomaly_images/widget/test_private_mixed/000_mixed.tiff",
        "anomaly_images_thresholded/widget/test_private/000_regular.png",
        "anomaly_images_thresholded/widget/test_private/001_overexposed.png",
        "anomaly_images_thresholded/widget/test_private_mixed/000_mixed.png",
    ]
    constant = tifffile.imread(submission.root / "anomaly_images/widget/test_private/001_overexposed.tiff")
    assert constant.dtype == np.float16 and constant.shape == (20, 40)  # native H x W
    np.testing.assert_array_equal(constant, np.full((20, 40), 0.25, np.float16))
    half = tifffile.imread(submission.root / "anomaly_images/widget/test_private/000_regular.tiff")
    assert half.dtype == np.float16 and half.shape == (20, 40)
    assert half.max() <= 1.0  # no padding value (9.0) leaked into the native map
    expected = np.zeros((20, 40), np.uint8)
    expected[:, :20] = 255  # content columns 0-15 of 32 cover native columns 0-19 of 40
    for split, stem in (("test_private", "000_regular"), ("test_private_mixed", "000_mixed")):
        binary = cv2.imread(str(submission.root / f"anomaly_images_thresholded/widget/{split}/{stem}.png"), -1)
        assert binary.dtype == np.uint8 and binary.shape == (20, 40)
        np.testing.assert_array_equal(binary, expected)
    empty = cv2.imread(str(submission.root / "anomaly_images_thresholded/widget/test_private/001_overexposed.png"), -1)
    assert not empty.any()


def test_export_without_pixel_threshold_writes_only_tiffs(tmp_path: Path) -> None:
    manifest, table, maps = _private_case(tmp_path)
    submission = MapStore(tmp_path / "submission")
    summary = export_submission(table, manifest, maps, submission, StubModel(pixel=None))
    assert summary["written"] == {"test_private": 2, "test_private_mixed": 1}
    assert len(list(submission.root.rglob("*.tiff"))) == 3
    assert not list(submission.root.rglob("*.png"))


def test_export_without_private_rows_writes_nothing(tmp_path: Path) -> None:
    manifest, table, maps = _private_case(tmp_path)
    submission = MapStore(tmp_path / "submission")
    summary = export_submission(table[table["split"] == "test_public"], manifest, maps, submission, StubModel())
    assert summary == {"model": "stub", "written": {}, "threshold": 0.5}
    assert not submission.root.exists()


# ----------------------------------------------------------------------------------------------------------------------
# Letterboxed categories (sheet_metal): padding is not part of the image
# ----------------------------------------------------------------------------------------------------------------------


def test_letterbox_padding_is_not_counted_as_defect_free_pixels(tmp_path: Path) -> None:
    from madfh_pipeline import metrics as M

    geometry = Geometry.plan(32, 8, 16, 16, "letterbox")  # content 16x4 at rows 6-9
    top, height = geometry.pad_y, geometry.content_height
    assert (top, height, geometry.content_width) == (6, 4, 16)
    store = ImageStore(tmp_path / "store")
    good = np.zeros((16, 16), np.uint8)
    good[top : top + height] = 100
    good[7, 3] = 180
    bad = good.copy()
    bad[7, 3] = 100
    bad[6, 0] = 180
    mask = np.zeros((16, 16), np.uint8)
    mask[7:9, 10:12] = 255
    bad[7:9, 10:12] = 200
    bad[8, 11] = 100  # one defect pixel the model misses
    rows = [
        _row("test_public/good/000_regular.png", "test_public", "good", "regular", size=16),
        _row("test_public/bad/000_regular.png", "test_public", "bad", "regular", "gt/000_regular_mask.png", 16),
    ]
    for row, image in zip(rows, (good, bad), strict=True):
        row |= geometry.to_dict()
        store.write(row["relpath"], image)
    store.write("gt/000_regular_mask.png", mask)
    maps = MapStore(tmp_path / "maps")
    table, _ = score_images(StubModel(), pd.DataFrame(rows), store, maps, {"splits": ["test_public"]}, RUNTIME)
    report, _ = compute_metrics(table, store, maps, StubModel())

    crop = slice(top, top + height)
    content_maps = [maps.read_map(k)[crop] for k in table["map_key"]]
    content_masks = [np.zeros((height, 16), bool), mask[crop] > 0]
    expected_auroc = M.pixel_auroc(content_masks, content_maps)
    expected_pro = M.au_pro(content_masks, content_maps, 0.05)
    assert report["test_public"]["all"]["pixel_auroc"] == pytest.approx(expected_auroc)
    assert report["test_public"]["all"]["au_pro_005"] == pytest.approx(expected_pro)
