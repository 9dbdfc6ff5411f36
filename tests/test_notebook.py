"""``notebooks/latest_run.ipynb`` runs in CI against a real (small) run, and is committed without outputs.

The execution tests point the notebook at the shared inspected run (conftest ``inspected_run``: sheet metal trained
and evaluated with autoencoder + PatchCore in a temp project) through the variables the notebook documents
(``MADFH_PROJECT``, ``MADFH_ENV``, ``MADFH_CATEGORY``) and execute every cell once with nbclient in the venv's
``python3`` kernel, from the project's ``notebooks/`` folder; a cell appended to the executed copy reads back the
metrics table and the MLflow runs it built.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = PROJECT_ROOT / "notebooks" / "latest_run.ipynb"
DETECTORS = ["autoencoder", "patchcore"]  # what the shared run trains
MARKER = "TABLE_ROWS="
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _stream_text(cell: Any) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


@dataclass(frozen=True)
class Executed:
    notebook: Any  # nbformat.NotebookNode, executed
    code: list[Any]  # the notebook's own code cells (without the appended one)
    probe: str  # what the appended cell printed


@pytest.fixture(scope="module")
def executed(inspected_run: Any) -> Executed:
    """The committed notebook executed once against the shared run, plus a cell that prints what it built."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    n_cells = len(notebook.cells)
    notebook.cells.append(
        nbformat.v4.new_code_cell(
            "import json\n"
            f"print({MARKER!r} + table[['detector', 'lighting', 'image_auroc']].to_json(orient='records'))\n"
            "print('RUN_DETECTORS=' + json.dumps(sorted(set(runs['tags.detector']))))"
        )
    )
    workdir = inspected_run.project / "notebooks"  # where the notebook lives in a project (its documented default)
    workdir.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MADFH_PROJECT", str(inspected_run.project))
        patch.setenv("MADFH_ENV", inspected_run.env)
        patch.setenv("MADFH_CATEGORY", inspected_run.category)
        patch.delenv("KEDRO_ENV", raising=False)
        patch.delenv("MPLBACKEND", raising=False)  # the tests' Agg must not reach the kernel: it shows figures inline
        client = NotebookClient(
            notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
        )
        failed: list[Any] = []
        client.on_cell_error = lambda cell, cell_index, execute_reply: failed.append(cell)
        try:
            client.execute()
        except CellExecutionError as exc:
            # Kedro's IPython extension renders tracebacks with rich, as display output: put them in the failure
            shown = "\n".join(o.get("data", {}).get("text/plain", "") for cell in failed for o in cell.outputs)
            pytest.fail(f"{exc}\n{ANSI.sub('', shown)[-6000:]}")
    code = [cell for cell in notebook.cells[:n_cells] if cell.cell_type == "code"]
    return Executed(notebook, code, _stream_text(notebook.cells[-1]))


@pytest.mark.slow
def test_every_cell_runs_and_the_metrics_table_has_one_row_per_detector(executed: Executed) -> None:
    for index, cell in enumerate(executed.code):
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"code cell {index}: {errors}"
        assert cell.execution_count is not None, f"code cell {index} did not run"
        assert "no report" not in _stream_text(cell), f"code cell {index}: {_stream_text(cell)}"
    lines = executed.probe.splitlines()
    rows = json.loads(next(line for line in lines if line.startswith(MARKER)).removeprefix(MARKER))
    overall = [row for row in rows if row["lighting"] == "all"]
    assert sorted(row["detector"] for row in overall) == DETECTORS  # one row per detector
    assert all(0.0 <= row["image_auroc"] <= 1.0 for row in overall)
    assert {row["detector"] for row in rows} == set(DETECTORS)  # + one row per lighting group of each
    run_detectors = json.loads(next(line for line in lines if line.startswith("RUN_DETECTORS=")).split("=", 1)[1])
    assert set(DETECTORS) <= set(run_detectors)  # the MLflow runs table lists the detectors' runs
    shown = [o for cell in executed.code for o in cell.outputs if o.output_type in ("display_data", "execute_result")]
    assert sum("text/html" in o.get("data", {}) for o in shown) >= 2  # the metrics table and the MLflow runs


@pytest.mark.slow
def test_the_figures_are_shown_in_the_notebook(executed: Executed) -> None:
    """The PRO curves and the misses / false alarms are drawn with ``plt.show()``: each must reach the notebook."""
    figures = [
        index
        for index, cell in enumerate(executed.code)
        for o in cell.outputs
        if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})
    ]
    pro_cell = next(
        i for i, cell in enumerate(executed.code) if "PRO curves" in cell.source or "pro_curve" in cell.source
    )
    assert pro_cell in figures, f"no figure shown by the PRO-curve cell (figures came from cells {figures})"


def test_a_session_opened_outside_the_project_reads_its_catalog(
    kedro_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``MADFH_PROJECT`` lets the notebook open a project that is not its working directory (a copy of the notebook,
    a shared checkout): a session for the project, created from a folder outside it, must read the project's catalog.
    (Loading the catalog validates the parameters against the registered pipelines, so the registry is read here.)"""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(kedro_project)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with KedroSession.create(project_path=kedro_project, env="test") as session:
        catalog = session.load_context().catalog
        store = catalog.get("wallplugs.image_store")
    assert store.load().root == kedro_project / "data/02_intermediate/wallplugs"


def test_committed_notebook_has_no_outputs() -> None:
    """Outputs and execution counts are stripped before commit: in the working copy and in the committed blob."""
    versions = {"working copy": NOTEBOOK.read_text(encoding="utf-8")}
    git = shutil.which("git")
    if git and (PROJECT_ROOT / ".git").exists():
        shown = subprocess.run(
            [git, "show", "HEAD:notebooks/latest_run.ipynb"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        if shown.returncode == 0:
            versions["HEAD"] = shown.stdout
    for where, text in versions.items():
        notebook = nbformat.reads(text, as_version=4)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert code, where
        for index, cell in enumerate(code):
            assert cell.outputs == [], f"{where}: code cell {index} has outputs"
            assert cell.execution_count is None, f"{where}: code cell {index} has execution count"
        assert "widgets" not in notebook.metadata, where
