"""Training pairs: the overview + zoom composite, the hashed split and the knowledge-base hook."""

from __future__ import annotations

import numpy as np
import pytest

from madfh_pipeline.explain.dataset import (
    OUTLINE_RGB,
    ZOOM_RGB,
    OperatorDescription,
    SplitLeakError,
    TrainingPair,
    assign_split,
    build_training_pair,
    check_disjoint,
    compose_input,
    mvtec_group_key,
    operator_training_pairs,
    split_fraction,
    split_pairs,
    zoom_window,
)


def colour_pixels(image: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.all(image == np.array(rgb, np.uint8), axis=2)


def test_no_defect_shows_the_whole_image_twice() -> None:
    gray = np.tile(np.arange(200, dtype=np.uint8)[None, :], (100, 1))  # 200 x 100, a horizontal ramp
    composite = compose_input(gray, None, 64)
    assert composite.shape == (64, 64, 3)
    assert composite.dtype == np.uint8
    np.testing.assert_array_equal(composite[:32], composite[32:])  # zoom window = whole image
    assert not colour_pixels(composite, OUTLINE_RGB).any()
    # Letterboxed 2:1 into 64 x 32: no bars, the ramp rises left to right, gray → equal channels.
    assert composite[16, 2, 0] < composite[16, 61, 0]
    assert np.array_equal(composite[..., 0], composite[..., 1])


def test_outline_and_zoom_box_mark_the_defect() -> None:
    image = np.full((400, 800, 3), 100, np.uint8)
    mask = np.zeros((200, 400), np.uint8)  # canvas-size mask: half the image's resolution
    mask[20:30, 40:60] = 1  # native (40..60, 80..120): upper left
    image[40:60, 80:120] = 20
    composite = compose_input(image, mask, 128, context=1.0, min_zoom_fraction=0.1)
    top, zoom = composite[:64], composite[64:]
    ys, xs = np.nonzero(colour_pixels(top, OUTLINE_RGB))
    # The overview is 800x400 → 128x64 (scale 0.16): the defect box is x 12.8..19.2, y 6.4..9.6.
    assert 12 <= xs.min() and xs.max() <= 20 and 6 <= ys.min() and ys.max() <= 10
    box_ys, box_xs = np.nonzero(colour_pixels(top, ZOOM_RGB))
    assert box_xs.min() < xs.min() and box_xs.max() > xs.max()  # the zoom window surrounds the defect
    # The zoom shows the dark defect large, outlined, with untouched interior pixels.
    zoom_outline = colour_pixels(zoom, OUTLINE_RGB)
    assert zoom_outline.sum() > colour_pixels(top, OUTLINE_RGB).sum()
    dark = np.all(zoom < 40, axis=2)
    assert dark.sum() > 40
    zy, zx = np.nonzero(zoom_outline)
    dy, dx = np.nonzero(dark)
    assert zy.min() <= dy.min() and dy.max() <= zy.max() and zx.min() <= dx.min() and dx.max() <= zx.max()


def test_zoom_window_context_aspect_floor_and_borders() -> None:
    mask = np.zeros((100, 200), bool)
    mask[40:50, 90:110] = True  # 20 x 10 box
    assert zoom_window(mask, (100, 200), aspect=2.0, context=1.0, min_fraction=0.0) == (70, 30, 130, 60)
    # A 1-px defect: the window is at least 50 % of the shorter side (50 px high), widened to the 2:1 aspect.
    speck = np.zeros((100, 200), bool)
    speck[50, 100] = True
    x0, y0, x1, y1 = zoom_window(speck, (100, 200), aspect=2.0, context=1.0, min_fraction=0.5)
    assert (x1 - x0, y1 - y0) == (100, 50)
    # In a corner the window is shifted inside the image, not cut.
    corner = np.zeros((100, 200), bool)
    corner[0:4, 0:8] = True
    assert zoom_window(corner, (100, 200), aspect=2.0, context=1.0, min_fraction=0.0) == (0, 0, 24, 12)
    assert zoom_window(None, (100, 200), 2.0, 1.0, 0.1) == (0, 0, 200, 100)


def test_pair_validation() -> None:
    image = np.zeros((20, 20), np.uint8)
    pair = build_training_pair("a/001_regular.png", image, None, "  The image looks normal. ", size=16)
    assert (pair.text, pair.group, pair.source, pair.image.shape) == (
        "The image looks normal.",
        "a/001_regular.png",
        "grounded",
        (16, 16, 3),
    )
    with pytest.raises(ValueError, match="Empty description"):
        build_training_pair("x", image, None, " ")
    with pytest.raises(ValueError, match="uint8"):
        compose_input(image.astype(np.float32), None, 16)


def test_mvtec_group_key_keeps_lighting_variants_together() -> None:
    assert mvtec_group_key("wallplugs/test_public/bad/003_overexposed.png") == "wallplugs/test_public/bad/003"
    assert mvtec_group_key("wallplugs/test_public/bad/003_shift_2.png") == "wallplugs/test_public/bad/003"
    assert mvtec_group_key("wallplugs/test_public/good/003_regular.png") == "wallplugs/test_public/good/003"
    assert mvtec_group_key("cell_0042") == "cell_0042"


def pairs_for(groups: list[str]) -> list[TrainingPair]:
    image = np.zeros((8, 8, 3), np.uint8)
    return [TrainingPair(f"{g}_{i}", image, "The image looks normal.", g) for i, g in enumerate(groups)]


def test_split_is_stable_proportional_and_group_wise() -> None:
    # Fixed values: a change of the hash would silently move past evaluation images into training.
    assert split_fraction("wallplugs/test_public/bad/003") == pytest.approx(0.9398297487535168)
    assert [assign_split(f"part_{i}", 0.2) for i in range(4)] == ["train", "eval", "eval", "train"]
    keys = [f"part_{i}" for i in range(2000)]
    share = np.mean([assign_split(k, 0.2) == "eval" for k in keys])
    assert 0.17 < share < 0.23
    assert [assign_split(k, 0.2) for k in keys] == [assign_split(k, 0.2) for k in keys]
    assert {assign_split(k, 0.0) for k in keys} == {"train"}
    assert {assign_split(k, 1.0) for k in keys} == {"eval"}
    assert [assign_split(k, 0.2, salt="other") for k in keys] != [assign_split(k, 0.2) for k in keys]

    groups = [f"g{i // 3}" for i in range(300)]  # 100 groups of 3 pairs
    train, evaluation = split_pairs(pairs_for(groups), eval_fraction=0.3)
    assert len(train) + len(evaluation) == 300
    assert evaluation and train
    check_disjoint(train, evaluation)  # no group on both sides
    with pytest.raises(SplitLeakError, match="g0"):
        check_disjoint(pairs_for(["g0", "g1"]), pairs_for(["g0"]))
    with pytest.raises(ValueError, match="eval_fraction"):
        assign_split("x", 1.5)


def test_operator_descriptions_become_pairs_like_grounded_ones() -> None:
    images = {"wallplugs/test_public/bad/007_regular.png": np.full((40, 60), 90, np.uint8)}
    mask = np.zeros((40, 60), np.uint8)
    mask[5:10, 5:10] = 1
    records = [
        OperatorDescription(
            "wallplugs/test_public/bad/007_regular.png", "Burr on the left rim.", mask=mask, confidence=5, author="kim"
        ),
        {"image": "wallplugs/test_public/bad/007_regular.png", "description": "maybe dust", "confidence": 1},
        {"image_id": "wallplugs/test_public/bad/007_regular.png", "text": "Crack near the top."},
    ]
    pairs = operator_training_pairs(records, images.__getitem__, size=32, min_confidence=3, group_key=mvtec_group_key)
    assert [p.text for p in pairs] == ["Burr on the left rim.", "Crack near the top."]
    assert {p.source for p in pairs} == {"operator"}
    assert {p.group for p in pairs} == {"wallplugs/test_public/bad/007"}
    assert colour_pixels(pairs[0].image, OUTLINE_RGB).any() and not colour_pixels(pairs[1].image, OUTLINE_RGB).any()
    with pytest.raises(ValueError, match="image id and a description"):
        OperatorDescription.from_record({"image": "x"})
