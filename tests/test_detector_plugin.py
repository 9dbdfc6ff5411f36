"""Adding a detector is one new module plus one parameters entry: a toy detector from a module outside the package.

The module is written into a temp folder (nothing in src/ knows it), named by ``detection.models.toy.module`` in a
test env, and the category pipeline runs it end to end: fit, calibrate, score, metrics, figures, export.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from madfh_pipeline.models.base import load_detector, read_header, save_detector

TOY_MODULE = '''
"""A detector of one's own: the mean training image; the map is the absolute difference to it, times ``scale``."""

import numpy as np
import torch

from madfh_pipeline.models.base import AnomalyDetector, DetectorOutput


class ToyDetector(AnomalyDetector):
    name = "toy"

    def __init__(self, config=None):
        config = {"scale": 1.0, **(config or {})}
        unknown = set(config) - {"scale"}
        if unknown:
            raise ValueError(f"Unknown toy config keys {sorted(unknown)}")
        super().__init__(config)
        self.mean = None

    def fit(self, batches):
        total, count = None, 0
        for batch in batches():
            total = batch.sum(0) if total is None else total + batch.sum(0)
            count += batch.shape[0]
        self.mean = total / count
        return {"loss": [float(self.mean.mean())]}

    def predict(self, batch):
        maps = ((batch - self.mean.to(batch.device)).abs().mean(dim=1) * self.config["scale"]).cpu().numpy()
        maps = maps.astype(np.float32)
        return DetectorOutput(scores=maps.reshape(len(maps), -1).max(axis=1), maps=maps)

    def get_state(self):
        return {"mean": self.mean}

    def set_state(self, state):
        self.mean = state["mean"]
'''
MODULE_NAME = "toy_detectors_for_tests"
TOY_ENTRY = {"name": "toy", "module": MODULE_NAME, "config": {"scale": 2.0}}


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / f"{MODULE_NAME}.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    return folder


@pytest.mark.slow
def test_a_detector_from_an_outside_module_runs_the_category_pipeline(
    kedro_project: Path,
    plugin_dir: Path,
    make_env: Callable[..., Path],
    make_mvtec_tree: Callable[..., Path],
    mlflow_runs: Callable[..., list[Any]],
    detector_runs: Callable[[Path, Any], dict[str, Any]],
) -> None:
    project = kedro_project
    make_env(
        project,
        "toyenv",
        {
            "detection": {"detectors": ["toy"], "models": {"toy": TOY_ENTRY}},
            "preprocessing": {"workers": 1},
        },
    )
    make_mvtec_tree(project / "data/01_raw/test_demo", "wallplugs", width=96, height=80, channels=1)
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env="toyenv") as session:
        session.run(pipeline_names=["wallplugs"])

    # the report of the toy detector, next to where the built-in ones put theirs
    report = json.loads((project / "data/08_reporting/wallplugs/toy/metrics.json").read_text())
    assert report["model"] == "toy" and report["resolution"] == "canvas"
    assert report["test_public"]["all"]["n_images"] == 4.0
    assert report["thresholds"]["pixel"] is not None and report["thresholds"]["image"] is not None
    figures = sorted(p.name for p in (project / "data/08_reporting/wallplugs/toy/figures").iterdir())
    assert figures == ["heatmaps.png", "pro_curve.png", "roc.png", "score_histogram.png"]
    assert (project / "data/07_model_output/submission/toy/anomaly_images/wallplugs/test_private").is_dir()

    # its model file: safetensors with its module in the header, and it round-trips
    (model_file,) = (project / "data/06_models/wallplugs/toy.safetensors").glob("*/toy.safetensors")
    header = read_header(model_file)
    assert (header["name"], header["module"], header["config"]) == ("toy", MODULE_NAME, {"scale": 2.0})
    loaded = load_detector(model_file)
    assert type(loaded).__module__ == MODULE_NAME and type(loaded).__name__ == "ToyDetector"
    assert loaded.thresholds.pixel == report["thresholds"]["pixel"]
    assert loaded.provenance["detector"] == "toy" and loaded.provenance["training_fingerprint"]
    save_detector(loaded, project / "copy.safetensors")
    again = load_detector(project / "copy.safetensors")
    probe = torch.rand(2, 1, 64, 64)
    np.testing.assert_array_equal(again.predict(probe).maps, loaded.predict(probe).maps)
    assert again.fingerprint == loaded.fingerprint

    # and its own row in the MLflow runs table
    (run,) = mlflow_runs(project, "tags.pipeline = 'wallplugs'")
    assert run.data.tags["model"] == "toy"
    child = detector_runs(project, run)["toy"]
    assert {"image_auroc", "threshold_pixel", "threshold_image", "train_loss"} <= set(child.data.metrics)
    assert child.data.params["config.scale"] == "2.0"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    assert [a.path for a in client.list_artifacts(child.info.run_id, "model")] == ["model/toy.safetensors"]


def test_the_context_imports_the_modules_that_detector_entries_name(
    kedro_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_env: Callable[..., Path]
) -> None:
    """So a saved plug-in model loads in any session of that env, even one that does not fit it."""
    name = "toy_detectors_imported_by_the_context"
    folder = tmp_path / "context_plugins"
    folder.mkdir()
    (folder / f"{name}.py").write_text(TOY_MODULE.replace('name = "toy"', 'name = "toy_context"'))
    monkeypatch.syspath_prepend(str(folder))
    make_env(
        kedro_project,
        "ctxenv",
        {"detection": {"models": {"tc": {"name": "tc", "type": "toy_context", "module": name}}}},
    )
    bootstrap_project(kedro_project)
    assert name not in sys.modules
    with KedroSession.create(project_path=kedro_project, env="ctxenv") as session:
        session.load_context()
    assert name in sys.modules
    make_env(
        kedro_project, "brokenenv", {"detection": {"models": {"tc": {"name": "tc", "module": "no_such_plugin_x"}}}}
    )
    with KedroSession.create(project_path=kedro_project, env="brokenenv") as session:
        with pytest.raises(ImportError, match=r"detection\.models\.tc\.module: cannot import 'no_such_plugin_x'"):
            session.load_context()
