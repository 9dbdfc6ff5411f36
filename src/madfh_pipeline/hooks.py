"""Run bookkeeping: tag every MLflow run with what it ran on, open a nested run per detector, end with a summary.

Tags make demo numbers impossible to pass for real ones (``data_source``) and tie every number to its code
(``git_commit``) and configuration (``kedro_env``, ``kedro_command`` with ``--env`` and ``--params``). The summary at
the end of a run is what an engineer wants to read first: the headline metrics per detector, where the figures and
reports are, and the MLflow address of the run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import mlflow
from kedro.framework.hooks import hook_impl
from kedro.io import DataCatalog

from madfh_pipeline import tracking

logger = logging.getLogger(__name__)

#: The columns of the end-of-run summary (report key, column title).
SUMMARY_COLUMNS = (
    ("image_auroc", "image AUROC"),
    ("au_pro_005", "AU-PRO@0.05"),
    ("seg_f1", "SegF1"),
    ("class_f1", "ClassF1"),
)
MLFLOW_UI = "http://127.0.0.1:5000"
#: Console width for log output that does not go to a terminal.
LOG_WIDTH = 200


def _names(run_params: dict[str, Any]) -> list[str]:
    names = run_params.get("pipeline_names") or [run_params.get("pipeline_name") or "__default__"]
    return [names] if isinstance(names, str) else list(names)


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (params or {}).items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def kedro_command(run_params: dict[str, Any]) -> str:
    """The command that reproduces the run, with the env and runtime parameters kedro-mlflow's tag leaves out."""
    parts = ["kedro run"]
    if run_params.get("env"):
        parts.append(f"--env={run_params['env']}")
    parts.append(f"--pipelines={','.join(_names(run_params))}")
    for key in ("tags", "node_names", "from_nodes", "to_nodes", "from_inputs", "to_outputs", "namespaces"):
        value = run_params.get(key)
        if value:
            parts.append(f"--{key.replace('_', '-')}={','.join(value)}")
    runtime = _flat(run_params.get("runtime_params") or {})
    if runtime:
        parts.append("--params=" + ",".join(f"{k}={v}" for k, v in runtime.items()))
    return " ".join(parts)


def runner_name(runner: Any) -> str:
    """The runner's class name; Kedro records ``None`` (as a string) when the session falls back to its default."""
    text = str(runner or "").strip()
    if text in ("", "None"):
        return "SequentialRunner"
    return text.rsplit(".", 1)[-1].split(" ")[0].strip("<>'\"")


def run_tags(
    run_params: dict[str, Any], params: dict[str, Any], categories: list[str], models: list[str] | None = None
) -> dict[str, str]:
    """The tags of a run: pipeline(s), category and model (comma-joined when several), data source, env."""
    return {
        "pipeline": "+".join(_names(run_params)),
        "category": ",".join(categories) if categories else "none",
        "model": ",".join(models) if models else "none",
        "data_source": str(params.get("data_source", "unknown")),
        "kedro_env": str(run_params.get("env") or "local"),
    }


