"""The registered champion served over HTTP by a real ``mlflow models serve`` process on a free localhost port.

Good and defective demo images get correct answers; a non-image body, an image with the wrong channels and an image
that is too large get a 4xx with a clear message, and the server keeps answering afterwards. The server is stopped
(its whole process group, which this test started) in teardown.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import mlflow
import numpy as np
import pytest
import requests

from madfh_pipeline.inspection import InspectionModel
from madfh_pipeline.serving import pyfunc as P

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(demo_model: InspectionModel, mlflow_store: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    client = mlflow.MlflowClient()
    run = client.create_run(client.get_experiment_by_name("serving-tests").experiment_id)
    logged = P.log_inspection_model(demo_model, run_id=run.info.run_id, champion="always")
    assert P.champion_of("madfh-sheet_metal") == logged.version
    port = _free_port()
    bin_dir = Path(sys.executable).parent
    env = os.environ | {
        "MLFLOW_TRACKING_URI": mlflow_store,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # `mlflow models serve` execs uvicorn
        "TQDM_DISABLE": "1",
    }
    log = (tmp_path_factory.mktemp("server") / "server.log").open("w")
    process = subprocess.Popen(
        [
            str(bin_dir / "mlflow"),
            "models",
            "serve",
            "-m",
            P.champion_uri("sheet_metal"),
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],  # fmt: skip
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: teardown stops uvicorn with it
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                log.flush()
                pytest.fail(f"mlflow models serve exited with {process.returncode}:\n{Path(log.name).read_text()}")
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not up after {STARTUP_TIMEOUT_S} s:\n{Path(log.name).read_text()}")
            time.sleep(1.0)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        log.close()


def _post(url: str, body: Any, content_type: str = "application/json") -> requests.Response:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    return requests.post(f"{url}/invocations", data=data, headers={"Content-Type": content_type}, timeout=120)


def _frame(images: list[np.ndarray], ids: list[str]) -> dict[str, Any]:
    return {"dataframe_split": {"columns": ["image", "image_id"], "data": [[P.encode_png(i), n] for i, n in zip(images, ids, strict=True)]}}  # fmt: skip


def test_good_and_defective_images_get_correct_answers(
    server: str, good_images: list[np.ndarray], bad_image: np.ndarray
) -> None:
    body = _frame([good_images[1], bad_image], ["good-1", "bad-1"]) | {"params": {"map_max_side": 64}}
    response = _post(server, body)
    assert response.status_code == 200, response.text
    good, bad = response.json()["predictions"]
    assert (good["image_id"], bad["image_id"]) == ("good-1", "bad-1")
    assert good["decision"] == "OK" and bad["decision"] == "NG"
    assert bad["score"] > bad["threshold"] > good["score"]
    assert bad["review_low"] <= bad["threshold"] <= bad["review_high"]
    assert bad["explanation"].startswith("1 defect region") or "defect regions" in bad["explanation"]
    assert json.loads(bad["regions"])[0]["area_px"] > 0
    compact = cv2.imdecode(np.frombuffer(base64.b64decode(bad["map_png"]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert compact.shape == (53, 64)
    assert compact.max() > 128  # the defect lies above the pixel threshold (127.5 on the documented scale)


def test_non_image_bodies_get_4xx(server: str) -> None:
    not_an_image = base64.b64encode(b"GIF89a? no: plain text").decode()
    response = _post(server, {"dataframe_split": {"columns": ["image"], "data": [[not_an_image]]}})
    assert response.status_code == 400
    assert "Not an image" in response.json()["message"]
    response = _post(server, b"\x89PNG\r\n\x1a\n raw bytes, not JSON")
    assert 400 <= response.status_code < 500
    response = _post(server, b"\x89PNG\r\n\x1a\n raw bytes", content_type="image/png")
    assert response.status_code == 415
    response = _post(server, {"dataframe_split": {"columns": ["picture"], "data": [["x"]]}})
    assert response.status_code == 400


def test_wrong_channels_and_too_large_get_400(server: str, good_images: list[np.ndarray]) -> None:
    rgb = np.dstack([good_images[0]] * 3)
    response = _post(server, _frame([rgb], ["rgb"]))
    assert response.status_code == 400
    assert "channel" in response.json()["message"] and "'rgb'" in response.json()["message"]
    response = _post(server, _frame([np.zeros((64, 640), np.uint8)], ["wide"]))
    assert response.status_code == 400 and "too large" in response.json()["message"]


def test_server_still_answers_after_bad_requests(server: str, good_images: list[np.ndarray]) -> None:
    response = _post(server, _frame([good_images[2]], ["after"]))
    assert response.status_code == 200 and response.json()["predictions"][0]["decision"] in ("OK", "REVIEW")
