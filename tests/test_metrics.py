"""Tests for madfh_pipeline.metrics with hand-computed expected values and a brute-force PRO reference.

The streaming (native-resolution) accumulator is checked against the exact functions, which are themselves checked
against the brute-force reference: its error bounds must hold, and be 0 with equal results when the grid is exact.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from madfh_pipeline.metrics import (
    MaskError,
    ScoreSampler,
    StreamingPixelMetrics,
    au_pro,
    au_pro_at_limits,
    class_f1,
    class_prf,
    float16_grid,
    image_aupr,
    image_auroc,
    limit_key,
    mean_std_threshold,
    percentile_threshold,
    pixel_auroc,
    pro_curve,
    score_grid,
    seg_f1,
    seg_prf,
    streaming_pixel_metrics,
    trapezoid_auc,
    validate_mask,
)

# ----------------------------------------------------------------------------------------------------------------------
# Brute-force reference: sweep every distinct score, binarise, measure each region explicitly.
# ----------------------------------------------------------------------------------------------------------------------


def _reference_curve(masks: list[np.ndarray], maps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    regions = []  # (image index, boolean region mask)
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m.astype(bool), structure=np.ones((3, 3)))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    n_neg = sum(int((~m.astype(bool)).sum()) for m in masks)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(np.concatenate([a.ravel() for a in maps]))[::-1]:
        binar = [a >= t for a in maps]
        fp = sum(int((b & ~m.astype(bool)).sum()) for b, m in zip(binar, masks, strict=True))
        overlaps = [(binar[i] & r).sum() / r.sum() for i, r in regions]
        fprs.append(fp / n_neg)
        pros.append(float(np.mean(overlaps)))
    return np.array(fprs), np.array(pros)


def _reference_au_pro(masks: list[np.ndarray], maps: list[np.ndarray], limit: float) -> float:
    x, y = _reference_curve(masks, maps)
    area = 0.0
    for i in range(1, len(x)):
        x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
        if x0 >= limit:
            break
        if x1 > limit:  # interpolate inside the segment that crosses the limit
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area / limit


# ----------------------------------------------------------------------------------------------------------------------
# Image-level metrics
# ----------------------------------------------------------------------------------------------------------------------


def test_image_auroc_hand_computed() -> None:
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_image_auroc_raw_scores_outside_unit_interval_equal_rescaled() -> None:
    raw = np.array([31.0, 34.0, 33.5, 38.0, 39.9, 30.2])
    labels = [0, 0, 1, 1, 1, 0]
    rescaled = (raw - raw.min()) / (raw.max() - raw.min())
    assert image_auroc(labels, raw) == pytest.approx(image_auroc(labels, rescaled))
    assert image_auroc(labels, raw) == pytest.approx(8 / 9)  # only 34.0 (good) beats 33.5 (defect)
    assert image_auroc([0, 0, 1, 1], [30.1, 30.4, 30.35, 40.0]) == pytest.approx(0.75)


def test_image_aupr_hand_computed() -> None:
    # Ranking 0.8 (defect), 0.4 (good), 0.35 (defect): AP = 0.5 * 1 + 0.5 * 2/3.
    assert image_aupr([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.5 + 1 / 3)


def test_image_metrics_single_class_nan(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="madfh_pipeline.metrics"):
        assert math.isnan(image_auroc([0, 0, 0], [0.1, 0.2, 0.3]))
        assert math.isnan(image_aupr([1, 1], [0.1, 0.2]))
    assert "only class" in caplog.text


def test_image_metrics_reject_bad_inputs() -> None:
    with pytest.raises(ValueError, match="length"):
        image_auroc([0, 1], [0.1])
    with pytest.raises(ValueError, match="0/1"):
        image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, float("nan")])


def test_class_f1_hand_computed() -> None:
    labels = [0, 0, 1, 1, 1]
    scores = [0.2, 0.6, 0.7, 0.5, 0.1]
    # threshold 0.5 (>=): predicted {0.6, 0.7, 0.5} -> TP 2, FP 1, FN 1.
    prf = class_prf(labels, scores, 0.5)
    assert (prf.tp, prf.fp, prf.fn) == (2, 1, 1)
    assert prf.precision == pytest.approx(2 / 3)
    assert prf.recall == pytest.approx(2 / 3)
    assert class_f1(labels, scores, 0.5) == pytest.approx(2 / 3)
    assert class_f1(labels, scores, 0.9) == 0.0  # nothing predicted but defects exist


# ----------------------------------------------------------------------------------------------------------------------
# Mask validation
# ----------------------------------------------------------------------------------------------------------------------


def test_validate_mask_accepts_encodings() -> None:
    expected = np.array([[False, True], [True, False]])
    for m in (expected, expected.astype(np.uint8), expected.astype(np.uint8) * 255, expected.astype(np.float32)):
        out = validate_mask(m, (2, 2), "m.png")
        assert out.dtype == np.bool_
        np.testing.assert_array_equal(out, expected)
    assert not validate_mask(np.zeros((2, 2), np.uint8), (2, 2)).any()


def test_validate_mask_errors_name_the_file() -> None:
    with pytest.raises(MaskError, match="000_mask.png.*shape"):
        validate_mask(np.zeros((4, 4), np.uint8), (8, 8), "000_mask.png")
    with pytest.raises(MaskError, match="bad.png.*not binary"):
        validate_mask(np.array([[0, 128], [255, 0]], np.uint8), (2, 2), "bad.png")
    with pytest.raises(MaskError, match="not binary"):
        validate_mask(np.array([[0, 1], [255, 0]], np.uint8), (2, 2), "mixed.png")
    with pytest.raises(MaskError, match="missing"):
        validate_mask(None, (2, 2), "gone.png")
    assert issubclass(MaskError, ValueError)


def test_pixel_metrics_report_wrong_or_missing_masks() -> None:
    maps = [np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32)]
    with pytest.raises(MaskError, match="b.png"):
        au_pro([np.zeros((4, 4)), np.zeros((3, 4))], maps, names=["a.png", "b.png"])
    with pytest.raises(MaskError, match="missing"):
        seg_f1([np.zeros((4, 4)), None], maps, 0.5)
    with pytest.raises(MaskError, match="not binary"):
        pixel_auroc([np.full((4, 4), 0.5), np.zeros((4, 4))], maps)
    with pytest.raises(ValueError, match="maps"):
        au_pro([np.zeros((4, 4))] * 3, maps)


# ----------------------------------------------------------------------------------------------------------------------
# Pixel AUROC
# ----------------------------------------------------------------------------------------------------------------------


def test_pixel_auroc_hand_computed_with_tie() -> None:
    mask = np.array([[1, 0, 0], [1, 0, 0]], np.uint8)
    amap = np.array([[0.8, 0.1, 0.3], [0.3, 0.5, 0.2]], np.float32)
    # Positives 0.8, 0.3 vs negatives 0.1, 0.3, 0.5, 0.2: 4 + (2 + 0.5 tie) = 6.5 of 8 pairs.
    assert pixel_auroc([mask], [amap]) == pytest.approx(6.5 / 8)


def test_pixel_auroc_matches_sklearn_over_several_images() -> None:
    rng = np.random.default_rng(0)
    masks = [(rng.random((16, 20)) > 0.8).astype(np.uint8) * 255 for _ in range(3)] + [np.zeros((8, 8), np.uint8)]
    maps = [np.round(rng.random(m.shape), 2).astype(np.float32) + 0.3 * (m > 0) for m in masks]
    expected = roc_auc_score(np.concatenate([m.ravel() > 0 for m in masks]), np.concatenate([a.ravel() for a in maps]))
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(np.stack(masks[:3]), np.stack(maps[:3])) == pytest.approx(
        roc_auc_score(np.concatenate([m.ravel() > 0 for m in masks[:3]]), np.concatenate([a.ravel() for a in maps[:3]]))
    )


def test_pixel_auroc_without_defects_is_nan() -> None:
    assert math.isnan(pixel_auroc([np.zeros((3, 3))], [np.ones((3, 3))]))


# ----------------------------------------------------------------------------------------------------------------------
# PRO curve and AU-PRO (hand-computed)
# ----------------------------------------------------------------------------------------------------------------------


def _one_region_4x4() -> np.ndarray:
    mask = np.zeros((4, 4), np.uint8)
    mask[1, 1] = mask[1, 2] = 255  # one region of 2 pixels, 14 negatives
    return mask


def test_au_pro_perfect_map_is_one() -> None:
    mask = _one_region_4x4()
    amap = (mask > 0).astype(np.float32)
    assert au_pro([mask], [amap]) == pytest.approx(1.0)
    assert au_pro([mask], [amap], fpr_limit=0.3) == pytest.approx(1.0)
    assert au_pro([mask], [amap], fpr_limit=1.0) == pytest.approx(1.0)
    assert au_pro([mask], [mask > 0]) == pytest.approx(1.0)  # an already binarised (bool) map
    fprs, pros = pro_curve([mask], [amap])
    np.testing.assert_allclose(fprs, [0, 0, 1, 1])
    np.testing.assert_allclose(pros, [0, 1, 1, 1])


def test_au_pro_partially_wrong_map() -> None:
    mask = _one_region_4x4()
    amap = np.zeros((4, 4), np.float32)
    amap[1, 1], amap[1, 2] = 0.9, 0.5  # region pixels
    amap[3, 3] = 0.7  # one false positive, ranked between them
    # Thresholds 0.9: (0, 1/2); 0.7: (1/14, 1/2); 0.5: (1/14, 1); 0: (1, 1).
    fprs, pros = pro_curve([mask], [amap])
    np.testing.assert_allclose(fprs, [0, 0, 1 / 14, 1 / 14, 1, 1])
    np.testing.assert_allclose(pros, [0, 0.5, 0.5, 1, 1, 1])
    # Up to 0.05 < 1/14 the curve is flat at 0.5.
    assert au_pro([mask], [amap], fpr_limit=0.05) == pytest.approx(0.5)
    # Up to 0.3: 0.5 * 1/14 + 1 * (0.3 - 1/14), normalised.
    assert au_pro([mask], [amap], fpr_limit=0.3) == pytest.approx((0.5 / 14 + 0.3 - 1 / 14) / 0.3)
    both = au_pro_at_limits([mask], [amap], (0.05, 0.3))
    assert both[0.05] == pytest.approx(0.5)
    assert both[0.3] == pytest.approx(1 - 1 / 8.4)


def test_au_pro_interpolates_at_fpr_limit() -> None:
    mask = _one_region_4x4()
    amap = np.zeros((4, 4), np.float32)
    amap[1, 1], amap[1, 2] = 0.9, 0.5
    amap[0, 0] = 0.5  # a negative tied with a region pixel: the curve jumps diagonally (0, .5) -> (1/14, 1)
    fprs, pros = pro_curve([mask], [amap])
    np.testing.assert_allclose(fprs, [0, 0, 1 / 14, 1, 1])
    np.testing.assert_allclose(pros, [0, 0.5, 1, 1, 1])
    # PRO at 0.05 = 0.5 + 0.5 * (0.05 * 14) = 0.85; area = (0.5 + 0.85) / 2 * 0.05.
    assert au_pro([mask], [amap], fpr_limit=0.05) == pytest.approx(0.675)
    # Without interpolation (truncating at the last point <= 0.05) one would get 0.5, with the next point 0.75+.


def test_au_pro_averages_over_regions_not_pixels() -> None:
    mask = np.zeros((6, 6), np.uint8)
    mask[0, 0] = 1  # region A: 1 pixel
    mask[3:5, 3:5] = 1  # region B: 4 pixels
    amap = np.zeros((6, 6), np.float64)
    amap[0, 0] = 0.8
    amap[3, 3] = 0.9
    amap[3, 4] = amap[4, 3] = amap[4, 4] = 0.2
    amap[5, 0] = 0.5  # one false positive among 31 negatives
    # 0.9: PRO mean(0, 1/4) = 0.125; 0.8: mean(1, 1/4) = 0.625; 0.5: FPR 1/31; 0.2: PRO 1; 0: FPR 1.
    fprs, pros = pro_curve([mask], [amap])
    np.testing.assert_allclose(fprs, [0, 0, 0, 1 / 31, 1 / 31, 1, 1])
    np.testing.assert_allclose(pros, [0, 0.125, 0.625, 0.625, 1, 1, 1])
    expected = (0.625 / 31 + (0.05 - 1 / 31) * 1.0) / 0.05  # = 1 - 0.375 / 1.55
    assert au_pro([mask], [amap]) == pytest.approx(expected)
    assert expected == pytest.approx(0.7580645161290323)


def test_regions_are_8_connected() -> None:
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = mask[0, 1] = mask[1, 2] = True  # diagonal contact: one region of 3 under 8-connectivity
    amap = np.zeros((4, 4), np.float32)
    amap[1, 2] = 1.0
    _, pros = pro_curve([mask], [amap])
    assert pros[1] == pytest.approx(1 / 3)  # 4-connectivity would give mean(0, 1) = 0.5


def test_defect_free_images_only_add_negatives() -> None:
    mask = _one_region_4x4()
    amap = np.zeros((4, 4), np.float32)
    amap[1, 1], amap[1, 2] = 0.9, 0.5
    amap[3, 3] = 0.7
    good_mask = np.zeros((4, 4), np.uint8)
    quiet = np.zeros((4, 4), np.float32)
    fprs, _ = pro_curve([mask, good_mask], [amap, quiet])
    np.testing.assert_allclose(fprs, [0, 0, 1 / 30, 1 / 30, 1, 1])  # 14 + 16 negatives
    # 1/30 < 0.05: area 0.5 * 1/30 + 1 * (0.05 - 1/30).
    assert au_pro([mask, good_mask], [amap, quiet]) == pytest.approx((0.5 / 30 + 0.05 - 1 / 30) / 0.05)
    loud = np.full((4, 4), 0.95, np.float32)  # a good image that lights up everywhere ranks above the defect
    assert au_pro([mask, good_mask], [amap, loud]) == pytest.approx(0.0)


def test_au_pro_without_regions_is_nan(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="madfh_pipeline.metrics"):
        assert math.isnan(au_pro([np.zeros((4, 4))], [np.random.default_rng(0).random((4, 4))]))
    assert "no defect regions" in caplog.text
    fprs, pros = pro_curve([np.zeros((2, 2))], [np.zeros((2, 2))])
    assert fprs.size == 0 and pros.size == 0
    with pytest.raises(ValueError):
        au_pro([_one_region_4x4()], [np.zeros((4, 4))], fpr_limit=0.0)


def test_au_pro_invariant_to_monotone_rescaling_and_accepts_channel_axis() -> None:
    rng = np.random.default_rng(1)
    mask = np.zeros((12, 12), np.uint8)
    mask[2:5, 2:6] = 1
    mask[8:10, 9] = 1
    amap = rng.random((12, 12)) + mask
    base = au_pro([mask], [amap])
    assert au_pro([mask], [30 + 10 * amap]) == pytest.approx(base)
    assert au_pro([mask], [amap[None]]) == pytest.approx(base)


@pytest.mark.parametrize("seed", range(8))
def test_au_pro_matches_brute_force_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for shape in [(9, 11), (7, 7), (10, 6)]:
        m = ndimage.binary_dilation(rng.random(shape) > 0.93, iterations=int(rng.integers(0, 2)))
        masks.append(m.astype(np.uint8) * 255)
        # Coarse rounding creates many ties between and within regions and negatives.
        maps.append(np.round(rng.random(shape) + 0.4 * m, 1).astype(np.float32))
    masks.append(np.zeros((5, 5), np.uint8))  # a defect-free image
    maps.append(np.round(rng.random((5, 5)), 1).astype(np.float32))
    if not any(m.any() for m in masks):
        pytest.skip("no regions drawn")
    ref_x, ref_y = _reference_curve(masks, maps)
    fprs, pros = pro_curve(masks, maps)
    np.testing.assert_allclose(fprs[:-1], ref_x, atol=1e-12)
    np.testing.assert_allclose(pros[:-1], ref_y, atol=1e-12)
    for limit in (0.01, 0.05, 0.3, 1.0):
        assert au_pro(masks, maps, fpr_limit=limit) == pytest.approx(_reference_au_pro(masks, maps, limit), abs=1e-12)


def test_au_pro_accepts_generator_of_maps_and_float16() -> None:
    rng = np.random.default_rng(3)
    masks = [np.zeros((16, 16), np.uint8) for _ in range(2)]
    masks[0][4:8, 4:8] = 255
    maps = [rng.random((16, 16)).astype(np.float16) + (m > 0) for m in masks]
    expected = _reference_au_pro(masks, [a.astype(np.float32) for a in maps], 0.05)
    assert au_pro(masks, (a for a in maps)) == pytest.approx(expected, abs=1e-12)


def test_au_pro_large_maps_smoke() -> None:
    rng = np.random.default_rng(4)
    masks, maps = [], []
    for i in range(4):
        m = np.zeros((512, 512), np.uint8)
        m[100 + i : 140 + i, 200:260] = 255
        m[400:403, 10:12] = 255
        masks.append(m)
        maps.append((rng.random((512, 512), dtype=np.float32) + 0.8 * (m > 0)).astype(np.float32))
    result = au_pro_at_limits(masks, maps, (0.05, 0.3))
    full_x, full_y = pro_curve(masks, maps)
    assert result[0.05] == pytest.approx(trapezoid_auc(full_x, full_y, 0.05) / 0.05, abs=1e-12)
    assert result[0.3] == pytest.approx(trapezoid_auc(full_x, full_y, 0.3) / 0.3, abs=1e-12)
    assert 0.0 < result[0.05] < result[0.3] < 1.0


def test_trapezoid_auc_interpolation() -> None:
    x, y = [0.0, 0.0, 0.1, 1.0], [0.0, 0.2, 0.6, 1.0]
    assert trapezoid_auc(x, y) == pytest.approx(0.5 * (0.2 + 0.6) * 0.1 + 0.5 * (0.6 + 1.0) * 0.9)
    # y(0.05) = 0.4 -> area 0.5 * (0.2 + 0.4) * 0.05.
    assert trapezoid_auc(x, y, 0.05) == pytest.approx(0.015)
    assert trapezoid_auc(x, y, 0.1) == pytest.approx(0.04)


# ----------------------------------------------------------------------------------------------------------------------
# SegF1
# ----------------------------------------------------------------------------------------------------------------------


def test_seg_f1_hand_computed_counts() -> None:
    mask1 = np.array([[1, 1, 0], [0, 0, 0]], np.uint8) * 255
    map1 = np.array([[0.9, 0.2, 0.6], [0.1, 0.5, 0.0]], np.float32)
    # threshold 0.5 (>=): TP 1 (0.9), FN 1 (0.2), FP 2 (0.6, 0.5)
    mask2 = np.zeros((2, 2), np.uint8)
    map2 = np.array([[0.7, 0.0], [0.0, 0.0]], np.float32)  # FP 1 on a good image
    prf = seg_prf([mask1, mask2], [map1, map2], 0.5)
    assert (prf.tp, prf.fp, prf.fn) == (1, 3, 1)
    assert prf.precision == pytest.approx(1 / 4)
    assert prf.recall == pytest.approx(1 / 2)
    assert seg_f1([mask1, mask2], [map1, map2], 0.5) == pytest.approx(2 * 1 / (2 * 1 + 3 + 1))  # = 1/3


def test_seg_f1_degenerate_cases() -> None:
    assert math.isnan(seg_f1([np.zeros((2, 2))], [np.zeros((2, 2))], 0.5))
    assert seg_f1([np.ones((2, 2))], [np.ones((2, 2))], 0.5) == 1.0


# ----------------------------------------------------------------------------------------------------------------------
# Thresholds from normal data
# ----------------------------------------------------------------------------------------------------------------------


def test_mean_std_threshold_matches_numpy_and_streams() -> None:
    rng = np.random.default_rng(5)
    maps = [(30 + rng.standard_normal((64, 48))).astype(np.float32) for _ in range(5)]
    flat = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    thr, mean, std = mean_std_threshold(maps, k=3.0)
    assert mean == pytest.approx(flat.mean(), rel=1e-12)
    assert std == pytest.approx(flat.std(), rel=1e-10)
    assert thr == pytest.approx(flat.mean() + 3 * flat.std(), rel=1e-12)
    # Streaming (generator of maps) equals batch (one concatenated array).
    thr_gen = mean_std_threshold((m for m in maps), k=3.0)
    thr_batch = mean_std_threshold(flat, k=3.0)
    assert thr_gen == pytest.approx(thr_batch, rel=1e-12)
    assert mean_std_threshold(maps, k=2.0, ddof=1)[2] == pytest.approx(flat.std(ddof=1), rel=1e-10)


def test_mean_std_threshold_hand_computed_and_errors() -> None:
    thr, mean, std = mean_std_threshold([1.0, 2.0, 3.0, 4.0], k=3.0)
    assert (mean, std) == pytest.approx((2.5, math.sqrt(1.25)))
    assert thr == pytest.approx(2.5 + 3 * math.sqrt(1.25))
    assert mean_std_threshold([np.array([1.0, 2.0]), np.array([3.0, 4.0])])[0] == pytest.approx(thr)
    with pytest.raises(ValueError):
        mean_std_threshold([])
    with pytest.raises(ValueError):
        mean_std_threshold(np.array([1.0, np.nan]))


def test_percentile_threshold() -> None:
    assert percentile_threshold([np.array([0.0, 1.0]), np.array([2.0, 3.0, 4.0])], 50) == pytest.approx(2.0)
    assert percentile_threshold(np.arange(101, dtype=np.float32), 99) == pytest.approx(99.0)
    with pytest.raises(ValueError):
        percentile_threshold([1.0], 101)


def test_seg_prf_compares_the_threshold_exactly() -> None:
    v = np.float32(0.1)  # 0.100000001490116...: above the float64 0.1
    amap = np.array([[v, 0.0], [0.5, 0.05]], np.float32)
    mask = np.array([[1, 0], [0, 0]], np.uint8)
    assert seg_prf([mask], [amap], 0.1).tp == 1
    just_above = float(np.nextafter(np.float64(v), np.inf))  # rounds to v in float32, yet v < just_above
    assert bool((amap >= just_above)[0, 0])  # numpy's float32 comparison would count the pixel
    prf = seg_prf([mask], [amap], just_above)
    assert (prf.tp, prf.fp, prf.fn) == (0, 1, 1)
    half = np.array([[np.float16(0.1), 0.0], [0.0, 0.0]], np.float16)
    assert seg_prf([mask], [half], float(np.nextafter(np.float64(np.float16(0.1)), np.inf))).tp == 0


# ----------------------------------------------------------------------------------------------------------------------
# Streaming (native-resolution) accumulator
# ----------------------------------------------------------------------------------------------------------------------


def _random_case(seed: int, structured: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Small masks and maps: random noise, or smooth maps with plateaus, ties, 1-pixel and touching regions."""
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for i in range(int(rng.integers(3, 7))):
        shape = (int(rng.integers(8, 24)), int(rng.integers(8, 24)))
        if i == 0 or rng.random() < 0.6:
            m = ndimage.binary_dilation(rng.random(shape) > 0.95, iterations=int(rng.integers(0, 3)))
        else:
            m = np.zeros(shape, bool)  # a defect-free image
        if structured:
            base = ndimage.gaussian_filter(rng.random(shape), 1.5)
            a = np.round(base + rng.uniform(0.0, 0.3) * m, int(rng.integers(1, 4)))  # plateaus and ties
            a[rng.random(shape) < 0.05] = a.max()  # ties at the very top, negatives and positives alike
        else:
            a = rng.standard_normal(shape) + rng.uniform(0.0, 2.0) * m
        masks.append(m.astype(np.uint8) * 255)
        maps.append(a.astype(np.float32))
    if not any(m.any() for m in masks):
        masks[0][0, 0] = 255
    return masks, maps