class RunTagsHook:
    """Tags kedro-mlflow's run, opens nested detector runs through :mod:`madfh_pipeline.tracking`, and summarises."""

    def __init__(self) -> None:
        self._reports: dict[tuple[str, str], dict[str, Any]] = {}
        self._run_id: str | None = None
        self._project_path: Path | None = None

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        _readable_console()

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: DataCatalog) -> None:
        self._reports = {}
        params = catalog.load("parameters") if "parameters" in catalog else {}
        vlm_state = self._check_vlm(params, pipeline)
        explainer_state = self._check_explainer(params, pipeline)
        run = mlflow.active_run()
        if run is None:  # tracking disabled for this pipeline
            self._run_id = None
            return
        self._run_id = run.info.run_id
        known = set((params.get("categories") or {}).keys())
        detectors = set(((params.get("detection") or {}).get("models") or {}).keys())
        parts = [n.namespace.split(".") for n in pipeline.nodes if n.namespace]
        categories = sorted({p[0] for p in parts} & known)
        models = sorted({p[1] for p in parts if len(p) > 1} & detectors)
        tags = run_tags(run_params, params, categories, models)
        project_path = Path(run_params.get("project_path") or Path.cwd())
        self._project_path = project_path
        tags["git_commit"] = tracking.git_commit(project_path)
        runtime = _flat(run_params.get("runtime_params") or {})
        extra = {
            "vlm": vlm_state,
            "learned_explainer": explainer_state,
            "kedro_command": kedro_command(run_params),
            # kedro-mlflow tags the runner's repr (an object address); its class name is what identifies it.
            "runner": runner_name(run_params.get("runner")),
            "mlflow.runName": _run_name(tags, runtime),
        }
        mlflow.set_tags(tags | extra)
        _mark_experiment(run.info.experiment_id)
        shared = {k: tags[k] for k in ("data_source", "git_commit", "kedro_env", "pipeline")}
        suffix = "".join(f" · {k.rsplit('.', 1)[-1]}={v}" for k, v in runtime.items())
        tracking.start(run.info.run_id, shared, suffix)
        logger.info("MLflow run '%s' tagged %s.", extra["mlflow.runName"], tags)

    @staticmethod
    def _check_vlm(params: dict[str, Any], pipeline: Any) -> str:
        """Say whether the MiniCPM-V branch runs; when it should but its weights are absent, stop now, not later.

        Raised here, before any node, so a missing model costs seconds, not a preprocessing run. The MLflow run that
        kedro-mlflow has opened is closed as FAILED (Kedro calls no error hook for a failing before-run hook).
        """
        vlm = params.get("vlm") or {}
        uses_vlm = any(n.name.endswith(".extract_vlm_features") for n in pipeline.nodes)
        if not vlm.get("enabled", False):
            reason = vlm.get("disabled_reason") or "vlm.enabled is false"
            logger.info(
                "MiniCPM-V branch disabled (%s): the vlm_features stage and the detectors that read it (hybrid, "
                "vlm_judge) are not part of this run.",
                reason,
            )
            return f"disabled: {reason}"
        if uses_vlm:
            from madfh_pipeline.models.vlm_detectors import check_vlm_available
            from madfh_pipeline.pipelines.vlm_features.nodes import model_settings

            try:
                check_vlm_available(model_settings(dict(vlm)))
            except Exception:
                if mlflow.active_run() is not None:
                    mlflow.end_run("FAILED")
                raise
        return "enabled"

    @staticmethod
    def _check_explainer(params: dict[str, Any], pipeline: Any) -> str:
        """Like :meth:`_check_vlm` for the BLIP + LoRA explainer (the grounded describer always runs)."""
        learned = ((params.get("explainer") or {}).get("learned")) or {}
        if not learned.get("enabled", False):
            reason = learned.get("disabled_reason") or "explainer.learned.enabled is false"
            logger.info(
                "Learned explainer disabled (%s): flagged images are explained by the grounded describer only.", reason
            )
            return f"disabled: {reason}"
        if any(n.name.endswith(".train_explainer") for n in pipeline.nodes):
            from madfh_pipeline.explain.lora import check_base_model_available

            try:
                check_base_model_available(learned["base_model"], bool(learned.get("local_files_only", True)))
            except Exception:
                if mlflow.active_run() is not None:
                    mlflow.end_run("FAILED")
                raise
        return "enabled"

    @hook_impl
    def after_node_run(self, node: Any, outputs: dict[str, Any]) -> None:
        for name, value in outputs.items():
            parts = name.split(".")
            if len(parts) == 3 and parts[2] == "evaluation_report" and isinstance(value, dict):
                self._reports[(parts[0], parts[1])] = value

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: DataCatalog) -> None:
        children = tracking.children()
        tracking.finish("FINISHED")
        if self._reports:
            logger.info("%s", summary(self._reports, children, self._run_id, self._project_path))

    @hook_impl
    def on_pipeline_error(self, error: Exception, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        tracking.finish("FAILED")


def _readable_console() -> None:
    """Off a terminal (CI, nohup, a log file) rich wraps every line at 80 columns; tables and paths become unreadable.

    Its console is then made wide enough for a log line, which is what log files and CI output want.
    """
    for handler in logging.getLogger().handlers:
        console = getattr(handler, "console", None)
        if console is not None and not console.is_terminal and console.width < LOG_WIDTH:
            console.width = LOG_WIDTH


def _run_name(tags: dict[str, str], runtime: dict[str, Any]) -> str:
    name = tags["pipeline"] if tags["pipeline"] != "__default__" else "all categories"
    name += f" ({tags['data_source']})"
    return name + "".join(f" · {k.rsplit('.', 1)[-1]}={v}" for k, v in runtime.items())


def _mark_experiment(experiment_id: str) -> None:
    """Open the experiment in MLflow 3's model-training view, not its GenAI view (traces, evaluations)."""
    try:
        mlflow.MlflowClient().set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
    except mlflow.exceptions.MlflowException as exc:  # a read-only experiment: cosmetic only
        logger.debug("Could not tag experiment %s: %s", experiment_id, exc)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) and math.isfinite(value) else "—"


def summary(
    reports: dict[tuple[str, str], dict[str, Any]],
    children: dict[tuple[str, str], str],
    parent_run_id: str | None,
    project_path: Path | None,
) -> str:
    """The end-of-run table: headline metrics per (category, detector), where the results are, the MLflow address."""
    header = ["category", "detector", *(title for _, title in SUMMARY_COLUMNS), "resolution"]
    rows = []
    for (category, detector), report in sorted(reports.items()):
        overall = (report.get("test_public") or {}).get("all") or {}
        rows.append(
            [category, detector, *(_fmt(overall.get(k)) for k, _ in SUMMARY_COLUMNS), report.get("resolution", "")]
        )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["Results on test_public (thresholds from validation/good only):", ""]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append("")
    root = project_path or Path.cwd()
    for category in sorted({c for c, _ in reports}):
        lines.append(f"Figures and reports: {root / 'data/08_reporting' / category}/<detector>/")
    if parent_run_id:
        lines.append(
            f"MLflow (make mlflow-ui, then open): {tracking.run_url(parent_run_id, ui=MLFLOW_UI)} "
            f"— one nested run per detector ({len(children)})."
        )
    return "\n".join(lines)
