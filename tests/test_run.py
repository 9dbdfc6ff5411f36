"""End to end in a throw-away copy of the project: generate demo data, break two files, run the wallplugs pipeline.

Uses the ``test`` env of the ``kedro_project`` fixture (96x80 images, 64x64 canvas, two workers, data_source demo).
Later stages of the category pipeline (training, evaluation) run too, with whatever the test env gives them; the
assertions here are about preprocessing and MLflow bookkeeping only.
"""

from __future__ import annotations

import json
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
#: Per category, from conftest.TEST_ENV_COUNTS: 6 train, 2 validation, 2 + 3 test_public, 1 + 1 private.
N_IMAGES = 15
N_MASKS = 3
PREPROCESSING_OUTPUTS = ["wallplugs.manifest", "wallplugs.validation_summary", "wallplugs.preprocessing_metrics"]


def _run(project: Path, name: str, env: str = "test", **kwargs: Any) -> None:
    with KedroSession.create(project_path=project, env=env) as session:
        session.run(pipeline_names=[name], **kwargs)


def _end_leaked_runs() -> None:
    # Work-around for the leaked run (see test_each_session_closes_its_mlflow_run): without it every later session of
    # this process logs into the first session's run.
    while mlflow.active_run() is not None:
        mlflow.end_run()


def _runs(project: Path, pipeline: str) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    experiment = client.get_experiment_by_name("madfh_pipeline")
    assert experiment is not None, "kedro-mlflow did not create the experiment"
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.pipeline = '{pipeline}'",
        order_by=["attributes.start_time ASC"],
    )


@pytest.mark.slow
def test_demo_data_then_wallplugs(kedro_project: Path) -> None:
    project = kedro_project
    bootstrap_project(project)

    # 1. generate the demo data set (all four categories, in the official layout)
    _run(project, "demo_data")
    _end_leaked_runs()
    raw = project / "data/01_raw/test_demo/wallplugs"
    for category in CATEGORIES:
        files = list((project / "data/01_raw/test_demo" / category).rglob("*.png"))
        assert len(files) == N_IMAGES + N_MASKS, category
    (demo_run,) = _runs(project, "demo_data")
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

    # 3. the category pipeline (with whatever later stages it has) completes and names both files
    _run(project, "wallplugs")
    _end_leaked_runs()
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

    (run,) = _runs(project, "wallplugs")
    assert run.data.tags["category"] == "wallplugs"
    assert run.data.tags["data_source"] == "demo"
    assert run.data.tags["kedro_env"] == "test"
    metrics = run.data.metrics
    assert metrics["wallplugs.preprocessing.n_skipped"] == 2.0
    assert metrics["wallplugs.preprocessing.n_usable"] == N_IMAGES - 2
    assert metrics["wallplugs.preprocessing.n_processed"] == N_IMAGES - 2
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "wallplugs/preprocessing")}
    assert {
        "wallplugs/preprocessing/validation_report.json",
        "wallplugs/preprocessing/validation_report.md",
    } <= artifacts

    # 4. nothing changed: the next run decodes nothing and says so (preprocessing only: the later stages were
    #    exercised above and would only add minutes)
    _run(project, "wallplugs", to_outputs=PREPROCESSING_OUTPUTS)
    _end_leaked_runs()
    first, second = _runs(project, "wallplugs")
    assert first.info.run_id == run.info.run_id
    metrics = second.data.metrics
    assert metrics["wallplugs.preprocessing.n_unchanged"] == N_IMAGES - 2
    assert metrics["wallplugs.preprocessing.n_processed"] == 0.0
    assert metrics["wallplugs.preprocessing.n_skipped"] == 2.0
    report = json.loads((project / "data/08_reporting/wallplugs/validation_report.json").read_text())
    assert {s["file"] for s in report["skipped"]} == {"train/good/002_regular.png", orphan_image}
    assert len(pd.read_parquet(project / "data/03_primary/wallplugs/manifest.parquet")) == N_IMAGES - 2


# ---- MLflow run bookkeeping and running from a sub-folder (notebooks/) ----


@pytest.fixture
def wallplugs_tree(kedro_project: Path, make_mvtec_tree: Callable[..., Path]) -> Path:
    """A small hand-made wallplugs tree (96x80 gray, 12 images) where the test env expects raw data."""
    bootstrap_project(kedro_project)
    return make_mvtec_tree(kedro_project / "data/01_raw/test_demo", "wallplugs", width=96, height=80, channels=1)


def test_each_session_closes_its_mlflow_run(kedro_project: Path, wallplugs_tree: Path) -> None:
    _run(kedro_project, "wallplugs", node_names=["wallplugs.validate_layout"])
    assert mlflow.active_run() is None
    _run(kedro_project, "wallplugs", node_names=["wallplugs.validate_layout"])
    assert len(_runs(kedro_project, "wallplugs")) == 2


def test_failed_pipeline_closes_its_run_as_failed(kedro_project: Path) -> None:
    bootstrap_project(kedro_project)
    (kedro_project / "data/01_raw/test_demo/wallplugs").mkdir(parents=True)  # empty: validate_layout raises
    with pytest.raises(Exception, match="No images found for category 'wallplugs'"):
        _run(kedro_project, "wallplugs", node_names=["wallplugs.validate_layout"])
    (run,) = _runs(kedro_project, "wallplugs")
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
    kedro_project: Path, wallplugs_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notebooks = _subfolder_env(kedro_project, "sub", relative_mlflow=True)
    monkeypatch.chdir(notebooks)
    _run(kedro_project, "wallplugs", env="sub", node_names=["wallplugs.validate_layout"])
    _end_leaked_runs()
    assert not (notebooks / "mlflow.db").exists()
    assert len(_runs(kedro_project, "wallplugs")) == 1  # logged in the project's database
