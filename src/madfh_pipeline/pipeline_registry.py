"""Project pipelines: one namespaced pipeline per category, built from the stage templates, plus stage pipelines.

Categories come from the ``categories:`` parameters (conf/base, overridden by conf/local or the env named in
``KEDRO_ENV``), so a new folder in the MVTec AD 2 layout becomes ``kedro run --pipeline=<name>`` without code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from kedro.framework.project import settings
from kedro.pipeline import Pipeline, pipeline
from kedro.utils import find_kedro_project

from madfh_pipeline.categories import pipeline_categories
from madfh_pipeline.pipelines import demo_data, detection, evaluation, preprocessing


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def configured_parameters(key: str, project_path: Path | None = None, env: str | None = None) -> Any:
    """Read one top-level parameter the way a run will: base, soft-merged with ``env`` (``KEDRO_ENV`` or ``local``).

    Plain YAML on purpose: building an ``OmegaConfigLoader`` here would re-register the process-wide ``globals``
    resolver for this env and silently change how the run's own catalog resolves ``${globals:...}``.
    """
    project_path = project_path or find_kedro_project(Path.cwd()) or Path.cwd()
    conf_source = Path(settings.CONF_SOURCE)
    if not conf_source.is_absolute():
        conf_source = project_path / conf_source
    value: Any = None
    for env_name in ("base", env or os.environ.get("KEDRO_ENV", "local")):
        for path in sorted((conf_source / env_name).glob("parameters*.yml")):
            content = (yaml.safe_load(path.read_text()) or {}).get(key)
            if content is None:
                continue
            value = _merge(value, content) if isinstance(value, dict) and isinstance(content, dict) else content
    return value


def configured_categories(project_path: Path | None = None, env: str | None = None) -> dict[str, Any]:
    return dict(configured_parameters("categories", project_path, env) or {})


def configured_detectors(project_path: Path | None = None, env: str | None = None) -> list[str]:
    detection = configured_parameters("detection", project_path, env) or {}
    return list(detection.get("detectors") or [])


def namespaced(template: Pipeline, category: str) -> Pipeline:
    """One copy of a stage template for ``category``: datasets under ``<category>.``, its spec as ``params:category``.

    Every other parameter stays global (the stage's parameters file), so categories differ only in their spec.
    """
    used = {name for n in template.nodes for name in n.inputs if name.startswith("params:")}
    mapping = {name: name for name in used}
    if "params:category" in used:
        mapping["params:category"] = f"params:categories.{category}"
    return pipeline(template, namespace=category, parameters=mapping, tags=[category])


def per_detector(template: Pipeline, detector: str) -> Pipeline:
    """One copy of a model stage for ``detector``: datasets under ``<detector>.``, category-level inputs shared."""
    category_level = {"manifest", "image_store"} & template.inputs()
    mapping = {
        "params:detector": f"params:detection.models.{detector}",
        "params:runtime": "params:detection.runtime",
        "params:thresholds": "params:detection.thresholds",
        "params:evaluation": "params:evaluation",
    }
    used = {name for n in template.nodes for name in n.inputs if name.startswith("params:")}
    return pipeline(
        template,
        namespace=detector,
        inputs=category_level,
        parameters={k: v for k, v in mapping.items() if k in used},
        tags=[detector],
    )


def register_pipelines() -> dict[str, Pipeline]:
    """Register ``<category>`` for each category, the stage pipelines over all of them, and ``__default__``."""
    categories = pipeline_categories(configured_categories())
    detectors = configured_detectors()
    model_stages = {"training": detection.create_pipeline(), "evaluation": evaluation.create_pipeline()}
    stages = {
        "preprocessing": preprocessing.create_pipeline(),
        **{
            name: sum((per_detector(template, det) for det in detectors), Pipeline([]))
            for name, template in model_stages.items()
        },
    }
    per_category = {cat: sum((namespaced(t, cat) for t in stages.values()), Pipeline([])) for cat in categories}
    pipelines: dict[str, Pipeline] = dict(per_category)
    for stage, template in stages.items():
        pipelines[stage] = sum((namespaced(template, cat) for cat in categories), Pipeline([]))
    pipelines["demo_data"] = sum((namespaced(demo_data.create_pipeline(), cat) for cat in categories), Pipeline([]))
    pipelines["__default__"] = sum(per_category.values(), Pipeline([]))
    return pipelines
