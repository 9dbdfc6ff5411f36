"""Reads: the review queue, labelled scores, outcome lists, dashboard stats, export, snapshots and backups."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
from kb_support import CATEGORY, MODEL, T0, image_id, inspection_fields

from madfh_pipeline.feedback import (
    InspectionRecord,
    KnowledgeBase,
    KnowledgeBaseSnapshot,
    NotFoundError,
    UnsupportedDatabaseError,
    ValidationError,
)

THRESHOLD = 10.0


@pytest.fixture
def plant(kb: KnowledgeBase) -> dict[int, int]:
    """Twenty inspections (image n scored n, threshold 10; 8 and 9 REVIEW) and feedback on six of them.

    | image | decision | verdicts                                   | label / outcome                      |
    | 3     | OK       | bob NG crack                               | NG, missed defect                    |
    | 9     | REVIEW   | carl OK                                    | OK, false alarm                      |
    | 11    | NG       | bob OK                                     | OK, false alarm                      |
    | 12    | NG       | anna NG scratch (+ polygon)                | NG, confirmed defect                 |
    | 13    | NG       | anna NG 3, bob OK 3                        | disputed (no label)                  |
    | 15    | NG       | anna NG, bob NG, carl OK                   | NG (conflict), confirmed defect      |

    Returns image number -> inspection id. Inspection n happens at T0 + n hours, feedback a day later.
    """
    records = [
        InspectionRecord(
            **inspection_fields(
                n,
                decision="REVIEW" if n in (8, 9) else ("NG" if n >= THRESHOLD else "OK"),
                explanation=f"explanation {n}",
            )
        )
        for n in range(20)
    ]
    ids = {n: recorded.id for n, recorded in enumerate(kb.record_inspections(records))}
    day = T0 + timedelta(days=1)
    feedback = [
        (3, "bob", "NG", 4, "crack"),
        (9, "carl", "OK", 4, None),
        (11, "bob", "OK", 3, None),
        (12, "anna", "NG", 5, "scratch"),
        (13, "anna", "NG", 3, None),
        (13, "bob", "OK", 3, None),
        (15, "anna", "NG", 2, None),
        (15, "bob", "NG", 2, None),
        (15, "carl", "OK", 5, None),
    ]
    for minute, (n, operator, verdict, confidence, defect_type) in enumerate(feedback):
        kb.record_feedback(
            ids[n],
            verdict=verdict,
            operator=operator,
            confidence=confidence,
            defect_type=defect_type,
            description=f"{operator} on {n}",
            region_polygon=[[1, 1], [5, 1], [5, 5]] if n == 12 else None,
            created_at=day + timedelta(minutes=minute),
        )
    return ids


def queue_images(items: list) -> list[int]:
    return [int(item.inspection.image_path.split("/")[-1][:3]) for item in items]


def test_review_queue_serves_review_first_then_closest_to_threshold(kb: KnowledgeBase, plant: dict[int, int]) -> None:
    queue = kb.review_queue(CATEGORY, limit=100)
    # Unreviewed only: REVIEW (8) first, then by |score - 10| / 10: 10 (0.0), 7 (0.3), then 14 and 6 (0.4 each,
    # the newer inspection first).
    assert queue_images(queue)[:5] == [8, 10, 7, 14, 6]
    assert set(queue_images(queue)).isdisjoint({3, 9, 11, 12, 13, 15})
    margins = [item.margin for item in queue[1:]]
    assert margins == sorted(margins)
    assert queue[1].margin == 0.0 and queue[0].inspection.decision == "REVIEW"
    assert len(queue) == 14

    page = kb.review_queue(CATEGORY, limit=3, offset=1)
    assert queue_images(page) == queue_images(queue)[1:4]


def test_review_queue_explores_a_share_in_image_id_order(kb: KnowledgeBase, plant: dict[int, int]) -> None:
    plain = kb.review_queue(CATEGORY, limit=100)
    mixed = kb.review_queue(CATEGORY, limit=100, explore_share=0.3)
    # the same unreviewed items, each once; positions 3, 6, 9, 13 come from the image-id order
    assert sorted(queue_images(mixed)) == sorted(queue_images(plain))
    explored = [position for position, item in enumerate(mixed) if item.exploration]
    assert explored == [3, 6, 9, 13]
    images = queue_images(mixed)
    for position in explored:  # the lowest image id not served before its slot
        left = [n for n in images if n not in images[:position]]
        assert images[position] == min(left, key=image_id)
    # the other slots keep the uncertainty order
    assert queue_images([i for i in mixed if not i.exploration]) == [
        n for n in queue_images(plain) if n not in queue_images([mixed[p] for p in explored])
    ]
    assert not any(item.exploration for item in plain)
    # pages agree with the whole queue, and the share only applies to the unreviewed queue
    for offset, limit in ((0, 4), (4, 5), (9, 5)):
        page = kb.review_queue(CATEGORY, limit=limit, offset=offset, explore_share=0.3)
        assert queue_images(page) == queue_images(mixed)[offset : offset + limit]
        assert [i.exploration for i in page] == [i.exploration for i in mixed[offset : offset + limit]]
    reviewed = kb.review_queue(CATEGORY, status="reviewed", explore_share=0.3)
    assert queue_images(reviewed) == queue_images(kb.review_queue(CATEGORY, status="reviewed"))
    with pytest.raises(ValidationError, match="explore_share"):
        kb.review_queue(CATEGORY, explore_share=0.9)


def test_review_queue_filters(kb: KnowledgeBase, plant: dict[int, int]) -> None:
    assert queue_images(kb.review_queue(CATEGORY, decisions=["OK"], limit=3)) == [7, 6, 5]
    assert queue_images(kb.review_queue(CATEGORY, status="disputed")) == [13]
    assert set(queue_images(kb.review_queue(CATEGORY, status="conflict"))) == {13, 15}
    assert len(kb.review_queue(CATEGORY, status="reviewed")) == 6
    assert len(kb.review_queue(CATEGORY, status="all", limit=100)) == 20
    window = kb.review_queue(CATEGORY, since=T0 + timedelta(hours=5), until=T0 + timedelta(hours=8), limit=100)
    assert sorted(queue_images(window)) == [5, 6, 7]
    assert kb.review_queue("sheet_metal") == []
    kb.register_model_version(CATEGORY, "v2")
    assert kb.review_queue(CATEGORY, model_version="v2") == []
    with pytest.raises(NotFoundError):
        kb.review_queue(CATEGORY, model_version="v404")
    with pytest.raises(ValidationError):
        kb.review_queue(CATEGORY, status="new")
    with pytest.raises(ValidationError):
        kb.review_queue(CATEGORY, decisions=["PASS"])


def test_two_verdicts_on_one_item_are_both_kept_and_visible(kb: KnowledgeBase, plant: dict[int, int]) -> None:
    case = kb.case(plant[13])
    assert [(f.operator, f.verdict) for f in case.feedback] == [("anna", "NG"), ("bob", "OK")]
    assert case.resolution.disputed and case.resolution.label is None
    assert kb.case(plant[15]).resolution.label == "NG"
    assert kb.case(plant[15], policy="latest").resolution.label == "OK"
    assert kb.case(plant[0]).feedback == () and kb.case(plant[0]).resolution.n_feedback == 0


def test_labelled_scores_for_threshold_recalibration(kb: KnowledgeBase, plant: dict[int, int]) -> None:
    table = kb.labelled_scores(CATEGORY, MODEL)
    assert table.set_index("inspection_id")["label"].to_dict() == {
        plant[3]: "NG",
        plant[9]: "OK",
        plant[11]: "OK",
        plant[12]: "NG",
        plant[15]: "NG",
    }
    assert table["is_defect"].tolist() == [True, False, False, True, True]
    assert table["score"].tolist() == [3.0, 9.0, 11.0, 12.0, 15.0]
    assert (table["threshold"] == THRESHOLD).all()
    with_disputed = kb.labelled_scores(CATEGORY, MODEL, include_disputed=True)
    assert with_disputed.loc[with_disputed["inspection_id"] == plant[13], "label"].isna().all()
    latest = kb.labelled_scores(CATEGORY, MODEL, policy="latest")
    assert latest.set_index("inspection_id").loc[[plant[13], plant[15]], "label"].tolist() == ["OK", "OK"]


def test_labels_follow_the_image_to_a_new_model_version(kb: KnowledgeBase, plant: dict[int, int]) -> None:
    """Verdicts given under v1 label v2's scores of the same images: what recalibrating v2 needs."""
    kb.register_model_version(CATEGORY, "v2", parent=MODEL)
    for n, score in ((11, 4.0), (12, 30.0), (3, 2.0)):
        kb.record_inspection(**inspection_fields(n, model_version="v2", score=score, threshold=5.0))
    table = kb.labelled_scores(CATEGORY, "v2").sort_values("score")
    assert list(zip(table["score"], table["label"], table["outcome"], strict=True)) == [
        (2.0, "NG", "missed_defect"),
        (4.0, "OK", "confirmed_ok"),
        (30.0, "NG", "confirmed_defect"),
    ]
    assert (table["model_version"] == "v2").all()
    # The v2 inspections of those images are not "unreviewed": the part already has verdicts.
    assert kb.review_queue(CATEGORY, model_version="v2") == []
    assert len(kb.case(table["inspection_id"].iloc[0]).feedback) == 1
    assert len(kb.labelled_scores(CATEGORY, None)) == 8


