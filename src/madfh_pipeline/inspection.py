"""The inspection core: one raw image in, a decision with its evidence out — the same code wherever it runs.

The Kedro ``inspect`` pipeline, the MLflow pyfunc model behind the REST endpoint and the distributed batch job all
call :meth:`InspectionModel.inspect`, so a score seen by an operator at the line is the score the evaluation pipeline
computed for the same file. Kedro-free and MLflow-free (torch, numpy, OpenCV only).

What an :class:`InspectionModel` holds, and why each part is there:

- the **fitted detector** with its **calibrated thresholds** (validation/good only, stored in the detector);
- the **preprocessing geometry** of its category (canvas size, ``stretch``/``letterbox``, output channels). A raw
  image of *any* size goes through exactly what preprocessing does — :func:`imaging.convert_channels`, then
  ``Geometry.plan(...).apply`` (INTER_AREA), then ``/ 255`` — so its canvas is byte-identical to the stored PNG the
  pipeline scored, and its anomaly map comes back to native size with ``Geometry.invert`` like the submission export;
- the **category facts** (name, native size, channels) to say when an input does not look like the category's images;
- a **REVIEW band** around the image threshold (see below), the **describer settings** of the grounded explanation,
  **input limits** and a **version label**.

**The REVIEW band is measured in validation score standard deviations.** The image threshold is ``mean + k·σ`` of
the detector's scores on validation/good (or a percentile of them); its ``σ`` is stored with the thresholds
(``thresholds.stats["image_std"]``). A score within ``review_band_std · σ`` of the threshold is REVIEW: OK below
``threshold − w``, NG at or above ``threshold + w``, REVIEW in between (``w = review_band_std · σ``). Why σ and not a
fraction of the threshold: scores live on unrelated scales (PatchCore distances ≈ 30 whose normal spread is ≈ 1, an
autoencoder's MSE ≈ 0.01, the VLM judge's probabilities in [0, 1]); ``0.05 × threshold`` would be 1.5 σ for one and
a meaningless width for another, while "within one normal standard deviation of the threshold" means the same
uncertainty for every detector. ``review_band_std = 0`` gives the plain threshold (NG when ``score >= threshold``,
the rule of the evaluation pipeline's ``predicted_anomalous``).

**Saved as a folder that cannot run code**: ``inspection.json`` (format :data:`INSPECTION_FORMAT`) and the detector
in the safe safetensors + JSON format of :mod:`madfh_pipeline.models.base` (``detector.safetensors``), plus, for the
ONNX runtime, ``embedding.onnx`` (a protobuf graph: operators and weights, no code). Loading never unpickles.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch

from madfh_pipeline.explain.describer import DescriberSettings, Description, describe
from madfh_pipeline.imaging import Geometry, ResizeMode, convert_channels
from madfh_pipeline.models.base import (
    AnomalyDetector,
    ModelFileError,
    load_detector,
    read_header,
    save_detector,
)

logger = logging.getLogger(__name__)

#: Written into ``inspection.json``; bump when the folder layout changes incompatibly.
INSPECTION_FORMAT = "madfh_inspection/1"
CONFIG_FILE = "inspection.json"
DETECTOR_FILE = "detector.safetensors"
ONNX_FILE = "embedding.onnx"

Decision = Literal["OK", "NG", "REVIEW"]
DECISIONS: tuple[str, ...] = ("OK", "NG", "REVIEW")
RUNTIMES: tuple[str, ...] = ("torch", "onnx")


def review_band(thresholds: Any, band_std: float) -> tuple[float, float]:
    """(low, high) around ``thresholds.image``, ``band_std`` validation-score standard deviations wide on each side.

    A module function (not only :attr:`InspectionModel.review_band`) so that whatever simulates inspection — the
    feedback-loop bench — decides by the same rule as the line.
    """
    width = float(band_std) * float(thresholds.stats["image_std"])
    return float(thresholds.image) - width, float(thresholds.image) + width


def decide(score: float, band: tuple[float, float]) -> Decision:
    """OK below ``band[0]``, NG at or above ``band[1]``, REVIEW in between (a zero-width band: NG at ``>=``)."""
    low, high = band
    if score >= high:
        return "NG"
    if score < low:
        return "OK"
    return "REVIEW"


CHANNEL_POLICIES: tuple[str, ...] = ("convert", "strict")
#: Encoded image formats accepted by :func:`decode_image` (checked from the file's magic bytes, not from a name).
IMAGE_FORMATS: dict[str, tuple[bytes, ...]] = {
    "png": (b"\x89PNG\r\n\x1a\n",),
    "jpeg": (b"\xff\xd8\xff",),
    "tiff": (b"II*\x00", b"MM\x00*"),
    "bmp": (b"BM",),
}


class InvalidImageError(ValueError):
    """An input the inspection refuses: not an image, wrong channels or pixel type, too small or too large.

    A client error, never a fault of the model: the REST server answers it with HTTP 400 and this message, and the
    batch job records it against the file.
    """


# --------------------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------------------


def _from_mapping(cls: type, data: Mapping[str, Any] | None, what: str) -> Any:
    """A dataclass from a parameters dict; unknown keys are an error so a misspelt setting is never ignored."""
    data = dict(data or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"Unknown {what} setting(s) {unknown}; known: {sorted(known)}.")
    return cls(**data)


@dataclass(frozen=True)
class PreprocessingSpec:
    """The canvas a category's images are resized onto: what ``parameters_preprocessing.yml`` says, per category."""

    target_width: int
    target_height: int
    mode: ResizeMode = "stretch"
    output_channels: int = 3

    def __post_init__(self) -> None:
        if self.target_width < 1 or self.target_height < 1:
            raise ValueError(f"Canvas must be positive, got {self.target_width}x{self.target_height}.")
        if self.mode not in ("stretch", "letterbox"):
            raise ValueError(f"Unknown resize mode '{self.mode}': use 'stretch' or 'letterbox'.")
        if self.output_channels not in (1, 3):
            raise ValueError(f"output_channels must be 1 or 3, got {self.output_channels!r}.")

    @classmethod
    def from_parameters(cls, preprocessing: Mapping[str, Any], category: Mapping[str, Any]) -> PreprocessingSpec:
        """The settings that take effect for ``category``: the global ones with its overrides (as preprocessing does)."""
        settings = dict(preprocessing) | dict(category.get("preprocessing") or {})
        channels = settings.get("output_channels") or category["channels"]
        return cls(
            target_width=int(settings["target_width"]),
            target_height=int(settings["target_height"]),
            mode=settings.get("mode", "stretch"),
            output_channels=int(channels),
        )

    def geometry(self, width: int, height: int) -> Geometry:
        return Geometry.plan(width, height, self.target_width, self.target_height, self.mode)

    def to_canvas(self, image: np.ndarray) -> tuple[np.ndarray, Geometry]:
        """Native uint8 image → canvas, exactly as :func:`madfh_pipeline.workers.process_image` writes it."""
        height, width = image.shape[:2]
        geometry = self.geometry(width, height)
        return geometry.apply(convert_channels(image, self.output_channels)), geometry


