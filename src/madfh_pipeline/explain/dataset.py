"""Training pairs for the explainer: the model's input image, the target text, and a leak-proof split.

**Input image: an "overview + zoom" composite, not a bare crop nor a heat-map overlay.** The canvas (the model's
square input, 384² for BLIP) is split in two bands:

- top band: the whole image, letterboxed, with every defect region's outline (1 px, red) and the zoom window (1 px,
  yellow) drawn on it. This is what lets a model say *where* a defect is and *how many* there are — a crop alone throws
  the position away, yet position is half of what the grounded description states.
- bottom band: the zoom window at up to native resolution (outlines drawn, interiors untouched). At 2448×2048 → 384²
  a 20 px defect shrinks to 3 px and vanishes (DESIGN §1: "small defects vanish at 256×256"); the zoom keeps its
  texture, shape and brightness visible.

A heat-map overlay was rejected because it paints over the very pixels whose brightness and texture the text
describes, and because the model would learn to read the detector's colour map rather than the part. Outlines only
mark borders. Without regions (a good image, or a map below threshold) the zoom is the whole image, so "looks normal"
pairs are built the same way.

**Split.** :func:`assign_split` hashes a *group key* (by default the image id; for MVTec AD 2 use
:func:`mvtec_group_key` so all lighting variants of one numbered part stay together) into train or eval. The hash is
stable across runs, machines and data growth: an image used to evaluate the explainer never trains it, even after
new images or operator descriptions are added. :func:`check_disjoint` raises when two pair lists share a group.

**Knowledge-base hook.** Operator descriptions enter through :class:`OperatorDescription` and
:func:`operator_training_pairs`; they become pairs exactly like grounded ones (same composite, same split by group
key), tagged ``source="operator"``.

Pure numpy/OpenCV: no torch, no Kedro.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal

import cv2
import numpy as np

from madfh_pipeline.explain.describer import as_defect_mask

logger = logging.getLogger(__name__)

Split = Literal["train", "eval"]
OUTLINE_RGB: tuple[int, int, int] = (255, 0, 0)
ZOOM_RGB: tuple[int, int, int] = (255, 255, 0)
DEFAULT_INPUT_SIZE = 384  # BLIP base's processor size


class SplitLeakError(ValueError):
    """Training and evaluation pairs share a group: evaluation numbers would be inflated by memorised images."""


@dataclass(frozen=True)
class TrainingPair:
    """One example for the explainer.

    ``image``: the composite model input (uint8 RGB, ``size × size``). ``text``: the target. ``group``: the key the
    split hashes (images of one physical part share it). ``source``: ``"grounded"`` (from the describer) or
    ``"operator"`` (from the knowledge base).
    """

    image_id: str
    image: np.ndarray
    text: str
    group: str
    source: str = "grounded"


# --------------------------------------------------------------------------------------------------------------------
# The composite input
# --------------------------------------------------------------------------------------------------------------------


def _to_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"Images must be uint8 (gray or RGB); got {image.dtype}.")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise ValueError(f"Images must be (H, W) or (H, W, 3); got shape {image.shape}.")


def _fit(image: np.ndarray, width: int, height: int) -> tuple[np.ndarray, float, int, int]:
    """Letterbox ``image`` into ``width × height`` (aspect kept, black bars); returns (panel, scale, pad_x, pad_y)."""
    h, w = image.shape[:2]
    scale = min(width / w, height / h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    panel = np.zeros((height, width, 3), np.uint8)
    pad_x, pad_y = (width - new_w) // 2, (height - new_h) // 2
    panel[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resized
    return panel, scale, pad_x, pad_y


def zoom_window(
    mask: np.ndarray | None, shape: tuple[int, int], aspect: float, context: float, min_fraction: float
) -> tuple[int, int, int, int]:
    """The crop (x0, y0, x1, y1) around all defect pixels, widened by ``context`` × the box size on every side.

    The window is at least ``min_fraction`` of the image's shorter side, has the panel's ``aspect`` (width/height)
    where the image allows it (so the zoom is not letterboxed into a sliver) and is shifted, not cut, at the borders.
    No defect: the whole image.
    """
    height, width = shape
    if mask is None or not mask.any():
        return 0, 0, width, height
    ys, xs = np.nonzero(mask)
    bx0, bx1, by0, by1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
    w = (bx1 - bx0) * (1 + 2 * context)
    h = (by1 - by0) * (1 + 2 * context)
    floor = min_fraction * min(height, width)
    w, h = max(w, floor), max(h, floor)
    w, h = max(w, h * aspect), max(h, w / aspect)
    w, h = min(w, width), min(h, height)
    x0 = int(round(np.clip(cx - w / 2, 0, width - w)))
    y0 = int(round(np.clip(cy - h / 2, 0, height - h)))
    return x0, y0, min(width, x0 + int(round(w))), min(height, y0 + int(round(h)))


def _outline(panel: np.ndarray, mask: np.ndarray, scale: float, pad_x: int, pad_y: int) -> None:
    """Draw the mask's outer contours onto ``panel`` (in place), scaled and padded like the image in it."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    moved = [
        np.round((c.reshape(-1, 2) + 0.5) * scale - 0.5 + np.array([pad_x, pad_y])).astype(np.int32).reshape(-1, 1, 2)
        for c in contours
    ]
    cv2.drawContours(panel, moved, -1, OUTLINE_RGB, thickness=1)


