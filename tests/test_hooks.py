"""Tests of the MLflow run tags: what a run ran on (pipelines, categories, data source, env)."""

from __future__ import annotations

import logging
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
        run_id = "parent-run"
        experiment_id = "7"


class _Hooked:
    """What the hook did: tags set on the parent run, tracking started, experiments marked."""

    def __init__(self) -> None:
        self.tags: list[dict[str, str]] = []
        self.started: list[tuple[str, dict[str, str], str]] = []
        self.marked: list[str] = []

    def __getitem__(self, index: int) -> dict[str, str]:
        return self.tags[index]

    def __len__(self) -> int:
        return len(self.tags)


def _hooked(monkeypatch: pytest.MonkeyPatch, active: bool) -> _Hooked:
    calls = _Hooked()
    monkeypatch.setattr(hooks.mlflow, "active_run", lambda: _Run() if active else None)
    monkeypatch.setattr(hooks.mlflow, "set_tags", calls.tags.append)
    monkeypatch.setattr(
        hooks.tracking, "start", lambda run_id, tags, suffix="": calls.started.append((run_id, tags, suffix))
    )
    monkeypatch.setattr(hooks.tracking, "git_commit", lambda path: "abc123")
    monkeypatch.setattr(hooks, "_mark_experiment", calls.marked.append)
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
    run_params = {"pipeline_names": ["walnuts", "wallplugs"], "env": "test", "runner": "SequentialRunner"}
    RunTagsHook().before_pipeline_run(run_params=run_params, pipeline=pipe, catalog=_catalog(PARAMS))
    assert len(calls) == 1
    tags = calls[0]
    assert tags["category"] == "wallplugs,walnuts"
    assert tags["pipeline"] == "walnuts+wallplugs"
    assert tags["data_source"] == "demo"
    assert tags["kedro_env"] == "test"
    assert tags["git_commit"] == "abc123"
    assert tags["kedro_command"] == "kedro run --env=test --pipelines=walnuts,wallplugs"
    assert tags["runner"] == "SequentialRunner"
    assert tags["mlflow.runName"] == "walnuts+wallplugs (demo)"
    assert calls.marked == ["7"]  # the experiment opens in MLflow's model-training view
    # detector runs inherit what every row of the runs table needs
    ((run_id, shared, suffix),) = calls.started
    assert run_id == "parent-run" and suffix == ""
    assert shared == {
        "data_source": "demo",
        "git_commit": "abc123",
        "kedro_env": "test",
        "pipeline": "walnuts+wallplugs",
    }


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
    assert calls.tags == [] and calls.started == []


@pytest.mark.parametrize(
    ("runner", "expected"),
    [
        ("<kedro.runner.sequential_runner.SequentialRunner object at 0x7f3a2c1d5e50>", "SequentialRunner"),
        ("<kedro.runner.thread_runner.ThreadRunner object at 0x7f3a2c1d5e50>", "ThreadRunner"),
        ("SequentialRunner", "SequentialRunner"),
        # KedroSession.run() without a runner records str(None) before it falls back to a SequentialRunner
        ("None", "SequentialRunner"),
        (None, "SequentialRunner"),
    ],
)
def test_runner_tag_is_the_class_name(monkeypatch: pytest.MonkeyPatch, runner: str | None, expected: str) -> None:
    calls = _hooked(monkeypatch, active=True)
    pipe = namespaced(preprocessing_pipeline(), "wallplugs")
    RunTagsHook().before_pipeline_run(run_params={"runner": runner}, pipeline=pipe, catalog=_catalog(PARAMS))
    assert calls[0]["runner"] == expected


def test_kedro_command_reproduces_the_run() -> None:
    run_params = {
        "env": "demo",
        "pipeline_names": ["wallplugs"],
        "node_names": ["wallplugs.patchcore.fit_detector"],
        "from_nodes": ["a", "b"],
        "runtime_params": {"detection": {"models": {"patchcore": {"config": {"num_neighbors": 3}}}}, "seed": 1},
    }
    assert hooks.kedro_command(run_params) == (
        "kedro run --env=demo --pipelines=wallplugs --node-names=wallplugs.patchcore.fit_detector --from-nodes=a,b "
        "--params=detection.models.patchcore.config.num_neighbors=3,seed=1"
    )
    assert hooks.kedro_command({}) == "kedro run --pipelines=__default__"


def test_runtime_params_name_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _hooked(monkeypatch, active=True)
    run_params = {"pipeline_names": ["wallplugs"], "runtime_params": {"detection": {"runtime": {"batch_size": 2}}}}
    RunTagsHook().before_pipeline_run(
        run_params=run_params, pipeline=namespaced(preprocessing_pipeline(), "wallplugs"), catalog=_catalog(PARAMS)
    )
    assert calls[0]["mlflow.runName"] == "wallplugs (demo) · batch_size=2"
    assert calls.started[0][2] == " · batch_size=2"  # detector runs carry the same suffix


# ---- end of the run: reports collected, detector runs closed, a summary logged ----

REPORT = {
    "model": "patchcore",
    "resolution": "canvas",
    "test_public": {"all": {"image_auroc": 0.91234, "au_pro_005": 0.5, "seg_f1": float("nan"), "class_f1": 0.75}},
}


def test_summary_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hooks.tracking, "run_url", lambda run_id, experiment_id=None, ui="": f"{ui}/#/runs/{run_id}")
    reports = {("wallplugs", "patchcore"): REPORT, ("wallplugs", "autoencoder"): {"test_public": {}}}
    text = hooks.summary(reports, {("wallplugs", "patchcore"): "c1"}, "parent-run", tmp_path)
    lines = text.splitlines()
    assert lines[0] == "Results on test_public (thresholds from validation/good only):"
    header = lines[2].split()
    assert header[:4] == ["category", "detector", "image", "AUROC"]
    rows = {line.split()[1]: line.split() for line in lines[4:6]}
    assert rows["patchcore"][2:7] == ["0.912", "0.500", "—", "0.750", "canvas"]  # NaN is a dash, not "nan"
    assert rows["autoencoder"][2:6] == ["—", "—", "—", "—"]
    assert f"Figures and reports: {tmp_path / 'data/08_reporting/wallplugs'}/<detector>/" in text
    assert "http://127.0.0.1:5000/#/runs/parent-run" in text and "one nested run per detector (1)" in text


def test_after_pipeline_run_closes_detector_runs_and_logs_the_summary(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    finished: list[str] = []
    monkeypatch.setattr(hooks.tracking, "children", lambda: {})
    monkeypatch.setattr(hooks.tracking, "finish", lambda status="FINISHED": finished.append(status) or [])
    hook = RunTagsHook()
    hook.after_node_run(node=None, outputs={"wallplugs.patchcore.evaluation_report": REPORT, "wallplugs.manifest": 1})
    with caplog.at_level(logging.INFO, logger="madfh_pipeline.hooks"):
        hook.after_pipeline_run(run_params={}, pipeline=None, catalog=DataCatalog())
    assert finished == ["FINISHED"]
    assert "Results on test_public" in caplog.text and "patchcore" in caplog.text
    hook.on_pipeline_error(error=RuntimeError("x"), run_params={}, pipeline=None, catalog=None)
    assert finished == ["FINISHED", "FAILED"]


def test_no_summary_without_evaluation(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(hooks.tracking, "finish", lambda status="FINISHED": [])
    with caplog.at_level(logging.INFO, logger="madfh_pipeline.hooks"):
        RunTagsHook().after_pipeline_run(run_params={}, pipeline=None, catalog=DataCatalog())
    assert "Results on test_public" not in caplog.text
