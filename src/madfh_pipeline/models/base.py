"""The one detector interface every anomaly detector implements, its plug-in registry, and its safe file format.

Detectors are plain torch/numpy objects with no Kedro inside, so they can be used from notebooks, the review app, a
model server or another orchestrator. Kedro nodes stream batches into :meth:`AnomalyDetector.fit` and
:meth:`predict`; persistence goes through :func:`save_detector` / :func:`load_detector`.

**Plug-ins.** A detector is one module that defines a subclass with a ``name``; the subclass registers itself. The
parameters entry ``detection.models.<key>: {name: <registered name>, module: <optional import path>, config: {...}}``
is all a run needs: :func:`detector_class` finds built-in detectors by importing the modules of
:mod:`madfh_pipeline.models` on demand, and a detector that lives elsewhere (a plant's own package, a test module) by
the ``module`` the parameters name. No if/else chain, no edit of this file.

**Model files cannot run code.** A detector file is a ``safetensors`` file: tensors in the body, everything else (class
name, constructor config, thresholds, the JSON part of the learnt state, provenance) as a JSON string in its header.
Loading never unpickles anything, so a model copied from another station, downloaded from a registry or served cannot
execute what it holds. Files of the first format (a torch pickle) are refused with the command that converts them.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: A callable that returns a fresh iterable of image batches. Detectors that need several passes over the data
#: (the autoencoder's epochs) call it once per pass; the batches are float32 tensors of shape (B, C, H, W) in [0, 1].
BatchSource = Callable[[], Iterable[torch.Tensor]]

#: Written into every model file; bump when the layout changes incompatibly.
FILE_FORMAT = "madfh_detector/2"
#: The first format: ``torch.save`` of a dict (a pickle). Refused on load; see :func:`convert_legacy_file`.
LEGACY_FORMAT = "madfh_detector/1"
_HEADER_KEY = "madfh"
_TENSOR_MARK = "__tensor__"


class ModelFileError(ValueError):
    """A file that is not a detector file this version can load safely (wrong format, legacy pickle, corrupt)."""


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
    ``get_state`` may only return tensors and JSON values (nested dicts and lists of them): that is what the safe
    file format stores.

    ``provenance`` travels with the model file: what it was trained on (a fingerprint of the training images and the
    effective config), when, and by which run, so a pipeline can reuse a model whose inputs did not change and a
    reviewer can trace any score back to its training data.
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
        self.provenance: dict[str, Any] = {}

    @abstractmethod
    def fit(self, batches: BatchSource) -> dict[str, list[float]]:
        """Learn normality from defect-free images; returns a training history (e.g. ``{"loss": [...]}``)."""

    @abstractmethod
    def predict(self, batch: torch.Tensor) -> DetectorOutput:
        """Score one batch (B, C, H, W) in [0, 1]; maps come back at the batch's H×W."""

    @abstractmethod
    def get_state(self) -> dict[str, Any]:
        """Everything learnt during ``fit`` as tensors and JSON values, for saving."""

    @abstractmethod
    def set_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_state` returned."""

    def to(self, device: str | torch.device) -> AnomalyDetector:
        """Move the detector's tensors to ``device``; subclasses extend this for their modules."""
        self.device = torch.device(device)
        return self

    @property
    def fingerprint(self) -> str:
        """Identity of what the model computes: class, config, training fingerprint and thresholds.

        Two detectors with the same fingerprint produce the same maps for the same image, so stored maps scored by
        one can be reused for the other.
        """
        return stable_hash(
            {
                "name": self.name,
                "config": self.config,
                "training": self.provenance.get("training_fingerprint"),
                "thresholds": self.thresholds.to_dict(),
                # operator feedback changes the bank without retraining: its lineage is part of the identity
                "lineage": self.provenance.get("lineage"),
            }
        )


def stable_hash(value: Any) -> str:
    """A short, deterministic hash of a JSON-able value (dict keys sorted), used for fingerprints."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def resolve_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; anything else is passed to torch as given."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


# --------------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------------


def _import_builtin_detectors() -> None:
    """Import every module of :mod:`madfh_pipeline.models` once, so their detectors register themselves.

    Only called when a name is not registered yet: importing the VLM modules pulls in transformers (seconds).
    """
    import madfh_pipeline.models as package

    for info in pkgutil.iter_modules(package.__path__, f"{package.__name__}."):
        try:
            importlib.import_module(info.name)
        except ImportError as exc:  # a module whose optional dependency is missing must not hide the others
            logger.debug("Could not import %s while looking for detectors: %s", info.name, exc)


def _register_loaded_subclasses() -> None:
    """Register every imported subclass with a ``name``, also those imported before the registry was reset."""
    stack = list(AnomalyDetector.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if "name" in cls.__dict__:
            AnomalyDetector.registry.setdefault(cls.name, cls)


def detector_class(name: str, module: str | None = None) -> type[AnomalyDetector]:
    """The registered detector class called ``name``; ``module`` is imported first when given (plug-ins)."""
    if module:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(f"Detector '{name}': cannot import its module '{module}': {exc}") from exc
    if name not in AnomalyDetector.registry:
        _import_builtin_detectors()
        _register_loaded_subclasses()
    try:
        return AnomalyDetector.registry[name]
    except KeyError:
        known = ", ".join(sorted(AnomalyDetector.registry))
        raise ValueError(
            f"Unknown detector '{name}'. Known detectors: {known}. A detector of your own is a module defining an "
            "AnomalyDetector subclass with that name; give the module in its parameters entry "
            "(detection.models.<key>.module)."
        ) from None


def build_detector(name: str, config: Mapping[str, Any] | None = None, module: str | None = None) -> AnomalyDetector:
    """Instantiate a registered detector by the name used in the parameters."""
    return detector_class(name, module)(dict(config or {}))


# --------------------------------------------------------------------------------------------------------------------
# Safe file format
# --------------------------------------------------------------------------------------------------------------------


def _split_state(state: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by a reference and collect it into ``tensors``."""
    if isinstance(state, torch.Tensor):
        tensors[path] = state.detach().cpu().contiguous()
        return {_TENSOR_MARK: path}
    if isinstance(state, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(state))
        return {_TENSOR_MARK: path}
    if isinstance(state, Mapping):
        return {str(k): _split_state(v, f"{path}.{k}", tensors) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return [_split_state(v, f"{path}.{i}", tensors) for i, v in enumerate(state)]
    if state is None or isinstance(state, bool | int | float | str):
        return state
    if isinstance(state, np.generic):
        return state.item()
    raise TypeError(
        f"Detector state at '{path}' is a {type(state).__name__}: get_state() may only return tensors and JSON values "
        "(dicts, lists, numbers, strings, None)."
    )


def _join_state(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR_MARK}:
            return tensors[value[_TENSOR_MARK]]
        return {k: _join_state(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_state(v, tensors) for v in value]
    return value


def detector_payload(detector: AnomalyDetector) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON header and the tensors of a detector file (also what a served model bundles)."""
    tensors: dict[str, torch.Tensor] = {}
    state = _split_state(detector.get_state(), "state", tensors)
    header = {
        "format": FILE_FORMAT,
        "name": detector.name,
        "module": type(detector).__module__,
        "config": detector.config,
        "thresholds": detector.thresholds.to_dict(),
        "provenance": detector.provenance,
        "state": state,
    }
    return header, tensors


def save_detector(detector: AnomalyDetector, path: str | Path) -> None:
    """Write a detector as one safetensors file (tensors) with a JSON header (everything else); no pickle."""
    from safetensors.torch import save_file

    header, tensors = detector_payload(detector)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_HEADER_KEY: json.dumps(header, default=_json_default)})
    tmp.replace(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a detector file without loading its tensors (cheap: provenance, thresholds, config)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # not a safetensors file at all (e.g. a legacy torch pickle)
        raise ModelFileError(_not_safe_message(path, exc)) from exc
    if _HEADER_KEY not in metadata:
        raise ModelFileError(f"'{path}' is a safetensors file but not a madfh_pipeline detector (no '{_HEADER_KEY}').")
    header = json.loads(metadata[_HEADER_KEY])
    if header.get("format") != FILE_FORMAT:
        raise ModelFileError(
            f"'{path}' has detector format {header.get('format')!r}; this version reads {FILE_FORMAT}."
        )
    return header


def _not_safe_message(path: Path, exc: Exception) -> str:
    return (
        f"'{path}' is not a safetensors detector file ({type(exc).__name__}: {exc}). Detector files are loaded only "
        "from safetensors, which cannot execute code. If this is a model saved by an earlier version of "
        f"madfh_pipeline (format {LEGACY_FORMAT}, a torch pickle), convert it once with "
        f"`python -m madfh_pipeline.models.convert {path}` (it reads tensors and plain values only and refuses "
        "anything else), or retrain."
    )


def load_detector(path: str | Path, device: str | torch.device = "cpu") -> AnomalyDetector:
    """Rebuild a detector saved by :func:`save_detector`. Never unpickles: only safetensors and JSON are read."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No saved detector at '{path}'. Run the training pipeline first.")
    header = read_header(path)
    tensors = load_file(str(path), device="cpu")
    detector = build_detector(header["name"], header["config"], _trusted_module(header.get("module")))
    detector.set_state(_join_state(header["state"], tensors))
    detector.thresholds = Thresholds.from_dict(header.get("thresholds"))
    detector.provenance = dict(header.get("provenance") or {})
    return detector.to(device)


def _trusted_module(module: str | None) -> str | None:
    """A module named in a file is imported only if it is one of ours; plug-ins come from the parameters instead.

    Importing a module runs its top-level code, so a file must not be able to name any module it likes.
    """
    if module and module.startswith("madfh_pipeline.models."):
        return module
    return None


def convert_legacy_file(source: str | Path, target: str | Path | None = None) -> Path:
    """Convert a :data:`LEGACY_FORMAT` torch file into the safe format.

    Reads with ``torch.load(weights_only=True)``, which only accepts tensors and plain containers: a file that holds
    anything else (e.g. a crafted pickle payload) is refused by torch before any of its code can run.
    """
    source = Path(source)
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's message ends with advice to retry with weights_only=False, i.e. to run the file: keep only its
        # diagnosis (which global the file wanted to import), never that advice.
        lines = [line.strip() for line in str(exc).splitlines() if "Unsupported global" in line]
        detail = lines[0] if lines else type(exc).__name__
        raise ModelFileError(
            f"'{source}' holds more than tensors and plain values ({detail}); it is refused and nothing in it ran. "
            "Retrain the model instead."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != LEGACY_FORMAT:
        raise ModelFileError(f"'{source}' is not a {LEGACY_FORMAT} detector file.")
    detector = build_detector(payload["name"], payload["config"])
    detector.set_state(payload["state"])
    detector.thresholds = Thresholds.from_dict(payload.get("thresholds"))
    target = Path(target) if target else source.with_suffix(".safetensors")
    save_detector(detector, target)
    logger.info("Converted %s → %s.", source, target)
    return target