def compose_input(
    image: np.ndarray,
    mask: np.ndarray | None,
    size: int | tuple[int, int] = DEFAULT_INPUT_SIZE,
    *,
    context: float = 1.0,
    min_zoom_fraction: float = 0.1,
) -> np.ndarray:
    """The model input for one image: overview band (outlines + zoom box) above a zoom band. uint8 RGB (H, W, 3).

    ``size`` is the model's input size (``(height, width)`` or one number). ``mask``: nonzero = defect, at any
    resolution (resized to the image, nearest neighbour), or ``None``. ``context``: how much surrounding surface the
    zoom keeps, as a multiple of the defects' box size on each side. ``min_zoom_fraction``: the zoom never shows less
    than this share of the image's shorter side (a 3-pixel speck is not blown up to the whole band).
    """
    rgb = _to_rgb(image)
    out_h, out_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    height, width = rgb.shape[:2]
    defects = None
    if mask is not None:
        defects = as_defect_mask(mask)
        if defects.shape != (height, width):
            defects = cv2.resize(defects.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
    top_h = out_h // 2
    bottom_h = out_h - top_h
    x0, y0, x1, y1 = zoom_window(defects, (height, width), out_w / bottom_h, context, min_zoom_fraction)

    top, scale, pad_x, pad_y = _fit(rgb, out_w, top_h)
    zoom, zscale, zpad_x, zpad_y = _fit(np.ascontiguousarray(rgb[y0:y1, x0:x1]), out_w, bottom_h)
    if defects is not None and defects.any():
        _outline(top, defects, scale, pad_x, pad_y)
        _outline(zoom, defects[y0:y1, x0:x1], zscale, zpad_x, zpad_y)
        box = np.round(np.array([x0, y0, x1, y1]) * scale + np.array([pad_x, pad_y, pad_x, pad_y])).astype(int)
        cv2.rectangle(top, (int(box[0]), int(box[1])), (int(box[2]) - 1, int(box[3]) - 1), ZOOM_RGB, thickness=1)
    return np.concatenate([top, zoom], axis=0)


# --------------------------------------------------------------------------------------------------------------------
# Pairs and the split
# --------------------------------------------------------------------------------------------------------------------


def build_training_pair(
    image_id: str,
    image: np.ndarray,
    mask: np.ndarray | None,
    description: str,
    *,
    size: int | tuple[int, int] = DEFAULT_INPUT_SIZE,
    context: float = 1.0,
    min_zoom_fraction: float = 0.1,
    group: str | None = None,
    source: str = "grounded",
) -> TrainingPair:
    """One pair from an image, its defect mask (``None`` = defect-free) and the target text.

    Use the mask the description was written from (ground truth for training; at inference, the thresholded map the
    grounded reference was computed from), so the outlines and the words state the same regions.
    """
    if not description or not description.strip():
        raise ValueError(f"Empty description for image '{image_id}': a pair needs a target text.")
    composite = compose_input(image, mask, size, context=context, min_zoom_fraction=min_zoom_fraction)
    return TrainingPair(
        image_id=image_id, image=composite, text=description.strip(), group=group or image_id, source=source
    )


_LIGHTING_SUFFIX = re.compile(r"^(\d+)_.*$")


def mvtec_group_key(image_id: str) -> str:
    """Group key for MVTec AD 2 ids: ``"<...>/test_public/bad/003_overexposed.png"`` → ``"<...>/test_public/bad/003"``.

    The lighting variants of one numbered test part (``regular``, ``overexposed``, ``shift_1``...) share the
    number; grouping by it keeps every variant on the same side of the split, so the explainer is never evaluated on
    a part it saw under another light. Ids without the ``NNN_`` pattern are their own group.
    """
    path = PurePosixPath(image_id.replace("\\", "/"))
    stem = path.name.rsplit(".", 1)[0]
    match = _LIGHTING_SUFFIX.match(stem)
    return str(path.with_name(match.group(1))) if match else image_id


def split_fraction(key: str, salt: str = "explainer") -> float:
    """A stable number in [0, 1) for ``key``: SHA-256 of ``salt:key`` (Python's ``hash`` changes per process)."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(key: str, eval_fraction: float = 0.2, salt: str = "explainer") -> Split:
    """``"eval"`` for about ``eval_fraction`` of all keys, ``"train"`` for the rest; the same key always lands alike."""
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}.")
    return "eval" if split_fraction(key, salt) < eval_fraction else "train"


def split_pairs(
    pairs: Iterable[TrainingPair], eval_fraction: float = 0.2, salt: str = "explainer"
) -> tuple[list[TrainingPair], list[TrainingPair]]:
    """(train, eval) by each pair's group; operator and grounded pairs of one group always land together."""
    train: list[TrainingPair] = []
    evaluation: list[TrainingPair] = []
    for pair in pairs:
        (evaluation if assign_split(pair.group, eval_fraction, salt) == "eval" else train).append(pair)
    logger.info(
        "Explainer split: %d train / %d eval pairs (eval_fraction=%s)", len(train), len(evaluation), eval_fraction
    )
    return train, evaluation


def check_disjoint(train: Sequence[TrainingPair], evaluation: Sequence[TrainingPair]) -> None:
    """Raise :class:`SplitLeakError` naming the shared groups when the two sets overlap."""
    shared = sorted({p.group for p in train} & {p.group for p in evaluation})
    if shared:
        raise SplitLeakError(
            f"{len(shared)} group(s) are in both the explainer's training and evaluation pairs, e.g. {shared[:5]}; "
            "build both from split_pairs() with one eval_fraction and salt."
        )


# --------------------------------------------------------------------------------------------------------------------
# Knowledge-base hook
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OperatorDescription:
    """An operator's description of one image, as the knowledge base (feedback store) will hand it over.

    Fields mirror the feedback store of the prototype (image, description, confidence 1–5, user, anomaly_type) plus
    an optional mask (a region the operator drew) and group key. ``image_id`` must be what ``load_image`` accepts,
    and the same id grounded pairs use, so both split alike.
    """

    image_id: str
    text: str
    mask: np.ndarray | None = None
    group: str | None = None
    confidence: int | None = None
    author: str | None = None
    anomaly_type: str | None = None

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> OperatorDescription:
        """From a knowledge-base row: keys ``image_id`` (or ``image``), ``description`` (or ``text``), optional
        ``confidence``, ``user`` (or ``author``), ``anomaly_type``, ``group``, ``mask``."""
        image_id = record.get("image_id", record.get("image"))
        text = record.get("description", record.get("text"))
        if not image_id or not text:
            raise ValueError(f"A knowledge-base record needs an image id and a description; got keys {sorted(record)}.")
        confidence = record.get("confidence")
        return cls(
            image_id=str(image_id),
            text=str(text),
            mask=record.get("mask"),
            group=record.get("group"),
            confidence=None if confidence is None else int(confidence),
            author=record.get("user", record.get("author")),
            anomaly_type=record.get("anomaly_type"),
        )


def operator_training_pairs(
    descriptions: Iterable[OperatorDescription | Mapping[str, Any]],
    load_image: Callable[[str], np.ndarray],
    *,
    size: int | tuple[int, int] = DEFAULT_INPUT_SIZE,
    context: float = 1.0,
    min_zoom_fraction: float = 0.1,
    min_confidence: int = 3,
    group_key: Callable[[str], str] | None = None,
) -> list[TrainingPair]:
    """Turn knowledge-base descriptions into pairs (``source="operator"``); the hook for issue 10's follow-up.

    ``load_image(image_id)`` returns the uint8 image. Descriptions below ``min_confidence`` (when a confidence is
    given) are left out, and how many is logged. ``group_key`` derives the split group from the id when the record
    has none (use the same function as for grounded pairs, e.g. :func:`mvtec_group_key`). Put the result through
    :func:`split_pairs` together with the grounded pairs.
    """
    pairs: list[TrainingPair] = []
    dropped = 0
    for item in descriptions:
        record = item if isinstance(item, OperatorDescription) else OperatorDescription.from_record(item)
        if record.confidence is not None and record.confidence < min_confidence:
            dropped += 1
            continue
        group = record.group or (group_key(record.image_id) if group_key else record.image_id)
        pairs.append(
            build_training_pair(
                record.image_id,
                load_image(record.image_id),
                record.mask,
                record.text,
                size=size,
                context=context,
                min_zoom_fraction=min_zoom_fraction,
                group=group,
                source="operator",
            )
        )
    if dropped:
        logger.info("Left out %d operator description(s) with confidence below %d", dropped, min_confidence)
    return pairs
