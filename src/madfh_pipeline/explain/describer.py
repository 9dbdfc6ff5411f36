"""Grounded, deterministic descriptions of defect regions, and the parser that reads them back.

The prototype's explainer was trained on free text nobody could check. Here every training target and every
evaluation reference is *derived from a mask* (a ground-truth mask, or a thresholded anomaly map): where each region
lies, how large it is, its shape, how many there are and whether it is darker or brighter than what surrounds it.
The wording uses a small fixed vocabulary (:data:`LOCATIONS`, :data:`SIZES`, :data:`SHAPES`, :data:`CONTRASTS`) and
fixed sentence templates, so that

- the same mask always gives the same text (a reproducible target for fine-tuning),
- a generated text can be parsed back (:func:`parse_description`) and compared fact by fact with the reference
  (location and size agreement in :mod:`madfh_pipeline.explain.text_metrics`), not only by n-gram overlap,
- a tokenizer can be built over :data:`VOCABULARY` (the tests do so to train a tiny model without downloads).

Pure numpy/OpenCV: no torch, no Kedro.

Example text for a mask with two regions::

    2 defect regions. Region 1: a small elongated defect in the upper left, near the edge, covering 0.80% of the
    image (8356 px), darker than its surroundings. Region 2: a tiny compact defect in the centre, covering 0.02% of
    the image (210 px), similar in brightness to its surroundings.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import cv2
import numpy as np

logger = logging.getLogger(__name__)

#: The nine cells of a 3x3 grid over the image, named by the region's centroid. Row-major (upper row first).
LOCATIONS: tuple[str, ...] = (
    "upper left",
    "upper centre",
    "upper right",
    "middle left",
    "centre",
    "middle right",
    "lower left",
    "lower centre",
    "lower right",
)
#: Size classes, smallest first; the bins are :attr:`DescriberSettings.size_bins` (shares of the image or object).
SIZES: tuple[str, ...] = ("tiny", "small", "medium-sized", "large", "very large")
#: Region shapes. ``elongated``: principal-axis ratio at least :attr:`DescriberSettings.elongation_ratio` (scratches,
#: cracks); ``irregular``: low solidity (rings, L- or C-shapes, frayed blobs); ``compact`` otherwise.
SHAPES: tuple[str, ...] = ("compact", "elongated", "irregular")
#: Contrast of a region's mean gray level against a ring of pixels around it.
CONTRASTS: tuple[str, ...] = ("darker", "brighter", "similar")
_CONTRAST_PHRASES: dict[str, str] = {
    "darker": "darker than its surroundings",
    "brighter": "brighter than its surroundings",
    "similar": "similar in brightness to its surroundings",
}
NORMAL_TEXT = "The image looks normal."

#: Every word the describer can write, apart from numbers. Punctuation used: ``. , : % ( ) -``.
VOCABULARY: frozenset[str] = frozenset(
    " ".join(
        [
            NORMAL_TEXT,
            "defect region regions scattered more smaller",
            "region a defect in the near the edge covering less than of the image object px",
            " ".join(LOCATIONS),
            " ".join(SIZES),
            " ".join(SHAPES),
            " ".join(_CONTRAST_PHRASES.values()),
            "anomaly score is not above the threshold",
        ]
    )
    .lower()
    .replace(".", " ")
    .replace("-", " ")
    .split()
)
PUNCTUATION: str = ".,:%()-"


@dataclass(frozen=True)
class DescriberSettings:
    """Thresholds that turn measurements into words. The vocabulary is fixed; only where the cuts lie can change.

    ``size_bins`` are shares of the image (or object) area separating tiny | small | medium-sized | large | very
    large. The defaults fit MVTec AD 2 and BSData, whose defects mostly cover well under 1 % of the image.
    ``contrast_threshold`` is in gray levels (0-255) between a region's mean and its surrounding ring's mean.
    ``edge_margin`` is the share of the image width/height within which a region's box counts as "near the edge".
    Regions smaller than ``min_region_px`` (at mask resolution) are ignored: a thresholded anomaly map has specks a
    human would not call defects. At most ``max_regions`` regions are written out (largest first), the rest are
    counted; from ``scattered_min_regions`` regions on, the defect is called scattered.
    """

    size_bins: tuple[float, float, float, float] = (0.001, 0.01, 0.05, 0.2)
    elongation_ratio: float = 3.0
    irregular_solidity: float = 0.5
    contrast_threshold: float = 10.0
    edge_margin: float = 0.05
    min_region_px: int = 1
    max_regions: int = 3
    scattered_min_regions: int = 4

    def __post_init__(self) -> None:
        bins = tuple(self.size_bins)
        if len(bins) != len(SIZES) - 1 or any(b <= a for a, b in zip(bins, bins[1:], strict=False)) or bins[0] <= 0:
            raise ValueError(f"size_bins must be {len(SIZES) - 1} increasing positive shares, got {self.size_bins}.")
        if self.max_regions < 1 or self.min_region_px < 1 or self.scattered_min_regions < 2:
            raise ValueError("max_regions and min_region_px must be >= 1 and scattered_min_regions >= 2.")

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any] | None) -> DescriberSettings:
        """Build from a parameters dict; unknown keys are an error so a misspelt threshold is never ignored."""
        params = dict(params or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"Unknown describer setting(s) {unknown}; known: {sorted(known)}.")
        if "size_bins" in params:
            params["size_bins"] = tuple(float(b) for b in params["size_bins"])
        return cls(**params)


@dataclass
class Description:
    """The text and the facts it was written from.

    ``regions`` holds one dict per region found (largest first), also those beyond ``max_regions`` that the text only
    counts: ``index`` (1-based), ``location``, ``near_edge``, ``size``, ``shape``, ``contrast`` (``None`` without an
    image), ``area_px`` (at mask resolution), ``area_native_px`` (scaled to native pixels), ``share`` (of the image or
    object), ``centroid`` (x, y as shares of width/height), ``bbox`` (x0, y0, x1, y1 at mask resolution, end
    exclusive), ``elongation``, ``solidity``, ``mean_inside`` and ``mean_surround`` (gray levels or ``None``).
    """

    text: str
    regions: list[dict[str, Any]] = field(default_factory=list)
    ignored_regions: int = 0
    reference: str = "image"
    score: float | None = None
    threshold: float | None = None

    @property
    def is_normal(self) -> bool:
        return not self.regions

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"is_normal": self.is_normal}


# --------------------------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------------------------


def as_defect_mask(mask: np.ndarray) -> np.ndarray:
    """A boolean (H, W) defect mask from a 0/1, 0/255 or boolean array.

    A float array with values other than 0 and 1 is refused: it is an anomaly *map*, and ``map > 0`` would call the
    whole image defective. Threshold it first (``anomaly_map > threshold``).
    """
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.ndim != 2:
        raise ValueError(f"A defect mask must be 2-D (H, W); got shape {mask.shape}.")
    if np.issubdtype(mask.dtype, np.floating) and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(
            "The defect mask is a float array with values other than 0 and 1 — an anomaly map, not a mask. "
            "Threshold it first (anomaly_map > threshold)."
        )
    return mask > 0


def _gray(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image.astype(np.uint8), cv2.COLOR_RGB2GRAY).astype(np.float32)
    if image.ndim != 2:
        raise ValueError(f"The image must be gray (H, W) or RGB (H, W, 3); got shape {image.shape}.")
    return image.astype(np.float32)


def _resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a boolean mask (a canvas-size mask measured against a native-size image)."""
    if mask.shape == (height, width):
        return mask
    return cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0