@dataclass(frozen=True)
class CategoryFacts:
    """Native facts of the category the model was trained for (see :class:`madfh_pipeline.categories.CategorySpec`)."""

    name: str
    width: int
    height: int
    channels: int

    @classmethod
    def from_parameters(cls, category: Mapping[str, Any]) -> CategoryFacts:
        return cls(str(category["name"]), int(category["width"]), int(category["height"]), int(category["channels"]))


@dataclass(frozen=True)
class InputLimits:
    """What an input may be. Checked before any pixel is decoded where possible (a PNG header is enough).

    ``channel_policy``: ``convert`` turns gray into RGB and back as preprocessing does (an RGB photo of a gray
    category is inspected in gray); ``strict`` refuses an image whose channels differ from the category's (an RGB
    image sent to a gray line's model usually means the wrong camera or the wrong model). Images with other than 1, 3
    or 4 channels (4 = alpha, dropped) are refused under both policies.
    """

    min_side: int = 16
    max_side: int = 16_384
    max_pixels: int = 64_000_000
    max_bytes: int = 64 * 1024 * 1024
    channel_policy: Literal["convert", "strict"] = "convert"

    def __post_init__(self) -> None:
        if self.channel_policy not in CHANNEL_POLICIES:
            raise ValueError(f"channel_policy must be one of {CHANNEL_POLICIES}, got {self.channel_policy!r}.")
        if not 1 <= self.min_side <= self.max_side or self.max_pixels < 1 or self.max_bytes < 1:
            raise ValueError(f"Inconsistent input limits: {self}.")


