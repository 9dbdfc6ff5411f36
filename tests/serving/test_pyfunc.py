"""The pyfunc model in a real SQLite MLflow store: logging into a run, versions, the champion alias, roll-back, the
error codes the scoring server turns into HTTP statuses, and no pickle anywhere in a logged model.

Tests that log models into the store are marked ``slow`` (each log loads the model back to check it, ~5 s).
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from madfh_pipeline.inspection import InspectionModel
from madfh_pipeline.models.base import ModelFileError
from madfh_pipeline.serving import pyfunc as P


@pytest.fixture(scope="module")
def registered(demo_model: InspectionModel, mlflow_store: str) -> dict[str, Any]:
    """Two versions of madfh-sheet_metal logged into one run; the first became champion (``if_missing``)."""
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("serving-tests")
    run = client.create_run(experiment.experiment_id, tags={"data_source": "demo"})
    first = P.log_inspection_model(demo_model, run_id=run.info.run_id)
    second = P.log_inspection_model(demo_model, run_id=run.info.run_id)
    reused = P.log_inspection_model(demo_model, run_id=run.info.run_id, reuse=True)
    return {"run_id": run.info.run_id, "first": first, "second": second, "reused": reused}


@pytest.mark.slow
def test_each_log_is_a_new_version_and_the_first_is_champion(registered: dict[str, Any]) -> None:
    first, second = registered["first"], registered["second"]
    assert first.registered_model_name == "madfh-sheet_metal"
    assert (first.version, second.version) == (1, 2)
    assert first.champion_version == 1 and second.champion_version == 1  # a retrained model waits for a decision
    assert first.run_id == registered["run_id"]
    assert P.versions("madfh-sheet_metal") == [1, 2]  # reuse=True found version 2 by its label: nothing new
    assert registered["reused"].version == 2 and registered["reused"].model_uri == second.model_uri
    tags = mlflow.MlflowClient().get_model_version("madfh-sheet_metal", "2").tags
    assert tags["category"] == "sheet_metal" and tags["run_id"] == registered["run_id"]


@pytest.mark.slow
def test_logged_model_holds_no_pickle_and_has_signature_and_example(registered: dict[str, Any]) -> None:
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=registered["first"].model_uri))
    files = [p for p in local.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"MLmodel", "model_code.py", "inspection.json", "detector.safetensors", "input_example.json"} <= names
    assert not [p for p in files if p.suffix in (".pkl", ".pickle", ".pt", ".pth", ".joblib")]
    for file in files:  # protocol-2+ pickles start with 0x80; none of the files may be one
        assert not file.read_bytes()[:1] == b"\x80", file
    info = mlflow.models.get_model_info(registered["first"].model_uri)
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["image", "image_id"]
    assert [c["name"] for c in info.signature.outputs.to_dict()] == list(P.OUTPUT_COLUMNS)
    assert {p.name for p in info.signature.params.params} == {"map_max_side", "include_map"}


@pytest.mark.slow
def test_champion_answers_good_and_bad(
    registered: dict[str, Any], good_images: list[np.ndarray], bad_image: np.ndarray
) -> None:
    model = P.load_champion("sheet_metal")
    out = model.predict(P.request_frame([good_images[0], bad_image], ["good", "bad"]), params={"map_max_side": 48})
    good, bad = out.iloc[0], out.iloc[1]
    assert list(out["image_id"]) == ["good", "bad"]
    assert good["decision"] == "OK" and bad["decision"] == "NG"
    assert bad["score"] > bad["threshold"] > good["score"]
    assert "defect region" in bad["explanation"] and "looks normal" in good["explanation"]
    regions = json.loads(bad["regions"])
    assert regions and {"bbox", "area_px", "peak", "mean"} <= set(regions[0])
    png = cv2.imdecode(np.frombuffer(base64.b64decode(bad["map_png"]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint8 and png.shape == (40, 48)  # native aspect 96×80, longer side 48
    assert good["map_low"] < good["map_high"]


@pytest.mark.slow
def test_rollback_moves_the_alias_and_load_follows_it(registered: dict[str, Any]) -> None:
    name = "madfh-sheet_metal"
    P.set_champion(name, 2)
    assert P.champion_of(name) == 2
    assert P.rollback(name) == 1
    assert P.champion_of(name) == 1
    assert mlflow.MlflowClient().get_registered_model(name).tags["previous_champion"] == "2"
    with pytest.raises(ValueError, match="no earlier version"):
        P.rollback(name)
    P.rollback(name, to_version=2)
    assert P.champion_of(name) == 2
    loaded = P.load_inspection_model(P.champion_uri("sheet_metal"))
    assert loaded.version == "sheet_metal/patchcore@demo-0"
    P.set_champion(name, 1)


def _error(model: Any, frame: pd.DataFrame) -> MlflowException:
    with pytest.raises(MlflowException) as caught:
        model.predict(frame)
    return caught.value


@pytest.mark.slow
def test_bad_inputs_raise_client_error_codes(registered: dict[str, Any], good_images: list[np.ndarray]) -> None:
    model = P.load_champion("sheet_metal")
    text = base64.b64encode(b"this is not an image at all").decode()
    error = _error(model, pd.DataFrame({"image": [text], "image_id": ["txt"]}))
    assert error.error_code == "INVALID_PARAMETER_VALUE" and error.get_http_status_code() == 400
    assert "Not an image" in error.message and "'txt'" in error.message

    error = _error(model, pd.DataFrame({"image": ["%%% not base64 %%%"]}))
    assert error.get_http_status_code() == 400 and "base64" in error.message

    rgb = np.dstack([good_images[0]] * 3)
    error = _error(model, P.request_frame([rgb]))
    assert error.get_http_status_code() == 400 and "channel" in error.message

    large = np.zeros((100, 500), np.uint8)
    error = _error(model, P.request_frame([large]))
    assert error.get_http_status_code() == 400 and "too large" in error.message


def test_request_without_image_column_is_a_bad_request(demo_model: InspectionModel) -> None:
    wrapper = P.InspectionPyfunc()
    wrapper.model = demo_model
    with pytest.raises(MlflowException) as caught:
        wrapper.predict(None, pd.DataFrame({"picture": ["x"]}))
    assert caught.value.error_code == "BAD_REQUEST" and "'image'" in caught.value.message


def test_a_model_failure_is_a_server_error(demo_model: InspectionModel, good_images: list[np.ndarray]) -> None:
    class Broken:
        settings = demo_model.settings

        def inspect_batch(self, images: Any, ids: Any) -> Any:
            raise RuntimeError("bank corrupted")

    wrapper = P.InspectionPyfunc()
    wrapper.model = Broken()  # type: ignore[assignment]
    with pytest.raises(MlflowException) as caught:
        wrapper.predict(None, P.request_frame([good_images[0]]))
    assert caught.value.get_http_status_code() == 500 and "bank corrupted" in caught.value.message


def test_logging_needs_a_run(demo_model: InspectionModel, mlflow_store: str) -> None:
    assert mlflow.active_run() is None
    with pytest.raises(ValueError, match="run_id or an active MLflow run"):
        P.log_inspection_model(demo_model)


@pytest.mark.slow
def test_pyfunc_loader_refuses_a_pickle_payload(
    model_folder: Path, tmp_path: Path, payload: type, mlflow_store: str
) -> None:
    import pickle

    marker = tmp_path / "payload_ran"
    folder = tmp_path / "inspection"
    shutil.copytree(model_folder, folder)
    (folder / "detector.safetensors").write_bytes(pickle.dumps(payload(marker)))
    target = tmp_path / "pyfunc_model"
    mlflow.pyfunc.save_model(
        path=str(target),
        python_model=str(Path(P.__file__).with_name("model_code.py")),
        artifacts={P.ARTIFACT_KEY: str(folder)},
        pip_requirements=["mlflow"],
    )
    with pytest.raises(ModelFileError, match="not a safetensors detector file"):
        mlflow.pyfunc.load_model(str(target))
    assert not marker.exists()
    pickle.loads(pickle.dumps(payload(marker)))  # the payload is live: unpickling it does create the marker
    assert marker.exists()


def _printed_json(out: str) -> dict[str, Any]:
    """The command's JSON document. Standalone, logs go to stderr; inside this suite a Kedro session of an earlier
    test may have left a console log handler on stdout, so log lines can precede it."""
    start = 0 if out.startswith("{") else out.find("\n{") + 1
    assert start or out.startswith("{"), f"no JSON printed: {out!r}"
    value, _ = json.JSONDecoder().raw_decode(out[start:])
    return value


@pytest.mark.slow
def test_command_line_registers_lists_and_refuses_a_bad_rollback(
    model_folder: Path, mlflow_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from madfh_pipeline.serving.__main__ import main

    assert main(["register", str(model_folder), "--experiment", "cli", "--name", "madfh-cli"]) == 0
    assert _printed_json(capsys.readouterr().out)["version"] == 1
    assert main(["list", "madfh-cli"]) == 0
    assert _printed_json(capsys.readouterr().out)["champion"] == 1
    assert main(["rollback", "madfh-cli"]) == 2  # nothing older than the only version: refused, no traceback
    assert main(["champion", "madfh-cli", "7"]) == 2  # no such version
    assert P.champion_of("madfh-cli") == 1
