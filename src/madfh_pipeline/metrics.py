"""Evaluation metrics following the MVTec AD 2 benchmark protocol.

Why this module exists: the original prototype reported only an image AUC computed on a biased split and had no
pixel metrics or thresholds. The benchmark (Heckler-Kram et al., 2025) ranks methods by **AU-PRO up to FPR 0.05**
and **SegF1** at a threshold derived from defect-free data only, so these are implemented here exactly and tested
against hand-computed values and a brute-force reference.

Design decisions
----------------
* Pure numpy / scipy / scikit-learn: no torch. In particular no ``torchmetrics``, which applies a sigmoid to scores
  outside ``[0, 1]``; raw anomaly scores (PatchCore's are ~30-40) would saturate and read as AUROC 0.5.
* Pixel metrics take a *sequence of per-image arrays* (or a stacked ``(N, H, W)`` array). Images may have different
  sizes. Maps are consumed one at a time, so they may also come from a generator that loads files lazily.
* Nothing is subsampled. Pixel AUROC and the PRO curve are *exact*: negative pixel scores are copied once into a
  single buffer (4 bytes per pixel for float16/float32 maps, 8 for float64) that is sorted in place; positive pixels
  additionally keep a float64 region weight. 100 M pixels (about one hundred 1024x1024 maps) therefore need roughly
  0.4-0.8 GB plus the inputs, which is fine on a workstation. ``au_pro`` only materialises the part of the curve up
  to the FPR limit.
* Wrong or missing ground-truth masks raise :class:`MaskError`; they are never silently treated as "good".
* A prediction is anomalous when ``score >= threshold`` (the same convention as the PRO curve).
* Degenerate inputs (one class only, no defect regions, no negative pixels) return ``nan`` with a logged warning
  instead of crashing a whole evaluation run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

logger = logging.getLogger(__name__)

__all__ = [
    "MaskError",
    "PRF",
    "au_pro",
    "au_pro_at_limits",
    "class_f1",
    "class_prf",
    "image_aupr",
    "image_auroc",
    "mean_std_threshold",
    "percentile_threshold",
    "pixel_auroc",
    "pro_curve",
    "seg_f1",
    "seg_prf",
    "trapezoid_auc",
    "validate_mask",
]

#: 8-connectivity, as in the official MVTec evaluation code (``scipy.ndimage.label`` with a 3x3 structure).
_REGION_STRUCTURE = np.ones((3, 3), dtype=int)
#: Elements per block when streaming statistics over very large arrays (bounds the float64 temporary to 32 MiB).
_BLOCK = 1 << 22


class MaskError(ValueError):
    """A ground-truth mask is missing, has the wrong shape or is not binary.

    A subclass of ``ValueError`` so generic callers still catch it, but distinct so pipelines can report the
    offending file instead of scoring the image as defect-free.
    """


@dataclass(frozen=True)
class PRF:
    """Precision, recall and F1 together with the raw counts they were computed from.

    Undefined ratios (e.g. precision without any positive prediction) are ``nan``.
    """

    precision: float
    recall: float
    f1: float
    tp: int
    fp: int
    fn: int


# ----------------------------------------------------------------------------------------------------------------------
# Input helpers
# ----------------------------------------------------------------------------------------------------------------------


def validate_mask(
    mask: ArrayLike | None, expected_shape: tuple[int, ...] | None, name: str = "mask"
) -> NDArray[np.bool_]:
    """Check a ground-truth mask and return it as a boolean array (True = defect).

    Why: a mask that is missing, resized with interpolation (grey values), or of another resolution than the anomaly
    map would otherwise silently produce a wrong score. Accepted encodings are bool, ``{0, 1}`` and ``{0, 255}``
    (any numeric dtype); mixing 1 and 255 is rejected as ambiguous.

    Args:
        mask: The mask array, or ``None`` when it could not be loaded.
        expected_shape: Shape it must have (usually the anomaly map's), or ``None`` to skip the shape check.
        name: File name or identifier used in error messages.

    Raises:
        MaskError: If the mask is missing, has the wrong shape, or is not binary.
    """
    if mask is None:
        raise MaskError(f"{name}: ground-truth mask is missing")
    arr = np.asarray(mask)
    if expected_shape is not None and tuple(arr.shape) != tuple(expected_shape):
        raise MaskError(f"{name}: mask shape {tuple(arr.shape)} does not match expected shape {tuple(expected_shape)}")
    if arr.dtype == np.bool_:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise MaskError(f"{name}: mask has non-numeric dtype {arr.dtype}")
    values = np.unique(arr)
    if values.size and not (np.all(np.isin(values, (0, 1))) or np.all(np.isin(values, (0, 255)))):
        shown = values[:10].tolist()
        raise MaskError(
            f"{name}: mask is not binary; expected values {{0, 1}} or {{0, 255}}, found {shown}"
            f"{' ...' if values.size > 10 else ''} (resize masks with nearest-neighbour interpolation)"
        )
    return arr != 0


def _as_2d_map(anomaly_map: ArrayLike, name: str) -> NDArray[Any]:
    """Return the map as a 2-D array, squeezing a single channel axis ((1, H, W) or (H, W, 1))."""
    arr = np.asarray(anomaly_map)
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr[0] if arr.shape[0] == 1 else arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"{name}: anomaly map must be 2-D, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)  # an already binarised map: True ranks above False
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name}: anomaly map has non-numeric dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError(f"{name}: anomaly map contains NaN or infinite values")
    return arr


def _score_dtype(arr: NDArray[Any]) -> type[np.floating[Any]]:
    """Smallest float dtype that holds the map's values exactly (float32 for float16/32 and small ints)."""
    if arr.dtype in (np.float16, np.float32, np.uint8, np.int8, np.uint16, np.int16, np.bool_):
        return np.float32
    return np.float64


def _as_list(items: Iterable[Any] | NDArray[Any]) -> list[Any] | NDArray[Any]:
    """Treat a single 2-D array as one image; keep stacked arrays and sequences; materialise other iterables."""
    if isinstance(items, np.ndarray):
        return items[None] if items.ndim == 2 else items
    if isinstance(items, Sequence):
        return items  # type: ignore[return-value]
    return list(items)


def _iter_maps(maps: Iterable[ArrayLike] | NDArray[Any]) -> Iterator[ArrayLike]:
    """Iterate over maps one at a time (a single 2-D array counts as one map)."""
    if isinstance(maps, np.ndarray) and maps.ndim == 2:
        yield maps
        return
    yield from maps


def _iter_pairs(
    masks: Iterable[ArrayLike | None] | NDArray[Any],
    maps: Iterable[ArrayLike] | NDArray[Any],
    names: Sequence[str] | None,
) -> Iterator[tuple[NDArray[np.bool_], NDArray[Any], str]]:
    """Yield validated ``(mask, map, name)`` triples, checking that both inputs have the same length."""
    mask_list = _as_list(masks)
    n = len(mask_list)
    if names is not None and len(names) != n:
        raise ValueError(f"got {len(names)} names for {n} masks")
    count = 0
    for i, amap in enumerate(_iter_maps(maps)):
        if i >= n:
            raise ValueError(f"more anomaly maps than masks ({n} masks)")
        name = names[i] if names is not None else f"image[{i}]"
        arr = _as_2d_map(amap, name)
        mask = validate_mask(mask_list[i], arr.shape, name)
        count += 1
        yield mask, arr, name
    if count != n:
        raise ValueError(f"got {count} anomaly maps for {n} masks")


def _check_image_inputs(labels: ArrayLike, scores: ArrayLike) -> tuple[NDArray[np.int8], NDArray[np.float64]]:
    """Validate image-level labels (binary) and scores (finite, same length)."""
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    if y.size == 0:
        raise ValueError("no labels given")
    if y.dtype != np.bool_ and not np.all(np.isin(y, (0, 1))):
        raise ValueError(f"labels must be 0/1 or bool, found {np.unique(y)[:10].tolist()}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return y.astype(np.int8), s


def _single_class(y: NDArray[np.int8], what: str) -> bool:
    """Log and report when a ranking metric is undefined because only one class is present."""
    if y.min() == y.max():
        logger.warning("%s is undefined: only class %d present in %d samples; returning nan", what, y[0], y.size)
        return True
    return False


# ----------------------------------------------------------------------------------------------------------------------
# Image-level metrics
# ----------------------------------------------------------------------------------------------------------------------


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Image-level ROC AUC (label 1 = anomalous) on the raw scores.

    Why scikit-learn on raw scores: AUROC depends only on the ranking, so no rescaling or sigmoid is needed, and a
    sigmoid (torchmetrics' behaviour for scores outside [0, 1]) would destroy the ranking of large scores.
    Returns ``nan`` with a warning if only one class is present.
    """
    y, s = _check_image_inputs(labels, scores)
    if _single_class(y, "image AUROC"):
        return math.nan
    return float(roc_auc_score(y, s))


def image_aupr(labels: ArrayLike, scores: ArrayLike) -> float:
    """Image-level area under the precision-recall curve as average precision (step-wise, scikit-learn).

    Why AP rather than trapezoidal AUPR: the trapezoid over-estimates area between PR points; AP is the standard.
    Returns ``nan`` with a warning if only one class is present.
    """
    y, s = _check_image_inputs(labels, scores)
    if _single_class(y, "image AUPR"):
        return math.nan
    return float(average_precision_score(y, s))


def _prf_from_counts(tp: int, fp: int, fn: int, what: str) -> PRF:
    """Build a :class:`PRF` from summed counts; F1 = 2TP / (2TP + FP + FN) (nan if nothing to find or predict)."""
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    denom = 2 * tp + fp + fn
    if denom == 0:
        logger.warning("%s F1 is undefined: no positives and no positive predictions; returning nan", what)
        f1 = math.nan
    else:
        f1 = 2 * tp / denom
    return PRF(precision=precision, recall=recall, f1=f1, tp=int(tp), fp=int(fp), fn=int(fn))


def class_prf(labels: ArrayLike, scores: ArrayLike, threshold: float) -> PRF:
    """Image-level precision/recall/F1 of ``score >= threshold`` against the labels (ClassF1 of the benchmark).

    The threshold must come from train/validation data (see :func:`mean_std_threshold`), never from the test set.
    """
    y, s = _check_image_inputs(labels, scores)
    pred = s >= threshold
    truth = y.astype(bool)
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    return _prf_from_counts(tp, fp, fn, "class")


def class_f1(labels: ArrayLike, scores: ArrayLike, threshold: float) -> float:
    """Image-level F1 (ClassF1) of ``score >= threshold``; see :func:`class_prf`."""
    return class_prf(labels, scores, threshold).f1


# ----------------------------------------------------------------------------------------------------------------------
# Pixel-level metrics
# ----------------------------------------------------------------------------------------------------------------------


def seg_prf(
    masks: Iterable[ArrayLike | None] | NDArray[Any],
    maps: Iterable[ArrayLike] | NDArray[Any],
    threshold: float,
    names: Sequence[str] | None = None,
) -> PRF:
    """Pixel-level precision/recall/F1 of ``map >= threshold`` with TP/FP/FN summed over all pixels of all images.

    Why summed rather than averaged per image: this is the benchmark's SegF1 definition, and it keeps defect-free
    images meaningful (they can only add false positives). Streams over the maps, so memory is one image at a time.
    """
    tp = fp = fn = 0
    for mask, amap, _ in _iter_pairs(masks, maps, names):
        pred = amap >= threshold
        tp += int(np.count_nonzero(pred & mask))
        fp += int(np.count_nonzero(pred & ~mask))
        fn += int(np.count_nonzero(~pred & mask))
    return _prf_from_counts(tp, fp, fn, "segmentation")


def seg_f1(
    masks: Iterable[ArrayLike | None] | NDArray[Any],
    maps: Iterable[ArrayLike] | NDArray[Any],
    threshold: float,
    names: Sequence[str] | None = None,
) -> float:
    """Benchmark SegF1: pixel F1 of ``map >= threshold`` accumulated over all images; see :func:`seg_prf`."""
    return seg_prf(masks, maps, threshold, names).f1


@dataclass
class _PixelScores:
    """Negative pixel scores sorted ascending, positive pixel scores sorted ascending with their region weights."""

    neg: NDArray[np.floating[Any]]
    pos: NDArray[np.floating[Any]]
    pos_weight: NDArray[np.float64] | None  # 1 / size of the pixel's GT region, aligned with ``pos``
    n_regions: int


def _gather_pixels(
    masks: Iterable[ArrayLike | None] | NDArray[Any],
    maps: Iterable[ArrayLike] | NDArray[Any],
    names: Sequence[str] | None,
    with_regions: bool,
) -> _PixelScores:
    """Collect all pixel scores split by ground truth, without subsampling.

    Negatives go into one pre-allocated buffer (sized from the masks, which are validated up front) and are sorted in
    place, so the peak cost is one copy of the negative scores. When ``with_regions`` is set each positive pixel gets
    the weight ``1 / |region|`` of its 8-connected ground-truth region.
    """
    mask_list = _as_list(masks)
    n = len(mask_list)
    if names is not None and len(names) != n:
        raise ValueError(f"got {len(names)} names for {n} masks")
    # First pass over the (small, boolean) masks only: validate values and count negatives for the buffer.
    bool_masks: list[NDArray[np.bool_]] = []
    n_neg = 0
    for i in range(n):
        name = names[i] if names is not None else f"image[{i}]"
        m = validate_mask(mask_list[i], None, name)
        bool_masks.append(m)
        n_neg += m.size - int(np.count_nonzero(m))

    neg: NDArray[np.floating[Any]] | None = None
    filled = 0
    pos_parts: list[NDArray[np.floating[Any]]] = []
    weight_parts: list[NDArray[np.float64]] = []
    n_regions = 0
    for mask, amap, _ in _iter_pairs(bool_masks, maps, names):
        dtype = _score_dtype(amap)
        if neg is None:
            neg = np.empty(n_neg, dtype=dtype)
        elif dtype == np.float64 and neg.dtype != np.float64:
            neg = neg.astype(np.float64)  # rare: mixed precisions; upcast so no map loses precision
        k = mask.size - int(np.count_nonzero(mask))
        neg[filled : filled + k] = amap[~mask]
        filled += k
        if mask.any():
            pos_parts.append(amap[mask])
            if with_regions:
                labeled, n_comp = ndimage.label(mask, structure=_REGION_STRUCTURE)
                sizes = np.bincount(labeled.ravel())
                weight_parts.append(1.0 / sizes[labeled[mask]].astype(np.float64))
                n_regions += int(n_comp)
    if neg is None:
        neg = np.empty(0, dtype=np.float64)
    # One common dtype so that equal scores compare equal across negatives and positives.
    common = np.result_type(neg.dtype, *(p.dtype for p in pos_parts), np.float32)
    common = np.float64 if common == np.float64 else np.float32
    neg = neg.astype(common, copy=False)
    neg.sort()  # in place: no second copy of the largest array
    pos = np.concatenate(pos_parts).astype(common, copy=False) if pos_parts else np.empty(0, dtype=common)
    pos_weight: NDArray[np.float64] | None = None
    order = np.argsort(pos, kind="stable")
    pos = pos[order]
    if with_regions:
        pos_weight = np.concatenate(weight_parts)[order] if weight_parts else np.empty(0, dtype=np.float64)
    return _PixelScores(neg=neg, pos=pos, pos_weight=pos_weight, n_regions=n_regions)


def pixel_auroc(
    masks: Iterable[ArrayLike | None] | NDArray[Any],
    maps: Iterable[ArrayLike] | NDArray[Any],
    names: Sequence[str] | None = None,
) -> float:
    """Exact pixel-level ROC AUC over all pixels of all images.

    Why not ``roc_auc_score`` on the flattened pixels: for ~100 M pixels it needs several float64 copies and an
    index array (GBs). Instead the AUC is computed as the Mann-Whitney statistic
    ``P(score_pos > score_neg) + 0.5 * P(score_pos == score_neg)``, which equals the trapezoidal ROC AUC including
    ties: negatives are sorted in place and every positive is located by binary search. Memory is ~4 bytes per
    pixel (float32 maps); time is O(N log N). No subsampling or binning, so the result is exact.
    Returns ``nan`` with a warning if there are no positive or no negative pixels.
    """
    px = _gather_pixels(masks, maps, names, with_regions=False)
    n_neg, n_pos = px.neg.size, px.pos.size
    if n_neg == 0 or n_pos == 0:
        logger.warning("pixel AUROC is undefined: %d positive and %d negative pixels; returning nan", n_pos, n_neg)
        return math.nan
    below = np.searchsorted(px.neg, px.pos, side="left").astype(np.int64)
    below_or_equal = np.searchsorted(px.neg, px.pos, side="right").astype(np.int64)
    # Integer sums are exact; 2 * U avoids the half-counts.
    twice_u = int(below.sum()) + int(below_or_equal.sum())
    return float(twice_u / (2.0 * n_pos * n_neg))


# ----------------------------------------------------------------------------------------------------------------------
# PRO curve and AU-PRO
# ----------------------------------------------------------------------------------------------------------------------


def _curve_points(px: _PixelScores, max_fpr: float | None) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """PRO curve points for all distinct thresholds, highest threshold first (FPR ascending), without the origin.

    At threshold ``t`` (pixels with ``score >= t`` are anomalous):
    ``FPR(t) = #neg >= t / #neg`` and ``PRO(t) = sum_{pos >= t} w / #regions`` where ``w = 1 / |region|`` - i.e. the
    mean over regions of the covered fraction. The curve only changes at observed scores, so evaluating it at every
    distinct score gives the exact curve, like the official sort/cumsum implementation. With ``max_fpr`` the
    thresholds are restricted to those needed to reach (and pass) that FPR.
    """
    neg, pos, w = px.neg, px.pos, px.pos_weight
    assert w is not None
    n_neg = neg.size
    lo = 0  # index into neg: thresholds below neg[lo] are not needed
    if max_fpr is not None and max_fpr < 1.0:
        # One extra negative beyond ceil(max_fpr * n) guarantees a point strictly past the limit despite rounding.
        need = min(n_neg, math.ceil(max_fpr * n_neg) + 1)
        lo = n_neg - need
    t_cut = neg[lo]
    neg_top = neg[lo:]
    uniq_neg = neg_top[np.concatenate(([True], neg_top[1:] != neg_top[:-1]))] if neg_top.size else neg_top
    p_lo = int(np.searchsorted(pos, t_cut, side="left"))
    pos_top = pos[p_lo:]
    thresholds = np.union1d(uniq_neg, pos_top)[::-1]  # unique, descending

    n_neg_ge = n_neg - np.searchsorted(neg, thresholds, side="left")
    # Suffix sums of the weights (accumulated from the highest score down, as in the official cumsum).
    suffix = np.zeros(pos.size + 1, dtype=np.float64)
    if pos.size:
        suffix[:-1] = np.cumsum(w[::-1])[::-1]
    w_ge = suffix[np.searchsorted(pos, thresholds, side="left")]
    fprs = np.clip(n_neg_ge / n_neg, 0.0, 1.0)
    pros = np.clip(w_ge / px.n_regions, 0.0, 1.0)
    return fprs, pros


def _pro_defined(px: _PixelScores) -> bool:
    """Log and report when the PRO curve is undefined (no GT regions or no negative pixels)."""
    if px.n_regions == 0:
        logger.warning("PRO is undefined: the ground truth contains no defect regions; returning nan")
        return False
    if px.neg.size == 0:
        logger.warning("PRO is undefined: there are no defect-free pixels to measure the FPR; returning nan")
        return False
    return True


def pro_curve(
    masks: Iterable[ArrayLike | None] | NDArray[Any],
    maps: Iterable[ArrayLike] | NDArray[Any],
    names: Sequence[str] | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Exact per-region-overlap curve ``(fprs, pros)``, FPR non-decreasing, starting at (0, 0) and ending at (1, 1).

    Regions are the 8-connected components of each ground-truth mask (scipy.ndimage.label with a 3x3 structure, as in
    the official MVTec evaluation). For every distinct score ``t`` the maps are binarised at ``score >= t``;
    PRO is the mean over all regions of all images of (covered pixels / region size), FPR is the false positive
    pixels over all negative pixels of all images (defect-free images contribute only negatives). Several points may
    share an FPR (vertical steps). Returns empty arrays (with a warning) if the curve is undefined.
    """
    px = _gather_pixels(masks, maps, names, with_regions=True)
    if not _pro_defined(px):
        return np.empty(0, dtype=np.float64), np.empty(0, dtype=np.float64)
    fprs, pros = _curve_points(px, None)
    return np.concatenate(([0.0], fprs, [1.0])), np.concatenate(([0.0], pros, [1.0]))


def trapezoid_auc(x: ArrayLike, y: ArrayLike, x_max: float | None = None) -> float:
    """Trapezoidal area under ``y(x)`` for non-decreasing ``x``, optionally only up to ``x_max``.

    Why not ``np.trapezoid`` on a truncated curve: the curve rarely has a point exactly at the integration limit, so
    (like the benchmark) ``y`` is linearly interpolated at ``x_max`` between the last point before it and the first
    point after it. If the curve ends before ``x_max`` its last value is held constant.
    """
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError("x and y must be 1-D arrays of equal length")
    finite = np.isfinite(xa) & np.isfinite(ya)
    if not finite.all():
        logger.warning("trapezoid_auc: ignoring %d non-finite curve points", int((~finite).sum()))
        xa, ya = xa[finite], ya[finite]
    if xa.size == 0:
        return math.nan
    if np.any(np.diff(xa) < 0):
        raise ValueError("x must be non-decreasing")
    extra = 0.0
    if x_max is not None:
        ins = int(np.searchsorted(xa, x_max, side="right"))  # first index with x > x_max
        if ins == 0:
            return 0.0
        if xa[ins - 1] != x_max:
            x0, y0 = xa[ins - 1], ya[ins - 1]
            if ins < xa.size:
                y_at = y0 + (ya[ins] - y0) * (x_max - x0) / (xa[ins] - x0)
            else:
                y_at = y0
            extra = 0.5 * (y0 + y_at) * (x_max - x0)
        xa, ya = xa[:ins], ya[:ins]
    return float(np.sum(0.5 * (ya[1:] + ya[:-1]) * np.diff(xa)) + extra)


def au_pro_at_limits(
    masks: Iterable[ArrayLike | None] | NDArray[Any],
    maps: Iterable[ArrayLike] | NDArray[Any],
    fpr_limits: Sequence[float] = (0.05, 0.3),
    names: Sequence[str] | None = None,
) -> dict[float, float]:
    """Normalised AU-PRO for several FPR limits from a single pass over the data (benchmark reports 0.05 and 0.3).

    Each value is the trapezoidal area under the PRO curve from FPR 0 to the limit (interpolated exactly at the
    limit) divided by the limit, so a perfect detector scores 1.0. Only the curve up to the largest limit is built.
    """
    limits = [float(v) for v in fpr_limits]
    if not limits or any(not (0.0 < v <= 1.0) for v in limits):
        raise ValueError(f"FPR limits must lie in (0, 1], got {list(fpr_limits)}")
    px = _gather_pixels(masks, maps, names, with_regions=True)
    if not _pro_defined(px):
        return {v: math.nan for v in limits}
    fprs, pros = _curve_points(px, max(limits))
    x = np.concatenate(([0.0], fprs))
    y = np.concatenate(([0.0], pros))
    return {v: trapezoid_auc(x, y, x_max=v) / v for v in limits}


def au_pro(
    masks: Iterable[ArrayLike | None] | NDArray[Any],
    maps: Iterable[ArrayLike] | NDArray[Any],
    fpr_limit: float = 0.05,
    names: Sequence[str] | None = None,
) -> float:
    """Benchmark headline metric: normalised area under the PRO curve up to ``fpr_limit`` (1.0 = perfect).

    See :func:`pro_curve` for the curve and :func:`au_pro_at_limits` for the integration. ``nan`` (with a warning) if
    the ground truth has no defect regions.
    """
    return au_pro_at_limits(masks, maps, (fpr_limit,), names)[float(fpr_limit)]


# ----------------------------------------------------------------------------------------------------------------------
# Thresholds from normal data
# ----------------------------------------------------------------------------------------------------------------------


def _iter_chunks(values: ArrayLike | Iterable[ArrayLike]) -> Iterator[NDArray[Any]]:
    """Yield flat numeric chunks from an array, a list of numbers, or an iterable of arrays (e.g. maps)."""
    if isinstance(values, np.ndarray) or np.isscalar(values):
        yield np.asarray(values).ravel()
        return
    if isinstance(values, (list, tuple)) and all(np.isscalar(v) for v in values):
        yield np.asarray(values).ravel()
        return
    for v in values:  # type: ignore[union-attr]
        yield np.asarray(v).ravel()


def mean_std_threshold(
    values: ArrayLike | Iterable[ArrayLike], k: float = 3.0, ddof: int = 0
) -> tuple[float, float, float]:
    """Threshold ``mean + k * std`` of scores from defect-free data, streamed without concatenation.

    Why: the benchmark's baselines binarise at mean + 3 sigma of the per-pixel scores of the *good validation* images;
    the MVTec AD 2 validation split has no defects, so F1-optimal thresholds are impossible there. The statistics are
    accumulated per block in float64 and merged with Chan et al.'s parallel update (numerically stable, unlike
    sum/sum-of-squares), so hundreds of 1024x1024 maps need only one block of memory. ``ddof=0`` (population std)
    matches ``numpy.std``.

    Returns:
        ``(threshold, mean, std)``.
    """
    count = 0
    mean = 0.0
    m2 = 0.0
    for chunk in _iter_chunks(values):
        if chunk.size and not (np.issubdtype(chunk.dtype, np.number) or chunk.dtype == np.bool_):
            raise ValueError(f"non-numeric values of dtype {chunk.dtype}")
        for start in range(0, chunk.size, _BLOCK):
            block = chunk[start : start + _BLOCK].astype(np.float64, copy=False)
            nb = block.size
            b_mean = float(block.mean())
            if not math.isfinite(b_mean):
                raise ValueError("values contain NaN or infinite entries")
            b_m2 = float(np.square(block - b_mean).sum())
            total = count + nb
            delta = b_mean - mean
            mean += delta * nb / total
            m2 += b_m2 + delta * delta * count * nb / total
            count = total
    if count <= ddof:
        raise ValueError(f"need more than {ddof} values to compute a standard deviation, got {count}")
    std = math.sqrt(m2 / (count - ddof))
    threshold = mean + k * std
    logger.info("mean+%.1f*std threshold from %d values: mean=%.6g std=%.6g -> %.6g", k, count, mean, std, threshold)
    return threshold, mean, std


def percentile_threshold(values: ArrayLike | Iterable[ArrayLike], q: float, method: str = "linear") -> float:
    """Threshold at the ``q``-th percentile (0-100) of scores from defect-free data.

    Why: a robust alternative to mean + k sigma when normal scores are skewed. Exact, so the values are concatenated
    (kept in their own dtype, e.g. 4 bytes per float32 pixel) before ``numpy.percentile``.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must lie in [0, 100], got {q}")
    chunks = list(_iter_chunks(values))
    data = np.concatenate(chunks) if chunks else np.empty(0)
    if data.size == 0:
        raise ValueError("no values given")
    if not np.isfinite(data).all():
        raise ValueError("values contain NaN or infinite entries")
    return float(np.percentile(data, q, method=method))  # type: ignore[call-overload]
