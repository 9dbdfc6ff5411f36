"""The inspection stage inside ``kedro run``: a drop folder with a corrupt file, the knowledge base, re-runs, the band.

Uses the shared :func:`inspected_run` (conftest): sheet metal trained with autoencoder + PatchCore, whose category
pipeline ended by inspecting ``data/inbox/sheet_metal`` — eight test_public images, the same part at twice the size, a
defective one as JPEG, a corrupt PNG and a text note — with PatchCore's calibrated model. Every test leaves the run as
it found it (a band it sets is removed and the default decisions restored), because other modules read the same run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from madfh_pipeline.app.review_settings import save_review_band
from madfh_pipeline.datasets.knowledge_base import InspectionModelStore
from madfh_pipeline.feedback import KnowledgeBase, image_content_id
from madfh_pipeline.inspection import InspectionModel

pytestmark = pytest.mark.slow

KB_FILE = "data/09_knowledge_base/knowledge_base.sqlite"
REVIEW_SETTINGS = "data/09_knowledge_base/review_settings.json"
REPORT_KEYS = {"anomaly_detection", "similar_cases", "generated_description", "processing_time"}


def _inspections(project: Path, category: str) -> pd.DataFrame:
    kb = KnowledgeBase.embedded(project / KB_FILE)
    try:
        return kb.snapshot(category).inspections
    finally:
        kb.close()


def _active_model(project: Path, category: str) -> tuple[Any, InspectionModel]:
    kb = KnowledgeBase.embedded(project / KB_FILE)
    try:
        active = kb.active_model_version(category)
    finally:
        kb.close()
    return active, InspectionModelStore(project / "data/06_models" / category / "inspection").load(active.version)


def _reports(project: Path, category: str) -> dict[str, dict[str, Any]]:
    folder = project / "data/08_reporting" / category / "inspection" / "reports"
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def _map_index(project: Path, category: str) -> pd.DataFrame:
    return pd.read_parquet(project / "data/07_model_output" / category / "inspection" / "_scores.parquet")


def _last_write(project: Path, category: str) -> dict[str, Any]:
    return json.loads((project / "data/07_model_output" / category / "inspection" / "_last_write.json").read_text())


@dataclass(frozen=True)
class Banded:
    """What a re-inspection with a REVIEW band of 10 σ set in the app left behind (before it was undone)."""

    log: str
    default: pd.DataFrame  # the map store's index before: decisions with the configured band
    index: pd.DataFrame  # ... and with the app's band
    last_write: dict[str, Any]
    reports: dict[str, dict[str, Any]]
    stored: pd.DataFrame  # the knowledge base's inspections
    restored: pd.DataFrame  # the map store's index after the band was removed and the folder inspected again


@pytest.fixture(scope="module")
def banded(inspected_run: Any, run_kedro_session: Callable[..., str]) -> Banded:
    """Set a band of 10 σ as the review app's Settings page does, re-inspect, record everything, then undo it."""
    run, category = inspected_run, inspected_run.category
    path = run.project / REVIEW_SETTINGS
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(run.project)
        default = _map_index(run.project, category).set_index("relpath")
        save_review_band(path, category, 10.0, "anna")
        try:
            log = run_kedro_session(run.project, run.env, f"inspect_{category}")
            index = _map_index(run.project, category).set_index("relpath")
            last_write = _last_write(run.project, category)
            reports = _reports(run.project, category)
            stored = _inspections(run.project, category)
        finally:
            save_review_band(path, category, None, "anna")
            run_kedro_session(run.project, run.env, f"inspect_{category}")
        restored = _map_index(run.project, category).set_index("relpath")
    return Banded(log, default, index, last_write, reports, stored, restored)


