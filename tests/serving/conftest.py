"""Fixtures of the serving tests: one really fitted demo inspection model, demo images, a temp MLflow store.

The model is a PatchCore fitted on rendered ``sheet_metal`` scenes at 96×80 (:func:`madfh_pipeline.serving.demo.
build_demo_model`, seconds): small enough for tests, real enough that a defective scene scores far above the normal
ones. Its input limits are tight (gray only, sides up to 400 px) so the REST test can provoke each 4xx cheaply.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from madfh_pipeline.demo.synth import SceneSpec
from madfh_pipeline.inspection import InspectionModel
from madfh_pipeline.serving.demo import build_demo_model, render_defective, render_normals

CATEGORY = "sheet_metal"
WIDTH, HEIGHT = 96, 80
SPEC = SceneSpec(CATEGORY, WIDTH, HEIGHT, 1)
#: Settings of the served test model: strict channels and a small size limit, so 4xx cases are cheap to build.
SERVED_SETTINGS: dict[str, Any] = {"limits": {"channel_policy": "strict", "max_side": 400}}


@pytest.fixture(scope="session")
def demo_model() -> InspectionModel:
    return build_demo_model(category=CATEGORY, width=WIDTH, height=HEIGHT, channels=1, settings=SERVED_SETTINGS)


@pytest.fixture(scope="session")
def good_images() -> list[np.ndarray]:
    """Normal scenes the model never saw (another seed than its training and validation scenes)."""
    return render_normals(SPEC, 4, seed=99)


@pytest.fixture(scope="session")
def bad_image() -> np.ndarray:
    """A scene with one large defect (scores ≈ 70 against a threshold ≈ 29 for the demo model)."""
    return render_defective(SPEC, seed=50, size_px=20)[0]


@pytest.fixture(scope="session")
def model_folder(demo_model: InspectionModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_model.save(tmp_path_factory.mktemp("inspection") / "model")


class PicklePayload:
    """Unpickling this object creates ``marker`` (``open(marker, "w")``): the stand-in for any code a file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(self.marker), "w")


@pytest.fixture
def payload() -> type[PicklePayload]:
    return PicklePayload


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh SQLite tracking + registry store (URI) per test module, with a local artifact root (so version numbers
    do not depend on which module ran first); MLflow's global URI is restored after."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.MlflowClient().create_experiment("serving-tests", artifact_location=str(root / "artifacts"))
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(previous)
