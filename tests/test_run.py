"""End to end in a throw-away copy of the project: generate demo data, break two files, run the wallplugs pipeline.

Uses the ``test`` env of the ``kedro_project`` fixture (96x80 images, 64x64 canvas, two workers, data_source demo,
canvas-resolution metrics). The first full run is checked for its preprocessing report and for what MLflow shows
(one nested run per detector with its metrics, tags, model and figures); a second run with nothing changed must
reuse every model and every map.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
import yaml
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

CATEGORIES = ("wallplugs", "sheet_metal", "walnuts", "fruit_jelly")
DETECTORS = ("autoencoder", "patchcore")
#: Per category, from conftest.TEST_ENV_COUNTS: 6 train, 2 validation, 2 + 3 test_public, 1 + 1 private.
N_IMAGES = 15
N_MASKS = 3
#: Images scored per detector after the two broken files: 2 validation + 4 test_public + 2 private.
N_SCORED = 8
#: The test env evaluates at the canvas resolution, so pixel metrics carry the ``canvas.`` prefix (image metrics
#: and thresholds do not): a canvas number can never be read as a benchmark (native) number.
DETECTOR_METRICS = ("image_auroc", "canvas.au_pro_005", "canvas.seg_f1", "threshold_pixel", "threshold_image")
DETECTOR_TAGS = ("detector", "git_commit", "data_source", "category", "kedro_env")
FIGURES = ("heatmaps.png", "pro_curve.png", "roc.png", "score_histogram.png")


def _run(project: Path, name: str, env: str = "test", **kwargs: Any) -> None:
    with KedroSession.create(project_path=project, env=env) as session:
        session.run(pipeline_names=[name], **kwargs)


def _end_leaked_runs() -> None:
    # Work-around for the leaked run (see test_each_session_closes_its_mlflow_run): without it every later session of
    # this process logs into the first session's run.
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.mark.slow
def test_demo_data_then_wallplugs(
    kedro_project: Path,
    mlflow_runs: Callable[..., list[Any]],
    detector_runs: Callable[[Path, Any], dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    project = kedro_project
    bootstrap_project(project)

    # 1. generate the demo data set (all four categories, in the official layout)
    _run(project, "demo_data")
    _end_leaked_runs()
    raw = project / "data/01_raw/test_demo/wallplugs"
    for category in CATEGORIES:
        files = list((project / "data/01_raw/test_demo" / category).rglob("*.png"))
        assert len(files) == N_IMAGES + N_MASKS, category
    (demo_run,) = mlflow_runs(project, "tags.pipeline = 'demo_data'")
    assert demo_run.info.status == "FINISHED"
    assert demo_run.data.tags["category"] == "fruit_jelly,sheet_metal,wallplugs,walnuts"
    assert demo_run.data.tags["data_source"] == "demo"

    # 2. break two files: a corrupt train image and a missing ground-truth mask
    corrupt = raw / "train/good/002_regular.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    mask = sorted((raw / "test_public/ground_truth/bad").glob("*_mask.png"))[1]
    mask.unlink()
    orphan_image = "test_public/bad/" + mask.name.replace("_mask.png", ".png")
    assert (raw / orphan_image).is_file()

    # 3. the whole category pipeline (preprocessing, both detectors, evaluation, export) completes and names both files
    with caplog.at_level(logging.INFO):
        _run(project, "wallplugs")
    _end_leaked_runs()
    assert "Results on test_public" in caplog.text  # the end-of-run summary
    report = json.loads((project / "data/08_reporting/wallplugs/validation_report.json").read_text())
    skipped = {s["file"]: s["problem"] for s in report["skipped"]}
    assert set(skipped) == {"train/good/002_regular.png", orphan_image}
    assert "corrupt" in skipped["train/good/002_regular.png"]
    assert skipped[orphan_image] == f"missing ground-truth mask test_public/ground_truth/bad/{mask.name}"
    assert (report["n_images_found"], report["n_usable"], report["n_skipped"]) == (N_IMAGES, N_IMAGES - 2, 2)
    assert report["stats"]["settings"] == {
        "target_width": 64,
        "target_height": 64,
        "mode": "stretch",
        "output_channels": 1,
    }
    markdown = (project / "data/08_reporting/wallplugs/validation_report.md").read_text()
    assert "`train/good/002_regular.png`" in markdown and f"`{orphan_image}`" in markdown

    manifest = pd.read_parquet(project / "data/03_primary/wallplugs/manifest.parquet")
    assert len(manifest) == N_IMAGES - 2
    assert manifest["split"].value_counts().to_dict() == {
        "train": 5,
        "validation": 2,
        "test_public": 4,
        "test_private": 1,
        "test_private_mixed": 1,
    }
    assert (manifest["split"] == manifest["official_split"]).all()
    assert int(manifest["has_mask"].sum()) == N_MASKS - 1
    assert (manifest["dst_width"] == 64).all() and (manifest["src_width"] == 96).all()
    assert not {"train/good/002_regular.png", orphan_image} & set(manifest["relpath"])
    store = project / "data/02_intermediate/wallplugs"
    assert (store / "train/good/000_regular.png").is_file()
    assert not (store / "train/good/002_regular.png").exists()
    for detector in DETECTORS:
        metrics_report = json.loads((project / f"data/08_reporting/wallplugs/{detector}/metrics.json").read_text())
        assert metrics_report["resolution"] == "canvas" and metrics_report["model"] == detector
        assert set(metrics_report["test_public"]) >= {"all"}
        submission = project / f"data/07_model_output/submission/{detector}/anomaly_images/wallplugs"
        assert sorted(p.relative_to(submission).as_posix() for p in submission.rglob("*.tiff")) == [
            "test_private/000_regular.tiff",
            "test_private_mixed/000_mixed.tiff",
        ]

    # 4. what the MLflow runs table shows: the parent run ...
    (run,) = mlflow_runs(project, "tags.pipeline = 'wallplugs'")
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert (tags["category"], tags["data_source"], tags["kedro_env"]) == ("wallplugs", "demo", "test")
    assert tags["model"] == "autoencoder,patchcore"
    assert "--env=test" in tags["kedro_command"] and "--pipelines=wallplugs" in tags["kedro_command"]
    metrics = run.data.metrics
    assert metrics["wallplugs.preprocessing.n_skipped"] == 2.0
    assert metrics["wallplugs.preprocessing.n_usable"] == N_IMAGES - 2
    assert metrics["wallplugs.preprocessing.n_processed"] == N_IMAGES - 2
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "preprocessing/wallplugs")}
    assert {
        "preprocessing/wallplugs/validation_report.json",
        "preprocessing/wallplugs/validation_report.md",
    } <= artifacts
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"

    # ... and one nested run per detector, comparable row by row
    children = detector_runs(project, run)
    assert set(children) == set(DETECTORS)
    for detector, child in children.items():
        assert child.info.status == "FINISHED", detector
        missing = [m for m in DETECTOR_METRICS if m not in child.data.metrics]
        assert not missing, f"{detector} lacks {missing}; it has {sorted(child.data.metrics)}"
        assert 0.0 <= child.data.metrics["image_auroc"] <= 1.0
        assert child.data.metrics["reused_model"] == 0.0 and child.data.metrics["fit_seconds"] > 0
        assert child.data.metrics["n_scored"] == N_SCORED
        assert not any(k.startswith("wallplugs.") for k in child.data.metrics)  # short keys, comparable across runs
        for tag in DETECTOR_TAGS:
            assert child.data.tags.get(tag), f"{detector} run lacks tag {tag}"
        assert (child.data.tags["detector"], child.data.tags["category"]) == (detector, "wallplugs")
        assert (child.data.tags["data_source"], child.data.tags["kedro_env"]) == ("demo", "test")
        assert child.data.tags["git_commit"] == tags["git_commit"]
        model_files = [a.path for a in client.list_artifacts(child.info.run_id, "model")]
        assert model_files == [f"model/{detector}.safetensors"], model_files
        figures = sorted(a.path for a in client.list_artifacts(child.info.run_id, "figures"))
        assert figures == [f"figures/{name}" for name in FIGURES]  # flat: no figures/figures/
        assert "metrics.json" in {a.path for a in client.list_artifacts(child.info.run_id)}

    # 5. nothing changed: the next run decodes nothing, fits nothing, scores nothing, and says so
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _run(project, "wallplugs")
    _end_leaked_runs()
    first, second = mlflow_runs(project, "tags.pipeline = 'wallplugs'")
    assert first.info.run_id == run.info.run_id
    metrics = second.data.metrics
    assert metrics["wallplugs.preprocessing.n_unchanged"] == N_IMAGES - 2
    assert metrics["wallplugs.preprocessing.n_processed"] == 0.0
    assert metrics["wallplugs.preprocessing.n_skipped"] == 2.0
    report = json.loads((project / "data/08_reporting/wallplugs/validation_report.json").read_text())
    assert {s["file"] for s in report["skipped"]} == {"train/good/002_regular.png", orphan_image}
    assert len(pd.read_parquet(project / "data/03_primary/wallplugs/manifest.parquet")) == N_IMAGES - 2
    for detector in DETECTORS:
        assert f"{detector}: reusing the model saved at version" in caplog.text, detector
        assert f"score {detector}: all {N_SCORED} maps reused" in caplog.text, detector
    assert "Fitting " not in caplog.text
    again = detector_runs(project, second)
    assert set(again) == set(DETECTORS)
    for detector, child in again.items():
        assert child.data.metrics["reused_model"] == 1.0, detector
        assert child.data.metrics["fit_seconds"] == 0.0, detector
        assert child.data.metrics["n_scored"] == 0.0, detector
        assert child.data.metrics["n_maps_reused"] == N_SCORED, detector
        assert child.data.tags["reused_model"], detector  # the version it reused
        # same model, same maps: the same numbers
        assert child.data.metrics["image_auroc"] == children[detector].data.metrics["image_auroc"], detector

    # the runner is named by its class (kedro-mlflow's own tag is an object address); session.run() without a runner
    # runs the SequentialRunner
    assert tags["runner"] == "SequentialRunner"


# ---- MLflow run bookkeeping and running from a sub-folder (notebooks/) ----


@pytest.fixture
def wallplugs_tree(kedro_project: Path, make_mvtec_tree: Callable[..., Path]) -> Path:
    """A small hand-made wallplugs tree (96x80 gray, 12 images) where the test env expects raw data."""
    bootstrap_project(kedro_project)
    return make_mvtec_tree(kedro_project / "data/01_raw/test_demo", "wallplugs", width=96, height=80, channels=1)


def test_each_session_closes_its_mlflow_run(
    kedro_project: Path, wallplugs_tree: Path, mlflow_runs: Callable[..., list[Any]]
) -> None:
    _run(kedro_project, "wallplugs", node_names=["wallplugs.validate_layout"])
    assert mlflow.active_run() is None
    _run(kedro_project, "wallplugs", node_names=["wallplugs.validate_layout"])
    assert len(mlflow_runs(kedro_project, "tags.pipeline = 'wallplugs'")) == 2


def test_failed_pipeline_closes_its_run_as_failed(kedro_project: Path, mlflow_runs: Callable[..., list[Any]]) -> None:
    bootstrap_project(kedro_project)
    (kedro_project / "data/01_raw/test_demo/wallplugs").mkdir(parents=True)  # empty: validate_layout raises
    with pytest.raises(Exception, match="No images found for category 'wallplugs'"):
        _run(kedro_project, "wallplugs", node_names=["wallplugs.validate_layout"])
    (run,) = mlflow_runs(kedro_project, "tags.pipeline = 'wallplugs'")
    assert run.info.status == "FAILED"
    assert mlflow.active_run() is None


def _subfolder_env(project: Path, name: str, *, relative_raw_root: bool = False, relative_mlflow: bool = False) -> Path:
    """An env like ``test``, optionally with conf/base's relative raw root or relative MLflow URI; returns notebooks/.

    Only one test may use the relative MLflow URI: MLflow caches its store per URI string for the whole process.
    """
    env = project / "conf" / name
    shutil.copytree(project / "conf" / "test", env)
    if relative_mlflow:
        (env / "mlflow.yml").unlink()
    if relative_raw_root:
        (env / "globals.yml").write_text(
            yaml.safe_dump({"raw_root": "data/01_raw/test_demo", "demo_root": "data/01_raw/test_demo"})
        )
    notebooks = project / "notebooks"
    notebooks.mkdir()
    return notebooks


def test_raw_root_is_relative_to_the_project_not_the_cwd(kedro_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notebooks = _subfolder_env(kedro_project, "sub", relative_raw_root=True)
    bootstrap_project(kedro_project)
    monkeypatch.chdir(notebooks)
    with KedroSession.create(project_path=kedro_project, env="sub") as session:
        catalog = session.load_context().catalog
        store = catalog.get("wallplugs.image_store")
        assert store.load().root == kedro_project / "data/02_intermediate/wallplugs"  # `path`: made absolute
        raw = catalog.get("wallplugs.raw_images")
        assert raw.category_dir == kedro_project / "data/01_raw/test_demo/wallplugs"


def test_mlflow_db_is_in_the_project_root_from_a_subfolder(
    kedro_project: Path, wallplugs_tree: Path, monkeypatch: pytest.MonkeyPatch, mlflow_runs: Callable[..., list[Any]]
) -> None:
    notebooks = _subfolder_env(kedro_project, "sub", relative_mlflow=True)
    monkeypatch.chdir(notebooks)
    _run(kedro_project, "wallplugs", env="sub", node_names=["wallplugs.validate_layout"])
    _end_leaked_runs()
    assert not (notebooks / "mlflow.db").exists()
    assert len(mlflow_runs(kedro_project, "tags.pipeline = 'wallplugs'")) == 1  # logged in the project's database
