"""The feedback loop end to end: inspect → operators' verdicts → ``feedback_<category>`` → inspect again.

One loop per module (a category run is the expensive part), in a temp project of its own: sheet metal with visible
defects, PatchCore only, the inspection stage on with a REVIEW band of 2 σ (so that some normal parts are flagged and
become confirmed false alarms). The operator answers with the ground truth through the real
:class:`~madfh_pipeline.feedback.KnowledgeBase` API, choosing the button the review app offers for each decision
(:func:`~madfh_pipeline.feedback.valid_actions`). Each test then checks one part of what the loop left behind.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from madfh_pipeline.app.feedback_run import describe_steps, read_feedback_report
from madfh_pipeline.datasets.knowledge_base import InspectionModelStore
from madfh_pipeline.feedback import ACTIONS, KnowledgeBase, ModelVersionInfo, valid_actions
from madfh_pipeline.feedback.learning import holdout_mask
from madfh_pipeline.inspection import InspectionModel

pytestmark = pytest.mark.slow

CATEGORY = "sheet_metal"
ENV = "loop"
COUNTS = {
    "train": 6,
    "validation": 3,
    "test_public_good": 6,
    "test_public_bad": 6,
    "test_private": 1,
    "test_private_mixed": 1,
}
KB_FILE = "data/09_knowledge_base/knowledge_base.sqlite"
REPORT = f"data/08_reporting/{CATEGORY}/feedback/report.json"
DESCRIPTION = "scratch across the sheet"


@dataclass(frozen=True)
class Loop:
    """Everything the loop left behind, read right after each step."""

    project: Path
    feedback_params: dict[str, Any]
    first: pd.DataFrame  # the knowledge base's inspections after the first inspection (model v1)
    labels: dict[str, int]  # image id → 1 defective / 0 good, as the operator answered
    versions: list[ModelVersionInfo]  # newest first
    active: ModelVersionInfo
    second: pd.DataFrame  # the inspections of the second inspection (the active version)
    models: dict[str, InspectionModel]  # version → the stored inspection model
    report: dict[str, Any]
    logs: dict[str, str]


def _truth(image_path: str) -> int:
    return int(Path(image_path).parent.name == "bad")


def _review(kb: KnowledgeBase, inspections: pd.DataFrame) -> dict[str, int]:
    """The operator's verdict on every scored inspection, through the button the app offers for its decision."""
    labels = {}
    for row in inspections.to_dict("records"):
        label = _truth(row["image_path"])
        verdict = "NG" if label else "OK"
        (action,) = [a for a in valid_actions(row["decision"]) if ACTIONS[a] == verdict]
        kb.record_feedback(
            int(row["id"]),
            action=action,
            operator="anna",
            confidence=4,
            description=DESCRIPTION if label else None,
        )
        labels[row["image_id"]] = label
    return labels


@pytest.fixture(scope="module")
def loop(
    tmp_path_factory: pytest.TempPathFactory,
    make_category_project: Callable[..., Path],
    run_kedro_session: Callable[..., str],
) -> Loop:
    parameters = {
        "detection": {"detectors": ["patchcore"]},
        "inspection": {"enabled": True, "detector": "patchcore", "review_band_std": 2.0},
    }
    folder = tmp_path_factory.mktemp("feedback_loop") / "project"
    project = make_category_project(folder, ENV, parameters, category=CATEGORY, counts=COUNTS, seed=5)
    logs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        patch.delenv("KEDRO_ENV", raising=False)
        logs["train"] = run_kedro_session(project, ENV, CATEGORY)  # train, calibrate, publish v1, inspect
        kb = KnowledgeBase.embedded(project / KB_FILE)
        try:
            first = kb.snapshot(CATEGORY).inspections
            labels = _review(kb, first)
            logs["feedback"] = run_kedro_session(project, ENV, f"feedback_{CATEGORY}")
            logs["inspect"] = run_kedro_session(project, ENV, f"inspect_{CATEGORY}")
            versions = kb.list_model_versions(CATEGORY)
            active = kb.active_model_version(CATEGORY)
            everything = kb.snapshot(CATEGORY).inspections
        finally:
            kb.close()
    store = InspectionModelStore(project / "data/06_models" / CATEGORY / "inspection")
    params = _feedback_params(project)
    return Loop(
        project=project,
        feedback_params=params,
        first=first,
        labels=labels,
        versions=versions,
        active=active,
        second=everything[everything["model_version"] == active.version].reset_index(drop=True),
        models={v.version: store.load(v.version) for v in versions},
        report=json.loads((project / REPORT).read_text()),
        logs=logs,
    )


