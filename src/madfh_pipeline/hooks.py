"""Tag every MLflow run with what it ran on, so demo numbers can never pass for real ones."""

from __future__ import annotations

import logging
from typing import Any

import mlflow
from kedro.framework.hooks import hook_impl
from kedro.io import DataCatalog

logger = logging.getLogger(__name__)


def run_tags(
    run_params: dict[str, Any], params: dict[str, Any], categories: list[str], models: list[str] | None = None
) -> dict[str, str]:
    """The tags of a run: pipeline(s), category and model (comma-joined when several), data source, env."""
    names = run_params.get("pipeline_names") or [run_params.get("pipeline_name") or "__default__"]
    if isinstance(names, str):
        names = [names]
    return {
        "pipeline": "+".join(names),
        "category": ",".join(categories) if categories else "none",
        "model": ",".join(models) if models else "none",
        "data_source": str(params.get("data_source", "unknown")),
        "kedro_env": str(run_params.get("env") or "local"),
    }


class RunTagsHook:
    """Adds ``category``, ``model``, ``data_source``, ``pipeline`` and ``kedro_env`` tags to kedro-mlflow's run."""

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: DataCatalog) -> None:
        run = mlflow.active_run()
        if run is None:  # tracking disabled for this pipeline
            return
        params = catalog.load("parameters") if "parameters" in catalog else {}
        known = set((params.get("categories") or {}).keys())
        detectors = set(((params.get("detection") or {}).get("models") or {}).keys())
        parts = [n.namespace.split(".") for n in pipeline.nodes if n.namespace]
        categories = sorted({p[0] for p in parts} & known)
        models = sorted({p[1] for p in parts if len(p) > 1} & detectors)
        tags = run_tags(run_params, params, categories, models)
        mlflow.set_tags(tags)
        logger.info("MLflow run '%s' tagged %s.", run.info.run_name, tags)
