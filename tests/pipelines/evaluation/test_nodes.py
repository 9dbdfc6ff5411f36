"""Tests of the evaluation nodes: scoring plans, exact benchmark metrics (canvas mode), figures and the export.

The metric tests use hand-made anomaly maps written straight to a MapStore and a stub model (a name, thresholds and a
fingerprint), so every expected value below is computed by hand from the 4x4 maps. Native-resolution metrics (the
streaming accumulator) are tested with the metrics module; here the manifest geometry is the identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from matplotlib.figure import Figure

from madfh_pipeline.datasets import ImageStore, MapStore, MapWrites, SubmissionDataset
from madfh_pipeline.datasets.map_store import map_key
from madfh_pipeline.imaging import GEOMETRY_COLUMNS, Geometry
from madfh_pipeline.metrics import MaskError
from madfh_pipeline.models.base import DetectorOutput, Thresholds, stable_hash
from madfh_pipeline.pipelines.evaluation.nodes import (
    collect_scores,
    compute_metrics,
    export_submission,
    flat_metrics,
    pick_examples,
    plot_evaluation,
    score_images,
)

RUNTIME = {"device": "cpu", "batch_size": 2}
CANVAS = {"resolution": "canvas", "examples_per_group": 2}
CATEGORY = {"name": "widget", "width": 4, "height": 4, "channels": 1}
NO_EXPLANATIONS = pd.DataFrame(columns=["relpath", "grounded"])


class StubModel:
    """What the evaluation nodes use of a detector: a name, thresholds, a fingerprint, ``to`` and ``predict``.

    ``predict`` returns the channel mean of each image as its map and the map's mean as its score, so the test knows
    the exact map every image must get. ``calls`` counts the images it scored.
    """

    def __init__(self, pixel: float | None = 0.5, image: float | None = 0.45) -> None:
        self.name = "stub"
        self.thresholds = Thresholds(pixel=pixel, image=image)
        self.devices: list[torch.device] = []
        self.calls = 0

    @property
    def fingerprint(self) -> str:
        return stable_hash({"name": self.name, "thresholds": self.thresholds.to_dict()})

    def to(self, device: Any) -> StubModel:
        self.devices.append(torch.device(device))
        return self

    def predict(self, batch: torch.Tensor) -> DetectorOutput:
        self.calls += len(batch)
        maps = batch.mean(dim=1).numpy()
        return DetectorOutput(scores=maps.mean(axis=(1, 2)), maps=maps)


def _scores_table(rows: list[dict], scores: list[float], threshold: float = 0.45) -> pd.DataFrame:
    """The table ``collect_scores`` returns, for hand-made scores."""
    table = pd.DataFrame(rows)[["relpath", "split", "label", "lighting", "has_mask", "mask_relpath", *GEOMETRY_COLUMNS]]
    table = table.copy()
    table["score"] = scores
    table["map_key"] = table["relpath"].map(map_key)
    table["predicted_anomalous"] = table["score"] >= threshold
    return table


# ----------------------------------------------------------------------------------------------------------------------
# score_images (a plan) and collect_scores
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def scored_store(tmp_path: Path, make_manifest_row: Callable[..., dict]) -> tuple[pd.DataFrame, ImageStore]:
    """Images of every split with random grey levels (so each map is recognisable), 6x8 pixels."""
    store = ImageStore(tmp_path / "store")
    rng = np.random.default_rng(3)
    row = make_manifest_row
    rows = [
        row("train/good/000_regular.png", "train", "good", "regular"),
        row("train/good/001_regular.png", "train", "good", "regular"),
        row("validation/good/000_regular.png", "validation", "good", "regular"),
        row("test_public/good/000_regular.png", "test_public", "good", "regular"),
        row("test_public/bad/000_overexposed.png", "test_public", "bad", "overexposed", "gt/000_overexposed_mask.png"),
        row("test_private/000_regular.png", "test_private", "unknown", "regular"),
        row("test_private_mixed/000_mixed.png", "test_private_mixed", "unknown", "mixed"),
    ]
    for r in rows:
        store.write(r["relpath"], rng.integers(0, 256, (6, 8), dtype=np.uint8))
    return pd.DataFrame(rows), store


def test_score_images_plans_every_scored_image_and_the_store_writes_their_maps(
    tmp_path: Path, scored_store: tuple[pd.DataFrame, ImageStore]
) -> None:
    manifest, store = scored_store
    model = StubModel(image=0.5)
    plan = score_images(model, manifest, store, {"splits": ["validation", "test_public"]}, RUNTIME)
    assert isinstance(plan, MapWrites)
    scored = manifest[manifest["split"] != "train"]
    assert [k for k, _ in plan.items] == scored["relpath"].tolist()  # train is never scored
    assert all(fp.startswith(f"{model.fingerprint}|") for _, fp in plan.items)
    assert model.calls == 0  # a plan: nothing is scored until the store carries it out

    maps = MapStore(tmp_path / "maps")
    maps.apply(plan)
    assert model.devices == [torch.device("cpu")]
    written = sorted(p.relative_to(maps.root).as_posix() for p in maps.root.rglob("*.npy"))
    assert written == sorted(map_key(k) for k in scored["relpath"])
    table, speed = collect_scores(maps, manifest, model)
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
    assert table["relpath"].tolist() == scored["relpath"].tolist()
    assert table.index.tolist() == list(range(len(scored)))
    for row in table.itertuples():
        image = store.read(row.relpath).astype(np.float32) / 255.0
        np.testing.assert_allclose(maps.read_map(row.map_key), image, rtol=1e-6, atol=1e-7)
        assert row.score == pytest.approx(float(image.mean()), rel=1e-6)
        assert row.predicted_anomalous == (row.score >= 0.5)
    assert set(speed) == {"inference_seconds", "inference_images_per_s", "n_scored", "n_maps_reused"}
    assert (speed["n_scored"], speed["n_maps_reused"]) == (5.0, 0.0)


def test_scoring_again_reuses_the_maps_until_the_model_changes(
    tmp_path: Path, scored_store: tuple[pd.DataFrame, ImageStore]
) -> None:
    manifest, store = scored_store
    maps = MapStore(tmp_path / "maps")
    evaluation = {"splits": ["validation", "test_public"]}
    maps.apply(score_images(StubModel(), manifest, store, evaluation, RUNTIME))
    same = StubModel()
    maps.apply(score_images(same, manifest, store, evaluation, RUNTIME))
    assert same.calls == 0
    assert collect_scores(maps, manifest, same)[1]["n_maps_reused"] == 5.0
    recalibrated = StubModel(pixel=0.7)  # other thresholds: another model fingerprint, so every map is stale
    maps.apply(score_images(recalibrated, manifest, store, evaluation, RUNTIME))
    assert recalibrated.calls == 5


def test_score_images_always_scores_the_private_splits(
    tmp_path: Path, scored_store: tuple[pd.DataFrame, ImageStore]
) -> None:
    manifest, store = scored_store
    maps = MapStore(tmp_path / "m")
    model = StubModel(image=None)
    maps.apply(score_images(model, manifest, store, {"splits": ["test_public"]}, RUNTIME))
    table, _ = collect_scores(maps, manifest, model)
    assert table["split"].tolist() == ["test_public", "test_public", "test_private", "test_private_mixed"]
    assert not table["predicted_anomalous"].any()  # no image threshold: nothing is flagged


# ----------------------------------------------------------------------------------------------------------------------
# compute_metrics (canvas mode) on a hand-made case
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


HandMade = tuple[pd.DataFrame, ImageStore, MapStore, list[dict]]


@pytest.fixture
def hand_made(tmp_path: Path, make_manifest_row: Callable[..., dict]) -> HandMade:
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

    def row(relpath: str, split: str, label: str, lighting: str, mask: str = "") -> dict:
        return make_manifest_row(relpath, split, label, lighting, mask, size=4)

    rows = [
        row("validation/good/000_regular.png", "validation", "good", "regular"),
        row("validation/good/001_regular.png", "validation", "good", "regular"),
        row("test_public/good/000_regular.png", "test_public", "good", "regular"),
        row("test_public/bad/001_regular.png", "test_public", "bad", "regular", "mask/001_regular_mask.png"),
        row("test_public/good/002_overexposed.png", "test_public", "good", "overexposed"),
        row(
            "test_public/bad/003_overexposed.png", "test_public", "bad", "overexposed", "mask/003_overexposed_mask.png"
        ),
        row("test_public/good/004_shift_1.png", "test_public", "good", "shift_1"),
    ]
    store.write("mask/001_regular_mask.png", mask_b)
    store.write("mask/003_overexposed_mask.png", mask_d)
    for r, anomaly_map in zip(rows[2:], (map_a, map_b, map_c, map_d, map_a), strict=True):
        maps.write_map(map_key(r["relpath"]), anomaly_map)
        store.write(r["relpath"], np.full((4, 4), 100, np.uint8))  # only the heat-map figure reads images
    table = _scores_table(rows, [0.3, 0.5, 0.1, 0.9, 0.5, 0.4, 0.2])
    return table, store, maps, rows


EXPECTED_ALL = {
    "n_images": 5.0,
    "n_bad": 2.0,
    "image_auroc": 5 / 6,  # B beats A, C, E; D beats A, E only
    "image_aupr": 0.5 * 1 + 0.5 * 2 / 3,  # ranking B, C, D, E, A
    "class_f1": 0.5,  # B tp, C fp, D fn
    "image_recall": 0.5,  # B found, D missed
    "image_false_alarm_rate": 1 / 3,  # C of A, C, E
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
    "image_recall": 1.0,
    "image_false_alarm_rate": 0.0,
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
    "image_recall": 0.0,
    "image_false_alarm_rate": 1.0,
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


def _metrics(hand: HandMade, model: StubModel | None = None, table: pd.DataFrame | None = None) -> tuple[dict, dict]:
    scores, store, maps, _ = hand
    raw = ImageStore(store.root, read_only=True)  # canvas mode never reads the raw masks
    return compute_metrics(scores if table is None else table, maps, store, raw, model or StubModel(), CANVAS)


PIXEL_KEYS = ("pixel_auroc", "au_pro_005", "au_pro_03", "seg_f1", "seg_precision", "seg_recall")


def test_compute_metrics_exact_values(hand_made: HandMade) -> None:
    report, flat = _metrics(hand_made, StubModel(pixel=0.5, image=0.45))
    assert report["model"] == "stub" and report["resolution"] == "canvas"
    assert report["thresholds"] == {"pixel": 0.5, "image": 0.45, "rule": "", "stats": {}}
    assert set(report["test_public"]) == {"all", "regular", "overexposed", "shift_1"}
    _assert_metrics(report["test_public"]["all"], EXPECTED_ALL)
    _assert_metrics(report["test_public"]["regular"], EXPECTED_REGULAR)
    _assert_metrics(report["test_public"]["overexposed"], EXPECTED_OVEREXPOSED)
    shift = report["test_public"]["shift_1"]
    assert shift["n_images"] == 1.0 and shift["n_bad"] == 0.0
    assert shift["image_false_alarm_rate"] == 0.0
    for key in ("image_auroc", "image_aupr", "class_f1", "pixel_auroc", "au_pro_005", "au_pro_03", "seg_f1"):
        assert shift[key] is None, key  # NaN is written as null: strict JSON has no NaN
    assert report["validation"] == {"n_images": 2.0, "image_false_alarm_rate": 0.5, "mean_score": pytest.approx(0.4)}
    assert report["seconds"] >= 0


def test_flat_metrics_are_short_keys_for_the_detector_run(hand_made: HandMade, mlflow_points: Callable) -> None:
    report, flat = _metrics(hand_made)
    # image metrics by name; pixel metrics named canvas.<metric> (never mistaken for native benchmark numbers)
    assert flat["image_auroc"] == pytest.approx(5 / 6)
    assert flat["canvas.au_pro_005"] == pytest.approx(EXPECTED_ALL["au_pro_005"])
    assert flat["canvas.seg_f1"] == pytest.approx(12 / 17)
    assert "au_pro_005" not in flat and "seg_f1" not in flat
    assert flat["canvas.seg_f1.overexposed"] == pytest.approx(4 / 9)
    assert flat["image_auroc.regular"] == 1.0
    assert flat["val_image_false_alarm_rate"] == 0.5
    assert flat["n_images.shift_1"] == 1.0
    assert "image_auroc.shift_1" not in flat  # NaN: kept in the report, left out of MLflow
    expected_keys = set()
    for group, section in report["test_public"].items():
        for key, value in section.items():
            if value is not None:
                name = f"canvas.{key}" if key in PIXEL_KEYS else key
                expected_keys.add(name if group == "all" else f"{name}.{group}")
    expected_keys |= {f"val_{key}" for key in report["validation"]}
    assert set(flat) == expected_keys
    points = mlflow_points(flat)
    assert len(points) == len(flat) and all(math.isfinite(value) and step == 0 for _, value, step in points)


def test_flat_metrics_of_a_native_report_carry_no_prefix() -> None:
    report = {
        "resolution": "native",
        "test_public": {"all": {"image_auroc": 0.9, "au_pro_005": 0.4, "au_pro_005_bound": 1e-4}},
        "validation": {"mean_score": 1.5},
    }
    assert flat_metrics(report) == {
        "image_auroc": 0.9,
        "au_pro_005": 0.4,
        "au_pro_005_bound": 1e-4,
        "val_mean_score": 1.5,
    }


def test_compute_metrics_without_thresholds_skips_threshold_metrics(hand_made: HandMade) -> None:
    report, flat = _metrics(hand_made, StubModel(pixel=None, image=None))
    threshold_keys = {"class_f1", "image_recall", "image_false_alarm_rate", "seg_f1", "seg_precision", "seg_recall"}
    assert not threshold_keys & set(report["test_public"]["all"])
    assert report["test_public"]["all"]["image_auroc"] == pytest.approx(5 / 6)
    assert report["validation"] == {}
    assert not any(k.startswith("val_") for k in flat)


def test_compute_metrics_without_test_public(hand_made: HandMade, caplog: pytest.LogCaptureFixture) -> None:
    table = hand_made[0]
    report, flat = _metrics(hand_made, table=table[table["split"] == "validation"])
    assert report["test_public"] == {}
    assert set(flat) == {"val_n_images", "val_image_false_alarm_rate", "val_mean_score"}
    assert "No test_public images" in caplog.text


def test_unknown_resolution_is_refused(hand_made: HandMade) -> None:
    table, store, maps, _ = hand_made
    with pytest.raises(ValueError, match="evaluation.resolution must be one of"):
        compute_metrics(table, maps, store, store, StubModel(), {"resolution": "thumbnail"})


def test_missing_mask_file_is_a_mask_error(hand_made: HandMade) -> None:
    store = hand_made[1]
    store.path("mask/003_overexposed_mask.png").unlink()
    with pytest.raises(MaskError, match="missing") as info:
        _metrics(hand_made)
    assert str(store.path("mask/003_overexposed_mask.png")) in str(info.value)


def test_bad_image_without_mask_is_never_scored_as_good(hand_made: HandMade) -> None:
    table = hand_made[0]
    table.loc[table["relpath"] == "test_public/bad/001_regular.png", ["has_mask", "mask_relpath"]] = (False, "")
    with pytest.raises(MaskError, match=r"test_public/bad/001_regular\.png.*no ground-truth mask"):
        _metrics(hand_made)


def test_mask_of_the_wrong_size_is_a_mask_error(hand_made: HandMade) -> None:
    hand_made[1].write("mask/001_regular_mask.png", np.zeros((5, 4), np.uint8))
    with pytest.raises(MaskError, match=r"001_regular_mask\.png.*shape"):
        _metrics(hand_made)


def test_missing_map_names_it(hand_made: HandMade) -> None:
    (hand_made[2].root / "maps/test_public/good/002_overexposed.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"002_overexposed\.npy"):
        _metrics(hand_made)


# ----------------------------------------------------------------------------------------------------------------------
# the heat-map grid's groups: chosen by the threshold, never by rank
# ----------------------------------------------------------------------------------------------------------------------


def _test_rows(good: list[float], bad: list[float]) -> pd.DataFrame:
    rows = [{"relpath": f"test_public/good/{i:03d}.png", "label": "good", "score": s} for i, s in enumerate(good)]
    rows += [{"relpath": f"test_public/bad/{i:03d}.png", "label": "bad", "score": s} for i, s in enumerate(bad)]
    return pd.DataFrame(rows)


def test_pick_examples_the_case_from_the_issue() -> None:
    """Threshold 27.73: the only bad image (27.8) is detected, and no good image (all below) is a false alarm."""
    test = _test_rows(good=[27.6, 26.4, 25.9], bad=[27.8])
    groups = pick_examples(test, per_group=3, threshold=27.73)
    assert groups["missed"].empty
    assert groups["false alarm"].empty
    assert groups["detected"]["score"].tolist() == [27.8]


@pytest.mark.parametrize("seed", range(25))
def test_pick_examples_never_contradicts_the_threshold(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(30, 3, int(rng.integers(2, 30))), int(rng.integers(0, 3)))
    labels = rng.random(len(scores)) < 0.5
    test = _test_rows(good=scores[~labels].tolist(), bad=scores[labels].tolist())
    # thresholds at, between and beyond the scores (ties included)
    threshold = float(rng.choice(np.concatenate([scores, scores + 0.05, [scores.min() - 1, scores.max() + 1]])))
    per_group = int(rng.integers(1, 5))
    groups = pick_examples(test, per_group, threshold)
    assert set(groups) == {"missed", "false alarm", "detected"}
    assert (groups["missed"]["label"] == "bad").all() and (groups["missed"]["score"] < threshold).all()
    assert (groups["false alarm"]["label"] == "good").all() and (groups["false alarm"]["score"] >= threshold).all()
    assert (groups["detected"]["label"] == "bad").all() and (groups["detected"]["score"] >= threshold).all()
    bad, good = test[test["label"] == "bad"], test[test["label"] == "good"]
    # each group holds as many as it may, and the most telling ones (lowest misses, highest alarms and detections)
    expected = {
        "missed": bad[bad["score"] < threshold]["score"].nsmallest(per_group),
        "false alarm": good[good["score"] >= threshold]["score"].nlargest(per_group),
        "detected": bad[bad["score"] >= threshold]["score"].nlargest(per_group),
    }
    for name, want in expected.items():
        assert sorted(groups[name]["score"]) == sorted(want), name


def test_pick_examples_needs_a_threshold() -> None:
    with pytest.raises(ValueError, match="calibrate the model first"):
        pick_examples(_test_rows([1.0], [2.0]), 2, None)


# ----------------------------------------------------------------------------------------------------------------------
# plot_evaluation
# ----------------------------------------------------------------------------------------------------------------------


def _titles(figure: Figure) -> list[str]:
    return [ax.get_title() for ax in figure.axes if ax.get_title()]


def test_plot_evaluation_returns_the_four_named_figures(hand_made: HandMade) -> None:
    table, store, maps, _ = hand_made
    report, _ = _metrics(hand_made)
    model = StubModel()
    figures = plot_evaluation(table, maps, store, model, report, NO_EXPLANATIONS, CANVAS, CATEGORY, "demo")
    assert list(figures) == ["roc.png", "pro_curve.png", "score_histogram.png", "heatmaps.png"]
    assert all(isinstance(fig, Figure) for fig in figures.values())
    for name, figure in figures.items():  # which category, which detector, which data: on every figure
        heading = figure._suptitle.get_text() if figure._suptitle else _titles(figure)[0]
        assert "widget · stub · demo data" in heading, name
    roc_ax = figures["roc.png"].axes[0]
    legend = [t.get_text() for t in roc_ax.get_legend().get_texts()]
    assert legend[0] == "AUROC 0.833"
    assert legend[1].startswith("image threshold 0.45\n(FPR 0.33, TPR 0.50)")  # the operating point: C, B of D
    pro_line = figures["pro_curve.png"].axes[0].lines[0]
    assert max(pro_line.get_xdata()) <= 0.3
    assert pro_line.get_ydata()[-1] == pytest.approx(0.75)  # the PRO plateau before FPR 0.3
    histogram = figures["score_histogram.png"].axes[0]
    assert [t.get_text() for t in histogram.get_legend().get_texts()] == [
        "validation good (2)",
        "test good (3)",
        "test bad (2)",
        "image threshold 0.45",
    ]
    figures["heatmaps.png"].savefig(store.root / "heat.png")  # closed figures can still be saved by the dataset
    assert (store.root / "heat.png").stat().st_size > 0


def test_heatmap_grid_rows_follow_the_threshold(hand_made: HandMade) -> None:
    table, store, maps, _ = hand_made
    report, _ = _metrics(hand_made)
    explanations = pd.DataFrame(
        {"relpath": ["test_public/bad/001_regular.png"], "grounded": ["one small defect in the upper left."]}
    )
    heat = plot_evaluation(table, maps, store, StubModel(), report, explanations, CANVAS, CATEGORY, "real")[
        "heatmaps.png"
    ]
    titles = _titles(heat)
    assert titles == [
        "MISSED: 003_overexposed.png\nscore 0.4 < 0.45",
        "FALSE ALARM: 002_overexposed.png\nscore 0.5 ≥ 0.45",
        "DETECTED: 001_regular.png\nscore 0.9 ≥ 0.45",
    ]
    assert "widget · stub · real data" in heat._suptitle.get_text()
    texts = [t.get_text() for ax in heat.axes for t in ax.texts]
    assert any("upper left" in t for t in texts)  # the flagged image's explanation is shown under it
    # a threshold above every score: no detection and no false alarm, every defect a miss
    strict = StubModel(image=2.0)
    grid = plot_evaluation(table, maps, store, strict, report, NO_EXPLANATIONS, CANVAS, CATEGORY, "real")[
        "heatmaps.png"
    ]
    assert [t.split(":")[0] for t in _titles(grid)] == ["MISSED", "MISSED"]
    texts = [t.get_text() for ax in grid.axes for t in ax.texts]
    assert "no good image at or above\nthe image threshold" in texts
    assert "no defective image at or above\nthe image threshold" in texts


def test_no_heatmap_grid_without_an_image_threshold(hand_made: HandMade) -> None:
    table, store, maps, _ = hand_made
    model = StubModel(image=None)
    report, _ = _metrics(hand_made, model)
    figures = plot_evaluation(table, maps, store, model, report, NO_EXPLANATIONS, CANVAS, CATEGORY, "demo")
    assert list(figures) == ["roc.png", "pro_curve.png", "score_histogram.png"]


# ----------------------------------------------------------------------------------------------------------------------
# export_submission
# ----------------------------------------------------------------------------------------------------------------------


def _private_case(tmp_path: Path, make_manifest_row: Callable[..., dict]) -> tuple[pd.DataFrame, MapStore]:
    """Private images of native 40x20 letterboxed onto a 32x32 canvas (content 32x16 at pad_y 8)."""
    geometry = Geometry.plan(40, 20, 32, 32, "letterbox")
    assert (geometry.pad_x, geometry.pad_y, geometry.content_width, geometry.content_height) == (0, 8, 32, 16)
    maps = MapStore(tmp_path / "maps")
    rows = []
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
        label = "unknown" if split != "test_public" else "good"
        rows.append(make_manifest_row(relpath, split, label, "regular", size=32) | geometry.to_dict())
        maps.write_map(map_key(relpath), canvas)
    return _scores_table(rows, [0.1, 0.2, 0.3, 0.4]), maps


def test_export_writes_native_size_tiffs_and_thresholded_pngs(
    tmp_path: Path, make_manifest_row: Callable[..., dict]
) -> None:
    table, maps = _private_case(tmp_path, make_manifest_row)
    files, summary = export_submission(table, maps, StubModel(pixel=0.5), CATEGORY)
    assert summary == {"model": "stub", "written": {"test_private": 2, "test_private_mixed": 1}, "threshold": 0.5}
    assert all(callable(render) for render in files.values())  # rendered one at a time by the dataset
    assert sorted(files) == [
        "anomaly_images/widget/test_private/000_regular.tiff",
        "anomaly_images/widget/test_private/001_overexposed.tiff",
        "anomaly_images/widget/test_private_mixed/000_mixed.tiff",
        "anomaly_images_thresholded/widget/test_private/000_regular.png",
        "anomaly_images_thresholded/widget/test_private/001_overexposed.png",
        "anomaly_images_thresholded/widget/test_private_mixed/000_mixed.png",
    ]
    root = tmp_path / "submission"
    SubmissionDataset(path=str(root)).save(files)
    constant = tifffile.imread(root / "anomaly_images/widget/test_private/001_overexposed.tiff")
    assert constant.dtype == np.float16 and constant.shape == (20, 40)  # native H x W
    np.testing.assert_array_equal(constant, np.full((20, 40), 0.25, np.float16))
    half = tifffile.imread(root / "anomaly_images/widget/test_private/000_regular.tiff")
    assert half.dtype == np.float16 and half.shape == (20, 40)
    assert half.max() <= 1.0  # no padding value (9.0) leaked into the native map
    expected = np.zeros((20, 40), np.uint8)
    expected[:, :20] = 255  # content columns 0-15 of 32 cover native columns 0-19 of 40
    for split, stem in (("test_private", "000_regular"), ("test_private_mixed", "000_mixed")):
        binary = cv2.imread(str(root / f"anomaly_images_thresholded/widget/{split}/{stem}.png"), -1)
        assert binary.dtype == np.uint8 and binary.shape == (20, 40)
        np.testing.assert_array_equal(binary, expected)
    empty = cv2.imread(str(root / "anomaly_images_thresholded/widget/test_private/001_overexposed.png"), -1)
    assert not empty.any()


def test_export_without_pixel_threshold_writes_only_tiffs(
    tmp_path: Path, make_manifest_row: Callable[..., dict]
) -> None:
    table, maps = _private_case(tmp_path, make_manifest_row)
    files, summary = export_submission(table, maps, StubModel(pixel=None), CATEGORY)
    assert summary["written"] == {"test_private": 2, "test_private_mixed": 1}
    assert len(files) == 3 and all(name.endswith(".tiff") for name in files)


def test_export_without_private_rows_writes_nothing(tmp_path: Path, make_manifest_row: Callable[..., dict]) -> None:
    table, maps = _private_case(tmp_path, make_manifest_row)
    files, summary = export_submission(table[table["split"] == "test_public"], maps, StubModel(), CATEGORY)
    assert files == {}
    assert summary == {"model": "stub", "written": {}, "threshold": 0.5}


# ----------------------------------------------------------------------------------------------------------------------
# Letterboxed categories (sheet_metal): padding is not part of the image
# ----------------------------------------------------------------------------------------------------------------------


def test_letterbox_padding_is_not_counted_as_defect_free_pixels(
    tmp_path: Path, make_manifest_row: Callable[..., dict]
) -> None:
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
        make_manifest_row("test_public/good/000_regular.png", "test_public", "good", "regular", size=16),
        make_manifest_row(
            "test_public/bad/000_regular.png", "test_public", "bad", "regular", "gt/000_regular_mask.png", 16
        ),
    ]
    for row, image in zip(rows, (good, bad), strict=True):
        row |= geometry.to_dict()
        store.write(row["relpath"], image)
    store.write("gt/000_regular_mask.png", mask)
    manifest = pd.DataFrame(rows)
    maps = MapStore(tmp_path / "maps")
    model = StubModel()
    maps.apply(score_images(model, manifest, store, {"splits": ["test_public"]}, RUNTIME))
    table, _ = collect_scores(maps, manifest, model)
    report, _ = compute_metrics(table, maps, store, store, model, CANVAS)

    crop = slice(top, top + height)
    content_maps = [maps.read_map(k)[crop] for k in table["map_key"]]
    content_masks = [np.zeros((height, 16), bool), mask[crop] > 0]
    expected_auroc = M.pixel_auroc(content_masks, content_maps)
    expected_pro = M.au_pro(content_masks, content_maps, 0.05)
    assert report["test_public"]["all"]["pixel_auroc"] == pytest.approx(expected_auroc)
    assert report["test_public"]["all"]["au_pro_005"] == pytest.approx(expected_pro)
