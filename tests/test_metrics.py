"""Tests for madfh_pipeline.metrics with hand-computed expected values and a brute-force PRO reference."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from madfh_pipeline.metrics import (
    MaskError,
    au_pro,
    au_pro_at_limits,
    class_f1,
    class_prf,
    image_aupr,
    image_auroc,
    mean_std_threshold,
    percentile_threshold,
    pixel_auroc,
    pro_curve,
    seg_f1,
    seg_prf,
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
