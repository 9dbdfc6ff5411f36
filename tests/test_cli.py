"""The real ``kedro`` command on tiny generated trees: a quiet screen that ends with the results, and a user's own
category (free file names, 256² gray) that runs end to end.

Each test is one ``kedro run`` in a subprocess (cwd = the temp project, whose conf/logging.yml is the real one), so
what is checked is what a user sees: the console, the exit code and ``info.log``.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from madfh_pipeline.models.base import read_header

#: A log record at WARNING or above on the console (rich: "WARNING  msg"), or a Python warning printed bare.
WARNING_LINE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|\w+Warning: ")
#: At most this many warning records on the screen of a clean run (issue 8: "a handful at most").
MAX_WARNINGS = 3
#: A LogProgress completion line: "<what>: done, <n> <unit> in <s> s (<rate> <unit>/s)".
DONE_LINE = re.compile(r": done, \d+ img in \d+ s \([\d.]+ img/s\)")

Cli = Callable[..., subprocess.CompletedProcess[str]]


def _warnings(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line.strip() for line in (result.stdout + result.stderr).splitlines() if WARNING_LINE.search(line)]


def _explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout (tail) ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-4000:]}"


@pytest.mark.slow
def test_kedro_run_is_quiet_and_ends_with_the_results(
    kedro_project: Path,
    make_mvtec_tree: Callable[..., Path],
    kedro_cli: Cli,
    mlflow_runs: Callable[..., list[Any]],
) -> None:
    make_mvtec_tree(kedro_project / "data/01_raw/test_demo", "wallplugs", width=96, height=80, channels=1)
    result = kedro_cli(kedro_project, "run", "--env", "test", "--pipeline=wallplugs")
    assert result.returncode == 0, _explain(result)
    warnings = _warnings(result)
    assert len(warnings) <= MAX_WARNINGS, "warnings on the screen:\n" + "\n".join(warnings)
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    start = max(i for i, line in enumerate(lines) if "Results on test_public" in line)
    assert start > max(i for i, line in enumerate(lines) if "Pipeline execution completed successfully" in line)
    summary = lines[start:]
    assert any(re.match(r"wallplugs\s+autoencoder\s+", line) for line in summary), summary
    assert any(re.match(r"wallplugs\s+patchcore\s+", line) for line in summary), summary
    assert "one nested run per detector (2)" in lines[-1]  # the last thing on the screen
    # the real CLI hands Kedro a runner object: the run is tagged with its class name and the reproducing command
    (run,) = mlflow_runs(kedro_project, "tags.pipeline = 'wallplugs'")
    assert run.data.tags["runner"] == "SequentialRunner"
    assert run.data.tags["kedro_command"] == "kedro run --env=test --pipelines=wallplugs"
    # Python warnings of other packages go to info.log, not to the screen
    assert (kedro_project / "info.log").is_file()


PARTS = {
    "name": "parts",
    "width": 256,
    "height": 256,
    "channels": 1,
    "description": "a user's own parts, free file names",
    "preprocessing": {"target_width": 256, "target_height": 256},
}


@pytest.mark.slow
def test_a_category_of_ones_own_with_free_file_names(
    kedro_project: Path,
    make_env: Callable[..., Path],
    make_mvtec_tree: Callable[..., Path],
    kedro_cli: Cli,
) -> None:
    """256² gray images named ``part_<n>.png`` (no lighting token), defined in an env: no code, no noise."""
    project = kedro_project
    # the autoencoder only: it is what the 256² check is about; PatchCore would add its backbone and 256² features
    make_env(project, "ownparts", {"categories": {"parts": PARTS}, "detection": {"detectors": ["autoencoder"]}})
    counts = {"train": 4, "validation": 2, "test_public_good": 2, "test_public_bad": 2}
    cat_dir = make_mvtec_tree(project / "data/01_raw/test_demo", "parts", 256, 256, 1, counts=counts, free_names=True)
    assert (cat_dir / "test_public/ground_truth/bad/part_8_mask.png").is_file()
    result = kedro_cli(project, "run", "--env", "ownparts", "--pipelines=parts", timeout=400)
    assert result.returncode == 0, _explain(result)
    warnings = _warnings(result)
    assert len(warnings) <= MAX_WARNINGS, "warnings on the screen:\n" + "\n".join(warnings)
    assert "Results on test_public" in result.stdout

    report = json.loads((project / "data/08_reporting/parts/autoencoder/metrics.json").read_text())
    assert set(report["test_public"]) == {"all"}  # no group for the empty lighting token
    assert report["test_public"]["all"]["n_images"] == 4.0
    assert (project / "data/07_model_output/submission/autoencoder/anomaly_images/parts/test_private").is_dir()
    # the autoencoder trained at the images' 256², not at an upscaled size
    (model_file,) = (project / "data/06_models/parts/autoencoder.safetensors").glob("*/autoencoder.safetensors")
    header = read_header(model_file)
    assert header["config"]["input_size"] is None
    assert header["state"]["input_size"] == 256
    # progress reaches the log file: completion lines with counts and rates
    log = (project / "info.log").read_text()
    done = [line for line in log.splitlines() if DONE_LINE.search(line)]
    assert any("preprocess parts: done, 12 img" in line for line in done), done
    assert any("score autoencoder: done" in line for line in done), done
    assert "test_public images have no lighting token in their name" in log  # said once, as information
