"""Tag every MLflow run with what it ran on, so demo numbers can never pass for real ones."""

from __future__ import annotations

import logging
from typing import Any

import mlflow
from kedro.framework.hooks import hook_impl
from kedro.io import DataCatalog

logger = logging.getLogger(__name__)


def run_tags(run_params: dict[str, Any], params: dict[str, Any], categories: list[str]) -> dict[str, str]:
    """The tags of a run: pipeline(s), category (or the comma-joined categories), data source, env."""
    names = run_params.get("pipeline_names") or [run_params.get("pipeline_name") or "__default__"]
    if isinstance(names, str):
        names = [names]
    return {
        "pipeline": "+".join(names),
        "category": ",".join(categories) if categories else "none",
        "data_source": str(params.get("data_source", "unknown")),
        "kedro_env": str(run_params.get("env") or "local"),
    }


class RunTagsHook:
    """Adds ``category``, ``data_source``, ``pipeline`` and ``kedro_env`` tags to the run kedro-mlflow started."""

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: DataCatalog) -> None:
        run = mlflow.active_run()
        if run is None:  # tracking disabled for this pipeline
            return
        params = catalog.load("parameters") if "parameters" in catalog else {}
        known = set((params.get("categories") or {}).keys())
        categories = sorted({n.namespace.split(".")[0] for n in pipeline.nodes if n.namespace} & known)
        tags = run_tags(run_params, params, categories)
        mlflow.set_tags(tags)
        logger.info("MLflow run '%s' tagged %s.", run.info.run_name, tags)