def _coarse_grid(rng: np.random.Generator, maps: list[np.ndarray]) -> np.ndarray:
    """A random grid of 3-60 points, sometimes wider than the data, so the bound is exercised (not zero)."""
    lo = min(float(a.min()) for a in maps)
    hi = max(float(a.max()) for a in maps)
    span = hi - lo
    return np.sort(rng.uniform(lo - 0.1 * span, hi + 0.1 * span, int(rng.integers(3, 60))))


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("seed", range(40))
def test_streaming_error_bounds_hold_against_exact(seed: int, structured: bool) -> None:
    masks, maps = _random_case(seed, structured)
    grid = _coarse_grid(np.random.default_rng(1000 + seed), maps)
    acc = StreamingPixelMetrics(grid, fpr_limits=(0.01, 0.05, 0.3, 1.0))
    acc.update(masks, maps)
    result = acc.result()
    exact_pro = au_pro_at_limits(masks, maps, (0.01, 0.05, 0.3, 1.0))
    for limit, expected in exact_pro.items():
        assert abs(result.au_pro[limit] - expected) <= result.au_pro_bound[limit] + 1e-12, limit
        assert result.au_pro_bound[limit] <= 0.5 / limit + 1e-12  # never more than half the box of the whole range
    assert abs(result.pixel_auroc - pixel_auroc(masks, maps)) <= result.pixel_auroc_bound + 1e-12
    assert result.pixel_auroc_bound <= 0.5