def _feedback_params(project: Path) -> dict[str, Any]:
    import yaml

    return dict(yaml.safe_load((project / "conf/base/parameters_feedback.yml").read_text())["feedback"])


def _by_image(frame: pd.DataFrame) -> dict[str, dict[str, Any]]:
    return {row["image_id"]: row for row in frame.to_dict("records")}


def test_first_inspection_is_what_the_operator_reviewed(loop: Loop) -> None:
    assert len(loop.first) == COUNTS["test_public_good"] + COUNTS["test_public_bad"]
    assert set(loop.first["decision"]) <= {"OK", "NG", "REVIEW"}
    flagged_good = [i for i, row in _by_image(loop.first).items() if row["decision"] != "OK" and not loop.labels[i]]
    assert flagged_good, "the loop needs confirmed false alarms to learn from (REVIEW band 2σ)"


def test_feedback_registers_a_new_version_whose_parent_is_the_reviewed_one(loop: Loop) -> None:
    assert len(loop.versions) == 2
    new, old = loop.versions  # newest first
    assert set(loop.first["model_version"]) == {old.version}
    assert new.parent_version == old.version and old.parent_version is None
    assert loop.active.version == new.version  # inspection uses the newest version unless one is pinned
    assert new.detector == old.detector == "patchcore"
    assert new.version != old.version and new.version.startswith("patchcore@")
    assert "feedback of 12 operator labels" in (new.notes or "")
    assert new.metrics and "after_threshold" in new.metrics
    assert loop.models[new.version].detector.provenance["parent_version"] == old.version


def test_second_inspection_uses_the_new_threshold(loop: Loop) -> None:
    new, old = loop.versions
    before, after = loop.models[old.version], loop.models[new.version]
    assert after.threshold != pytest.approx(before.threshold)
    assert after.threshold == pytest.approx(loop.report["steps"]["threshold"]["after"])
    first, second = _by_image(loop.first), _by_image(loop.second)
    assert set(second) == set(first)  # every image inspected again by the new version, none twice
    assert not loop.second.duplicated("image_id").any()
    changed = []
    for image_id, row in second.items():
        assert row["threshold"] == pytest.approx(after.threshold), image_id
        assert row["decision"] == after.decide(row["score"]), image_id
        assert first[image_id]["decision"] == before.decide(first[image_id]["score"]), image_id
        if row["decision"] != first[image_id]["decision"]:
            changed.append(image_id)
    # the decisions that change are exactly those the two versions decide differently for the scores they compute
    expected = [i for i in second if after.decide(second[i]["score"]) != before.decide(first[i]["score"])]
    assert changed == expected
    assert changed, "feedback changed no decision of the second inspection"
    # the recalibrated threshold is the lowest score that still finds (1 - max_miss_rate) of the confirmed defects:
    # a score of one of them under the new version
    defect_scores = [row["score"] for i, row in second.items() if loop.labels[i]]
    assert min(abs(s - after.threshold) for s in defect_scores) == pytest.approx(0.0, abs=1e-4 * after.threshold)


def test_report_has_before_and_after_as_the_review_app_reads_it(loop: Loop) -> None:
    new, old = loop.versions
    report = read_feedback_report(loop.project / REPORT)  # the app's own reader checks the documented shape
    for side in (report.before, report.after):
        assert {"false_alarm_rate", "image_auroc", "threshold"} <= set(side)
        assert side["false_alarm_rate"] is not None and 0.0 <= side["false_alarm_rate"] <= 1.0
        assert side["image_auroc"] is not None and 0.0 <= side["image_auroc"] <= 1.0
    assert report.before["threshold"] == pytest.approx(loop.models[old.version].threshold)
    assert report.after["threshold"] == pytest.approx(loop.models[new.version].threshold)
    raw = loop.report
    assert (raw["model_version_before"], raw["model_version_after"]) == (old.version, new.version)
    assert raw["n_feedback"] == raw["n_labels"] == len(loop.labels)
    hold = holdout_mask(list(loop.labels), loop.feedback_params["holdout_fraction"], loop.feedback_params["salt"])
    assert (raw["n_holdout"], raw["n_calibration"]) == (int(hold.sum()), int((~hold).sum()))
    assert raw["before"]["n"] == raw["n_holdout"]  # before/after are measured on the held-out labels only


