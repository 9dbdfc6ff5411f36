"""The inspection nodes without Kedro: a folder with broken files, the map store, the knowledge base, the REVIEW band.

Real components throughout: a PatchCore fitted and calibrated on rendered sheet-metal scenes
(:func:`madfh_pipeline.serving.demo.build_demo_model`), published to an :class:`InspectionModelStore` folder, a real
folder listing (:class:`ImageFolderDataset`), the real :class:`MapStore` carrying out the node's plan, and a real
SQLite knowledge base written through :class:`InspectionRecordsDataset`, as the catalog does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest

from madfh_pipeline.datasets import ImageFolderDataset
from madfh_pipeline.datasets.knowledge_base import InspectionModelStore, InspectionRecordsDataset
from madfh_pipeline.datasets.map_store import MapStore
from madfh_pipeline.demo.synth import SceneSpec
from madfh_pipeline.feedback import KnowledgeBase, image_content_id, sqlite_url
from madfh_pipeline.imaging import read_image
from madfh_pipeline.inspection import InspectionModel
from madfh_pipeline.pipelines.inspection.nodes import inspect_images, publish_inspection_model, record_inspections
from madfh_pipeline.serving.demo import build_demo_model, render_defective, render_normals

CATEGORY = {"name": "sheet_metal", "width": 96, "height": 80, "channels": 1}
SPEC = SceneSpec("sheet_metal", 96, 80, 1)
#: Inspection parameters as in conf/base (batch of 8 so that the broken files share a batch with good ones).
INSPECTION = {"enabled": True, "detector": "patchcore", "batch_size": 8, "embeddings": True, "review_band_std": 1.0}
#: Files that cannot be inspected, and a word their error must contain.
BROKEN = {"c_corrupt.png": "corrupt", "d_empty.png": "empty", "e_tiny.png": "too small"}
REPORT_KEYS = {"anomaly_detection", "similar_cases", "generated_description", "processing_time"}


def band_decision(score: float, threshold: float, half_width: float) -> str:
    """The documented rule: OK below ``threshold - w``, NG at or above ``threshold + w``, REVIEW in between."""
    if score >= threshold + half_width:
        return "NG"
    return "OK" if score < threshold - half_width else "REVIEW"


@pytest.fixture(scope="module")
def model() -> InspectionModel:
    """A PatchCore fitted on six rendered scenes, calibrated on three, inspecting at a 64² canvas."""
    return build_demo_model("sheet_metal", 96, 80, 1, n_train=6, n_validation=3, canvas=(64, 64))


def _write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image), path
    return path


@dataclass
class Line:
    """An inspection station: the published model, its registration, a drop folder and the stores it writes."""

    folder: Path
    models: InspectionModelStore
    kb_path: Path
    active: Any
    maps: MapStore

    def listing(self) -> pd.DataFrame:
        return ImageFolderDataset(str(self.folder)).load()

    def inspect(self, band: dict[str, float] | None = None) -> dict[str, Any]:
        """Run ``inspect_images`` and let the map store carry out its plan; returns the store's write statistics."""
        plan = inspect_images(self.listing(), self.models, self.active, INSPECTION, band or {}, CATEGORY)
        return self.maps.apply(plan)

    def record(self) -> tuple[pd.DataFrame, dict[str, dict[str, Any]], dict[str, Any]]:
        kb = KnowledgeBase(sqlite_url(self.kb_path))
        try:
            records, reports, metrics, _ = record_inspections(self.maps, self.listing(), self.active, CATEGORY, kb)
        finally:
            kb.close()
        InspectionRecordsDataset(CATEGORY["name"], path=str(self.kb_path)).save(records)
        return records, reports, metrics

    def stored(self) -> pd.DataFrame:
        """The category's inspections as the knowledge base holds them."""
        kb = KnowledgeBase(sqlite_url(self.kb_path))
        try:
            return kb.snapshot(CATEGORY["name"]).inspections
        finally:
            kb.close()


