"""Tests of the pipeline registry: one namespaced pipeline per configured category, stage pipelines, __default__."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kedro.pipeline import Pipeline

from madfh_pipeline.pipeline_registry import configured_categories, register_pipelines

CATEGORIES = ("wallplugs", "sheet_metal", "walnuts", "fruit_jelly")
OFF = ("can", "fabric", "rice", "vial")
PREPROCESSING_NODES = ("validate_layout", "preprocess_images", "build_validation_report", "build_manifest")
#: Parameters every category shares; anything else a category pipeline reads must be its own spec.
SHARED_PREFIXES = ("params:preprocessing", "params:splits", "params:demo_data", "params:data_source")
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _names(pipe: Pipeline) -> set[str]:
    return {n.name for n in pipe.nodes}


def _add_parameters(project: Path, env: str, content: dict) -> None:
    (project / "conf" / env).mkdir(exist_ok=True)
    (project / "conf" / env / "parameters.yml").write_text(yaml.safe_dump(content))


@pytest.fixture
def pipelines(kedro_project: Path) -> dict[str, Pipeline]:
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
        else:
            assert name.startswith(f"{category}."), name
    assert pipe.inputs() >= {f"{category}.raw_images", f"params:categories.{category}", "params:preprocessing"}


def test_preprocessing_stage_covers_every_category(pipelines: dict[str, Pipeline]) -> None:
    assert _names(pipelines["preprocessing"]) == {f"{c}.{n}" for c in CATEGORIES for n in PREPROCESSING_NODES}


def test_demo_data_pipeline(pipelines: dict[str, Pipeline]) -> None:
    pipe = pipelines["demo_data"]
    assert _names(pipe) == {f"{c}.generate_demo_category" for c in CATEGORIES}
    assert pipe.outputs() == {f"{c}.demo_images" for c in CATEGORIES}
    assert pipe.inputs() == {"params:demo_data", *(f"params:categories.{c}" for c in CATEGORIES)}


def test_new_category_in_conf_local_needs_no_code(kedro_project: Path) -> None:
    _add_parameters(
        kedro_project,
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


def test_category_with_pipeline_false_is_not_registered(kedro_project: Path) -> None:
    _add_parameters(
        kedro_project,
        "local",
        {"categories": {"toasters": {"name": "toasters", "width": 6, "height": 4, "channels": 1, "pipeline": False}}},
    )
    assert "toasters" not in register_pipelines()


def test_categories_of_the_env_named_in_kedro_env(kedro_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _add_parameters(
        kedro_project, "staging", {"categories": {"mugs": {"name": "mugs", "width": 6, "height": 4, "channels": 1}}}
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
