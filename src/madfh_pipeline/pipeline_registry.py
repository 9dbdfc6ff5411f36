"""Project pipelines: one namespaced pipeline per category, built from the stage templates, plus stage pipelines.

Categories and detectors are data: the ``categories:`` and ``detection:`` parameters of the run decide which
pipelines exist, so a new folder in the MVTec AD 2 layout becomes ``kedro run --pipeline=<name>`` without code.

Which parameters: the ones the run itself uses. :class:`madfh_pipeline.context.ProjectContext` hands the session's
parameters (base + the env given by ``--env`` + ``--params``) to :func:`use_parameters` as soon as the session
creates its context, before Kedro reads the pipelines; a category defined only in ``conf/demo`` or a detector added by
``--params`` therefore has its pipeline. Without a session (``kedro registry list``) the registry loads
``KEDRO_ENV`` (default ``local``) through the project's own config loader.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

from kedro.framework.project import pipelines as project_pipelines
from kedro.framework.project import settings
from kedro.pipeline import Pipeline, pipeline
from kedro.utils import find_kedro_project

from madfh_pipeline.categories import pipeline_categories
from madfh_pipeline.pipelines import (
    demo_data,
    detection,
    evaluation,
    explainer,
    feedback,
    inspection,
    preprocessing,
    vlm_features,
)

logger = logging.getLogger(__name__)

#: The parameters the registry builds from, with the project and env they came from (set by the context).
_ACTIVE: dict[str, Any] = {}


def use_parameters(parameters: dict[str, Any], project_path: Path, env: str | None) -> None:
    """Build the pipelines from these parameters (called by the project's context for every session).

    When they differ from what the registry last built from, Kedro's lazily loaded pipelines are invalidated so the
    next access rebuilds them.
    """
    relevant = _relevant(parameters)
    changed = _ACTIVE.get("relevant") != relevant or _ACTIVE.get("project") != Path(project_path)
    _ACTIVE.update(parameters=parameters, relevant=relevant, project=Path(project_path), env=env)
    if changed:
        project_pipelines.configure(f"{__package__}.pipeline_registry")


def _relevant(parameters: dict[str, Any]) -> dict[str, Any]:
    """The part of the parameters that decides which pipelines exist."""
    detection_params = parameters.get("detection") or {}
    return copy.deepcopy(
        {
            "categories": parameters.get("categories") or {},
            "detectors": detection_params.get("detectors") or [],
            "models": {
                k: ((v or {}).get("enabled", True), (v or {}).get("features") or [])
                for k, v in (detection_params.get("models") or {}).items()
            },
            "vlm": vlm_enabled(parameters),
            "learned_explainer": learned_explainer_enabled(parameters),
            "inspection": inspection_detector(parameters),
        }
    )


def inspection_detector(parameters: dict[str, Any]) -> str | None:
    """The detector whose model inspects new images, or None when the inspection stage is off."""
    params = parameters.get("inspection") or {}
    return str(params.get("detector")) if params.get("enabled", False) else None


def learned_explainer_enabled(parameters: dict[str, Any]) -> bool:
    """Whether the BLIP + LoRA explainer is trained (else explanations come from the grounded describer alone)."""
    return bool(((parameters.get("explainer") or {}).get("learned") or {}).get("enabled", False))


def vlm_enabled(parameters: dict[str, Any]) -> bool:
    """Whether the MiniCPM-V branch (feature stage + the detectors that read it) is part of the pipelines."""
    return bool((parameters.get("vlm") or {}).get("enabled", False))


def _load_parameters(project_path: Path, env: str | None) -> dict[str, Any]:
    """Parameters through the project's own config loader (only used when no session gave them).

    The loader class and its arguments come from this project's settings module, not from Kedro's global
    ``settings``, which keep Kedro's defaults (destructive merges) until a project has been configured — e.g. when a
    script or notebook calls :func:`register_pipelines` directly.
    """
    from madfh_pipeline import settings as project_settings

    conf_source = Path(getattr(project_settings, "CONF_SOURCE", "conf"))
    if not conf_source.is_absolute():
        conf_source = project_path / conf_source
    loader_class = getattr(project_settings, "CONFIG_LOADER_CLASS", settings.CONFIG_LOADER_CLASS)
    loader_args = dict(getattr(project_settings, "CONFIG_LOADER_ARGS", {}))
    loader = loader_class(conf_source=str(conf_source), env=env, **loader_args)
    return dict(loader["parameters"])


def configured_parameters(project_path: Path | None = None, env: str | None = None) -> dict[str, Any]:
    """The parameters pipelines are built from: the session's, else loaded for ``env`` (``KEDRO_ENV`` / local).

    Without ``project_path``: the project of the working directory; outside any project, the latest session's (a
    session may be opened from elsewhere, e.g. a notebook with ``MADFH_PROJECT``).
    """
    same_env = env is None or env == _ACTIVE.get("env")
    here = find_kedro_project(Path.cwd())
    if project_path is None and here is None and _ACTIVE and same_env:
        return dict(_ACTIVE["parameters"])
    project_path = Path(project_path or here or Path.cwd())
    if _ACTIVE.get("project") == project_path and same_env:
        return dict(_ACTIVE["parameters"])
    return _load_parameters(project_path, env or os.environ.get("KEDRO_ENV") or "local")


def configured_categories(project_path: Path | None = None, env: str | None = None) -> dict[str, Any]:
    return dict(configured_parameters(project_path, env).get("categories") or {})


def detector_features(parameters: dict[str, Any], detector: str) -> list[str]:
    models = (parameters.get("detection") or {}).get("models") or {}
    return list((models.get(detector) or {}).get("features") or [])


def configured_detectors(parameters: dict[str, Any]) -> list[str]:
    """Detectors listed in ``detection.detectors`` whose entry is not ``enabled: false``.

    With the VLM branch disabled, detectors that read ``vlm_features`` are left out (the run says so).
    """
    detection_params = parameters.get("detection") or {}
    models = detection_params.get("models") or {}
    names = list(detection_params.get("detectors") or [])
    unknown = [n for n in names if n not in models]
    if unknown:
        raise ValueError(
            f"detection.detectors lists {unknown} without an entry under detection.models; known entries: "
            f"{', '.join(sorted(models))}."
        )
    enabled = [n for n in names if (models[n] or {}).get("enabled", True)]
    if not vlm_enabled(parameters):
        enabled = [n for n in enabled if "vlm_features" not in detector_features(parameters, n)]
    return enabled


def namespaced(template: Pipeline, category: str, inputs: dict[str, str] | None = None) -> Pipeline:
    """One copy of a stage template for ``category``: datasets under ``<category>.``, its spec as ``params:category``.

    Every other parameter stays global (the stage's parameters file), so categories differ only in their spec.
    """
    used = {name for n in template.nodes for name in n.inputs if name.startswith("params:")}
    mapping = {name: name for name in used}
    if "params:category" in used:
        mapping["params:category"] = f"params:categories.{category}"
    return pipeline(template, namespace=category, inputs=inputs, parameters=mapping, tags=[category])


#: Category-level datasets that every detector of a category shares (not copied per detector).
CATEGORY_LEVEL = {"manifest", "image_store", "raw_masks", "vlm_features", "explainer_model"}


def per_detector(template: Pipeline, detector: str) -> Pipeline:
    """One copy of a model stage for ``detector``: datasets under ``<detector>.``, category-level inputs shared."""
    category_level = CATEGORY_LEVEL & template.inputs()
    mapping = {
        "params:detector": f"params:detection.models.{detector}",
        "params:runtime": "params:detection.runtime",
        "params:thresholds": "params:detection.thresholds",
        "params:evaluation": "params:evaluation",
        "params:category": "params:category",
        "params:data_source": "params:data_source",
        "params:vlm": "params:vlm",
        "params:explainer": "params:explainer",
    }
    used = {name for n in template.nodes for name in n.inputs if name.startswith("params:")}
    return pipeline(
        template,
        namespace=detector,
        inputs=category_level,
        parameters={k: v for k, v in mapping.items() if k in used},
        tags=[detector],
    )


def build_pipelines(parameters: dict[str, Any]) -> dict[str, Pipeline]:
    """``<category>`` for each category, the stage pipelines over all of them, ``demo_data`` and ``__default__``."""
    categories = pipeline_categories(parameters.get("categories"))
    detectors = configured_detectors(parameters)
    model_stages = {"training": detection.create_pipeline, "evaluation": evaluation.create_pipeline}
    stages = {"preprocessing": preprocessing.create_pipeline()}
    learned = learned_explainer_enabled(parameters)
    if vlm_enabled(parameters):
        stages["vlm_features"] = vlm_features.create_pipeline()
    if learned:
        stages["explainer"] = explainer.create_pipeline()
    for name, make in model_stages.items():
        options: dict[str, bool] = {"learned": learned} if name == "evaluation" else {}
        stages[name] = sum(
            (
                per_detector(make(features="vlm_features" in detector_features(parameters, det), **options), det)
                for det in detectors
            ),
            Pipeline([]),
        )
    per_category = {cat: sum((namespaced(t, cat) for t in stages.values()), Pipeline([])) for cat in categories}
    pipelines: dict[str, Pipeline] = dict(per_category)
    for stage, template in stages.items():
        pipelines[stage] = sum((namespaced(template, cat) for cat in categories), Pipeline([]))
    inspector = inspection_detector(parameters)
    if inspector is not None:
        if inspector not in detectors:
            raise ValueError(
                f"inspection.detector is '{inspector}', which this run does not train (detectors: {detectors}); "
                "choose one of them or set inspection.enabled: false."
            )
        inspect = {
            cat: namespaced(
                inspection.create_pipeline(),
                cat,
                inputs={"model": f"{cat}.{inspector}.model", "review_settings": "review_settings"},
            )
            for cat in categories
        }
        for cat, pipe in inspect.items():
            per_category[cat] += pipe
            pipelines[cat] = per_category[cat]
            pipelines[f"inspect_{cat}"] = pipe
        pipelines["inspect"] = sum(inspect.values(), Pipeline([]))
        learn = {cat: namespaced(feedback.create_pipeline(), cat) for cat in categories}
        for cat, pipe in learn.items():
            pipelines[f"feedback_{cat}"] = pipe
        pipelines["feedback"] = sum(learn.values(), Pipeline([]))
    pipelines["demo_data"] = sum((namespaced(demo_data.create_pipeline(), cat) for cat in categories), Pipeline([]))
    pipelines["__default__"] = sum(per_category.values(), Pipeline([]))
    return pipelines


def register_pipelines() -> dict[str, Pipeline]:
    """Kedro's entry point: the pipelines of the run's parameters (see the module docstring)."""
    return build_pipelines(configured_parameters())