def test_category_run_inspects_the_drop_folder_and_records_the_corrupt_file(
    inspected_run: Any,
    monkeypatch: pytest.MonkeyPatch,
    mlflow_runs: Callable[..., list[Any]],
    detector_runs: Callable[[Path, Any], dict[str, Any]],
) -> None:
    run, category = inspected_run, inspected_run.category
    monkeypatch.chdir(run.project)
    inspections = _inspections(run.project, category)
    by_name = {Path(row["image_path"]).name: row for row in inspections.to_dict("records")}
    assert set(by_name) == set(run.files)  # every image once (notes.txt is no image), none lost
    for name, row in by_name.items():
        assert row["image_path"] == str(run.inbox / name)
        assert row["image_id"] == image_content_id(run.inbox / name)

    corrupt = by_name["corrupt.png"]
    assert corrupt["decision"] == "ERROR"
    assert "corrupt" in corrupt["error"] and str(run.inbox / "corrupt.png") in corrupt["error"]
    assert pd.isna(corrupt["score"]) and pd.isna(corrupt["threshold"])
    assert f"Cannot inspect '{run.inbox / 'corrupt.png'}'" in run.log

    active, model = _active_model(run.project, category)
    (parent,) = mlflow_runs(run.project, f"tags.pipeline = '{category}'")
    assert active.detector == "patchcore" and active.version.startswith("patchcore@")
    assert active.mlflow_run_id == detector_runs(run.project, parent)["patchcore"].info.run_id
    scored = {name: row for name, row in by_name.items() if name != "corrupt.png"}
    for name, row in scored.items():
        assert row["decision"] in ("OK", "NG", "REVIEW"), name
        assert row["error"] is None or pd.isna(row["error"]), name
        assert row["model_version"] == active.version, name
        assert row["threshold"] == pytest.approx(model.threshold)
        assert row["decision"] == model.decide(row["score"]), name
        assert Path(row["map_path"]).is_file(), name
    # a part whose defect PatchCore sees is NG in any format; a normal part at another size is inspected like any other
    assert scored["bad_as.jpg"]["decision"] == "NG"
    assert {row["decision"] for name, row in scored.items() if run.files[name] == "bad"} == {"NG"}
    assert scored["large.png"]["score"] == pytest.approx(scored[f"good_{_first_good(run)}"]["score"], rel=0.05)

    reports = _reports(run.project, category)
    assert set(reports) == set(inspections["image_id"])
    for row in by_name.values():
        report = reports[row["image_id"]]
        assert REPORT_KEYS <= set(report)
        detection = report["anomaly_detection"]
        assert detection["is_anomaly"] == (row["decision"] == "NG")
        assert detection["decision"] == row["decision"]
        if row["decision"] == "ERROR":
            assert detection["score"] is None and report["error"] == row["error"]
        else:
            assert detection["score"] == pytest.approx(row["score"])
            assert detection["threshold"] == pytest.approx(row["threshold"])
            assert report["generated_description"] == row["explanation"] and report["processing_time"] > 0
    metrics = parent.data.metrics
    assert metrics[f"{category}.inspection.n_images"] == len(run.files)
    assert metrics[f"{category}.inspection.n_error"] == 1.0


def _first_good(run: Any) -> str:
    """The test_public image ``large.png`` was made from (the first good one by name)."""
    return sorted(name for name, kind in run.files.items() if kind == "good")[0].removeprefix("good_")


def test_inspecting_again_scores_nothing_and_adds_no_record(
    inspected_run: Any,
    monkeypatch: pytest.MonkeyPatch,
    run_kedro_session: Callable[..., str],
    mlflow_runs: Callable[..., list[Any]],
) -> None:
    run, category = inspected_run, inspected_run.category
    monkeypatch.chdir(run.project)
    before = _inspections(run.project, category)
    log = run_kedro_session(run.project, run.env, f"inspect_{category}")
    assert _last_write(run.project, category) | {"seconds": 0} == {
        "n_images": len(run.files),
        "n_scored": 0,
        "n_reused": len(run.files),  # the corrupt file too: its error is recorded, not retried on every run
        "seconds": 0,
        "images_per_s": 0.0,
    }
    assert f"all {len(run.files)} maps reused (same model and images); no forward pass." in log
    assert "Inspecting " not in log  # the model was not even loaded
    after = _inspections(run.project, category)
    assert len(after) == len(before) == len(run.files)
    assert sorted(after["id"]) == sorted(before["id"])
    assert not after.duplicated(["image_id", "model_version"]).any()
    (inspect_run,) = mlflow_runs(run.project, f"tags.pipeline = 'inspect_{category}'")[-1:]
    assert inspect_run.info.status == "FINISHED"
    assert inspect_run.data.metrics[f"{category}.inspection.n_images"] == len(run.files)


def test_review_band_from_the_app_changes_the_decisions(inspected_run: Any, banded: Banded) -> None:
    run, category = inspected_run, inspected_run.category
    _, model = _active_model(run.project, category)
    sigma = float(model.detector.thresholds.stats["image_std"])
    assert f"REVIEW band 10.00 σ for {category} (set in the review app)." in banded.log
    assert banded.last_write["n_scored"] == len(run.files)  # another band: every image is decided again
    scored = banded.index[banded.index["decision"] != "ERROR"]
    for image_id, row in scored.iterrows():
        expected = _band_decision(row["score"], model.threshold, 10.0 * sigma)
        assert row["decision"] == expected, image_id
        assert banded.reports[image_id]["anomaly_detection"]["decision"] == expected, image_id
        assert row["score"] == pytest.approx(banded.default.loc[image_id, "score"], rel=1e-6)  # scores stay
    assert (scored["decision"] == "REVIEW").sum() > (banded.default["decision"] == "REVIEW").sum()
    # removing the band in the app brings the configured one back at the next run
    assert banded.restored["decision"].to_dict() == banded.default["decision"].to_dict()


def test_knowledge_base_keeps_the_decision_the_reports_show(banded: Banded) -> None:
    """After a re-inspection with another band, the knowledge base (what the review app shows, and what feedback is
    judged against) must agree with the report written for the same image and model version."""
    differing = {
        Path(row["image_path"]).name: (
            row["decision"],
            banded.reports[row["image_id"]]["anomaly_detection"]["decision"],
        )
        for row in banded.stored.to_dict("records")
        if row["decision"] != banded.reports[row["image_id"]]["anomaly_detection"]["decision"]
    }
    assert not differing, f"knowledge base vs report decision, same model version: {differing}"


def _band_decision(score: float, threshold: float, half_width: float) -> str:
    if score >= threshold + half_width:
        return "NG"
    return "OK" if score < threshold - half_width else "REVIEW"
