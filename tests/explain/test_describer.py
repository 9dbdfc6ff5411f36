"""The grounded describer: exact wording for synthetic masks, and the parser reads every fact back."""

from __future__ import annotations

import re

import numpy as np
import pytest

from madfh_pipeline.explain.describer import (
    LOCATIONS,
    NORMAL_TEXT,
    SIZES,
    VOCABULARY,
    DescriberSettings,
    ParsedRegion,
    canonical_text,
    describe,
    format_number,
    parse_description,
)

H, W = 100, 200


def flat(value: int = 120) -> np.ndarray:
    return np.full((H, W), value, np.uint8)


def test_normal_image_and_score_sentence() -> None:
    assert describe(None, flat()).text == NORMAL_TEXT
    assert describe(np.zeros((H, W), np.uint8)).text == "The image looks normal."
    assert (
        describe(None, flat(), score=0.2, threshold=0.5).text
        == "The image looks normal. Anomaly score 0.2 is not above the threshold 0.5."
    )
    assert describe(None, flat(), score=34.56789).text == "The image looks normal. Anomaly score 34.57."
    with pytest.raises(ValueError, match="mask or an image"):
        describe(None)


def test_an_unthresholded_anomaly_map_is_refused() -> None:
    anomaly_map = np.random.default_rng(0).random((H, W)).astype(np.float32)
    with pytest.raises(ValueError, match="Threshold it first"):
        describe(anomaly_map)
    assert len(describe((anomaly_map > 0.999).astype(np.float32)).regions) > 0  # a thresholded float map is fine


def test_one_dark_elongated_region_near_the_upper_left_edge() -> None:
    mask = np.zeros((H, W), np.uint8)
    mask[2:6, 5:45] = 255  # 4 x 40 px = 160 px = 0.8 % of 20,000
    image = flat()
    image[mask > 0] = 60
    result = describe(mask, image)
    assert result.text == (
        "1 defect region. Region 1: a small elongated defect in the upper left, near the edge, covering 0.80% of the "
        "image (160 px), darker than its surroundings."
    )
    (region,) = result.regions
    assert region["bbox"] == (5, 2, 45, 6)
    assert region["centroid"] == pytest.approx((25 / W, 4 / H))
    assert region["elongation"] == pytest.approx(10.0)
    assert (region["mean_inside"], region["mean_surround"]) == (60.0, 120.0)


def test_two_regions_largest_first_with_native_scale_and_contrast() -> None:
    mask = np.zeros((H, W), np.uint8)
    mask[45:55, 95:105] = 1  # 100 px compact, centre, bright
    mask[80:90, 150:152] = 1  # 20 px elongated, lower right, same gray
    image = flat()
    image[45:55, 95:105] = 200
    result = describe(mask, image, native_scale=(2.0, 3.0))
    assert result.text == (
        "2 defect regions. "
        "Region 1: a small compact defect in the centre, covering 0.50% of the image (600 px), brighter than its "
        "surroundings. "
        "Region 2: a small elongated defect in the lower right, covering 0.10% of the image (120 px), similar in "
        "brightness to its surroundings."
    )
    assert [r["area_px"] for r in result.regions] == [100, 20]
    assert [r["area_native_px"] for r in result.regions] == [600, 120]


def test_scattered_regions_are_counted_beyond_max_regions_and_specks_ignored() -> None:
    mask = np.zeros((H, W), np.uint8)
    for i, x in enumerate((20, 90, 130, 150, 180)):
        mask[40 : 40 + 5 - i, x : x + 5] = 1  # areas 25, 20, 15, 10, 5 px
    mask[95, 2] = 1  # a 1-px speck
    result = describe(mask, settings={"min_region_px": 2, "max_regions": 2})
    assert result.ignored_regions == 1
    assert len(result.regions) == 5
    assert result.text == (
        "5 scattered defect regions. "
        # 25 px = 0.125 % (printed to 2 decimals, half-to-even) is above the 0.1 % "tiny" bin; 20 px = 0.1 % sits on it.
        "Region 1: a small compact defect in the middle left, covering 0.12% of the image (25 px). "
        "Region 2: a small compact defect in the centre, covering 0.10% of the image (20 px). "
        "3 more smaller regions."
    )


