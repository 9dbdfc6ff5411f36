"""The settings page under AppTest: defect types in the knowledge base, the uncertainty band in its JSON file."""

from __future__ import annotations

import json
from collections.abc import Callable

from app_support import CATEGORY, ReviewData
from streamlit.testing.v1 import AppTest

from madfh_pipeline.app.review_settings import DEFAULT_EXPLORE_SHARE, load_explore_share, load_review_settings
from madfh_pipeline.inspection import InspectionSettings


def _messages(at: AppTest) -> str:
    return "\n".join(str(p.value) for p in [*at.error, *at.warning, *at.success, *at.info])


def _types(app_env: ReviewData, include_retired: bool = False) -> list[str]:
    with app_env.kb() as kb:
        return [t.name for t in kb.list_defect_types(CATEGORY, include_retired=include_retired)]


def test_changes_need_an_operator(make_app: Callable, app_env: ReviewData) -> None:
    at = make_app(page="settings")
    assert "Enter your name in the sidebar to change settings" in _messages(at)
    for key in ("add-type-button", "edit-type-button", "save-band", "save-share"):
        assert at.button(key=key).disabled, key
    assert all(b.disabled for b in at.button if b.key and b.key.startswith("toggle-type-"))
    assert not app_env.data_root.joinpath("09_knowledge_base", "review_settings.json").exists()


def test_add_rename_retire_and_restore_defect_types(make_app: Callable, app_env: ReviewData) -> None:
    at = make_app(operator="anna", page="settings")
    at.text_input(key="new-type-name").input("  Dent ")
    at.text_input(key="new-type-description").input("pressed in")
    at.button(key="add-type-button").click().run()
    assert "Added defect type 'dent'" in _messages(at)
    assert _types(app_env) == ["crack", "dent", "scratch"]

    at.text_input(key="new-type-name").input("dent")
    at.button(key="add-type-button").click().run()
    assert "Not changed" in _messages(at) and "already exists" in _messages(at)

    at.selectbox(key="edit-type").set_value("crack")
    at.text_input(key="edit-type-name").input("hairline crack")
    at.button(key="edit-type-button").click().run()
    assert _types(app_env) == ["dent", "hairline crack", "scratch"]

    with app_env.kb() as kb:
        scratch = next(t for t in kb.list_defect_types(CATEGORY) if t.name == "scratch")
    at.button(key=f"toggle-type-{scratch.id}").click().run()
    assert "retired" in _messages(at)
    assert _types(app_env) == ["dent", "hairline crack"]
    assert "scratch" in _types(app_env, include_retired=True)

    # The review form offers the active types only; bob's old verdict keeps its retired type.
    at.switch_page("views/review.py").run()
    item = at.selectbox(key="item-picker").value
    assert at.selectbox(key=f"defect-{item}").options == ["(none)", "dent", "hairline crack"]
    with app_env.kb() as kb:
        assert kb.feedback_for(app_env.ids["002_regular"])[0].defect_type == "scratch"

    at.switch_page("views/settings.py").run()
    at.button(key=f"toggle-type-{scratch.id}").click().run()
    assert _types(app_env) == ["dent", "hairline crack", "scratch"]


def test_uncertainty_band_is_saved_where_the_pipeline_reads_it(make_app: Callable, app_env: ReviewData) -> None:
    path = app_env.data_root / "09_knowledge_base" / "review_settings.json"
    at = make_app(operator="anna", page="settings")
    assert "not set here" in "\n".join(c.value for c in at.caption)
    at.number_input(key="band-std").set_value(1.5)
    at.button(key="save-band").click().run()
    assert "within 1.5 σ of the threshold" in _messages(at)
    content = json.loads(path.read_text())
    assert content["version"] == 1
    assert content["categories"][CATEGORY]["review_band_std"] == 1.5
    assert content["categories"][CATEGORY]["updated_by"] == "anna"
    assert load_review_settings(path) == {CATEGORY: 1.5}
    # The inspection core takes the value as it is.
    assert InspectionSettings(review_band_std=load_review_settings(path)[CATEGORY]).review_band_std == 1.5

    at.button(key="remove-band").click().run()
    assert load_review_settings(path) == {}


def test_queue_sample_share_is_saved_beside_the_band_and_reset_to_the_default(
    make_app: Callable, app_env: ReviewData
) -> None:
    path = app_env.data_root / "09_knowledge_base" / "review_settings.json"
    at = make_app(operator="anna", page="settings")
    assert at.number_input(key="explore-share").value == round(DEFAULT_EXPLORE_SHARE * 100)
    at.number_input(key="band-std").set_value(1.5)
    at.button(key="save-band").click().run()
    at.number_input(key="explore-share").set_value(10)
    at.button(key="save-share").click().run()
    assert "samples 10% of its places" in _messages(at)
    assert load_explore_share(path, CATEGORY) == 0.1
    assert load_review_settings(path) == {CATEGORY: 1.5}  # the band is kept

    at.button(key="remove-band").click().run()
    assert load_review_settings(path) == {}
    assert load_explore_share(path, CATEGORY) == 0.1  # removing the band keeps the share
    at.button(key="reset-share").click().run()
    assert load_explore_share(path, CATEGORY) == DEFAULT_EXPLORE_SHARE
    assert json.loads(path.read_text())["categories"] == {}  # nothing left of the category
