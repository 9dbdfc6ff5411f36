"""Tests of madfh_pipeline.categories: the facts of DESIGN.md §1 as configured, and the messages for bad entries."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from madfh_pipeline.categories import (
    CategorySpec,
    UnknownCategoryError,
    get_category,
    parse_categories,
    pipeline_categories,
)

BASE_PARAMETERS = Path(__file__).resolve().parents[1] / "conf" / "base" / "parameters.yml"

# DESIGN.md §1: (width, height, channels) per category. The official image counts per split live in docs/data.md
# (categories no longer carry them: nothing in the pipeline used them).
FACTS = {
    "wallplugs": (2448, 2048, 1),
    "sheet_metal": (4224, 1056, 1),
    "walnuts": (2448, 2048, 3),
    "fruit_jelly": (2100, 1520, 3),
    "can": (2232, 1024, 3),
    "fabric": (2448, 2048, 3),
    "rice": (2448, 2048, 3),
    "vial": (1400, 1900, 1),
}


@pytest.fixture(scope="module")
def configured() -> dict:
    return yaml.safe_load(BASE_PARAMETERS.read_text())["categories"]


def test_base_parameters_hold_the_eight_official_categories(configured: dict) -> None:
    specs = parse_categories(configured)
    assert set(specs) == set(FACTS)
    for name, (width, height, channels) in FACTS.items():
        spec = specs[name]
        assert isinstance(spec, CategorySpec)
        assert (spec.name, spec.width, spec.height, spec.channels) == (name, width, height, channels)
        assert spec.description  # what the category is, for reports and the app


def test_exactly_four_categories_get_a_pipeline(configured: dict) -> None:
    assert pipeline_categories(configured) == ["wallplugs", "sheet_metal", "walnuts", "fruit_jelly"]
    specs = parse_categories(configured)
    assert [n for n, s in specs.items() if not s.pipeline] == ["can", "fabric", "rice", "vial"]


def test_sheet_metal_is_letterboxed(configured: dict) -> None:
    assert parse_categories(configured)["sheet_metal"].preprocessing == {"mode": "letterbox"}
    assert parse_categories(configured)["wallplugs"].preprocessing == {}


def test_to_dict_round_trips(configured: dict) -> None:
    spec = parse_categories(configured)["walnuts"]
    assert CategorySpec(**spec.to_dict()) == spec


def test_per_category_detector_overrides_are_kept() -> None:
    entry = {"name": "gizmo", "width": 10, "height": 20, "channels": 1}
    overrides = {"patchcore": {"config": {"max_bank_size": 8192}}}
    spec = parse_categories({"gizmo": entry | {"detection": overrides}})["gizmo"]
    assert spec.detection == overrides
    assert parse_categories({"gizmo": entry})["gizmo"].detection == {}


@pytest.mark.parametrize("missing", ["width", "name", "height", "channels"])
def test_missing_fact_names_the_category_and_the_key(missing: str) -> None:
    entry = {"name": "gizmo", "width": 10, "height": 20, "channels": 1}
    del entry[missing]
    with pytest.raises(ValueError, match=rf"Category 'gizmo'.*must give {missing}"):
        parse_categories({"gizmo": entry})


def test_empty_entry_lists_every_missing_key() -> None:
    with pytest.raises(ValueError, match=r"Category 'gizmo'.*must give name, width, height, channels"):
        parse_categories({"gizmo": None})


def test_name_must_equal_the_key() -> None:
    with pytest.raises(ValueError, match=r"Category entry 'gizmo' has name 'widget'"):
        parse_categories({"gizmo": {"name": "widget", "width": 10, "height": 20, "channels": 1}})


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"width": 0, "height": 20, "channels": 1}, r"Category 'gizmo': width and height must be positive, got 0x20"),
        ({"width": 10, "height": -1, "channels": 1}, r"got 10x-1"),
        ({"width": 10, "height": 20, "channels": 4}, r"Category 'gizmo': channels must be 1 \(gray\) or 3"),
    ],
)
def test_bad_facts_are_refused(entry: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_categories({"gizmo": {"name": "gizmo", **entry}})


@pytest.mark.parametrize("name", ["1st", "my-cat", "a/b", "with space"])
def test_names_must_be_usable_as_namespace_and_folder(name: str) -> None:
    with pytest.raises(ValueError, match="must start with a letter"):
        CategorySpec(name=name, width=1, height=1, channels=1)


def test_pipeline_flag_defaults_to_true() -> None:
    configured = {
        "a": {"name": "a", "width": 1, "height": 1, "channels": 1},
        "b": {"name": "b", "width": 1, "height": 1, "channels": 3, "pipeline": False},
    }
    assert pipeline_categories(configured) == ["a"]
    assert pipeline_categories(None) == []


def test_get_category_returns_the_spec(configured: dict) -> None:
    spec = get_category("vial", configured)
    assert (spec.width, spec.height, spec.channels, spec.pipeline) == (1400, 1900, 1, False)


def test_unknown_category_lists_the_known_ones(configured: dict) -> None:
    with pytest.raises(UnknownCategoryError) as info:
        get_category("toaster", configured)
    message = str(info.value)
    assert message.startswith("Unknown category 'toaster'. Known categories: ")
    assert "can, fabric, fruit_jelly, rice, sheet_metal, vial, wallplugs, walnuts." in message
    assert "conf/local/parameters.yml" in message
    assert isinstance(info.value, KeyError)