def test_outcome_lists(kb: KnowledgeBase, plant: dict[int, int]) -> None:
    false_alarms = kb.false_alarms(CATEGORY)
    assert sorted(false_alarms["inspection_id"]) == sorted([plant[9], plant[11]])
    confirmed = kb.confirmed_defects(CATEGORY)
    assert sorted(confirmed["inspection_id"]) == sorted([plant[3], plant[12], plant[15]])
    only_flagged = kb.confirmed_defects(CATEGORY, include_missed=False)
    assert sorted(only_flagged["inspection_id"]) == sorted([plant[12], plant[15]])
    missed = kb.missed_defects(CATEGORY)
    assert missed["inspection_id"].tolist() == [plant[3]]
    assert missed["defect_type"].tolist() == ["crack"]
    row = confirmed.set_index("inspection_id").loc[plant[12]]
    assert row["region_polygon"] == [[[1.0, 1.0], [5.0, 1.0], [5.0, 5.0]]]
    assert row["descriptions"] == ["anna on 12"] and row["explanation"] == "explanation 12"
    assert kb.false_alarms("sheet_metal").empty


def test_dashboard_stats(kb: KnowledgeBase, plant: dict[int, int]) -> None:
    # One more day: image 40 (T0 + 40 h, two days later) flagged NG, a false alarm.
    late = kb.record_inspection(**inspection_fields(40)).id
    kb.record_feedback(late, action="false_alarm", operator="anna", confidence=4)
    stats = kb.stats(CATEGORY, freq="D")
    counts = stats.decisions.set_index("decision")["count"].to_dict()
    assert counts == {"NG": 11, "OK": 8, "REVIEW": 2}
    assert stats.over_time["period"].tolist() == [
        pd.Timestamp("2026-03-02", tz="UTC"),
        pd.Timestamp("2026-03-04", tz="UTC"),
    ]
    day1, day3 = stats.over_time.to_dict("records")
    # Day 1 reviewed and labelled: 3 (OK -> NG), 9 (REVIEW -> OK), 11 (NG -> OK), 12 and 15 (NG -> NG); 13 disputed.
    assert (day1["flagged_reviewed"], day1["false_alarms"], day1["ok_reviewed"], day1["missed_defects"]) == (4, 2, 1, 1)
    assert day1["false_alarm_rate"] == pytest.approx(2 / 4) and day1["miss_rate"] == 1.0
    assert (day3["flagged_reviewed"], day3["false_alarms"], day3["false_alarm_rate"]) == (1, 1, 1.0)
    assert pd.isna(day3["miss_rate"])  # no OK decision reviewed that day: no rate, not 0
    per_version = stats.per_model_version.iloc[0]
    assert (per_version["model_version"], per_version["reviewed"], per_version["false_alarm_rate"]) == (
        MODEL,
        6,
        pytest.approx(3 / 5),
    )
    assert stats.operators.set_index("operator")["feedback"].to_dict() == {"anna": 4, "bob": 4, "carl": 2}
    windowed = kb.stats(CATEGORY, since=T0, until=T0 + timedelta(hours=10))
    assert windowed.decisions["count"].sum() == 10
    assert windowed.per_model_version.iloc[0]["reviewed"] == 2  # images 3 and 9
    with pytest.raises(ValidationError):
        kb.stats(model_version=MODEL)


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_export_joins_inspections_with_feedback(
    kb: KnowledgeBase, plant: dict[int, int], tmp_path: Path, suffix: str
) -> None:
    path = kb.export(tmp_path / "out" / f"kb.{suffix}")
    table = pd.read_csv(path) if suffix == "csv" else pd.read_parquet(path)
    assert len(table) == 14 + 9  # unreviewed inspections once, reviewed ones once per verdict
    assert table["feedback_id"].notna().sum() == 9
    by_image = table[table["inspection_id"] == plant[13]]
    assert sorted(by_image["operator"]) == ["anna", "bob"]
    assert by_image["resolved_label"].isna().all() and by_image["label_conflict"].all()
    assert set(table.loc[table["inspection_id"] == plant[12], "resolved_label"]) == {"NG"}
    assert not list(tmp_path.joinpath("out").glob(".*tmp"))
    with pytest.raises(ValidationError, match="csv or parquet"):
        kb.export(tmp_path / "kb.xlsx")