@dataclass(frozen=True)
class InspectionSettings:
    """How scores become decisions and text.

    ``review_band_std``: half-width of the REVIEW band around the image threshold, in standard deviations of the
    validation/good image scores (module docstring). ``top_regions``: how many predicted regions a result lists
    (highest peak first). ``describer``: :class:`~madfh_pipeline.explain.describer.DescriberSettings` keys.
    ``runtime``: ``torch``, or ``onnx`` to run PatchCore's feature extractor in ONNX Runtime
    (:mod:`madfh_pipeline.serving.onnx`). ``batch_size``: canvases per detector call in :meth:`InspectionModel.
    inspect_batch`.
    """

    review_band_std: float = 1.0
    top_regions: int = 5
    describer: dict[str, Any] = field(default_factory=dict)
    runtime: Literal["torch", "onnx"] = "torch"
    batch_size: int = 8
    limits: InputLimits = field(default_factory=InputLimits)

    def __post_init__(self) -> None:
        if not (isinstance(self.review_band_std, int | float) and self.review_band_std >= 0):
            raise ValueError(f"review_band_std must be a number >= 0, got {self.review_band_std!r}.")
        if self.top_regions < 0 or self.batch_size < 1:
            raise ValueError("top_regions must be >= 0 and batch_size >= 1.")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {self.runtime!r}.")
        DescriberSettings.from_mapping(self.describer)  # fail now, not at the first defective image

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> InspectionSettings:
        data = dict(data or {})
        if isinstance(data.get("limits"), Mapping):
            data["limits"] = _from_mapping(InputLimits, data["limits"], "inspection.limits")
        return _from_mapping(cls, data, "inspection")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------------------
# Input: decoding and validation
# --------------------------------------------------------------------------------------------------------------------


def _sniff_format(data: bytes) -> str | None:
    for name, magics in IMAGE_FORMATS.items():
        if any(data.startswith(magic) for magic in magics):
            return name
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, so an absurd size is refused before any decoding (a PNG bomb)."""
    if len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


def decode_base64(text: str | bytes, limits: InputLimits | None = None) -> bytes:
    """Base64 (optionally a ``data:image/...;base64,`` URL) → bytes, with the size checked before decoding."""
    limits = limits or InputLimits()
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("ascii", errors="replace")
    if not isinstance(text, str):
        raise InvalidImageError(f"Expected a base64 string, got {type(text).__name__}.")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    if len(text) > math.ceil(limits.max_bytes * 4 / 3) + 4:
        raise InvalidImageError(
            f"Encoded image is too large: {len(text)} base64 characters, limit {limits.max_bytes} bytes decoded."
        )
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(f"The image field is not valid base64 ({exc}).") from exc


def decode_image(data: bytes, limits: InputLimits | None = None) -> np.ndarray:
    """Encoded PNG/JPEG/TIFF/BMP bytes → the array a file would give (:func:`imaging.read_image` conventions).

    Returns uint8 or uint16, gray (H, W), RGB (H, W, 3) or RGBA (H, W, 4) in R, G, B order, *before* channel or size
    validation (so :func:`validate_image` can name what was wrong). Raises :class:`InvalidImageError` for anything that
    is not a decodable image of a known format.
    """
    limits = limits or InputLimits()
    if not data:
        raise InvalidImageError("The image is empty (0 bytes).")
    if len(data) > limits.max_bytes:
        raise InvalidImageError(f"Encoded image is too large: {len(data)} bytes, limit {limits.max_bytes}.")
    kind = _sniff_format(data)
    if kind is None:
        raise InvalidImageError(
            f"Not an image: the data does not start like any of {', '.join(IMAGE_FORMATS)} (first bytes {data[:8]!r})."
        )
    size = _png_size(data) if kind == "png" else None
    if size is not None:
        _check_size(size[0], size[1], limits)
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InvalidImageError(f"The {kind.upper()} data is corrupt or truncated and cannot be decoded.")
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    return image


def _check_size(width: int, height: int, limits: InputLimits) -> None:
    if min(width, height) < limits.min_side:
        raise InvalidImageError(f"Image is too small: {width}x{height}, each side must be >= {limits.min_side} px.")
    if max(width, height) > limits.max_side or width * height > limits.max_pixels:
        raise InvalidImageError(
            f"Image is too large: {width}x{height} ({width * height} px); limits: side <= {limits.max_side} px, "
            f"<= {limits.max_pixels} px in all."
        )


def validate_image(image: Any, limits: InputLimits, category_channels: int | None = None) -> np.ndarray:
    """A native image as inspection takes it: uint8 gray (H, W) or RGB (H, W, 3), or :class:`InvalidImageError`.

    Accepts uint8 and uint16 (scaled to 8 bit by ``>> 8`` like :func:`imaging.read_image`), gray as (H, W) or
    (H, W, 1), RGB, and RGBA (alpha dropped). ``category_channels`` with ``limits.channel_policy == "strict"`` also
    refuses an image whose channel count differs from the category's.
    """
    if not isinstance(image, np.ndarray):
        raise InvalidImageError(f"Expected an image as a numpy array, got {type(image).__name__}.")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise InvalidImageError(f"Unsupported pixel type {image.dtype}: use uint8 or uint16.")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        channels = image.shape[2] if image.ndim == 3 else "?"
        raise InvalidImageError(
            f"Unsupported image shape {image.shape} ({channels} channels): expected gray (H, W), RGB (H, W, 3) or "
            "RGBA (H, W, 4)."
        )
    height, width = image.shape[:2]
    _check_size(width, height, limits)
    if image.ndim == 3 and image.shape[2] == 4:
        image = np.ascontiguousarray(image[:, :, :3])
    channels = 1 if image.ndim == 2 else 3
    if limits.channel_policy == "strict" and category_channels is not None and channels != category_channels:
        raise InvalidImageError(
            f"Image has {channels} channel(s) but this model's category takes {category_channels} "
            f"({'gray' if category_channels == 1 else 'RGB'}); channel_policy is 'strict'."
        )
    return image


def to_tensor(canvases: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 canvases → float32 (B, C, H, W) in [0, 1]; the same arithmetic as :func:`madfh_pipeline.streaming.to_tensor`
    (repeated here because that module pulls in the Kedro image store)."""
    stacked = np.stack([c[:, :, None] if c.ndim == 2 else c for c in canvases])
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).float().div_(255.0)


