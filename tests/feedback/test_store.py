"""Writes through the store API: model versions, defect types, inspections and feedback, and what each refuses."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kb_support import CATEGORY, MODEL, T0, image_id, inspection_fields

from madfh_pipeline.feedback import (
    AlreadyExistsError,
    InspectionRecord,
    InUseError,
    KnowledgeBase,
    NotFoundError,
    UnknownDefectTypeError,
    ValidationError,
    image_content_id,
    valid_actions,
)

# ------------------------------------------------------------------------------------------------ model versions


def test_model_versions_lineage_newest_and_pinning(kb: KnowledgeBase) -> None:
    kb.register_model_version(CATEGORY, "v2", mlflow_run_id="run-2", parent=MODEL, created_at=T0 + timedelta(days=1))
    kb.register_model_version(CATEGORY, "v3", mlflow_run_id="run-3", parent="v2", created_at=T0 + timedelta(days=2))
    kb.register_model_version("sheet_metal", "v9", created_at=T0 + timedelta(days=5))

    # v1 was registered "now" by the fixture, so it is the newest; v3 is newest of the dated ones.
    assert [v.version for v in kb.list_model_versions(CATEGORY)] == [MODEL, "v3", "v2"]
    assert kb.get_model_version(CATEGORY, "v3").parent_version == "v2"
    assert kb.newest_model_version(CATEGORY).version == MODEL
    assert kb.pinned_model_version(CATEGORY) is None
    assert kb.active_model_version(CATEGORY).version == MODEL  # nothing pinned: the newest

    kb.pin_model_version(CATEGORY, "v2")
    pinned = kb.pin_model_version(CATEGORY, "v3")  # re-pinning moves the champion in one transaction
    assert pinned.is_champion
    assert [v.version for v in kb.list_model_versions(CATEGORY) if v.is_champion] == ["v3"]
    assert kb.active_model_version(CATEGORY).version == "v3"
    assert kb.pinned_model_version("sheet_metal") is None  # pins are per category

    kb.unpin_model_version(CATEGORY)
    assert kb.pinned_model_version(CATEGORY) is None
    with pytest.raises(NotFoundError):
        kb.pin_model_version(CATEGORY, "v404")
    with pytest.raises(NotFoundError):
        kb.active_model_version("fabric")


def test_register_is_idempotent_only_for_the_same_identity(kb: KnowledgeBase) -> None:
    again = kb.register_model_version(CATEGORY, MODEL, mlflow_run_id="run-1", detector="patchcore", exist_ok=True)
    assert again.id == kb.get_model_version(CATEGORY, MODEL).id
    with pytest.raises(AlreadyExistsError, match=r"already registered\.$"):
        kb.register_model_version(CATEGORY, MODEL, mlflow_run_id="run-1", detector="patchcore")
    with pytest.raises(AlreadyExistsError, match="different run id"):
        kb.register_model_version(CATEGORY, MODEL, mlflow_run_id="run-other", exist_ok=True)
    with pytest.raises(NotFoundError):
        kb.register_model_version(CATEGORY, "v2", parent="v404")
    with pytest.raises(ValidationError, match="plain JSON"):
        kb.register_model_version(CATEGORY, "v2", metrics={"auroc": float("nan")})
    stored = kb.register_model_version(CATEGORY, "v2", metrics={"auroc": 0.93, "thresholds": [1, 2]}, notes="ok")
    assert kb.get_model_version(CATEGORY, "v2").metrics == {"auroc": 0.93, "thresholds": [1, 2]} == stored.metrics


# -------------------------------------------------------------------------------------------------- defect types


def test_defect_type_crud(kb: KnowledgeBase, add_inspection: Callable[..., int]) -> None:
    added = kb.add_defect_type(CATEGORY, "  Missing   Thread ", "no thread cut")
    assert added.name == "missing thread"
    with pytest.raises(AlreadyExistsError):
        kb.add_defect_type(CATEGORY, "MISSING THREAD")
    kb.add_defect_type("sheet_metal", "scratch")  # the same name in another category is another type
    assert [d.name for d in kb.list_defect_types(CATEGORY)] == ["crack", "missing thread", "scratch"]

    kb.update_defect_type(CATEGORY, "missing thread", new_name="thread missing", description="no thread")
    with pytest.raises(AlreadyExistsError):
        kb.update_defect_type(CATEGORY, "thread missing", new_name="crack")

    # A used type can be retired (it stays on old feedback) but not deleted.
    used = add_inspection(12)
    kb.record_feedback(used, verdict="NG", defect_type="thread missing", operator="anna", confidence=4)
    with pytest.raises(InUseError, match="retire it instead"):
        kb.delete_defect_type(CATEGORY, "thread missing")
    kb.retire_defect_type(CATEGORY, "thread missing")
    assert "thread missing" not in [d.name for d in kb.list_defect_types(CATEGORY)]
    assert "thread missing" in [d.name for d in kb.list_defect_types(CATEGORY, include_retired=True)]
    assert kb.feedback_for(used)[0].defect_type == "thread missing"
    with pytest.raises(UnknownDefectTypeError, match="retired"):
        kb.record_feedback(used, verdict="NG", defect_type="thread missing", operator="bob", confidence=4)
    with pytest.raises(AlreadyExistsError, match="restore"):
        kb.add_defect_type(CATEGORY, "thread missing")
    assert kb.restore_defect_type(CATEGORY, "thread missing").active

    # A rename carries past feedback along (feedback refers to the type, not to its name).
    kb.update_defect_type(CATEGORY, "thread missing", new_name="no thread")
    assert kb.feedback_for(used)[0].defect_type == "no thread"

    kb.delete_defect_type(CATEGORY, "crack")
    assert [d.name for d in kb.list_defect_types(CATEGORY)] == ["no thread", "scratch"]
    with pytest.raises(UnknownDefectTypeError):
        kb.delete_defect_type(CATEGORY, "crack")


# --------------------------------------------------------------------------------------------------- inspections


def test_record_inspection_is_idempotent_by_image_and_model_version(
    kb: KnowledgeBase, caplog: pytest.LogCaptureFixture
) -> None:
    first = kb.record_inspection(**inspection_fields(3, explanation="looks fine"))
    assert first.created
    with caplog.at_level(logging.WARNING):
        again = kb.record_inspection(**inspection_fields(3, score=3.5, explanation="looks fine"))
    assert again == type(first)(id=first.id, created=False)
    assert "differed in: score" in caplog.text
    assert kb.get_inspection(first.id).score == 3.0  # the first record is kept

    # Same image, another model version: a new inspection of the same image.
    kb.register_model_version(CATEGORY, "v2")
    other = kb.record_inspection(**inspection_fields(3, model_version="v2"))
    assert other.created and other.id != first.id
    assert [i.model_version for i in kb.find_inspections(image_id(3))] == [MODEL, "v2"]


def test_inspection_round_trip(kb: KnowledgeBase, tmp_path: Path) -> None:
    image = tmp_path / "001_regular.png"
    image.write_bytes(b"\x89PNG fake bytes")
    recorded = kb.record_inspection(
        image_id=image_content_id(image),
        image_path=str(image),
        category=CATEGORY,
        model_version=MODEL,
        score=0.93,
        threshold=0.9,
        decision="REVIEW",
        map_path="maps/001.npy",
        explanation="bright spot near the thread",
        processing_time_s=0.41,
        inspected_at=datetime(2026, 3, 2, 10, 0, tzinfo=UTC) + timedelta(hours=1),
        embedding=np.arange(1, 9, dtype=np.float64),
        embedding_space="efficientnet_lite0/avgpool",
        attributes={"lighting": "regular", "split": "test_public", "data_source": "demo"},
    )
    stored = kb.get_inspection(recorded.id)
    assert stored.image_id == image_content_id(image.read_bytes())
    assert stored.inspected_at == datetime(2026, 3, 2, 11, 0, tzinfo=UTC)
    assert stored.inspected_at.tzinfo is not None
    assert stored.attributes == {"lighting": "regular", "split": "test_public", "data_source": "demo"}
    assert (stored.decision, stored.embedding_space, stored.processing_time_s) == (
        "REVIEW",
        "efficientnet_lite0/avgpool",
        0.41,
    )
    assert stored.margin == pytest.approx(0.03 / 0.9)


def test_unreadable_file_is_recorded_as_error(kb: KnowledgeBase) -> None:
    recorded = kb.record_inspection(
        image_id=image_id("broken"),
        image_path="/data/broken.png",
        category=CATEGORY,
        model_version=MODEL,
        decision="ERROR",
        error="cannot identify image file",
    )
    stored = kb.get_inspection(recorded.id)
    assert (stored.decision, stored.score, stored.error) == ("ERROR", None, "cannot identify image file")
    with pytest.raises(ValidationError, match="re-inspect"):
        kb.record_feedback(recorded.id, verdict="NG", operator="anna", confidence=3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image_id": "/data/001.png"}, "SHA-256"),
        ({"decision": "PASS"}, "Unknown decision"),
        ({"decision": "ERROR"}, "needs the error text"),
        ({"error": "unreadable"}, "use decision ERROR"),
        ({"score": float("nan")}, "finite"),
        ({"score": None}, "score and threshold"),
        ({"inspected_at": datetime(2026, 3, 2, 8, 0)}, "timezone-aware"),
        ({"embedding": [0.0, 0.0]}, "all zeros"),
        ({"embedding": [1.0, 2.0]}, "embedding_space is required"),
        ({"embedding_space": "x"}, "without an embedding"),
        ({"processing_time_s": -1.0}, "negative"),
        ({"category": " "}, "category is required"),
        ({"attributes": {"when": datetime(2026, 1, 1, tzinfo=UTC)}}, "plain JSON"),
    ],
)
def test_invalid_inspections_are_refused(kb: KnowledgeBase, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        kb.record_inspection(**inspection_fields(1, **overrides))
    assert kb.snapshot().inspections.empty


def test_unregistered_model_version_is_refused(kb: KnowledgeBase) -> None:
    with pytest.raises(NotFoundError, match="register_model_version"):
        kb.record_inspection(**inspection_fields(1, model_version="v404"))


def test_a_batch_is_all_or_nothing(kb: KnowledgeBase) -> None:
    good = [InspectionRecord(**inspection_fields(n)) for n in range(3)]
    bad = InspectionRecord(**inspection_fields(3, model_version="v404"))
    with pytest.raises(NotFoundError):
        kb.record_inspections([*good, bad])
    assert kb.snapshot().inspections.empty
    results = kb.record_inspections([*good, good[0]])  # a repeat inside the batch is the same record
    assert [r.created for r in results] == [True, True, True, False]
    assert results[3].id == results[0].id


# ------------------------------------------------------------------------------------------------------ feedback


def test_feedback_round_trip_with_region(kb: KnowledgeBase, add_inspection: Callable[..., int]) -> None:
    inspection = add_inspection(14)
    stored = kb.record_feedback(
        inspection,
        action="confirm_defect",
        defect_type=" Scratch",
        description="  scratch along the thread  ",
        region_polygon=[[10, 12], [40, 12.5], [40, 30]],
        region_mask_path="masks/014.png",
        confidence=5,
        operator=" anna ",
        session="shift-a",
        created_at=T0 + timedelta(days=1),
    )
    assert (stored.verdict, stored.outcome, stored.defect_type, stored.operator) == (
        "NG",
        "confirmed_defect",
        "scratch",
        "anna",
    )
    assert stored.region_polygon == [[[10.0, 12.0], [40.0, 12.5], [40.0, 30.0]]]  # one polygon -> list of polygons
    assert kb.feedback_for(inspection) == [stored]
    assert stored.description == "scratch along the thread"
    two = kb.record_feedback(
        inspection,
        verdict="NG",
        region_polygon=[[[0, 0], [5, 0], [5, 5]], [[9, 9], [12, 9], [12, 12], [9, 12]]],
        operator="bob",
        confidence=2,
    )
    assert len(two.region_polygon) == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"operator": "  "}, ValidationError, "operator is required"),
        ({"confidence": 0}, ValidationError, "1 to 5"),
        ({"confidence": 6}, ValidationError, "1 to 5"),
        ({"confidence": 3.5}, ValidationError, "1 to 5"),
        ({"confidence": True}, ValidationError, "1 to 5"),
        ({"verdict": "BAD"}, ValidationError, "Unknown verdict"),
        ({"verdict": None}, ValidationError, "Give a verdict"),
        ({"verdict": None, "action": "looks_ok"}, ValidationError, "Unknown action"),
        ({"verdict": "OK", "action": "confirm_defect"}, ValidationError, "records NG"),
        ({"verdict": None, "action": "missed_defect"}, ValidationError, "does not fit an item the model decided NG"),
        ({"defect_type": "dent"}, UnknownDefectTypeError, r"known: crack, scratch"),
        ({"verdict": "OK", "defect_type": "scratch"}, ValidationError, "only goes with an NG"),
        ({"verdict": "OK", "region_mask_path": "m.png"}, ValidationError, "only goes with an NG"),
        ({"region_polygon": [[0, 0], [1, 1]]}, ValidationError, "at least 3"),
        ({"region_polygon": [[0, 0], [1, -1], [2, 2]]}, ValidationError, "non-negative"),
        ({"region_polygon": "0,0 1,1 2,2"}, ValidationError, "region_polygon must be"),
        ({"created_at": datetime(2026, 3, 2)}, ValidationError, "timezone-aware"),
    ],
)
def test_invalid_feedback_is_refused(
    kb: KnowledgeBase,
    add_inspection: Callable[..., int],
    kwargs: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    inspection = add_inspection(12)  # decided NG
    arguments = {"verdict": "NG", "operator": "anna", "confidence": 3} | kwargs
    with pytest.raises(error, match=message):
        kb.record_feedback(inspection, **arguments)
    assert kb.feedback_for(inspection) == []


def test_defect_types_are_per_category(kb: KnowledgeBase) -> None:
    kb.register_model_version("sheet_metal", "s1")
    kb.add_defect_type("sheet_metal", "dent")
    other = kb.record_inspection(**inspection_fields(12, category="sheet_metal", model_version="s1")).id
    with pytest.raises(UnknownDefectTypeError, match="known: dent"):
        kb.record_feedback(other, verdict="NG", defect_type="scratch", operator="anna", confidence=3)
    assert kb.record_feedback(other, verdict="NG", defect_type="dent", operator="anna", confidence=3).defect_type


def test_feedback_on_a_missing_inspection(kb: KnowledgeBase) -> None:
    with pytest.raises(NotFoundError, match="Inspection 4242"):
        kb.record_feedback(4242, verdict="OK", operator="anna", confidence=3)


@pytest.mark.parametrize(
    ("decision", "actions"),
    [
        ("NG", ("confirm_defect", "false_alarm")),
        ("REVIEW", ("confirm_defect", "false_alarm")),
        ("OK", ("missed_defect", "confirm_ok")),
    ],
)
def test_each_button_fits_its_decisions(
    kb: KnowledgeBase, add_inspection: Callable[..., int], decision: str, actions: tuple[str, ...]
) -> None:
    assert valid_actions(decision) == actions
    inspection = add_inspection(5, decision=decision)
    outcomes = [kb.record_feedback(inspection, action=a, operator=a, confidence=3).outcome for a in actions]
    assert outcomes == [
        a.replace("confirm_defect", "confirmed_defect").replace("confirm_ok", "confirmed_ok") for a in actions
    ]