def test_each_step_is_its_own_mlflow_run(
    loop: Loop, mlflow_runs: Callable[..., list[Any]], detector_runs: Callable[[Path, Any], dict[str, Any]]
) -> None:
    new, old = loop.versions
    train, feedback, inspect = mlflow_runs(loop.project)  # the three `kedro run`s, oldest first
    assert [r.data.tags["pipeline"] for r in (train, feedback, inspect)] == [
        CATEGORY,
        f"feedback_{CATEGORY}",
        f"inspect_{CATEGORY}",
    ]
    for run in (train, feedback, inspect):
        assert run.info.status == "FINISHED"
        assert run.data.tags["category"] == CATEGORY and run.data.tags["data_source"] == "demo"
    # each model version points at the run that made it
    assert old.mlflow_run_id == detector_runs(loop.project, train)["patchcore"].info.run_id
    learned = detector_runs(loop.project, feedback)["feedback"]
    assert new.mlflow_run_id == learned.info.run_id
    assert learned.data.metrics["after.threshold"] == pytest.approx(loop.models[new.version].threshold)
    assert learned.data.metrics["before.threshold"] == pytest.approx(loop.models[old.version].threshold)
    # each step's decision is a metric too: the number of patches the bank grew by, whether the defect bank stayed
    steps = loop.report["steps"]
    assert learned.data.metrics["step.extend_bank.patches_added"] == steps["extend_bank"]["patches_added"]
    assert learned.data.metrics["step.defect_bank.kept"] == float(steps["defect_bank"]["kept"])
    # and the dashboard's plain-words summary of the same report: one line per step, the real numbers in it
    lines = describe_steps(steps)
    assert [line.split()[0] for line in lines] == [
        "Memory",
        "Defect" if steps["defect_bank"]["kept"] else "No",
        "Image",
    ]
    assert str(steps["extend_bank"]["patches_added"]) in lines[0] or "unchanged" in lines[0]
    assert f"{steps['threshold']['after']:.4f}" in lines[2]
    assert inspect.data.metrics[f"{CATEGORY}.inspection.n_images"] == len(loop.labels)


def test_operators_descriptions_join_the_explainers_training_set(loop: Loop) -> None:
    path = loop.project / f"data/05_model_input/{CATEGORY}/explainer/operator_descriptions.json"
    descriptions = json.loads(path.read_text())
    assert len(descriptions) == sum(loop.labels.values())  # one per defective part (good parts got no text)
    first = _by_image(loop.first)
    paths = {first[i]["image_path"] for i, label in loop.labels.items() if label}
    assert {d["image"] for d in descriptions} == paths
    assert {(d["description"], d["user"], d["confidence"]) for d in descriptions} == {(DESCRIPTION, "anna", 4)}


def test_confirmed_false_alarms_join_the_memory_bank_and_defects_form_a_defect_bank(loop: Loop) -> None:
    new, old = loop.versions
    steps = loop.report["steps"]
    extend = steps["extend_bank"]
    assert "skipped" not in extend, f"memory bank not extended: {extend}"
    assert extend["images"] > 0 and extend["patches_added"] > 0
    bank_before = loop.models[old.version].detector.memory_bank.shape[0]
    bank_after = loop.models[new.version].detector.memory_bank.shape[0]
    assert bank_after == bank_before + extend["patches_added"]
    defect = steps["defect_bank"]
    assert defect.get("reason") != "disabled or nothing to learn from", f"defect bank not tried: {defect}"
    # the normal variation an operator confirmed stops looking anomalous: those parts score lower than before
    first, second = _by_image(loop.first), _by_image(loop.second)
    hold = dict(
        zip(loop.labels, holdout_mask(list(loop.labels), loop.feedback_params["holdout_fraction"]), strict=True)
    )
    taught = [i for i, row in first.items() if row["decision"] != "OK" and not loop.labels[i] and not hold[i]]
    assert taught and all(second[i]["score"] < first[i]["score"] for i in taught), taught
