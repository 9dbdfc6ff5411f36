"""Tests of the MLflow run tags: what a run ran on (pipelines, categories, data source, env)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import node, pipeline

from madfh_pipeline import hooks
from madfh_pipeline.hooks import RunTagsHook, run_tags
from madfh_pipeline.pipeline_registry import namespaced
from madfh_pipeline.pipelines.preprocessing import create_pipeline as preprocessing_pipeline


def test_single_pipeline() -> None:
    tags = run_tags({"pipeline_names": ["wallplugs"], "env": "demo"}, {"data_source": "demo"}, ["wallplugs"])
    assert tags["pipeline"] == "wallplugs"
    assert tags["category"] == "wallplugs"
    assert tags["data_source"] == "demo"
    assert tags["kedro_env"] == "demo"


def test_multiple_pipelines_and_categories() -> None:
    tags = run_tags(
        {"pipeline_names": ["wallplugs", "walnuts"], "env": None},
        {"data_source": "real"},
        ["wallplugs", "walnuts"],
    )
    assert tags["pipeline"] == "wallplugs+walnuts"
    assert tags["category"] == "wallplugs,walnuts"
    assert tags["data_source"] == "real"
    assert tags["kedro_env"] == "local"


@pytest.mark.parametrize(
    ("run_params", "expected"),
    [
        ({"pipeline_name": "preprocessing"}, "preprocessing"),  # the deprecated single-name key
        ({"pipeline_names": None, "pipeline_name": None}, "__default__"),
        ({}, "__default__"),
        ({"pipeline_names": "sheet_metal"}, "sheet_metal"),  # a bare string is one name, not characters
        ({"pipeline_names": [], "pipeline_name": "demo_data"}, "demo_data"),
    ],
)
def test_pipeline_name_fallbacks(run_params: dict, expected: str) -> None:
    assert run_tags(run_params, {}, [])["pipeline"] == expected


def test_defaults_when_nothing_is_known() -> None:
    tags = run_tags({}, {}, [])
    assert tags["category"] == "none"
    assert tags["data_source"] == "unknown"
    assert tags["kedro_env"] == "local"
    assert all(isinstance(v, str) for v in tags.values())


def test_base_and_demo_configs_declare_their_data_source() -> None:
    conf = Path(__file__).resolve().parents[1] / "conf"
    base = yaml.safe_load((conf / "base/parameters.yml").read_text())
    demo = yaml.safe_load((conf / "demo/parameters.yml").read_text())
    assert run_tags({}, base, [])["data_source"] == "real"
    assert run_tags({}, base | demo, [])["data_source"] == "demo"


class _Run:
    class info:  # noqa: N801 - mimics mlflow.entities.Run.info
        run_name = "fake"


def _hooked(monkeypatch: pytest.MonkeyPatch, active: bool) -> list[dict[str, str]]:
    calls: list[dict[str, str]] = []
    monkeypatch.setattr(hooks.mlflow, "active_run", lambda: _Run() if active else None)
    monkeypatch.setattr(hooks.mlflow, "set_tags", calls.append)
    return calls


def _catalog(params: dict[str, Any]) -> DataCatalog:
    return DataCatalog(datasets={"parameters": MemoryDataset(params)})


PARAMS = {
    "data_source": "demo",
    "categories": {"wallplugs": {}, "walnuts": {}, "vial": {}},
    "detection": {"models": {"patchcore": {}, "autoencoder": {}}},
}


def test_hook_tags_the_active_run(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _hooked(monkeypatch, active=True)
    pipe = namespaced(preprocessing_pipeline(), "walnuts") + namespaced(preprocessing_pipeline(), "wallplugs")
    run_params = {"pipeline_names": ["walnuts", "wallplugs"], "env": "test"}
    RunTagsHook().before_pipeline_run(run_params=run_params, pipeline=pipe, catalog=_catalog(PARAMS))
    assert len(calls) == 1
    tags = calls[0]
    assert tags["category"] == "wallplugs,walnuts"
    assert tags["pipeline"] == "walnuts+wallplugs"
    assert tags["data_source"] == "demo"
    assert tags["kedro_env"] == "test"


def test_hook_ignores_namespaces_that_are_not_categories(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _hooked(monkeypatch, active=True)
    pipe = pipeline([node(lambda x: x, "a", "b", name="copy")], namespace="scratch") + namespaced(
        preprocessing_pipeline(), "wallplugs"
    )
    RunTagsHook().before_pipeline_run(run_params={}, pipeline=pipe, catalog=_catalog(PARAMS))
    assert calls[0]["category"] == "wallplugs"


def test_hook_reports_models_of_nested_namespaces(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _hooked(monkeypatch, active=True)
    pipe = pipeline([node(lambda x: x, "a", "b", name="fit")], namespace="wallplugs.patchcore")
    RunTagsHook().before_pipeline_run(run_params={}, pipeline=pipe, catalog=_catalog(PARAMS))
    assert calls[0]["category"] == "wallplugs"
    assert calls[0]["model"] == "patchcore"


def test_hook_without_parameters_still_tags(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _hooked(monkeypatch, active=True)
    pipe = namespaced(preprocessing_pipeline(), "wallplugs")
    RunTagsHook().before_pipeline_run(run_params={}, pipeline=pipe, catalog=DataCatalog())
    assert calls[0]["category"] == "none"  # no categories known without parameters
    assert calls[0]["data_source"] == "unknown"


def test_hook_does_nothing_without_an_active_run(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _hooked(monkeypatch, active=False)
    RunTagsHook().before_pipeline_run(
        run_params={}, pipeline=namespaced(preprocessing_pipeline(), "wallplugs"), catalog=_catalog(PARAMS)
    )
    assert calls == []