def test_streaming_bounds_are_not_vacuous() -> None:
    """On coarse grids the streaming values do differ from the exact ones (so the bound test above bites), and the
    bounds shrink as the grid gets finer."""
    errors, bounds = [], {}
    for seed in range(10):
        masks, maps = _random_case(seed, structured=False)
        grid = _coarse_grid(np.random.default_rng(seed), maps)
        acc = StreamingPixelMetrics(grid)
        acc.update(masks, maps)
        errors.append(abs(acc.au_pro(0.3)[0] - au_pro(masks, maps, 0.3)))
    assert max(errors) > 1e-3
    masks, maps = _random_case(3, structured=False)
    sampler = ScoreSampler()
    for a in maps:
        sampler.add(a)
    for n in (16, 256, 4096):
        acc = StreamingPixelMetrics(score_grid(sampler, n_tail=n, n_log=n // 4, n_body=n // 4, n_uniform=n // 4))
        acc.update(masks, maps)
        bounds[n] = acc.result().max_bound
    assert bounds[16] > bounds[256] > bounds[4096]


@pytest.mark.parametrize("seed", range(6))
def test_streaming_is_exact_when_every_score_is_a_grid_point(seed: int) -> None:
    masks, maps = _random_case(seed, structured=True)
    values = np.unique(np.concatenate([a.ravel() for a in maps]))
    # The values themselves, and a superset: every float32 multiple of 0.001 (the maps are float32 values rounded to
    # at most 3 decimals; a float64 0.7 would *not* do, since float32(0.7) < 0.7 is then no grid point).
    superset = np.linspace(-1.0, 3.0, 4001).astype(np.float32).astype(np.float64)
    assert np.all(np.isin(values.astype(np.float64), superset))
    for grid in (values.astype(np.float64), superset):
        acc = StreamingPixelMetrics(grid, fpr_limits=(0.05, 0.3, 1.0))
        acc.update(masks, maps)
        result = acc.result()
        assert result.pixel_auroc_bound == 0.0
        assert result.pixel_auroc == pytest.approx(pixel_auroc(masks, maps), abs=1e-12)
        for limit, expected in au_pro_at_limits(masks, maps, (0.05, 0.3, 1.0)).items():
            assert result.au_pro_bound[limit] == 0.0
            assert result.au_pro[limit] == pytest.approx(expected, abs=1e-12)
        # The same polyline: both curves with repeated points (up to summation rounding) removed.
        curves = []
        for x, y in (acc.pro_curve(), pro_curve(masks, maps)):
            keep = np.ones(x.size, bool)
            keep[1:] = (np.abs(np.diff(x)) > 1e-12) | (np.abs(np.diff(y)) > 1e-12)
            curves.append((x[keep], y[keep]))
        np.testing.assert_allclose(curves[0][0], curves[1][0], atol=1e-12)
        np.testing.assert_allclose(curves[0][1], curves[1][1], atol=1e-12)


def test_float16_maps_on_the_float16_grid_are_exact() -> None:
    rng = np.random.default_rng(7)
    masks = [np.zeros((20, 30), np.uint8) for _ in range(3)]
    masks[0][3:7, 4:9] = 255
    masks[1][15, 2] = 255
    maps = [(30 + 5 * rng.random((20, 30)) + 2 * (m > 0)).astype(np.float16) for m in masks]
    grid = float16_grid(20.0, 50.0)
    assert np.all(np.diff(grid) > 0) and grid[0] == 20.0 and grid[-1] == 50.0
    assert np.all(np.isin(np.concatenate([a.ravel() for a in maps]).astype(np.float64), grid))
    assert float16_grid().size == 63_487  # every finite float16 (+0 and -0 are one value)
    acc = StreamingPixelMetrics(grid)
    acc.update(masks, maps)
    result = acc.result()
    assert result.max_bound == 0.0
    assert result.pixel_auroc == pytest.approx(pixel_auroc(masks, maps), abs=1e-12)
    assert result.au_pro[0.05] == pytest.approx(au_pro(masks, maps, 0.05), abs=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.uint8])
def test_streaming_seg_prf_equals_exact(dtype: type) -> None:
    rng = np.random.default_rng(11)
    masks = [(ndimage.binary_dilation(rng.random((16, 16)) > 0.95)).astype(np.uint8) for _ in range(4)]
    scale = 100.0 if dtype == np.uint8 else 1.0
    maps = [(scale * (rng.random((16, 16)) + 0.5 * m)).astype(dtype) for m in masks]
    data_value = float(maps[0][5, 5])
    thresholds = [data_value, float(np.nextafter(np.float64(data_value), np.inf)), 0.7 * scale, -1.0, 1e9]
    acc = StreamingPixelMetrics(np.linspace(0, 1.5 * scale, 7), thresholds=thresholds)
    acc.update(masks, maps)
    result = acc.result()
    for t in thresholds:
        expected = seg_prf(masks, maps, t)
        got = acc.seg_prf(t)
        assert (got.tp, got.fp, got.fn) == (expected.tp, expected.fp, expected.fn), t
        brute_tp = sum(int(((a.astype(np.float64) >= t) & (m > 0)).sum()) for a, m in zip(maps, masks, strict=True))
        assert got.tp == brute_tp
        assert result.seg[t] == got
    with pytest.raises(ValueError, match="not on the score grid"):
        acc.seg_prf(0.123456)


def test_streaming_memory_does_not_grow_with_images() -> None:
    rng = np.random.default_rng(5)
    acc = StreamingPixelMetrics(np.linspace(0.0, 1.0, 257), thresholds=[0.9])
    shapes = [a.shape for a in acc._state()]
    nbytes = acc.nbytes
    masks, maps = [], []
    for i in range(1000):
        mask = np.zeros((12, 10), bool)
        if i % 3 == 0:
            mask[2:5, 3:6] = True
        masks.append(mask)
        maps.append(rng.random((12, 10), dtype=np.float32) + np.float32(0.3) * mask)
        acc.add(masks[-1], maps[-1])
    assert acc.n_images == 1000
    assert [a.shape for a in acc._state()] == shapes
    assert acc.nbytes == nbytes
    result = acc.result()
    assert result.n_regions == 334 and result.n_negative + result.n_positive == 1000 * 120
    assert abs(result.au_pro[0.3] - au_pro(masks, maps, 0.3)) <= result.au_pro_bound[0.3] + 1e-12
    assert result.seg[0.9] == seg_prf(masks, maps, 0.9)


def test_streaming_accumulators_merge_exactly() -> None:
    masks, maps = _random_case(21, structured=True)
    grid = score_grid(np.concatenate([a.ravel() for a in maps]), thresholds=[0.5], n_tail=64, n_log=8, n_body=16)
    whole = StreamingPixelMetrics(grid, thresholds=[0.5])
    whole.update(masks, maps)
    parts = [whole.empty_like(), whole.empty_like()]
    for i, (m, a) in enumerate(zip(masks, maps, strict=True)):
        parts[i % 2].add(m, a)
    merged = StreamingPixelMetrics.merged(parts)
    (n1, p1, w1, lo1, hi1), (n2, p2, w2, lo2, hi2) = whole._state(), merged._state()
    for x, y in ((n1, n2), (p1, p2), (lo1, lo2), (hi1, hi2)):
        np.testing.assert_array_equal(x, y)  # counts and per-bin extremes: identical
    np.testing.assert_allclose(w1, w2, rtol=1e-14)  # region weights: equal up to the order of float summation
    parts[0] += parts[1]
    for other in (merged.result(), parts[0].result()):
        expected = whole.result()
        assert other.seg == expected.seg and other.n_regions == expected.n_regions
        assert other.pixel_auroc == expected.pixel_auroc
        for limit in (0.05, 0.3):
            assert other.au_pro[limit] == pytest.approx(expected.au_pro[limit], abs=1e-14)
            assert other.au_pro_bound[limit] == pytest.approx(expected.au_pro_bound[limit], abs=1e-14)
    with pytest.raises(ValueError, match="different score grids"):
        whole.merge(StreamingPixelMetrics(grid[:-1], thresholds=[0.5]))
    with pytest.raises(ValueError, match="thresholds"):
        whole.merge(StreamingPixelMetrics(grid))


def test_streaming_degenerate_cases_are_nan(caplog: pytest.LogCaptureFixture) -> None:
    grid = np.linspace(0, 1, 11)
    with caplog.at_level(logging.WARNING, logger="madfh_pipeline.metrics"):
        good_only = StreamingPixelMetrics(grid)
        good_only.add(np.zeros((4, 4)), np.random.default_rng(0).random((4, 4)))
        result = good_only.result()
    assert math.isnan(result.au_pro[0.05]) and math.isnan(result.au_pro_bound[0.3])
    assert math.isnan(result.pixel_auroc) and math.isnan(result.max_bound)
    assert "no defect regions" in caplog.text and "pixel AUROC is undefined" in caplog.text
    defects_only = StreamingPixelMetrics(grid)
    defects_only.add(np.ones((3, 3)), np.ones((3, 3)))
    assert math.isnan(defects_only.au_pro(0.05)[0]) and math.isnan(defects_only.pixel_auroc()[0])
    assert math.isnan(StreamingPixelMetrics(grid).result().pixel_auroc)
    fprs, pros = good_only.pro_curve()
    assert fprs.size == 0 and pros.size == 0
    with pytest.raises(ValueError):
        StreamingPixelMetrics(grid, thresholds=[math.nan])
    with pytest.raises(ValueError):
        StreamingPixelMetrics([])
    with pytest.raises(ValueError):
        StreamingPixelMetrics(grid, fpr_limits=(0.0,))
    with pytest.raises(MaskError, match="b.png"):
        good_only.add(np.zeros((3, 3)), np.zeros((4, 4)), name="b.png")
    with pytest.raises(MaskError, match="missing"):
        good_only.add(None, np.zeros((4, 4)))


def test_streaming_driver_groups_and_refines() -> None:
    rng = np.random.default_rng(9)
    items = []
    for i in range(9):
        m = np.zeros((24, 24), bool)
        if i % 3:
            m[rng.integers(0, 18) :, rng.integers(0, 18) :][:4, :5] = True
        a = (ndimage.gaussian_filter(rng.random((24, 24)), 1.0) + 0.2 * m).astype(np.float32)
        items.append((("regular", "overexposed", None)[i % 3], f"img{i}.png", m, a))
    masks = [it[2] for it in items]
    maps = [it[3] for it in items]
    calls = []

    def pairs() -> list[tuple[str | None, str, np.ndarray, np.ndarray]]:
        calls.append(1)
        return items

    coarse = np.linspace(0.0, 1.0, 9)
    one_pass = streaming_pixel_metrics(pairs, coarse, thresholds=[0.6], tolerance=None)
    assert set(one_pass) == {"all", "regular", "overexposed"} and len(calls) == 1
    assert one_pass["all"].n_images == 9 and one_pass["regular"].n_images == 3
    single = StreamingPixelMetrics(coarse, thresholds=[0.6])
    single.update(masks[0::3], maps[0::3])
    assert one_pass["regular"] == single.result()
    assert one_pass["all"].max_bound > 1e-3

    refined = streaming_pixel_metrics(pairs, coarse, thresholds=[0.6], tolerance=1e-3, max_passes=3)
    assert refined["all"].passes >= 2 and len(calls) == 1 + refined["all"].passes
    assert refined["all"].max_bound < one_pass["all"].max_bound
    exact = au_pro_at_limits(masks, maps, (0.05, 0.3))
    for limit, expected in exact.items():
        assert abs(refined["all"].au_pro[limit] - expected) <= refined["all"].au_pro_bound[limit] + 1e-12
    assert refined["all"].seg[0.6] == seg_prf(masks, maps, 0.6)
    with pytest.raises(ValueError, match="collides"):
        streaming_pixel_metrics(lambda: [("all", "x", masks[0], maps[0])], coarse)


def test_refined_grid_only_when_needed_and_targets_the_worst_bins() -> None:
    rng = np.random.default_rng(4)
    masks = [ndimage.binary_dilation(rng.random((30, 30)) > 0.97) for _ in range(6)]
    maps = [(rng.standard_normal((30, 30)) + 1.5 * m).astype(np.float32) for m in masks]
    acc = StreamingPixelMetrics(np.linspace(-4, 6, 6), fpr_limits=(0.05,))
    acc.update(masks, maps)
    coarse = acc.result()
    assert coarse.au_pro_bound[0.05] > 0.1 and coarse.pixel_auroc_bound > 0.1
    assert acc.refined_grid(1.0) is None
    finer = acc.refined_grid(1e-3)
    assert finer is not None and np.all(np.isin(acc.edges, finer))
    again = StreamingPixelMetrics(finer, fpr_limits=(0.05,))
    again.update(masks, maps)
    # One refinement suffices here, which needs the splits in the bins that carry each bound (the top tail for
    # AU-PRO@0.05, the overlap of the classes for AUROC); splitting elsewhere leaves the AU-PRO bound near 3e-3.
    assert again.result().max_bound <= 1e-3
    assert abs(again.result().au_pro[0.05] - au_pro(masks, maps, 0.05)) <= again.result().au_pro_bound[0.05] + 1e-12


def test_score_sampler_is_bounded_uniform_and_exact_at_the_extremes() -> None:
    rng = np.random.default_rng(2)
    chunks = [rng.standard_normal((50, 40)) + i for i in range(30)]
    sampler = ScoreSampler(max_values=5_000, seed=1)
    for c in chunks:
        sampler.add(c.astype(np.float32))
    flat = np.concatenate([c.astype(np.float32).ravel() for c in chunks]).astype(np.float64)
    sample = sampler.values()
    assert sample.size == 5_000 and sampler.count == flat.size
    assert (sampler.low, sampler.high) == (flat.min(), flat.max())
    assert np.all(np.isin(sample, flat))
    assert abs(sample.mean() - flat.mean()) < 0.3  # the late (high) chunks are not favoured
    again = ScoreSampler(max_values=5_000, seed=1)
    for c in chunks:
        again.add(c.astype(np.float32))
    np.testing.assert_array_equal(np.sort(again.values()), np.sort(sample))
    with pytest.raises(ValueError):
        sampler.add(np.array([np.nan]))


def test_score_grid_is_dense_in_the_top_tail() -> None:
    sample = np.random.default_rng(3).standard_normal(200_000)
    grid = score_grid(sample, thresholds=[1.2345], n_tail=1000, n_log=100, n_body=100, n_uniform=100)
    assert np.all(np.diff(grid) > 0)
    assert 1.2345 in grid and grid[0] == sample.min() and grid[-1] == sample.max()
    ordered = np.sort(sample)
    fpr_at = 1.0 - np.searchsorted(ordered, grid, side="left") / sample.size  # share of the sample >= each point
    gaps = np.diff(fpr_at[::-1])
    in_tail = fpr_at[::-1][1:] <= 0.3
    assert gaps[in_tail].max() <= 1.05 * 0.35 / 1000 + 1e-5  # cells of tail_fraction / n_tail of the sample
    with pytest.raises(ValueError):
        score_grid(np.empty(0))


def test_streaming_result_as_metrics_uses_report_names() -> None:
    mask = _one_region_4x4()
    amap = (mask > 0).astype(np.float32)
    acc = StreamingPixelMetrics([0.0, 0.5, 1.0], thresholds=[0.5])
    acc.add(mask, amap)
    flat = acc.result().as_metrics()
    assert flat["au_pro_005"] == pytest.approx(1.0) and flat["au_pro_03"] == pytest.approx(1.0)
    assert flat["pixel_auroc"] == 1.0 and flat["seg_f1"] == 1.0 and flat["au_pro_005_bound"] == 0.0
    assert limit_key(0.05) == "au_pro_005" and limit_key(0.3) == "au_pro_03" and limit_key(1.0) == "au_pro_1"
