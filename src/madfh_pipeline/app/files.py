"""File access of the review app: paths confined to the data roots, images, anomaly maps and heat-map overlays.

Paths come from the knowledge base, which any pipeline (or a tampered row) may have written, and the app serves
whatever it reads to a browser. So every path is resolved (``..`` and symbolic links included) and must lie inside
one of the configured data roots before a single byte is read: ``../../etc/passwd`` as an image path is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import tifffile
from PIL import Image

logger = logging.getLogger(__name__)

#: Colour map of the heat-map overlay: perceptually ordered, so "hotter" reads as "more anomalous".
COLORMAP = "turbo"
#: Map formats the app reads; see :func:`load_map`.
SCORE_MAP_SUFFIXES = (".npy", ".tif", ".tiff")
PICTURE_MAP_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


class PathNotAllowedError(PermissionError):
    """A path that does not lie inside any configured data root (or is not a usable path at all)."""


class UnsupportedMapError(ValueError):
    """An anomaly map file the app cannot read (unknown suffix or shape)."""


def confine(path: str | Path, roots: Sequence[Path], base: Path) -> Path:
    """``path`` resolved (relative ones against ``base``), refused unless it lies inside one of ``roots``.

    Symbolic links are followed before the check, so a link inside a root that points outside is refused too.
    """
    text = str(path)
    if not text.strip() or "\x00" in text:
        raise PathNotAllowedError(f"Not a usable file path: {text!r}.")
    candidate = Path(text)
    if not candidate.is_absolute():
        candidate = base / candidate
    resolved = candidate.resolve()
    for root in roots:
        if resolved.is_relative_to(root.resolve()):
            return resolved
    shown = ", ".join(str(root) for root in roots)
    logger.warning("Refused a path outside the data roots: %r (resolves to %s).", text, resolved)
    raise PathNotAllowedError(f"{text} lies outside the configured data roots ({shown}); the app does not read it.")


def load_image(path: Path) -> np.ndarray:
    """An image file as uint8 RGB ``(H, W, 3)``; 16-bit and float images are scaled down for display."""
    with Image.open(path) as image:
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            array = np.asarray(image, dtype=np.float32)
            scale = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1e-12)
            gray = np.clip(array / scale * 255.0, 0, 255).astype(np.uint8)
            return np.stack([gray] * 3, axis=-1)
        return np.asarray(image.convert("RGB"))


@dataclass(frozen=True)
class AnomalyMap:
    """A loaded anomaly map. ``scores`` is True for maps in score units (``.npy``, float TIFF): those are scaled
    with the inspection's threshold. A picture (PNG, 8/16-bit TIFF) is already a visualisation and is shown as it
    is stored, scaled to [0, 1]."""

    values: np.ndarray
    scores: bool


def load_map(path: Path) -> AnomalyMap:
    """Read an anomaly map: ``.npy`` float maps (the canvas-size maps of the pipelines), TIFF or a picture."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        values = np.load(path, allow_pickle=False)
        scores = True
    elif suffix in (".tif", ".tiff"):
        values = tifffile.imread(path)
        scores = np.issubdtype(values.dtype, np.floating)
    elif suffix in PICTURE_MAP_SUFFIXES:
        with Image.open(path) as image:
            picture = image if image.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L") else image.convert("L")
            values = np.asarray(picture)
        scores = False
    else:
        raise UnsupportedMapError(f"Unsupported anomaly map format {path.name!r}: use .npy, .tif(f) or .png.")
    values = np.squeeze(np.asarray(values))
    if values.ndim != 2 or min(values.shape) < 1:
        raise UnsupportedMapError(f"Anomaly map {path.name} has shape {values.shape}; expected a single 2-D map.")
    if not scores:
        top = 65535.0 if values.dtype == np.uint16 else 255.0 if values.dtype == np.uint8 else float(values.max())
        values = values.astype(np.float32) / max(top, 1e-12)
    return AnomalyMap(values=values.astype(np.float32), scores=scores)


def scale_map(anomaly_map: AnomalyMap, threshold: float | None) -> np.ndarray:
    """Map values to [0, 1] for colouring, with the inspection's threshold at 0.5.

    Below the threshold the map's minimum is 0 and the threshold 0.5; above it, 1.0 is reached at the threshold
    plus the same distance again. An image whose map never reaches the threshold therefore stays in the cool half
    of the colour map, and a defect above it is unmistakably hot, whatever the detector's score scale. Pictures
    (not in score units) and maps of inspections without a threshold are shown min-max scaled.
    """
    values = anomaly_map.values
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros_like(values)
    if not anomaly_map.scores:
        return np.clip(np.nan_to_num(values), 0.0, 1.0)
    low = float(finite.min())
    if threshold is None or threshold <= low:
        span = float(finite.max()) - low
        return np.clip((np.nan_to_num(values, nan=low) - low) / span, 0, 1) if span > 0 else np.zeros_like(values)
    relative = (np.nan_to_num(values, nan=low) - low) / (threshold - low)
    return np.clip(relative / 2.0, 0.0, 1.0).astype(np.float32)


def overlay(image: np.ndarray, scaled_map: np.ndarray, opacity: float) -> np.ndarray:
    """The image with the coloured map blended over it (map resized to the image, bilinear)."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be within [0, 1], got {opacity}.")
    height, width = image.shape[:2]
    if scaled_map.shape != (height, width):
        scaled_map = cv2.resize(scaled_map, (width, height), interpolation=cv2.INTER_LINEAR)
    colours = matplotlib.colormaps[COLORMAP](scaled_map)[..., :3] * 255.0
    blended = image.astype(np.float32) * (1.0 - opacity) + colours * opacity
    return np.clip(blended, 0, 255).astype(np.uint8)


def fit_to(image: np.ndarray, max_side: int) -> np.ndarray:
    """The image scaled down (area interpolation) so its longer side is at most ``max_side`` pixels."""
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)
