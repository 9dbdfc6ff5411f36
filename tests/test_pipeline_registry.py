"""Tests of the pipeline registry: one namespaced pipeline per configured category, stage pipelines, __default__."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kedro.framework.startup import bootstrap_project
from kedro.pipeline import Pipeline

from madfh_pipeline.pipeline_registry import configured_categories, register_pipelines

CATEGORIES = ("wallplugs", "sheet_metal", "walnuts", "fruit_jelly")
OFF = ("can", "fabric", "rice", "vial")
PREPROCESSING_NODES = (
    "validate_layout",
    "preprocess_images",
    "summarize_preprocessing",
    "build_validation_report",
    "build_manifest",
)
#: Parameters every category shares; anything else a category pipeline reads must be its own spec.
SHARED_PREFIXES = ("params:preprocessing", "params:splits", "params:demo_data", "params:data_source")
#: Datasets deliberately shared by every category: the review app's one settings file (a band per category).
SHARED_DATASETS = {"review_settings"}
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _names(pipe: Pipeline) -> set[str]:
    return {n.name for n in pipe.nodes}


def _add_parameters(project: Path, env: str, content: dict) -> None:
    (project / "conf" / env).mkdir(exist_ok=True)
    (project / "conf" / env / "parameters.yml").write_text(yaml.safe_dump(content))


@pytest.fixture
def project(kedro_project: Path) -> Path:
    """The temp project, bootstrapped as every Kedro entry point does (its settings: soft merge, resolvers)."""
    bootstrap_project(kedro_project)
    return kedro_project


@pytest.fixture
def pipelines(project: Path) -> dict[str, Pipeline]:
    return register_pipelines()


def test_registered_names(pipelines: dict[str, Pipeline]) -> None:
    assert {*CATEGORIES, "preprocessing", "demo_data", "__default__"} <= set(pipelines)
    assert not set(OFF) & set(pipelines)  # pipeline: false in conf/base


def test_default_is_the_union_of_the_category_pipelines(pipelines: dict[str, Pipeline]) -> None:
    union = set().union(*(_names(pipelines[c]) for c in CATEGORIES))
    assert _names(pipelines["__default__"]) == union
    assert not _names(pipelines["__default__"]) & _names(pipelines["demo_data"])  # generating data is opt-in


@pytest.mark.parametrize("category", CATEGORIES)
def test_category_pipeline_is_namespaced(pipelines: dict[str, Pipeline], category: str) -> None:
    pipe = pipelines[category]
    assert {f"{category}.{n}" for n in PREPROCESSING_NODES} <= _names(pipe)
    for n in pipe.nodes:
        assert n.name.startswith(f"{category}."), n.name
        assert not re.search(r"[(\[]", n.name), f"node without an explicit name: {n.name}"
        assert category in n.tags
    datasets = pipe.datasets()
    assert {
        f"{category}.raw_images",
        f"{category}.image_store",
        f"{category}.preprocessing_table",
        f"{category}.manifest",
        f"{category}.validation_report",
        f"{category}.validation_summary",
        f"{category}.preprocessing_metrics",
    } <= datasets
    for name in datasets:
        if name.startswith("params:categories."):
            assert name == f"params:categories.{category}", name
        elif name.startswith("params:"):
            assert not any(f"params:{c}" in name for c in CATEGORIES), name  # no per-category copies of stage params
        elif name not in SHARED_DATASETS:
            assert name.startswith(f"{category}."), name
    assert pipe.inputs() >= {f"{category}.raw_images", f"params:categories.{category}", "params:preprocessing"}


def test_preprocessing_stage_covers_every_category(pipelines: dict[str, Pipeline]) -> None:
    assert _names(pipelines["preprocessing"]) == {f"{c}.{n}" for c in CATEGORIES for n in PREPROCESSING_NODES}


def test_demo_data_pipeline(pipelines: dict[str, Pipeline]) -> None:
    pipe = pipelines["demo_data"]
    assert _names(pipe) == {f"{c}.generate_demo_category" for c in CATEGORIES}
    assert pipe.outputs() == {f"{c}.demo_images" for c in CATEGORIES}
    assert pipe.inputs() == {"params:demo_data", *(f"params:categories.{c}" for c in CATEGORIES)}


def test_new_category_in_conf_local_needs_no_code(project: Path) -> None:
    _add_parameters(
        project,
        "local",
        {
            "categories": {
                "toasters": {"name": "toasters", "width": 640, "height": 480, "channels": 3, "pipeline": True},
                "vial": {"pipeline": True},  # soft-merged onto conf/base
                "walnuts": {"pipeline": False},
            }
        },
    )
    pipelines = register_pipelines()
    assert {"toasters", "vial", "wallplugs", "sheet_metal", "fruit_jelly"} <= set(pipelines)
    assert "walnuts" not in pipelines
    assert {f"toasters.{n}" for n in PREPROCESSING_NODES} <= _names(pipelines["toasters"])
    assert "toasters.raw_images" in pipelines["toasters"].inputs()
    assert _names(pipelines["toasters"]) <= _names(pipelines["__default__"])
    assert "toasters.generate_demo_category" in _names(pipelines["demo_data"])
    assert configured_categories()["vial"]["width"] == 1400  # base facts kept under the override


def test_category_with_pipeline_false_is_not_registered(project: Path) -> None:
    _add_parameters(
        project,
        "local",
        {"categories": {"toasters": {"name": "toasters", "width": 6, "height": 4, "channels": 1, "pipeline": False}}},
    )
    assert "toasters" not in register_pipelines()


def test_categories_of_the_env_named_in_kedro_env(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _add_parameters(
        project, "staging", {"categories": {"mugs": {"name": "mugs", "width": 6, "height": 4, "channels": 1}}}
    )
    assert "mugs" not in register_pipelines()  # conf/local is the default env
    monkeypatch.setenv("KEDRO_ENV", "staging")
    assert "mugs" in register_pipelines()


def test_category_datasets_resolve_through_the_catalog_factories(kedro_project: Path) -> None:
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from madfh_pipeline.datasets import ImageStoreDataset, MVTecAD2Dataset

    bootstrap_project(kedro_project)
    with KedroSession.create(project_path=kedro_project, env="test") as session:
        context = session.load_context()
        catalog = context.catalog
        raw = catalog.get("walnuts.raw_images")
        assert isinstance(raw, MVTecAD2Dataset)
        assert raw.category_dir == kedro_project / "data/01_raw/test_demo/walnuts"
        store = catalog.get("walnuts.image_store")
        assert isinstance(store, ImageStoreDataset)
        assert store.load().root == kedro_project / "data/02_intermediate/walnuts"
        assert context.params["categories"]["walnuts"]["width"] == 96  # the test env's override, soft-merged
        assert context.params["categories"]["walnuts"]["channels"] == 3


def test_kedro_registry_list_in_the_real_project() -> None:
    env = os.environ | {"DO_NOT_TRACK": "1", "KEDRO_DISABLE_TELEMETRY": "1"}
    env.pop("KEDRO_ENV", None)
    kedro = Path(sys.executable).with_name("kedro")
    result = subprocess.run(
        [str(kedro), "registry", "list"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    listed = set(re.findall(r"^- (\w+)$", result.stdout, flags=re.MULTILINE))
    # only a superset: a developer's own conf/local may register more categories here
    assert {*CATEGORIES, "preprocessing", "demo_data", "__default__"} <= listed


def test_register_pipelines_without_a_bootstrapped_project(
    kedro_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Importing the registry in a plain interpreter (a notebook, a script) uses the project's config loader too.

    The project soft-merges envs, so a conf/local entry that only switches an official category on must keep its
    facts from conf/base, whether or not Kedro's global settings were configured (bootstrap_project) first. Kedro's
    settings are global to the process, so "not configured yet" is reproduced with a fresh settings object.
    """
    from kedro.framework.project import _ProjectSettings

    from madfh_pipeline import pipeline_registry

    monkeypatch.setattr(pipeline_registry, "settings", _ProjectSettings())
    _add_parameters(kedro_project, "local", {"categories": {"vial": {"pipeline": True}}})
    pipelines = register_pipelines()
    assert "vial" in pipelines
    assert configured_categories()["vial"]["width"] == 1400


