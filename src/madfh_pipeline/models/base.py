"""The one detector interface every anomaly detector implements.

Detectors are plain torch/numpy objects with no Kedro inside, so they can be used from notebooks, the review app or
another orchestrator. Kedro nodes stream batches into :meth:`AnomalyDetector.fit` and :meth:`predict`; persistence
goes through :func:`save_detector` / :func:`load_detector` so that a saved file alone is enough to rebuild the model
(class name, constructor config, learnt state and the thresholds calibrated on normal data).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: A callable that returns a fresh iterable of image batches. Detectors that need several passes over the data
#: (the autoencoder's epochs) call it once per pass; the batches are float32 tensors of shape (B, C, H, W) in [0, 1].
BatchSource = Callable[[], Iterable[torch.Tensor]]


@dataclass
class DetectorOutput:
    """Scores for one batch: an image score per image and a pixel map at the input resolution."""

    scores: np.ndarray  # (B,) float32
    maps: np.ndarray  # (B, H, W) float32


@dataclass
class Thresholds:
    """Decision thresholds calibrated on defect-free data only (the benchmark's rule).

    ``pixel`` binarises anomaly maps (SegF1), ``image`` binarises image scores (ClassF1). ``rule`` records how they
    were derived so a report can say it, e.g. ``"mean+3.0std"``.
    """

    pixel: float | None = None
    image: float | None = None
    rule: str = ""
    stats: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"pixel": self.pixel, "image": self.image, "rule": self.rule, "stats": dict(self.stats)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Thresholds:
        data = data or {}
        return cls(
            pixel=data.get("pixel"),
            image=data.get("image"),
            rule=data.get("rule", ""),
            stats=dict(data.get("stats", {})),
        )


class AnomalyDetector(ABC):
    """Fit on normal images, then score images and localise anomalies.

    Subclasses register under :attr:`name` (the name used in ``parameters_detection.yml``), keep every constructor
    argument in :attr:`config` (so :func:`load_detector` can rebuild them) and implement the abstract methods.
    """

    name: ClassVar[str]
    registry: ClassVar[dict[str, type[AnomalyDetector]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            AnomalyDetector.registry[cls.name] = cls

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = dict(config)
        self.thresholds = Thresholds()
        self.device = torch.device("cpu")

    @abstractmethod
    def fit(self, batches: BatchSource) -> dict[str, list[float]]:
        """Learn normality from defect-free images; returns a training history (e.g. ``{"loss": [...]}``)."""

    @abstractmethod
    def predict(self, batch: torch.Tensor) -> DetectorOutput:
        """Score one batch (B, C, H, W) in [0, 1]; maps come back at the batch's H×W."""

    @abstractmethod
    def get_state(self) -> dict[str, Any]:
        """Everything learnt during ``fit`` (tensors or plain Python), for saving."""

    @abstractmethod
    def set_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_state` returned."""

    def to(self, device: str | torch.device) -> AnomalyDetector:
        """Move the detector's tensors to ``device``; subclasses extend this for their modules."""
        self.device = torch.device(device)
        return self


def resolve_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; anything else is passed to torch as given."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def build_detector(name: str, config: dict[str, Any] | None = None) -> AnomalyDetector:
    """Instantiate a registered detector by the name used in the parameters."""
    # Import for the registration side effect: every detector module adds itself to the registry.
    from madfh_pipeline.models import autoencoder, patchcore  # noqa: F401

    try:
        cls = AnomalyDetector.registry[name]
    except KeyError:
        known = ", ".join(sorted(AnomalyDetector.registry))
        raise ValueError(f"Unknown detector '{name}'. Known detectors: {known}.") from None
    return cls(dict(config or {}))


def save_detector(detector: AnomalyDetector, path: str | Path) -> None:
    """Write class name, config, learnt state and thresholds to one torch file."""
    payload = {
        "format": "madfh_detector/1",
        "name": detector.name,
        "config": detector.config,
        "state": detector.get_state(),
        "thresholds": detector.thresholds.to_dict(),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)


def load_detector(path: str | Path, device: str | torch.device = "cpu") -> AnomalyDetector:
    """Rebuild a detector saved by :func:`save_detector`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No saved detector at '{path}'. Run the training pipeline first.")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != "madfh_detector/1":
        raise ValueError(f"'{path}' is not a madfh_pipeline detector file (format={payload.get('format')!r}).")
    detector = build_detector(payload["name"], payload["config"])
    detector.set_state(payload["state"])
    detector.thresholds = Thresholds.from_dict(payload.get("thresholds"))
    return detector.to(device)