def _location(cx: float, cy: float) -> str:
    """Cell of the 3x3 grid holding the centroid (shares of width and height)."""
    col = min(int(cx * 3), 2)
    row = min(int(cy * 3), 2)
    return LOCATIONS[row * 3 + col]


def _size_class(share: float, bins: tuple[float, ...]) -> str:
    return SIZES[int(np.searchsorted(np.asarray(bins), share, side="right"))]


def _shape_measures(region: np.ndarray) -> tuple[float, float]:
    """(elongation, solidity) of one connected region.

    Elongation is the ratio of the principal axes from second moments; each pixel adds its own variance (1/12) so a
    single pixel is round, not degenerate. Solidity is area over the convex hull of the pixels' *corners* (pixel
    centres would make small regions look hollow).
    """
    ys, xs = np.nonzero(region)
    cov = np.cov(np.stack([xs, ys]).astype(np.float64), bias=True) if xs.size > 1 else np.zeros((2, 2))
    eig = np.sort(np.linalg.eigvalsh(cov + np.eye(2) / 12.0))
    elongation = float(np.sqrt(eig[1] / eig[0]))
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    points = np.concatenate([c.reshape(-1, 2) for c in contours])
    corners = (points[:, None, :] + np.array([[0, 0], [1, 0], [0, 1], [1, 1]])[None]).reshape(-1, 2)
    hull_area = cv2.contourArea(cv2.convexHull(corners.astype(np.int32)))
    solidity = float(min(1.0, xs.size / hull_area)) if hull_area > 0 else 1.0
    return elongation, solidity


