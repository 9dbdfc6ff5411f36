"""The review-queue page under Streamlit's AppTest, on a real knowledge base file and generated images."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import date, timedelta

import numpy as np
import pytest
from app_support import CATEGORY, MAIN, T0, ReviewData
from PIL import Image
from streamlit.testing.v1 import AppTest

from madfh_pipeline.app.review_settings import DEFAULT_EXPLORE_SHARE, save_explore_share
from madfh_pipeline.feedback import KnowledgeBase, image_content_id

#: The queue the knowledge base serves for the test data: REVIEW first, then nearest the threshold (relative).
EXPECTED_ORDER = ["001_regular", "003_regular", "007_regular", "004_regular", "006_regular", "005_regular"]


def _picker_ids(at: AppTest) -> list[int]:
    """The item ids of the picker, in order (the options are shown as '#<id> · ...')."""
    return [int(option.split(" ")[0].lstrip("#")) for option in at.selectbox(key="item-picker").options]


def _table(at: AppTest, *columns: str):
    """The first table showing all of ``columns`` (AppTest finds tables without selection by content only)."""
    for frame in at.dataframe:
        if set(columns) <= set(frame.value.columns):
            return frame.value
    raise AssertionError(f"no table with columns {columns}")


def _messages(at: AppTest) -> str:
    parts = [*at.error, *at.warning, *at.success, *at.info]
    return "\n".join(str(p.value) for p in parts)


def _pick(at: AppTest, inspection_id: int) -> None:
    at.selectbox(key="item-picker").set_value(inspection_id)
    at.run()


def test_queue_is_ordered_by_uncertainty_like_the_knowledge_base(make_app: Callable, app_env: ReviewData) -> None:
    save_explore_share(app_env.data_root / "09_knowledge_base" / "review_settings.json", CATEGORY, 0.0, "anna")
    at = make_app()
    expected = [app_env.ids[name] for name in EXPECTED_ORDER]
    assert _picker_ids(at) == expected
    with app_env.kb() as kb:
        assert [item.inspection.id for item in kb.review_queue(CATEGORY)] == expected
    table = _table(at, "item", "from threshold")
    assert table["item"].tolist() == expected
    assert table["decision"].iloc[0] == "REVIEW"
    # The first item is shown: the REVIEW one, with its score against the threshold.
    assert any(m.value.startswith(f"### Item #{expected[0]} · :orange[REVIEW]") for m in at.markdown)
    metric = at.metric[0]
    assert metric.value == "10.9" and "threshold 10" in metric.proto.delta


def test_queue_mixes_in_samples_at_the_stored_share(make_app: Callable, app_env: ReviewData) -> None:
    at = make_app()  # no share stored: the default
    with app_env.kb() as kb:
        served = kb.review_queue(CATEGORY, explore_share=DEFAULT_EXPLORE_SHARE)
    assert _picker_ids(at) == [item.inspection.id for item in served]
    table = _table(at, "item", "why")
    assert table["why"].tolist() == ["sample" if item.exploration else "uncertain" for item in served]
    assert table["why"].tolist().count("sample") == 1  # position 3 of 6
    assert "are *samples* taken regardless of the score" in "\n".join(c.value for c in at.caption)
    assert any(
        option.endswith("· sample · " + option.split(" · ")[-1]) for option in at.selectbox(key="item-picker").options
    )

    path = app_env.data_root / "09_knowledge_base" / "review_settings.json"
    save_explore_share(path, CATEGORY, 0.5, "anna")
    at.run()
    assert _table(at, "item", "why")["why"].tolist().count("sample") == 3
    path.write_text(json.dumps({"version": 1, "categories": {CATEGORY: {"explore_share": 2}}}))
    at.run()
    assert "between 0 and 0.5" in _messages(at)
    assert _picker_ids(at) == [app_env.ids[name] for name in EXPECTED_ORDER]


def test_filters_by_decision_model_version_date_and_status(make_app: Callable, app_env: ReviewData) -> None:
    ids = app_env.ids
    at = make_app()
    at.multiselect(key="filter-decisions").set_value(["OK"]).run()
    assert _picker_ids(at) == [ids["004_regular"], ids["005_regular"]]

    at.multiselect(key="filter-decisions").set_value(["REVIEW", "NG", "OK"])
    at.selectbox(key="filter-version").set_value("v2").run()
    assert _picker_ids(at) == [ids["007_regular"]]

    at.selectbox(key="filter-version").set_value("all")
    at.date_input(key="filter-since").set_value(date(2026, 3, 5)).run()  # T0 + 3 days
    assert set(_picker_ids(at)) == {ids["006_regular"], ids["005_regular"], ids["007_regular"]}

    at.date_input(key="filter-since").set_value(None)
    at.date_input(key="filter-until").set_value((T0 + timedelta(days=1)).date()).run()
    assert _picker_ids(at) == [ids["001_regular"], ids["003_regular"]]

    at.date_input(key="filter-until").set_value(None)
    at.selectbox(key="filter-status").set_value("reviewed").run()
    assert _picker_ids(at) == [ids["002_regular"]]

    at.multiselect(key="filter-decisions").set_value([]).run()
    assert "Choose at least one decision" in _messages(at)
    assert not at.exception


def test_operator_is_required_before_a_verdict_is_written(make_app: Callable, app_env: ReviewData) -> None:
    at = make_app()
    assert at.button(key="action-false_alarm").disabled
    assert "Enter your name" in _messages(at)
    # The callback checks too: a name erased in the same round trip as the click writes nothing.
    at.sidebar.text_input(key="operator").input("anna").run()
    at.sidebar.text_input(key="operator").input("   ")
    at.button(key="action-false_alarm").click().run()
    assert "Enter your name in the sidebar before giving a verdict" in _messages(at)
    with app_env.kb() as kb:
        assert kb.feedback_for(app_env.ids["001_regular"]) == []
        assert len(kb.snapshot(CATEGORY).feedback) == 1  # only bob's verdict from the fixture


def test_false_alarm_button_writes_the_row_and_moves_on(make_app: Callable, app_env: ReviewData) -> None:
    first, second = app_env.ids["001_regular"], app_env.ids["003_regular"]
    at = make_app(operator="  anna ")
    at.text_area(key=f"description-{first}").input("reflection on the rim")
    at.select_slider(key=f"confidence-{first}").set_value(5)
    at.button(key="action-false_alarm").click().run()
    assert f"Saved: false alarm on #{first} by anna." in _messages(at)
    with app_env.kb() as kb:
        (row,) = kb.feedback_for(first)
    assert (row.operator, row.verdict, row.outcome, row.confidence) == ("anna", "OK", "false_alarm", 5)
    assert row.description == "reflection on the rim" and row.defect_type is None and row.region_polygon is None
    assert row.session is not None and row.session.startswith("review-app:")
    # The reviewed item left the (unreviewed) queue and the next one is on screen.
    assert first not in _picker_ids(at)
    assert at.selectbox(key="item-picker").value == second


def test_confirm_defect_stores_type_description_and_region(make_app: Callable, app_env: ReviewData) -> None:
    item = app_env.ids["003_regular"]
    at = make_app(operator="anna")
    _pick(at, item)
    assert [b.key for b in at.button if b.key and b.key.startswith("action-")] == [
        "action-confirm_defect",
        "action-false_alarm",
    ]
    at.selectbox(key=f"defect-{item}").set_value("scratch")
    at.text_area(key=f"description-{item}").input("thin scratch")
    # What the region canvas leaves in the session once a rectangle is drawn (canvas -> image pixels).
    at.session_state[f"polygons-{item}"] = [[[10.0, 12.0], [40.0, 12.0], [40.0, 30.0], [10.0, 30.0]]]
    at.button(key="action-confirm_defect").click().run()
    with app_env.kb() as kb:
        (row,) = kb.feedback_for(item)
    assert (row.verdict, row.outcome, row.defect_type) == ("NG", "confirmed_defect", "scratch")
    assert row.region_polygon == [[[10.0, 12.0], [40.0, 12.0], [40.0, 30.0], [10.0, 30.0]]]


def test_ok_item_offers_missed_defect_and_refuses_a_defect_type_with_an_ok_verdict(
    make_app: Callable, app_env: ReviewData
) -> None:
    item = app_env.ids["004_regular"]  # decided OK; its map is a PNG
    at = make_app(operator="anna")
    _pick(at, item)
    assert [b.key for b in at.button if b.key and b.key.startswith("action-")] == [
        "action-missed_defect",
        "action-confirm_ok",
    ]
    assert any("map is a picture" in c.value for c in at.caption)
    at.selectbox(key=f"defect-{item}").set_value("crack")
    at.button(key="action-confirm_ok").click().run()
    assert "clear the defect type" in _messages(at)
    with app_env.kb() as kb:
        assert kb.feedback_for(item) == []
    at.button(key="action-missed_defect").click().run()
    with app_env.kb() as kb:
        (row,) = kb.feedback_for(item)
    assert (row.outcome, row.defect_type) == ("missed_defect", "crack")


def test_item_shows_overlay_explanation_and_similar_cases(make_app: Callable, app_env: ReviewData) -> None:
    at = make_app()
    assert not at.error
    images = [c for image in at.image for c in image.captions if "with its anomaly map" in c]
    assert images, "the item's image with its heat map is shown"
    assert any(m.value == "an unclear mark near the upper left corner" for m in at.info)
    reviewed = app_env.ids["002_regular"]
    similar = [m.value for m in at.markdown if m.value.startswith(f"#{reviewed} · similarity")]
    assert similar and "label **NG** (scratch)" in similar[0] and "confirmed defect" in similar[0]
    assert "Text similarity is switched off" in _messages(at)
    at.slider(key="opacity").set_value(0.9).run()
    assert not at.exception and not at.error


def test_two_operators_on_the_same_item_both_verdicts_are_stored_and_shown(
    make_app: Callable, app_env: ReviewData
) -> None:
    item = app_env.ids["001_regular"]
    anna, ben = make_app(operator="anna"), make_app(operator="ben")
    assert at_item(anna) == item and at_item(ben) == item  # both look at the same item at the same time
    anna.button(key="action-false_alarm").click().run()
    ben.button(key="action-confirm_defect").click().run()  # ben's screen still shows the item anna just judged
    assert "Operators disagree on this image (anna judged it too)" in _messages(ben)
    with app_env.kb() as kb:
        rows = kb.feedback_for(item)
        assert sorted((r.operator, r.outcome) for r in rows) == [("anna", "false_alarm"), ("ben", "confirmed_defect")]
        assert kb.case(item).resolution.conflict

    for at in (anna, ben):  # the item, listed among the disputed ones, shows both verdicts
        at.selectbox(key="filter-status").set_value("disputed").run()
        assert _picker_ids(at) == [item]
        verdicts = _table(at, "operator", "verdict")
        assert sorted(verdicts["operator"]) == ["anna", "ben"]
        assert any("operators disagree" in m.value for m in at.markdown)


def at_item(at: AppTest) -> int:
    return at.selectbox(key="item-picker").value


def test_paths_outside_the_data_roots_are_refused(make_app: Callable, app_env: ReviewData) -> None:
    secret = app_env.root / "secret.png"  # outside the data root, next to it
    secret.write_bytes((app_env.data_root / "01_raw").joinpath(next_png(app_env)).read_bytes())
    with app_env.kb() as kb:
        bad = [
            kb.record_inspection(
                image_id=image_content_id(f"bad-{n}".encode()),
                image_path=path,
                category=CATEGORY,
                model_version="v1",
                score=10.0,
                threshold=10.0,
                decision="REVIEW",
                map_path=map_path,
                inspected_at=T0,
            ).id
            for n, (path, map_path) in enumerate(
                [
                    ("../../etc/passwd", None),
                    ("/etc/passwd", None),
                    (str(secret), None),
                    ("data/01_raw/" + next_png(app_env), "../../etc/passwd"),
                ]
            )
        ]
    at = make_app()
    for inspection_id in bad:
        _pick(at, inspection_id)
        assert not at.exception
        assert any("lies outside the configured data roots" in e.value for e in at.error), inspection_id
        assert not at.image


def next_png(data: ReviewData) -> str:
    """A generated image, relative to ``data_root / 01_raw``."""
    return str(next((data.data_root / "01_raw").rglob("*.png")).relative_to(data.data_root / "01_raw"))


def test_missing_knowledge_base_and_missing_config_are_clear_errors(
    make_app: Callable, app_env: ReviewData, monkeypatch
) -> None:
    monkeypatch.setenv("MADFH_KB_URL", f"sqlite:///{app_env.root / 'nowhere.sqlite'}")
    at = AppTest.from_file(str(MAIN), default_timeout=30).run()
    assert "No knowledge base file" in at.error[0].value and "make run" in at.error[0].value
    assert not (app_env.root / "nowhere.sqlite").exists()  # the app never creates an empty knowledge base
    monkeypatch.delenv("MADFH_KB_URL")
    at = AppTest.from_file(str(MAIN), default_timeout=30).run()
    assert "--kb-url" in at.error[0].value


def test_region_and_embedding_free_items_render(make_app: Callable, app_env: ReviewData) -> None:
    """An inspection without map, explanation or embedding still renders, saying what is missing."""
    with app_env.kb() as kb:
        plain = app_env.data_root / "01_raw" / "plain.png"
        Image.fromarray(np.full((30, 40), 128, dtype=np.uint8)).save(plain)
        inspection = kb.record_inspection(
            image_id=image_content_id(plain),
            image_path=str(plain),
            category=CATEGORY,
            model_version="v1",
            score=10.0,
            threshold=10.0,
            decision="REVIEW",
            inspected_at=T0,
        ).id
    at = make_app()
    _pick(at, inspection)
    text = "\n".join(c.value for c in at.caption)
    assert "no anomaly map" in text and "no stored image embedding" in text and "No explanation" in text
    assert not at.error and not at.exception


@pytest.mark.slow  # loads the real MiniLM text model (about 20 s on two cores)
def test_text_similarity_uses_the_real_model_when_switched_on(
    make_app: Callable, app_env: ReviewData, monkeypatch
) -> None:
    monkeypatch.setenv("MADFH_TEXT_SEARCH", "1")
    at = make_app()
    reviewed = app_env.ids["002_regular"]
    hits = [m.value for m in at.markdown if m.value.startswith(f"#{reviewed} · similarity")]
    assert len(hits) == 2, "found by image and by explanation text"
    assert any("scratch near the corner" in c.value or "upper left corner" in c.value for c in at.caption)
    with KnowledgeBase(app_env.kb_url) as kb:
        assert kb.similar_texts("a scratch near the corner", category=CATEGORY)[0].case.inspection.id == reviewed