# ---- the DAG shows every data flow (issue: stores are node outputs, nothing is written into a node input) ----


def _producers(pipe: Pipeline) -> dict[str, str]:
    return {out: n.name for n in pipe.nodes for out in n.outputs}


def _consumers(pipe: Pipeline, dataset: str) -> set[str]:
    return {n.name for n in pipe.nodes if dataset in n.inputs}


def test_stores_are_outputs_of_the_nodes_that_write_them(project: Path, pipelines: dict[str, Pipeline]) -> None:
    from madfh_pipeline.pipeline_registry import configured_detectors, configured_parameters

    pipe = pipelines["wallplugs"]
    producers = _producers(pipe)
    detectors = configured_detectors(configured_parameters())
    assert {"autoencoder", "patchcore"} <= set(detectors)
    assert producers["wallplugs.image_store"] == "wallplugs.preprocess_images"
    readers = _consumers(pipe, "wallplugs.image_store")
    for detector in detectors:
        ns = f"wallplugs.{detector}"
        assert {f"{ns}.fit_detector", f"{ns}.calibrate_thresholds", f"{ns}.score_images"} <= readers, detector
        assert producers[f"{ns}.anomaly_maps"] == f"{ns}.score_images", detector
        maps_readers = _consumers(pipe, f"{ns}.anomaly_maps")
        assert {f"{ns}.compute_metrics", f"{ns}.plot_evaluation", f"{ns}.export_submission"} <= maps_readers
        assert producers[f"{ns}.submission"] == f"{ns}.export_submission", detector
        assert producers[f"{ns}.model"] == f"{ns}.calibrate_thresholds", detector
    for n in pipe.nodes:
        assert not set(n.inputs) & set(n.outputs), f"{n.name} writes into its own input"
    # what the pipeline writes is never a free input: a partial run cannot read a store no node of it produced
    written = {"wallplugs.image_store"} | {
        f"wallplugs.{d}.{name}" for d in detectors for name in ("model", "anomaly_maps", "submission")
    }
    assert not written & pipe.inputs()
    assert {"wallplugs.raw_images", "wallplugs.raw_masks"} <= pipe.inputs()  # read-only sources


