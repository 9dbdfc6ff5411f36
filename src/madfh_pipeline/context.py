"""The project's Kedro context: hands the session's parameters to the pipeline registry before pipelines load.

Why a context and not a hook: Kedro reads ``register_pipelines()`` without passing it the run's env or ``--params``,
and kedro-viz builds its session with hooks switched off. Every session, however, creates its context (with the
config loader for the env and runtime parameters it was given) before the pipelines are first read, so this is the
one place that sees the run's real parameters in every entry point: ``kedro run``, ``kedro viz``, ``kedro ipython``,
notebooks and tests.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from attrs import define
from kedro.framework.context import KedroContext

logger = logging.getLogger(__name__)


@define(slots=False)
class ProjectContext(KedroContext):
    def __attrs_post_init__(self) -> None:
        from madfh_pipeline.pipeline_registry import use_parameters

        parameters: dict[str, Any] = dict(self.config_loader["parameters"])
        _import_detector_plugins(parameters)
        use_parameters(parameters, self.project_path, self.env)


def _import_detector_plugins(parameters: dict[str, Any]) -> None:
    """Import the modules that detector entries name, so their models load even in a run that does not fit them."""
    models = ((parameters.get("detection") or {}).get("models")) or {}
    for key, entry in models.items():
        module = (entry or {}).get("module")
        if module:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise ImportError(f"detection.models.{key}.module: cannot import '{module}': {exc}") from exc