@pytest.fixture
def line(tmp_path: Path, model: InspectionModel) -> Iterator[Line]:
    """Two normal scenes, two defective ones and the three broken files of :data:`BROKEN`, in one drop folder.

    Sorted by name the broken files sit between the good ones, so with a batch of 8 all seven share one batch.
    """
    folder = tmp_path / "inbox"
    for i, image in enumerate(render_normals(SPEC, 2, seed=21)):
        _write(folder / f"a_good_{i}.png", image)
    for i in range(2):
        image, _ = render_defective(SPEC, seed=30 + i, size_px=24, kinds=["missing_piece"])
        _write(folder / f"b_bad_{i}.png", image)
    (folder / "c_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 16)
    (folder / "d_empty.png").write_bytes(b"")
    _write(folder / "e_tiny.png", np.full((8, 8), 128, np.uint8))  # decodes, but below the inspection's 16 px
    (folder / "notes.txt").write_text("not an image")
    models = InspectionModelStore(tmp_path / "models")
    published, registration = publish_inspection_model(
        model.detector, CATEGORY, {"target_width": 64, "target_height": 64, "mode": "stretch"}, INSPECTION
    )
    models.add(published)
    kb_path = tmp_path / "kb" / "knowledge_base.sqlite"
    kb = KnowledgeBase.embedded(kb_path)
    info = dict(registration)
    kb.register_model_version(CATEGORY["name"], info.pop("version"), **info)
    active = kb.active_model_version(CATEGORY["name"])
    kb.close()
    yield Line(folder, models, kb_path, active, MapStore(tmp_path / "maps"))


def test_published_version_is_content_addressed(model: InspectionModel) -> None:
    params = {"target_width": 64, "target_height": 64, "mode": "stretch"}
    first, registration = publish_inspection_model(model.detector, CATEGORY, params, INSPECTION)
    again, _ = publish_inspection_model(model.detector, CATEGORY, params, INSPECTION)
    assert first.version == again.version == f"patchcore@{model.detector.fingerprint[:12]}"
    assert registration["detector"] == "patchcore"
    assert registration["metrics"] == {
        "threshold_image": model.detector.thresholds.image,
        "threshold_pixel": model.detector.thresholds.pixel,
    }


def test_broken_files_are_errors_with_their_path_and_every_other_image_is_inspected(
    line: Line, model: InspectionModel
) -> None:
    listing = line.listing()
    assert sorted(Path(p).name for p in listing["path"]) == sorted(
        [*(f"a_good_{i}.png" for i in range(2)), *(f"b_bad_{i}.png" for i in range(2)), *BROKEN]
    )  # notes.txt is not an image
    stats = line.inspect()
    assert stats["n_images"] == stats["n_scored"] == 7

    scored = line.maps.scores().set_index("relpath")
    by_name = {Path(path).name: image_id for image_id, path in zip(listing["image_id"], listing["path"], strict=True)}
    for name, word in BROKEN.items():
        row = scored.loc[by_name[name]]
        assert row["decision"] == "ERROR", name
        assert np.isnan(row["score"]) and row["map_key"] == "", name
        assert row["path"] == str(line.folder / name)
        assert word in row["error"].lower(), (name, row["error"])
    names = ["a_good_0.png", "a_good_1.png", "b_bad_0.png", "b_bad_1.png"]
    # the tiny file in the same batch did not cost its neighbours their inspection: the scores of the model itself
    direct = model.inspect_batch([read_image(line.folder / name) for name in names], names)
    for name, result in zip(names, direct, strict=True):
        row = scored.loc[by_name[name]]
        assert row["score"] == pytest.approx(result.score, rel=1e-5), name
        assert row["decision"] == model.decide(row["score"]) and row["error"] == "", name
        assert line.maps.read_map(row["map_key"]).shape == (64, 64)
    assert {scored.loc[by_name[f"b_bad_{i}.png"], "decision"] for i in range(2)} == {"NG"}
    assert {scored.loc[by_name[f"a_good_{i}.png"], "decision"] for i in range(2)} == {"OK"}


def test_records_reach_the_knowledge_base_and_reports_keep_the_original_keys(line: Line) -> None:
    line.inspect()
    records, reports, metrics = line.record()
    stored = line.stored().set_index("image_path")
    assert len(stored) == 7
    for name in BROKEN:
        row = stored.loc[str(line.folder / name)]
        assert row["decision"] == "ERROR" and row["error"], name
        assert pd.isna(row["score"]) and pd.isna(row["threshold"]), name
        assert row["image_id"] == image_content_id(line.folder / name)
    scored = stored[stored["decision"] != "ERROR"]
    assert set(scored["decision"]) == {"OK", "NG"}
    assert scored["error"].isna().all() and scored["score"].notna().all()
    assert (scored["model_version"] == line.active.version).all()

    assert set(reports) == set(records["image_id"])
    for image_id, report in reports.items():
        assert REPORT_KEYS <= set(report), image_id
        detection = report["anomaly_detection"]
        assert {"is_anomaly", "score", "threshold"} <= set(detection)
        assert detection["is_anomaly"] == (detection["decision"] == "NG")
        assert isinstance(report["similar_cases"], list)
        if detection["decision"] == "ERROR":
            assert detection["score"] is None and report["error"]
        else:
            assert report["generated_description"] and report["processing_time"] > 0
    assert metrics["n_error"]["value"] == 3.0 and metrics["n_images"]["value"] == 7.0
    assert metrics["n_ok"]["value"] + metrics["n_ng"]["value"] == 4.0


def test_inspecting_again_scores_nothing_and_records_no_duplicate(line: Line) -> None:
    line.inspect()
    line.record()
    first = line.stored()
    stats = line.inspect()
    assert (stats["n_scored"], stats["n_reused"]) == (0, 7)  # errors too: a broken file is not retried forever
    line.record()
    again = line.stored()
    assert len(again) == len(first) == 7
    assert sorted(again["id"]) == sorted(first["id"])
    assert not again.duplicated(["image_id", "model_version"]).any()


def test_the_review_band_set_in_the_app_changes_decisions(line: Line, model: InspectionModel) -> None:
    line.inspect()
    default = line.maps.scores().set_index("relpath")
    stats = line.inspect({"sheet_metal": 10.0, "another_category": 0.0})
    assert stats["n_scored"] == 7  # another band, another decision: every image again
    wide = line.maps.scores().set_index("relpath")
    sigma = float(model.detector.thresholds.stats["image_std"])
    threshold = model.threshold
    scored = wide[wide["decision"] != "ERROR"]
    assert np.allclose(scored["review_low"], threshold - 10.0 * sigma)
    assert np.allclose(scored["review_high"], threshold + 10.0 * sigma)
    for key, row in scored.iterrows():
        assert row["decision"] == band_decision(row["score"], threshold, 10.0 * sigma), key
        assert row["score"] == pytest.approx(default.loc[key, "score"], rel=1e-6)  # the score does not move
    assert (scored["decision"] == "REVIEW").sum() > (default["decision"] == "REVIEW").sum()
    # a band of 0 is the plain threshold: nothing is left for review
    line.inspect({"sheet_metal": 0.0})
    plain = line.maps.scores()
    assert "REVIEW" not in set(plain["decision"])
    assert set(plain.loc[plain["decision"] != "ERROR", "decision"]) == {"OK", "NG"}