def test_kedro_viz_draws_the_same_edges(project: Path) -> None:
    """kedro-viz builds its graph from a session without hooks: the registry must still see the env's parameters."""
    from kedro_viz.data_access import data_access_manager
    from kedro_viz.server import load_and_populate_data

    load_and_populate_data(project, env="test", pipeline_name="wallplugs")
    nodes = {
        n.id: n.name if n.type != "task" else n.kedro_obj.name
        for n in data_access_manager.get_nodes_for_registered_pipeline("wallplugs")
    }
    edges = {
        (nodes[e.source], nodes[e.target]) for e in data_access_manager.get_edges_for_registered_pipeline("wallplugs")
    }
    assert ("wallplugs.preprocess_images", "wallplugs.image_store") in edges
    for detector in ("autoencoder", "patchcore"):  # the test env's detectors
        ns = f"wallplugs.{detector}"
        assert ("wallplugs.image_store", f"{ns}.fit_detector") in edges
        assert ("wallplugs.image_store", f"{ns}.score_images") in edges
        assert (f"{ns}.score_images", f"{ns}.anomaly_maps") in edges
        for reader in ("compute_metrics", "plot_evaluation", "export_submission"):
            assert (f"{ns}.anomaly_maps", f"{ns}.{reader}") in edges, reader
        assert (f"{ns}.export_submission", f"{ns}.submission") in edges
    assert not any(".hybrid." in a or ".hybrid." in b for a, b in edges)  # not a detector of the test env


