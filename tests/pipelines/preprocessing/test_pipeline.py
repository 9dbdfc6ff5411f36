"""The preprocessing template: its wiring, and a run of the namespaced copy on a tiny tree with a plain runner."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from madfh_pipeline.datasets import ImageStoreDataset, MVTecAD2Dataset
from madfh_pipeline.pipeline_registry import namespaced
from madfh_pipeline.pipelines.preprocessing import create_pipeline
from madfh_pipeline.pipelines.preprocessing.nodes import NoUsableDataError

OUTPUTS = (
    "checked_files",
    "preprocessing_table",
    "preprocessing_stats",
    "validation_report",
    "validation_summary",
)
NODES = ["validate_layout", "preprocess_images", "summarize_preprocessing", "build_validation_report", "build_manifest"]


def test_template_wiring() -> None:
    template = create_pipeline()
    assert [n.name for n in template.nodes] == NODES
    assert template.inputs() == {"raw_images", "params:category", "params:preprocessing", "params:splits"}
    assert template.outputs() == {"preprocessing_metrics", "validation_summary", "manifest"}
    assert set(template.all_outputs()) >= {"checked_files", "image_store", "preprocessing_table", "validation_report"}
    preprocess, summarize = template.nodes[1], template.nodes[2]
    # the store is what preprocess_images writes (an output), and what the summary reads (an input): the DAG shows it
    assert preprocess.outputs == ["image_store"] and "image_store" not in preprocess.inputs
    assert summarize.inputs[0] == "image_store"


def test_namespaced_copy() -> None:
    pipe = namespaced(create_pipeline(), "wallplugs")
    assert {n.name for n in pipe.nodes} == {f"wallplugs.{n}" for n in NODES}
    assert pipe.inputs() == {
        "wallplugs.raw_images",
        "params:categories.wallplugs",
        "params:preprocessing",
        "params:splits",
    }
    assert pipe.outputs() == {
        "wallplugs.preprocessing_metrics",
        "wallplugs.validation_summary",
        "wallplugs.manifest",
    }
    assert "wallplugs.image_store" in pipe.all_outputs()
    assert all(n.tags == {"wallplugs"} for n in pipe.nodes)
    assert all(n.namespace == "wallplugs" for n in pipe.nodes)


def _catalog(root: Path, store: Path, category: dict, preprocessing: dict) -> DataCatalog:
    name = category["name"]
    datasets: dict[str, Any] = {
        f"{name}.raw_images": MVTecAD2Dataset(path=str(root), category=name),
        f"{name}.image_store": ImageStoreDataset(path=str(store)),
        f"params:categories.{name}": MemoryDataset(category),
        "params:preprocessing": MemoryDataset(preprocessing),
        "params:splits": MemoryDataset({"extra_validation": 1, "seed": 42}),
    }
    for out in (*OUTPUTS, "manifest", "preprocessing_metrics"):
        datasets[f"{name}.{out}"] = MemoryDataset(copy_mode="assign")
    return DataCatalog(datasets=datasets)


def test_run_on_a_tiny_tree(
    tmp_path: Path,
    make_mvtec_tree: Callable[..., Path],
    make_category: Callable[..., dict],
    preprocessing_params: dict,
) -> None:
    cat_dir = make_mvtec_tree(tmp_path / "raw", "gizmo", width=40, height=20, channels=3)
    (cat_dir / "train/good/000_regular.png").write_bytes(b"garbage")
    category = make_category("gizmo", 40, 20, 3)
    catalog = _catalog(tmp_path / "raw", tmp_path / "store", category, preprocessing_params)
    SequentialRunner().run(namespaced(create_pipeline(), "gizmo"), catalog)
    manifest = catalog.load("gizmo.manifest")
    assert len(manifest) == 11
    assert (manifest["split"] != manifest["official_split"]).sum() == 1
    # intermediate MemoryDatasets are released by the runner; the pipeline's free outputs stay
    assert catalog.load("gizmo.preprocessing_metrics")["n_skipped"] == {"value": 1.0, "step": 0}
    assert "`train/good/000_regular.png`" in catalog.load("gizmo.validation_summary")
    assert (tmp_path / "store/_index.parquet").is_file()
    assert (tmp_path / "store/test_public/ground_truth/bad/001_overexposed_mask.png").is_file()
    # a second run of the same pipeline writes nothing: the store keeps what did not change
    catalog = _catalog(tmp_path / "raw", tmp_path / "store", category, preprocessing_params)
    SequentialRunner().run(namespaced(create_pipeline(), "gizmo"), catalog)
    metrics = catalog.load("gizmo.preprocessing_metrics")
    assert metrics["n_processed"]["value"] == 0.0 and metrics["n_unchanged"]["value"] == 11.0


def test_run_fails_clearly_when_nothing_is_usable(
    tmp_path: Path, make_category: Callable[..., dict], preprocessing_params: dict
) -> None:
    (tmp_path / "raw/gizmo").mkdir(parents=True)
    catalog = _catalog(tmp_path / "raw", tmp_path / "store", make_category("gizmo"), preprocessing_params)
    with pytest.raises(NoUsableDataError, match="No images found for category 'gizmo'"):
        SequentialRunner().run(namespaced(create_pipeline(), "gizmo"), catalog)