def _contrast(
    gray: np.ndarray, region: np.ndarray, all_defects: np.ndarray, threshold: float
) -> tuple[str | None, float | None, float | None]:
    """Compare the region's mean with a ring around it that excludes every defect pixel.

    The ring is about half the region's equivalent radius wide (2 to 25 px), so a large blob is compared with its
    neighbourhood, not with the whole image's lighting gradient.
    """
    width = int(np.clip(round(0.5 * np.sqrt(region.sum() / np.pi)), 2, 25))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1))
    ring = (cv2.dilate(region.astype(np.uint8), kernel) > 0) & ~all_defects
    if not ring.any():
        return None, float(gray[region].mean()), None
    inside, around = float(gray[region].mean()), float(gray[ring].mean())
    diff = inside - around
    label = "similar" if abs(diff) < threshold else ("darker" if diff < 0 else "brighter")
    return label, inside, around


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------


def format_number(value: float) -> str:
    """Four significant digits, never in exponent notation (raw PatchCore scores are ~30, normalised ones ~0.5)."""
    return np.format_float_positional(float(value), precision=4, unique=False, fractional=False, trim="-")


def _format_share(share: float) -> str:
    pct = 100.0 * share
    if pct < 0.01:
        return "less than 0.01%"
    if pct < 1:
        return f"{pct:.2f}%"
    if pct < 10:
        return f"{pct:.1f}%"
    return f"{pct:.0f}%"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _region_sentence(region: Mapping[str, Any], reference: str) -> str:
    edge = ", near the edge" if region["near_edge"] else ""
    contrast = f", {_CONTRAST_PHRASES[region['contrast']]}" if region["contrast"] else ""
    return (
        f"Region {region['index']}: a {region['size']} {region['shape']} defect in the {region['location']}{edge}, "
        f"covering {_format_share(region['share'])} of the {reference} ({region['area_native_px']} px){contrast}."
    )


def _score_sentence(score: float | None, threshold: float | None) -> str:
    if score is None:
        return ""
    if threshold is None:
        return f"Anomaly score {format_number(score)}."
    relation = "is above" if score > threshold else "is not above"
    return f"Anomaly score {format_number(score)} {relation} the threshold {format_number(threshold)}."


