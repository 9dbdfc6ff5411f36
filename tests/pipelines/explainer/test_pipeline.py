"""The explainer inside ``kedro run``: grounded pairs → LoRA fine-tuning of a tiny random BLIP → explanations and
text metrics per detector, a training that learns nothing failing the run, and the grounded-only (demo) mode.

The learned runs use :func:`madfh_pipeline.explain.tiny.save_tiny_random_blip` (a 1-layer vision tower, a 2-layer
decoder over the describer's vocabulary), loaded through the pipeline's own ``from_pretrained(local_files_only=True)``
path; its texts mean nothing, the tests check the plumbing, the split, the loss check and what MLflow shows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest

from madfh_pipeline.explain.lora import LossNotDecreasingError
from madfh_pipeline.explain.tiny import TINY_SIZE, save_tiny_random_blip

pytestmark = pytest.mark.slow

CATEGORY = "sheet_metal"
COUNTS = {
    "train": 6,
    "validation": 3,
    "test_public_good": 3,
    "test_public_bad": 4,
    "test_private": 1,
    "test_private_mixed": 1,
}
#: Lighting variants added to the first two defective parts (same part number, another light): one group each.
VARIANT = "variant"


def _learned(base_model: Path, **training: Any) -> dict[str, Any]:
    return {
        "detection": {"detectors": ["patchcore"]},
        "explainer": {
            "learned": {
                "enabled": True,
                "base_model": str(base_model),
                "input_size": TINY_SIZE,
                "training": {
                    "epochs": 20,
                    "batch_size": 2,
                    "lr": 0.01,
                    "loss_window": 3,
                    "min_relative_drop": 0.05,
                    "device": "cpu",
                }
                | training,
                "generation": {"max_new_tokens": 20, "num_beams": 1, "batch_size": 8},
            }
        },
    }


def _add_lighting_variants(raw: Path, count: int = 2) -> list[str]:
    """A second, darker shot of the first ``count`` defective parts (``NNN_variant.png`` + mask), as MVTec AD 2
    names the lighting variants of one part."""
    added = []
    for source in sorted((raw / "test_public" / "bad").glob("*.png"))[:count]:
        number = source.stem.split("_", 1)[0]
        image = cv2.imread(str(source), cv2.IMREAD_UNCHANGED)
        assert cv2.imwrite(str(source.with_name(f"{number}_{VARIANT}.png")), (image * 0.8).astype(np.uint8))
        masks = raw / "test_public" / "ground_truth" / "bad"
        (masks / f"{number}_{VARIANT}_mask.png").write_bytes((masks / f"{source.stem}_mask.png").read_bytes())
        added.append(f"test_public/bad/{number}_{VARIANT}.png")
    return added


def _pairs(project: Path, side: str) -> tuple[list[dict[str, Any]], Path]:
    folder = project / "data/05_model_input" / CATEGORY / "explainer" / side
    lines = (folder / "pairs.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()], folder


def _client(project: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")


def _completed(log: str) -> list[str]:
    return [line.removeprefix("Completed node: ") for line in log.splitlines() if line.startswith("Completed node: ")]


def test_learned_explainer_trains_explains_and_reports_inside_the_category_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_category_project: Callable[..., Path],
    run_kedro_session: Callable[..., str],
    mlflow_runs: Callable[..., list[Any]],
    detector_runs: Callable[[Path, Any], dict[str, Any]],
) -> None:
    blip = save_tiny_random_blip(tmp_path / "tiny_blip")
    project = make_category_project(tmp_path / "project", "learned", _learned(blip), counts=COUNTS, seed=3)
    variants = _add_lighting_variants(project / "data/01_raw/test_demo" / CATEGORY)
    monkeypatch.chdir(project)
    log = run_kedro_session(project, "learned", CATEGORY)

    # describe → pairs → LoRA fine-tune → explain → text metrics, in this order, inside the category pipeline
    done = _completed(log)
    order = [
        f"{CATEGORY}.build_manifest",
        f"{CATEGORY}.build_explainer_pairs",
        f"{CATEGORY}.train_explainer",
        f"{CATEGORY}.patchcore.explain_detections",
    ]
    assert all(name in done for name in order), done
    assert [done.index(name) for name in order] == sorted(done.index(name) for name in order)

    # the pairs: files a person can open, split by part (a part's lighting variants on one side)
    train, train_folder = _pairs(project, "train")
    evaluation, eval_folder = _pairs(project, "eval")
    assert train and evaluation
    for pairs, folder in ((train, train_folder), (evaluation, eval_folder)):
        for pair in pairs:
            image = cv2.imread(str(folder / pair["image"]), cv2.IMREAD_UNCHANGED)
            assert image is not None and image.shape[:2] == (TINY_SIZE, TINY_SIZE), pair
            assert pair["text"] and pair["source"] == "grounded"
    assert not {p["group"] for p in train} & {p["group"] for p in evaluation}
    assert not {p["image_id"] for p in train} & {p["image_id"] for p in evaluation}
    sources = {p["image_id"] for p in train + evaluation}
    bad = sorted(p.relative_to(project / "data/01_raw/test_demo" / CATEGORY).as_posix() for p in _bad_images(project))
    assert sources == {*bad, *(f"validation/good/{i:03d}_regular.png" for i in range(COUNTS["validation"]))}
    for variant in variants:
        number = variant.rsplit("/", 1)[1].split("_", 1)[0]
        sides = {
            side
            for side, pairs in (("train", train), ("eval", evaluation))
            for p in pairs
            if p["group"] == f"test_public/bad/{number}"
        }
        assert len(sides) == 1, f"part {number} is on both sides"
    assert any(p["text"] != "" and "normal" in p["text"].lower() for p in train + evaluation)  # good images teach it

    # MLflow: the category's explainer run has the loss curve and the held-out text metrics ...
    (parent,) = mlflow_runs(project, f"tags.pipeline = '{CATEGORY}'")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["learned_explainer"] == "enabled"
    children = detector_runs(project, parent)
    assert set(children) == {"patchcore", "explainer"}
    explainer = children["explainer"]
    history = _client(project).get_metric_history(explainer.info.run_id, "loss")
    assert len(history) == explainer.data.metrics["train_steps"] >= 6
    assert sorted(m.step for m in history) == list(range(len(history)))
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert np.mean(losses[-3:]) <= 0.95 * np.mean(losses[:3])  # what the loss check let through
    metrics = explainer.data.metrics
    assert {"eval_loss", "eval_bleu", "eval_rouge_l"} <= set(metrics), sorted(metrics)
    assert metrics["n_train_pairs"] == len(train) and metrics["n_eval_pairs"] == len(evaluation)
    adapters = {a.path for a in _client(project).list_artifacts(explainer.info.run_id, "explainer")}
    assert "explainer/adapter_model.safetensors" in adapters
    assert (project / "data/06_models" / CATEGORY / "explainer" / "adapter_model.safetensors").is_file()

    # ... and each detector's run the text metrics of its explanations, grounded and learned
    explanations = pd.read_parquet(project / "data/07_model_output" / CATEGORY / "patchcore" / "explanations.parquet")
    assert len(explanations) > 0
    assert explanations["grounded"].str.len().gt(0).all()
    assert explanations["learned"].map(lambda t: isinstance(t, str)).all()
    detector = children["patchcore"].data.metrics
    assert detector["explain.n_flagged"] == len(explanations)
    for kind in ("grounded", "learned"):
        assert {f"explain.{kind}.bleu", f"explain.{kind}.rouge_l"} <= set(detector), sorted(detector)
    report = (project / "data/08_reporting" / CATEGORY / "patchcore" / "explanations.md").read_text()
    assert "| learned |" in report.splitlines()[4]
    assert all(f"`{relpath}`" in report for relpath in explanations["relpath"])


def _bad_images(project: Path) -> list[Path]:
    return sorted((project / "data/01_raw/test_demo" / CATEGORY / "test_public" / "bad").glob("*.png"))


def test_training_whose_loss_never_falls_fails_the_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_category_project: Callable[..., Path],
    run_kedro_session: Callable[..., str],
    mlflow_runs: Callable[..., list[Any]],
    detector_runs: Callable[[Path, Any], dict[str, Any]],
) -> None:
    """lr 0 and no dropout: every step sees all pairs and the same weights, so the loss cannot fall."""
    blip = save_tiny_random_blip(tmp_path / "tiny_blip")
    parameters = _learned(blip, lr=0.0, epochs=6, batch_size=64)
    parameters["explainer"]["learned"]["lora"] = {"r": 8, "alpha": 16, "dropout": 0.0}
    project = make_category_project(tmp_path / "project", "stuck", parameters, counts=COUNTS, seed=3)
    monkeypatch.chdir(project)
    with pytest.raises(LossNotDecreasingError, match="Training loss did not fall"):
        run_kedro_session(project, "stuck", CATEGORY, to_nodes=[f"{CATEGORY}.train_explainer"])
    (parent,) = mlflow_runs(project, f"tags.pipeline = '{CATEGORY}'")
    assert parent.info.status == "FAILED"
    explainer = detector_runs(project, parent).get("explainer")
    assert explainer is None or explainer.info.status == "FAILED"
    assert not (project / "data/06_models" / CATEGORY / "explainer").exists()  # nothing saved as if it had learnt


def test_without_the_learned_explainer_every_flagged_image_gets_a_grounded_explanation(
    inspected_run: Any, mlflow_runs: Callable[..., list[Any]], detector_runs: Callable[[Path, Any], dict[str, Any]]
) -> None:
    """The demo's mode (learned explainer off, with a reason) on the shared inspected run (conftest)."""
    run, category = inspected_run, inspected_run.category
    (parent,) = mlflow_runs(run.project, f"tags.pipeline = '{category}'")
    assert parent.data.tags["learned_explainer"] == "disabled: no BLIP weights in the test env"
    assert "Learned explainer disabled (no BLIP weights in the test env)" in run.log
    assert f"{category}.train_explainer" not in run.log
    children = detector_runs(run.project, parent)
    flagged_somewhere = False
    for detector in ("autoencoder", "patchcore"):
        scores = pd.read_parquet(run.project / "data/07_model_output" / category / detector / "scores.parquet")
        model_report = json.loads(
            (run.project / "data/08_reporting" / category / detector / "metrics.json").read_text()
        )
        threshold = model_report["thresholds"]["image"]
        test = scores[scores["split"] == "test_public"]
        flagged = sorted(test.loc[test["score"] >= threshold, "relpath"])
        flagged_somewhere |= bool(flagged)
        table = pd.read_parquet(run.project / "data/07_model_output" / category / detector / "explanations.parquet")
        assert sorted(table["relpath"]) == flagged, detector
        assert "learned" not in table
        assert table["grounded"].str.contains("Anomaly score").all(), detector
        markdown = (run.project / "data/08_reporting" / category / detector / "explanations.md").read_text()
        assert f"{len(flagged)} test images at or above the image threshold" in markdown
        for relpath, text in zip(table["relpath"], table["grounded"], strict=True):
            assert f"| `{relpath}` |" in markdown and text in markdown
        figure = run.project / "data/08_reporting" / category / detector / "figures" / "heatmaps.png"
        assert figure.is_file() and figure.stat().st_size > 10_000, detector
        assert children[detector].data.metrics["explain.n_flagged"] == len(flagged)
    assert flagged_somewhere, "no detector flagged a test image: nothing was explained"