def test_snapshot_is_a_consistent_copy(kb: KnowledgeBase, plant: dict[int, int], tmp_path: Path) -> None:
    snapshot = kb.snapshot(CATEGORY)
    kb.record_feedback(plant[13], verdict="NG", operator="dora", confidence=5)  # after the snapshot
    assert len(snapshot.feedback) == 9 and len(kb.snapshot().feedback) == 10
    assert len(snapshot.inspections) == 20 and snapshot.schema_revision == kb.schema_revision
    assert set(snapshot.defect_types["name"]) == {"scratch", "crack"}

    live = kb.labelled_scores(CATEGORY, MODEL)
    assert plant[13] in set(live["inspection_id"])  # dora settled the dispute in the live store ...
    assert plant[13] not in set(snapshot.labelled_scores(CATEGORY, MODEL)["inspection_id"])  # ... not in the snapshot

    loaded = KnowledgeBaseSnapshot.load(snapshot.save(tmp_path / "snap"))
    for table in ("inspections", "feedback", "defect_types", "model_versions"):
        pd.testing.assert_frame_equal(
            getattr(loaded, table), getattr(snapshot, table), check_dtype=False, check_index_type=False
        )
    pd.testing.assert_frame_equal(
        loaded.labelled_scores(CATEGORY, MODEL), snapshot.labelled_scores(CATEGORY, MODEL), check_dtype=False
    )
    assert loaded.taken_at == snapshot.taken_at
    assert sorted(loaded.false_alarms()["inspection_id"]) == sorted([plant[9], plant[11]])
    (tmp_path / "snap" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        KnowledgeBaseSnapshot.load(tmp_path / "snap")


def test_backup(kb: KnowledgeBase, plant: dict[int, int], tmp_path: Path, backend: str) -> None:
    if backend == "postgresql":
        with pytest.raises(UnsupportedDatabaseError, match="pg_dump"):
            kb.backup(tmp_path / "b.sqlite")
        return
    target = kb.backup(tmp_path / "backups" / "kb.sqlite")
    with pytest.raises(FileExistsError):
        kb.backup(target)
    with KnowledgeBase(f"sqlite:///{target}", migrate=False) as copy:
        assert copy.check_integrity() == []
        assert len(copy.snapshot().feedback) == 9
        assert copy.case(plant[13]).resolution.disputed


def test_integrity_check_finds_what_constraints_cannot(kb: KnowledgeBase, plant: dict[int, int]) -> None:
    assert kb.check_integrity() == []
    with kb.engine.begin() as connection:  # a writer that bypassed the API and got the outcome wrong
        connection.exec_driver_sql(
            f"UPDATE feedback SET outcome = 'missed_defect' WHERE inspection_id = {plant[12]}"  # noqa: S608
        )
    assert kb.check_integrity() == ["1 feedback row(s) whose outcome contradicts the inspection's decision"]


def test_find_inspections(kb: KnowledgeBase, plant: dict[int, int]) -> None:
    assert [i.id for i in kb.find_inspections(image_id(4))] == [plant[4]]
    assert kb.find_inspections(image_id(4), category="sheet_metal") == []
    assert kb.feedback_for(plant[12], same_image=True) == kb.feedback_for(plant[12])


def test_an_empty_knowledge_base_answers_with_empty_tables(kb: KnowledgeBase, tmp_path: Path) -> None:
    """The first day on a new line: every read works before any inspection or verdict exists."""
    assert kb.review_queue(CATEGORY) == []
    assert kb.labelled_scores(CATEGORY, MODEL).empty
    assert kb.false_alarms(CATEGORY).empty and kb.confirmed_defects(CATEGORY).empty
    stats = kb.stats(CATEGORY)
    assert stats.decisions.empty and stats.over_time.empty and stats.per_model_version.empty
    assert "false_alarm_rate" in stats.over_time.columns
    assert pd.read_csv(kb.export(tmp_path / "empty.csv")).empty
    loaded = KnowledgeBaseSnapshot.load(kb.snapshot().save(tmp_path / "snap"))
    assert loaded.inspections.empty and loaded.labelled_scores(CATEGORY, MODEL).empty
    assert kb.similar_images(category=CATEGORY, vector=[1.0, 0.0], embedding_space="any") == []
    assert kb.check_integrity() == []