def describe(
    mask: np.ndarray | None,
    image: np.ndarray | None = None,
    *,
    native_scale: float | tuple[float, float] = 1.0,
    object_mask: np.ndarray | None = None,
    score: float | None = None,
    threshold: float | None = None,
    settings: DescriberSettings | Mapping[str, Any] | None = None,
) -> Description:
    """Describe every defect region of ``mask`` in fixed-vocabulary English, with the facts behind the words.

    ``mask``: nonzero = defect, at any resolution (``None`` = no defect). ``image``: uint8 gray or RGB of the same
    scene, at any resolution (the mask is resized to it, nearest neighbour) — only needed for the contrast clause.
    ``native_scale``: native pixels per mask pixel, ``(sx, sy)`` or one number, so that a mask on a 1024² canvas
    reports the area in the original image's pixels. ``object_mask``: shares are of the object instead of the image
    (the words say "of the object"). ``score``/``threshold``: optional anomaly score sentence at the end; leave them
    out of training targets (a model cannot read a detector's score off the image).
    """
    settings = settings if isinstance(settings, DescriberSettings) else DescriberSettings.from_mapping(settings)
    sx, sy = (native_scale, native_scale) if np.isscalar(native_scale) else tuple(native_scale)
    if mask is None:
        if image is None:
            raise ValueError("describe() needs a mask or an image (to know the frame of a defect-free image).")
        mask = np.zeros(_gray(image).shape, dtype=bool)
    defects = as_defect_mask(mask)
    height, width = defects.shape
    reference = "image"
    total_area = float(height * width)
    if object_mask is not None:
        obj = _resize_mask(as_defect_mask(object_mask), height, width)
        if not obj.any():
            raise ValueError("object_mask is empty: shares of the object cannot be computed.")
        defects = defects & obj
        total_area, reference = float(obj.sum()), "object"

    count, labels, stats, centroids = cv2.connectedComponentsWithStats(defects.astype(np.uint8), connectivity=8)
    kept = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= settings.min_region_px]
    ignored = count - 1 - len(kept)
    # Largest first; ties by top, then left, so the order never depends on the labelling algorithm.
    kept.sort(key=lambda i: (-stats[i, cv2.CC_STAT_AREA], stats[i, cv2.CC_STAT_TOP], stats[i, cv2.CC_STAT_LEFT]))

    gray = defects_at_image = labels_at_image = None
    if image is not None and kept:
        gray = _gray(image)
        # The ring around a region must be defect-free surface: every defect pixel is excluded, specks included.
        defects_at_image = _resize_mask(defects, *gray.shape)
        labels_at_image = labels
        if labels.shape != gray.shape:  # cv2.resize has no int32 nearest path; float32 is exact for label ids
            labels_at_image = cv2.resize(
                labels.astype(np.float32), (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_NEAREST
            ).astype(np.int32)

    regions: list[dict[str, Any]] = []
    mx, my = settings.edge_margin * width, settings.edge_margin * height
    for index, label in enumerate(kept, start=1):
        x0, y0 = int(stats[label, cv2.CC_STAT_LEFT]), int(stats[label, cv2.CC_STAT_TOP])
        x1, y1 = x0 + int(stats[label, cv2.CC_STAT_WIDTH]), y0 + int(stats[label, cv2.CC_STAT_HEIGHT])
        area = int(stats[label, cv2.CC_STAT_AREA])
        region = labels[y0:y1, x0:x1] == label
        elongation, solidity = _shape_measures(region)
        if elongation >= settings.elongation_ratio:
            shape = "elongated"
        elif solidity < settings.irregular_solidity:
            shape = "irregular"
        else:
            shape = "compact"
        cx, cy = float(centroids[label][0] + 0.5) / width, float(centroids[label][1] + 0.5) / height
        contrast = mean_inside = mean_surround = None
        if gray is not None and labels_at_image is not None and defects_at_image is not None:
            at_image = labels_at_image == label
            if at_image.any():  # a region of a few canvas pixels may vanish when the mask is shrunk to the image
                contrast, mean_inside, mean_surround = _contrast(
                    gray, at_image, defects_at_image, settings.contrast_threshold
                )
        share = area / total_area
        regions.append(
            {
                "index": index,
                "location": _location(cx, cy),
                "near_edge": bool(x0 < mx or y0 < my or x1 > width - mx or y1 > height - my),
                "size": _size_class(share, settings.size_bins),
                "shape": shape,
                "contrast": contrast,
                "area_px": area,
                "area_native_px": round(area * float(sx) * float(sy)),
                "share": share,
                "centroid": (cx, cy),
                "bbox": (x0, y0, x1, y1),
                "elongation": elongation,
                "solidity": solidity,
                "mean_inside": mean_inside,
                "mean_surround": mean_surround,
            }
        )

    sentences: list[str] = []
    if not regions:
        sentences.append(NORMAL_TEXT)
    else:
        scattered = "scattered " if len(regions) >= settings.scattered_min_regions else ""
        sentences.append(f"{len(regions)} {scattered}defect region{'s' if len(regions) != 1 else ''}.")
        sentences.extend(_region_sentence(r, reference) for r in regions[: settings.max_regions])
        rest = len(regions) - settings.max_regions
        if rest > 0:
            sentences.append(f"{_plural(rest, 'more smaller region')}.")
    score_sentence = _score_sentence(score, threshold)
    if score_sentence:
        sentences.append(score_sentence)
    return Description(
        text=" ".join(sentences),
        regions=regions,
        ignored_regions=ignored,
        reference=reference,
        score=score,
        threshold=threshold,
    )


# --------------------------------------------------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedRegion:
    """The facts one region sentence states; ``None`` where a (generated) sentence leaves a slot out."""

    location: str | None
    size: str | None
    shape: str | None
    contrast: str | None
    near_edge: bool


@dataclass(frozen=True)
class ParsedDescription:
    """What a description says: normal or not, the announced region count, and the regions written out."""

    is_normal: bool
    count: int | None
    regions: tuple[ParsedRegion, ...]


def _alternation(words: tuple[str, ...]) -> str:
    # Longest first, so "upper centre" wins over "centre" and "very large" over "large".
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_LOCATION_RE = re.compile(rf"\bin the ({_alternation(LOCATIONS)})\b")
_SIZE_RE = re.compile(rf"\b({_alternation(SIZES)})\b")
_SHAPE_RE = re.compile(rf"\b({_alternation(SHAPES)})\b")
_CONTRAST_RE = re.compile(r"\b(darker|brighter|similar)\b")
_HEADER_RE = re.compile(r"\b(\d+) (?:scattered )?defect regions?\b")
_REGION_SPLIT_RE = re.compile(r"\bregion \d+:")


def canonical_text(text: str) -> str:
    """Lower case and tidy spacing, so texts decoded by a word-piece tokenizer compare with the describer's.

    Decoders write ``"region 1 : a medium - sized defect ... 0. 8 % ( 120 px )"``; this gives
    ``"region 1: a medium-sized defect ... 0.8% (120 px)"``. The describer's own text only changes case, so
    ``canonical_text(describe(...).text) == describe(...).text.lower()``.
    """
    text = re.sub(r"\s+", " ", text.lower()).strip()
    text = re.sub(r"\s*-\s*", "-", text)
    text = re.sub(r"(\d)\s*\.\s*(?=\d)", r"\1.", text)
    text = re.sub(r"(?<=\d) (?=\d)", "", text)
    text = re.sub(r"\s+([.,:;%)])", r"\1", text)
    return re.sub(r"\(\s+", "(", text)


def parse_description(text: str) -> ParsedDescription | None:
    """Read a description back into facts; ``None`` when the text states neither normality nor any region.

    Lenient on purpose: a generated sentence with a garbled number still yields its location and size words. Only
    the fixed vocabulary is recognised, so operator free text parses to ``None`` (it is not a grounded reference).
    """
    text = canonical_text(text)
    header = _HEADER_RE.search(text)
    segments = _REGION_SPLIT_RE.split(text)[1:]
    regions = []
    for segment in segments:
        location, size = _LOCATION_RE.search(segment), _SIZE_RE.search(segment)
        shape, contrast = _SHAPE_RE.search(segment), _CONTRAST_RE.search(segment)
        regions.append(
            ParsedRegion(
                location=location.group(1) if location else None,
                size=size.group(1) if size else None,
                shape=shape.group(1) if shape else None,
                contrast=contrast.group(1) if contrast else None,
                near_edge="near the edge" in segment,
            )
        )
    is_normal = "looks normal" in text
    if not (is_normal or header or regions):
        return None
    count = int(header.group(1)) if header else (0 if is_normal and not regions else None)
    return ParsedDescription(is_normal=is_normal and not regions, count=count, regions=tuple(regions))