# ---- the registry builds from the session's parameters: its env and its runtime (--params) parameters ----

GADGETS = {"categories": {"gadgets": {"name": "gadgets", "width": 96, "height": 80, "channels": 1}}}


def _session_pipelines(project: Path, env: str, runtime_params: dict[str, Any] | None = None) -> set[str]:
    from kedro.framework.project import pipelines as project_pipelines
    from kedro.framework.session import KedroSession

    with KedroSession.create(project_path=project, env=env, runtime_params=runtime_params) as session:
        session.load_context()
        return set(project_pipelines)


def _session_nodes(project: Path, env: str, name: str, runtime_params: dict[str, Any] | None = None) -> set[str]:
    from kedro.framework.project import pipelines as project_pipelines
    from kedro.framework.session import KedroSession

    with KedroSession.create(project_path=project, env=env, runtime_params=runtime_params) as session:
        session.load_context()
        return {n.name for n in project_pipelines[name].nodes}


def test_a_category_of_the_sessions_env_gets_its_pipeline(project: Path, make_env: Callable[..., Path]) -> None:
    make_env(project, "onlyhere", GADGETS)
    assert "gadgets" in _session_pipelines(project, "onlyhere")
    assert "gadgets" not in _session_pipelines(project, "test")  # the same process, another env: gone again
    assert "gadgets" in _session_pipelines(project, "onlyhere")


def test_a_detector_added_by_runtime_params_gets_its_nodes(project: Path) -> None:
    extra = {
        "detection": {
            "detectors": ["autoencoder", "patchcore", "pc3"],
            "models": {"pc3": {"name": "pc3", "type": "patchcore", "config": {"num_neighbors": 3}}},
        }
    }
    nodes = _session_nodes(project, "test", "wallplugs", extra)
    expected = {f"wallplugs.pc3.{n}" for n in ("fit_detector", "calibrate_thresholds", "score_images")}
    assert expected | {"wallplugs.pc3.export_submission"} <= nodes
    assert "wallplugs.patchcore.fit_detector" in nodes
    assert not any(".pc3." in n for n in _session_nodes(project, "test", "wallplugs"))  # without --params: none


@pytest.mark.slow
def test_runtime_params_reach_the_fitted_detector(
    project: Path,
    make_mvtec_tree: Callable[..., Path],
    mlflow_runs: Callable[..., list[Any]],
    detector_runs: Callable[[Path, Any], dict[str, Any]],
) -> None:
    """``--params detection.models.patchcore.config.num_neighbors=3`` is the config the detector is fitted with."""
    from kedro.framework.session import KedroSession

    make_mvtec_tree(project / "data/01_raw/test_demo", "wallplugs", width=96, height=80, channels=1)
    runtime = {
        "detection": {"models": {"patchcore": {"config": {"num_neighbors": 3}}}},
        "preprocessing": {"workers": 1},
    }
    with KedroSession.create(project_path=project, env="test", runtime_params=runtime) as session:
        params = session.load_context().params
        assert params["detection"]["models"]["patchcore"]["config"] == {
            "max_bank_size": 256,  # the test env's value, deep-merged under the runtime parameter
            "pool_max_patches": 5000,
            "num_neighbors": 3,
        }
        session.run(pipeline_names=["wallplugs"], to_nodes=["wallplugs.patchcore.fit_detector"])
    (run,) = mlflow_runs(project, "tags.pipeline = 'wallplugs'")
    assert "--params=detection.models.patchcore.config.num_neighbors=3" in run.data.tags["kedro_command"]
    children = detector_runs(project, run)
    assert set(children) == {"patchcore"}  # only the slice that ran
    child_params = children["patchcore"].data.params
    assert child_params["config.num_neighbors"] == "3"
    assert child_params["config.max_bank_size"] == "256"
    assert "num_neighbors=3" in children["patchcore"].info.run_name  # a row of the runs table says what differs