def test_share_of_the_object_and_size_classes() -> None:
    obj = np.zeros((H, W), bool)
    obj[:, :100] = True  # the object is the left half: 10,000 px
    mask = np.zeros((H, W), np.uint8)
    mask[30:70, 30:70] = 1  # 1,600 px = 16 % of the object
    mask[10:20, 150:160] = 1  # outside the object: not a defect of it
    result = describe(mask, object_mask=obj)
    assert result.reference == "object"
    assert result.text == (
        "1 defect region. Region 1: a large compact defect in the middle left, covering 16% of the object (1600 px)."
    )
    shares = [0.0005, 0.005, 0.02, 0.1, 0.5]
    settings = DescriberSettings()
    for share, size in zip(shares, SIZES, strict=True):
        side = round(np.sqrt(share * H * W))
        m = np.zeros((H, W), np.uint8)
        m[:side, :side] = 1
        assert describe(m, settings=settings).regions[0]["size"] == size


def test_ring_is_irregular_and_canvas_mask_meets_native_image() -> None:
    canvas = np.zeros((50, 100), np.uint8)
    yy, xx = np.mgrid[0:50, 0:100]
    radius = np.hypot(yy - 25, xx - 50)
    canvas[(radius >= 10) & (radius < 13)] = 1  # a thin ring: compact by its axes, hollow by its solidity
    image = flat()  # native image at twice the canvas size
    image[cv2_resize_nearest(canvas, W, H) > 0] = 10
    result = describe(canvas, image, native_scale=2.0)
    (region,) = result.regions
    assert region["shape"] == "irregular"
    assert region["contrast"] == "darker"
    assert region["area_native_px"] == 4 * region["area_px"]
    assert "irregular defect in the centre" in result.text


def cv2_resize_nearest(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    import cv2

    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)


def test_every_location_cell_is_named() -> None:
    names = []
    for row in range(3):
        for col in range(3):
            mask = np.zeros((90, 90), np.uint8)
            mask[row * 30 + 12 : row * 30 + 18, col * 30 + 12 : col * 30 + 18] = 1
            names.append(describe(mask).regions[0]["location"])
    assert tuple(names) == LOCATIONS


def random_mask(rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    for _ in range(int(rng.integers(0, 6))):
        y, x = int(rng.integers(0, H - 5)), int(rng.integers(0, W - 5))
        h, w = int(rng.integers(1, 30)), int(rng.integers(1, 30))
        mask[y : y + h, x : x + w] = 1
    return mask


def test_parse_reads_back_every_stated_fact() -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        mask = random_mask(rng)
        image = rng.integers(0, 256, (H, W), dtype=np.uint8)
        result = describe(mask, image, settings={"max_regions": 3})
        parsed = parse_description(result.text)
        assert parsed is not None
        assert parsed.is_normal == result.is_normal
        assert parsed.count == len(result.regions)
        expected = tuple(
            ParsedRegion(r["location"], r["size"], r["shape"], r["contrast"], r["near_edge"])
            for r in result.regions[:3]
        )
        assert parsed.regions == expected
        # The text stays inside the fixed vocabulary (a word-level tokenizer over it has no unknown words).
        words = re.findall(r"[a-z]+", result.text.lower())
        assert set(words) <= VOCABULARY


def test_canonical_text_undoes_word_piece_spacing() -> None:
    text = describe(np.pad(np.ones((4, 40), np.uint8), ((2, H - 6), (5, W - 45)))).text
    assert canonical_text(text) == text.lower()
    decoded = "region 1 : a medium - sized defect in the centre , covering 0. 8 % of the image ( 1 2 3 px ) ."
    assert (
        canonical_text(decoded) == "region 1: a medium-sized defect in the centre, covering 0.8% of the image (123 px)."
    )
    assert parse_description(decoded).regions[0].size == "medium-sized"


def test_parse_is_lenient_but_refuses_free_text() -> None:
    garbled = "2 defect regions. region 1: a very large defect in the upper centre, covering 9x% of the image"
    parsed = parse_description(garbled)
    assert parsed is not None
    assert parsed.count == 2
    assert parsed.regions == (ParsedRegion("upper centre", "very large", None, None, False),)
    assert parse_description("a scratch on the left flank, operator says reject") is None


def test_settings_reject_unknown_keys_and_bad_bins() -> None:
    with pytest.raises(ValueError, match="contrast_treshold"):
        DescriberSettings.from_mapping({"contrast_treshold": 5})
    with pytest.raises(ValueError, match="increasing"):
        DescriberSettings(size_bins=(0.1, 0.01, 0.2, 0.3))


def test_format_number_never_uses_exponents() -> None:
    assert [format_number(x) for x in (0.000123, 0.5, 34.5678, 12345.6)] == ["0.000123", "0.5", "34.57", "12350"]