# --------------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """One connected region of the predicted defect mask, at native resolution.

    ``bbox`` is (x0, y0, x1, y1), end exclusive; ``peak`` the largest anomaly-map value inside (the map brought back
    to native size), ``mean`` its mean there.
    """

    bbox: tuple[int, int, int, int]
    area_px: int
    peak: float
    mean: float

    def to_dict(self) -> dict[str, Any]:
        return {"bbox": list(self.bbox), "area_px": self.area_px, "peak": self.peak, "mean": self.mean}


@dataclass
class InspectionResult:
    """Everything one inspection found out about one image (see :meth:`to_record` for the JSON-able part)."""

    image_id: str | None
    score: float
    threshold: float
    pixel_threshold: float
    decision: Decision
    review_band: tuple[float, float]
    anomaly_map: np.ndarray  # float32, canvas size
    region_mask: np.ndarray  # bool, native size: the map brought back and binarised at the pixel threshold
    regions: list[Region]
    n_regions: int
    explanation: str
    description: Description
    geometry: Geometry
    width: int
    height: int
    input_channels: int
    processing_ms: float
    model_version: str
    map_range: tuple[float, float]

    def to_record(self) -> dict[str, Any]:
        """The result without arrays: plain values for a table row, a JSON answer or a Dask record."""
        return {
            "image_id": self.image_id,
            "score": self.score,
            "threshold": self.threshold,
            "pixel_threshold": self.pixel_threshold,
            "decision": self.decision,
            "review_low": self.review_band[0],
            "review_high": self.review_band[1],
            "explanation": self.explanation,
            "n_regions": self.n_regions,
            "regions": json.dumps([r.to_dict() for r in self.regions]),
            "width": self.width,
            "height": self.height,
            "input_channels": self.input_channels,
            "processing_ms": self.processing_ms,
            "model_version": self.model_version,
        }

    def compact_map(self, max_side: int = 256) -> np.ndarray:
        """The anomaly map as uint8, at the image's aspect ratio with its longer side <= ``max_side``.

        Scaling (linear, clipped): ``u8 = round(255 · (v − lo) / (hi − lo))`` with ``(lo, hi) = map_range`` =
        ``(pixel_mean, 2·pixel_threshold − pixel_mean)`` of validation/good: 0 is the normal mean, **127.5 the pixel
        threshold**, 255 twice as far above the mean as the threshold. Letterbox padding is cropped away first.
        """
        crop = self.anomaly_map[self.geometry.content]
        height, width = crop.shape
        scale = min(1.0, max_side / max(self.width, self.height))
        size = (max(1, round(self.width * scale)), max(1, round(self.height * scale)))
        small = cv2.resize(crop, size, interpolation=cv2.INTER_AREA if size[0] < width else cv2.INTER_LINEAR)
        lo, hi = self.map_range
        return np.clip(np.rint(255.0 * (small - lo) / (hi - lo)), 0, 255).astype(np.uint8)

    def map_png_base64(self, max_side: int = 256) -> str:
        ok, buffer = cv2.imencode(".png", self.compact_map(max_side))
        if not ok:
            raise RuntimeError("Could not encode the anomaly map as PNG.")
        return base64.b64encode(buffer.tobytes()).decode("ascii")


# --------------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------------


class InspectionModel:
    """A fitted detector plus everything needed to inspect raw native images with it (module docstring)."""

    def __init__(
        self,
        detector: AnomalyDetector,
        preprocessing: PreprocessingSpec,
        category: CategoryFacts,
        settings: InspectionSettings | None = None,
        version: str = "",
        onnx_path: str | Path | None = None,
    ) -> None:
        """``settings.runtime == "onnx"`` exports PatchCore's feature extractor to ONNX now (tens of seconds), or
        loads it from ``onnx_path`` (what :meth:`load` does), and attaches it to a *copy* of ``detector``: the
        caller's detector (e.g. the one the evaluation pipeline scores with) keeps its torch path."""
        settings = settings or InspectionSettings()
        self.detector = copy.deepcopy(detector) if settings.runtime == "onnx" else detector
        self.preprocessing = preprocessing
        self.category = category
        self.settings = settings
        self.version = version or f"{category.name}/{detector.name}@{detector.fingerprint[:8]}"
        self.describer = DescriberSettings.from_mapping(self.settings.describer)
        self._onnx: Any = None  # madfh_pipeline.serving.onnx.OnnxEmbedding when runtime is onnx
        thresholds = detector.thresholds
        missing = [
            name
            for name, value in (
                ("pixel", thresholds.pixel),
                ("image", thresholds.image),
                ("stats.pixel_mean", thresholds.stats.get("pixel_mean")),
                ("stats.image_std", thresholds.stats.get("image_std")),
            )
            if value is None
        ]
        if missing:
            raise ValueError(
                f"Detector '{detector.name}' has no calibrated {', '.join(missing)}: an inspection model needs the "
                "thresholds of calibrate_thresholds (validation/good) — calibrate it first."
            )
        if not thresholds.pixel > thresholds.stats["pixel_mean"]:
            raise ValueError(
                f"Pixel threshold {thresholds.pixel} is not above the validation pixel mean "
                f"{thresholds.stats['pixel_mean']}: the calibration is degenerate."
            )
        if self.settings.runtime == "onnx":
            self.use_onnx(onnx_path)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_parameters(
        cls,
        detector: AnomalyDetector,
        preprocessing: Mapping[str, Any],
        category: Mapping[str, Any],
        inspection: Mapping[str, Any] | None = None,
        version: str = "",
    ) -> InspectionModel:
        """Build from the pipeline's parameters: ``params:preprocessing``, ``params:category`` (its entry) and
        ``params:inspection`` (:class:`InspectionSettings` keys). ``runtime: onnx`` exports the ONNX graph now."""
        return cls(
            detector,
            PreprocessingSpec.from_parameters(preprocessing, category),
            CategoryFacts.from_parameters(category),
            InspectionSettings.from_mapping(inspection),
            version,
        )

    def use_onnx(self, path: str | Path | None = None) -> None:
        """Run the detector's feature extractor in ONNX Runtime: load ``path``, or export the graph now."""
        from madfh_pipeline.serving.onnx import OnnxEmbedding, export_embedding

        height, width = self.preprocessing.target_height, self.preprocessing.target_width
        embedding = (
            OnnxEmbedding.load(path, self.detector)
            if path is not None
            else export_embedding(self.detector, height, width, self.preprocessing.output_channels)
        )
        embedding.attach(self.detector)
        self._onnx = embedding
        self.settings = replace(self.settings, runtime="onnx")

    # ---------------------------------------------------------------- inspection
    @property
    def threshold(self) -> float:
        return float(self.detector.thresholds.image)

    @property
    def pixel_threshold(self) -> float:
        return float(self.detector.thresholds.pixel)

    @property
    def review_band(self) -> tuple[float, float]:
        """(low, high): OK below low, NG at or above high, REVIEW in between (empty when the band width is 0)."""
        return review_band(self.detector.thresholds, float(self.settings.review_band_std))

    @property
    def map_range(self) -> tuple[float, float]:
        """(lo, hi) of the uint8 map scaling: the validation pixel mean and its mirror image about the threshold."""
        mean = float(self.detector.thresholds.stats["pixel_mean"])
        return mean, 2.0 * self.pixel_threshold - mean

    def decide(self, score: float) -> Decision:
        return decide(score, self.review_band)

    def prepare(self, image: Any) -> tuple[np.ndarray, Geometry, np.ndarray, int]:
        """Validate a native image and put it on the canvas: (canvas uint8, geometry, native uint8, input channels).

        The canvas is what the detector sees (the stored PNG of the pipeline, byte for byte); callers that need
        features of an image (similar cases, feedback) use it so they see the same pixels."""
        native = validate_image(image, self.settings.limits, self.category.channels)
        channels_in = 1 if image.ndim == 2 else int(image.shape[2])
        canvas, geometry = self.preprocessing.to_canvas(native)
        return canvas, geometry, native, channels_in

    def inspect(self, image: np.ndarray, image_id: str | None = None) -> InspectionResult:
        """Inspect one native image (uint8/uint16, gray/RGB/RGBA, any size within the limits)."""
        return self.inspect_batch([image], [image_id])[0]

    def inspect_batch(
        self, images: Sequence[np.ndarray], image_ids: Sequence[str | None] | None = None
    ) -> list[InspectionResult]:
        """Inspect several images; every image is validated before any is scored (one bad input fails the call and
        the error names it). Canvases go to the detector ``settings.batch_size`` at a time; a result's
        ``processing_ms`` is its share of its batch's time plus its own pre- and post-processing."""
        ids = list(image_ids) if image_ids is not None else [None] * len(images)
        if len(ids) != len(images):
            raise ValueError(f"{len(images)} images but {len(ids)} image ids.")
        prepared = []
        for index, (image, image_id) in enumerate(zip(images, ids, strict=True)):
            started = time.perf_counter()
            try:
                prepared.append((*self.prepare(image), time.perf_counter() - started))
            except InvalidImageError as exc:
                name = f"'{image_id}'" if image_id is not None else f"#{index}"
                raise InvalidImageError(f"Image {name}: {exc}") from exc
        results: list[InspectionResult] = []
        step = int(self.settings.batch_size)
        for start in range(0, len(prepared), step):
            chunk = prepared[start : start + step]
            started = time.perf_counter()
            with torch.no_grad():
                out = self.detector.predict(to_tensor([canvas for canvas, _, _, _, _ in chunk]))
            share = (time.perf_counter() - started) / len(chunk)
            for offset, (_, geometry, native, channels_in, prep_seconds) in enumerate(chunk):
                started = time.perf_counter()
                result = self._result(
                    ids[start + offset], native, geometry, channels_in, float(out.scores[offset]), out.maps[offset]
                )
                result.processing_ms = 1000.0 * (prep_seconds + share + time.perf_counter() - started)
                results.append(result)
        return results

    def _result(
        self,
        image_id: str | None,
        native: np.ndarray,
        geometry: Geometry,
        channels_in: int,
        score: float,
        anomaly_map: np.ndarray,
    ) -> InspectionResult:
        anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
        native_map = geometry.invert(anomaly_map)
        mask = native_map >= self.pixel_threshold  # the evaluation's and the explainer stage's rule
        regions, n_regions = self._regions(mask, native_map)
        decision = self.decide(score)
        # The text follows the decision (like the explainer stage, which describes flagged images): an OK image is
        # described as normal even if a few pixels pass the pixel threshold; those stay listed in ``regions``.
        description = describe(
            mask if decision != "OK" else None,
            native,
            score=score,
            threshold=self.threshold,
            settings=self.describer,
        )
        return InspectionResult(
            image_id=image_id,
            score=score,
            threshold=self.threshold,
            pixel_threshold=self.pixel_threshold,
            decision=decision,
            review_band=self.review_band,
            anomaly_map=anomaly_map,
            region_mask=mask,
            regions=regions,
            n_regions=n_regions,
            explanation=description.text,
            description=description,
            geometry=geometry,
            width=int(native.shape[1]),
            height=int(native.shape[0]),
            input_channels=channels_in,
            processing_ms=0.0,
            model_version=self.version,
            map_range=self.map_range,
        )

    def _regions(self, mask: np.ndarray, native_map: np.ndarray) -> tuple[list[Region], int]:
        """Connected regions (8-connectivity) of at least ``describer.min_region_px`` pixels, highest peak first."""
        if not mask.any():
            return [], 0
        from scipy import ndimage

        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        kept = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= self.describer.min_region_px]
        if not kept:
            return [], 0
        peaks = ndimage.maximum(native_map, labels, kept)
        means = ndimage.mean(native_map, labels, kept)
        regions = []
        for label, peak, mean in zip(kept, np.atleast_1d(peaks), np.atleast_1d(means), strict=True):
            x0, y0 = int(stats[label, cv2.CC_STAT_LEFT]), int(stats[label, cv2.CC_STAT_TOP])
            x1, y1 = x0 + int(stats[label, cv2.CC_STAT_WIDTH]), y0 + int(stats[label, cv2.CC_STAT_HEIGHT])
            regions.append(Region((x0, y0, x1, y1), int(stats[label, cv2.CC_STAT_AREA]), float(peak), float(mean)))
        regions.sort(key=lambda r: (-r.peak, r.bbox[1], r.bbox[0]))
        return regions[: self.settings.top_regions], len(kept)

    # ---------------------------------------------------------------- persistence
    def config(self) -> dict[str, Any]:
        """The JSON part of the saved folder (also what a served model reports about itself)."""
        return {
            "format": INSPECTION_FORMAT,
            "version": self.version,
            "category": asdict(self.category),
            "preprocessing": asdict(self.preprocessing),
            "settings": self.settings.to_dict(),
            "detector": {
                "file": DETECTOR_FILE,
                "name": self.detector.name,
                "fingerprint": self.detector.fingerprint,
                "thresholds": self.detector.thresholds.to_dict(),
            },
            "onnx": None if self._onnx is None else self._onnx.describe() | {"file": ONNX_FILE},
        }

    def save(self, folder: str | Path) -> Path:
        """Write ``inspection.json`` + ``detector.safetensors`` (+ ``embedding.onnx``) into ``folder``; no pickle."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_detector(self.detector, folder / DETECTOR_FILE)
        if self._onnx is not None:
            self._onnx.save(folder / ONNX_FILE)
        tmp = folder / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(self.config(), indent=2, sort_keys=True))
        tmp.replace(folder / CONFIG_FILE)
        logger.info("Saved inspection model %s to %s.", self.version, folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> InspectionModel:
        """Read a folder written by :meth:`save`. Only JSON, safetensors and (for ``runtime: onnx``) an ONNX graph are
        read: a pickle put in place of the detector is refused by the safetensors reader before anything runs."""
        folder = Path(folder)
        config_path = folder / CONFIG_FILE
        if not config_path.is_file():
            raise ModelFileError(f"'{folder}' is not an inspection model folder: no {CONFIG_FILE}.")
        try:
            config = json.loads(config_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFileError(f"'{config_path}' is not valid JSON ({exc}).") from exc
        if not isinstance(config, dict) or config.get("format") != INSPECTION_FORMAT:
            found = config.get("format") if isinstance(config, dict) else type(config).__name__
            raise ModelFileError(f"'{config_path}' has format {found!r}; this version reads {INSPECTION_FORMAT}.")
        detector_path = folder / DETECTOR_FILE
        read_header(detector_path)  # refuses a non-safetensors file (e.g. a pickle) with the convert hint
        detector = load_detector(detector_path, device)
        recorded = (config.get("detector") or {}).get("fingerprint")
        if recorded != detector.fingerprint:
            raise ModelFileError(
                f"'{detector_path}' is not the detector '{config_path}' was saved with (fingerprint "
                f"{detector.fingerprint} != {recorded}): the folder was mixed up; re-export it."
            )
        settings = InspectionSettings.from_mapping(config.get("settings"))
        if settings.runtime == "onnx" and not (folder / ONNX_FILE).is_file():
            raise ModelFileError(f"'{folder}' is configured for runtime 'onnx' but holds no {ONNX_FILE}.")
        return cls(
            detector,
            PreprocessingSpec(**config["preprocessing"]),
            CategoryFacts(**config["category"]),
            settings,
            str(config.get("version", "")),
            onnx_path=folder / ONNX_FILE if settings.runtime == "onnx" else None,
        )
