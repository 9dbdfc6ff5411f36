"""The MiniCPM-V branch inside ``kedro run``: features → four detectors side by side → evaluation, a second run that
reuses every feature, a missing model that stops the run before its first node, and the demo's "disabled" mode.

The branch runs on a tiny RANDOM MiniCPM-V saved in the test (:func:`save_tiny_random_minicpmv`), read through the
pipeline's own loader (``allow_random_weights`` is the test-only switch); its features and answers mean nothing, so
these runs check wiring, storage, reuse and what MLflow shows, never quality.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kedro.framework.project import pipelines

from madfh_pipeline.models import vlm_detectors
from madfh_pipeline.models.vlm import MiniCPMVMissingModelError
from madfh_pipeline.models.vlm_tiny import TINY_PATCH_SIZE, TINY_VISION_WIDTH, save_tiny_random_minicpmv

pytestmark = pytest.mark.slow

CATEGORY = "wallplugs"
DETECTORS = ("autoencoder", "hybrid", "patchcore", "vlm_judge")
#: What the hybrid and the judge fit on and score: write_mvtec_tree's default counts, 96x80 gray.
N_IMAGES = 12
N_TRAIN = 4
N_SCORED = 8  # 2 validation + 4 test_public + 2 private
CANVAS = 64  # the test env's preprocessing target
#: Image metrics of every detector run (pixel metrics carry ``canvas.``: the test env evaluates on the canvas).
DETECTOR_METRICS = ("image_auroc", "canvas.au_pro_005", "canvas.seg_f1", "threshold_image", "threshold_pixel")


def _vlm(model: Path | str) -> dict[str, Any]:
    return {
        "vlm": {
            "enabled": True,
            "disabled_reason": "",
            "model": str(model),
            "allow_random_weights": True,
            "image_size": "input",
            "device": "cpu",
            "dtype": "float32",
        },
        "detection": {"detectors": list(DETECTORS)},
    }


@pytest.fixture
def fresh_vlm_cache() -> Iterator[None]:
    """MiniCPM-V is loaded once per process and settings; start and end each test with nothing loaded."""
    vlm_detectors._SHARED_VLM.clear()
    yield
    vlm_detectors._SHARED_VLM.clear()


@pytest.fixture
def wallplugs(kedro_project: Path, make_mvtec_tree: Callable[..., Path]) -> Path:
    return make_mvtec_tree(kedro_project / "data/01_raw/test_demo", CATEGORY, width=96, height=80, channels=1)


def _completed(log: str) -> list[str]:
    return [line.removeprefix("Completed node: ") for line in log.splitlines() if line.startswith("Completed node: ")]


def test_vlm_branch_trains_four_detectors_side_by_side_and_reuses_its_features(
    kedro_project: Path,
    wallplugs: Path,
    tmp_path: Path,
    fresh_vlm_cache: None,
    make_env: Callable[..., Path],
    run_kedro_session: Callable[..., str],
    mlflow_runs: Callable[..., list[Any]],
    detector_runs: Callable[[Path, Any], dict[str, Any]],
) -> None:
    model = save_tiny_random_minicpmv(tmp_path / "tiny_minicpmv")
    make_env(kedro_project, "vlm", _vlm(model))
    log = run_kedro_session(kedro_project, "vlm", CATEGORY)

    # preprocessing → vlm_features → training of all four → evaluation
    done = _completed(log)
    position = {name: i for i, name in enumerate(done)}
    features = position[f"{CATEGORY}.extract_vlm_features"]
    assert position[f"{CATEGORY}.preprocess_images"] < features
    for detector in DETECTORS:
        fit = position[f"{CATEGORY}.{detector}.fit_detector"]
        assert (
            fit < position[f"{CATEGORY}.{detector}.score_images"] < position[f"{CATEGORY}.{detector}.compute_metrics"]
        )
        if detector in ("hybrid", "vlm_judge"):
            assert features < fit, detector
    assert f"vlm features {CATEGORY}: computed features of {N_IMAGES} images" in log
    # the detectors read what the stage stored (looked up by the pixels' content hash), they compute nothing again
    assert f"hybrid fit: VLM features of {N_TRAIN} images reused from the feature store, 0 computed." in log

    # the feature store: one file per image, a (D, h, w) float16 grid and a (D',) pooled vector
    store = kedro_project / "data/04_feature" / CATEGORY / "vlm"
    assert json.loads((store / "_last_write.json").read_text())["n_computed"] == N_IMAGES
    files = sorted(store.glob("features/**/*.safetensors"))
    assert len(files) == N_IMAGES
    from safetensors import safe_open

    with safe_open(str(files[0]), "pt") as handle:
        grid, pooled = handle.get_tensor("grid"), handle.get_tensor("pooled")
    side = CANVAS // TINY_PATCH_SIZE
    assert str(grid.dtype) == "torch.float16" and tuple(grid.shape) == (TINY_VISION_WIDTH, side, side)
    assert tuple(pooled.shape) == (TINY_VISION_WIDTH,)

    # MLflow: the four detectors side by side, each with its metrics
    (first,) = mlflow_runs(kedro_project, f"tags.pipeline = '{CATEGORY}'")
    assert first.info.status == "FINISHED"
    assert first.data.tags["vlm"] == "enabled"
    assert first.data.tags["model"] == ",".join(DETECTORS)
    assert first.data.metrics[f"{CATEGORY}.vlm_features.n_computed"] == N_IMAGES
    children = detector_runs(kedro_project, first)
    assert set(children) == set(DETECTORS)
    for detector, child in children.items():
        assert child.info.status == "FINISHED", detector
        missing = [m for m in DETECTOR_METRICS if m not in child.data.metrics]
        assert not missing, f"{detector} lacks {missing}"
        assert 0.0 <= child.data.metrics["image_auroc"] <= 1.0
        assert child.data.metrics["n_scored"] == N_SCORED
        assert child.data.tags["detector"] == detector and child.data.tags["category"] == CATEGORY
    # the judge's image score is a probability (P("yes") from the logits)
    judge = json.loads((kedro_project / "data/08_reporting" / CATEGORY / "vlm_judge" / "metrics.json").read_text())
    assert 0.0 <= judge["thresholds"]["image"] <= 1.0

    # a second run: every feature reused, MiniCPM-V never loaded, no forward pass
    vlm_detectors._SHARED_VLM.clear()
    log = run_kedro_session(kedro_project, "vlm", CATEGORY)
    assert (
        f"vlm features {CATEGORY}: reused the stored features of all {N_IMAGES} images (same images, model and "
        "settings); the model was not loaded and no forward pass ran." in log
    )
    last = json.loads((store / "_last_write.json").read_text())
    assert (last["n_computed"], last["n_reused"]) == (0, N_IMAGES)
    assert not vlm_detectors._SHARED_VLM, "MiniCPM-V was loaded although nothing needed it"
    first_again, second = mlflow_runs(kedro_project, f"tags.pipeline = '{CATEGORY}'")
    assert first_again.info.run_id == first.info.run_id
    assert second.data.metrics[f"{CATEGORY}.vlm_features.n_computed"] == 0.0
    assert second.data.metrics[f"{CATEGORY}.vlm_features.n_reused"] == N_IMAGES
    again = detector_runs(kedro_project, second)
    for detector in ("hybrid", "vlm_judge"):
        assert again[detector].data.metrics["reused_model"] == 1.0, detector
        assert again[detector].data.metrics["image_auroc"] == children[detector].data.metrics["image_auroc"]


def test_missing_model_stops_the_run_before_its_first_node(
    kedro_project: Path,
    wallplugs: Path,
    fresh_vlm_cache: None,
    make_env: Callable[..., Path],
    run_kedro_session: Callable[..., str],
    mlflow_runs: Callable[..., list[Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    missing = kedro_project / "models" / "MiniCPM-V-4.6"
    make_env(kedro_project, "no_weights", _vlm(missing))
    caplog.set_level("INFO")
    with pytest.raises(MiniCPMVMissingModelError) as error:
        run_kedro_session(kedro_project, "no_weights", CATEGORY)
    message = str(error.value)
    assert str(missing) in message and "does not exist" in message
    assert "'vlm.model'" in message
    assert "hf download openbmb/MiniCPM-V-4.6 --local-dir <dir>" in message
    assert "Running node" not in caplog.text
    assert not (kedro_project / "data/02_intermediate" / CATEGORY).exists()  # no image was preprocessed
    assert not (kedro_project / "data/03_primary").exists()
    (run,) = mlflow_runs(kedro_project)  # kedro-mlflow had opened it: closed as failed, not left running
    assert run.info.status == "FAILED"


def test_demo_env_runs_without_the_vlm_branch_and_says_why(
    kedro_project: Path,
    wallplugs: Path,
    make_env: Callable[..., Path],
    run_kedro_session: Callable[..., str],
    mlflow_runs: Callable[..., list[Any]],
) -> None:
    """The demo's own ``vlm`` block (conf/demo), with conf/base's four detectors."""
    demo = yaml.safe_load((kedro_project / "conf/demo/parameters.yml").read_text())["vlm"]
    reason = demo["disabled_reason"]
    assert demo["enabled"] is False and reason
    make_env(kedro_project, "demo_like", {"vlm": demo, "detection": {"detectors": list(DETECTORS)}})
    log = run_kedro_session(kedro_project, "demo_like", CATEGORY, to_nodes=[f"{CATEGORY}.build_manifest"])
    assert f"MiniCPM-V branch disabled ({reason})" in log
    (run,) = mlflow_runs(kedro_project, f"tags.pipeline = '{CATEGORY}'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["vlm"] == f"disabled: {reason}"
    # the branch and the detectors that read it are not part of the category's pipeline
    names = [node.name for node in pipelines[CATEGORY].nodes]
    assert f"{CATEGORY}.autoencoder.fit_detector" in names and f"{CATEGORY}.patchcore.fit_detector" in names
    assert not [n for n in names if "vlm" in n or ".hybrid." in n], names
    assert not (kedro_project / "data/04_feature").exists()
