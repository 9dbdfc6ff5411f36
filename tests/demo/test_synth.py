"""Tests of the synthetic MVTec AD 2 look-alike: layout, determinism, and that masks tell the truth about the pixels."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from madfh_pipeline.demo.synth import (
    DEFECT_KINDS,
    LIGHTING_TOKENS,
    SPLITS,
    SceneSpec,
    plan_dataset,
    render_defective,
    render_item,
    render_normal,
    render_pair,
)

STYLE_CATEGORIES = ["wallplugs", "sheet_metal", "walnuts", "fruit_jelly", "can", "vial"]  # 4 styles + generic RGB/grey
# The native facts come from the project's categories (conf/base/parameters.yml), the single source of them.
_CONF = Path(__file__).resolve().parents[2] / "conf" / "base" / "parameters.yml"
NATIVE_SPECS = {
    name: SceneSpec(name, entry["width"], entry["height"], entry["channels"])
    for name, entry in yaml.safe_load(_CONF.read_text())["categories"].items()
}
SMALL = {cat: NATIVE_SPECS[cat].scaled(0.12) for cat in STYLE_CATEGORIES}

TEST_PUBLIC_NAME = re.compile(r"^\d{3}_(regular|overexposed|underexposed|shift_[123])\.png$")


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _expected_shape(spec: SceneSpec) -> tuple[int, ...]:
    return (spec.height, spec.width) if spec.channels == 1 else (spec.height, spec.width, 3)


@pytest.mark.parametrize("category", STYLE_CATEGORIES)
def test_native_render_shapes_and_dtypes(category: str) -> None:
    spec = NATIVE_SPECS[category]
    image = render_normal(spec, _rng(0))
    assert image.dtype == np.uint8
    assert image.shape == _expected_shape(spec)
    defective, mask, kinds = render_defective(spec, _rng(1))
    assert defective.shape == image.shape and defective.dtype == np.uint8
    assert mask.shape == (spec.height, spec.width) and mask.dtype == np.uint8
    assert 1 <= len(kinds) <= 3 and set(kinds) <= set(DEFECT_KINDS)
    assert 10 < image.mean() < 245, "image should be neither black nor blown out"


def test_styles_follow_the_category_name() -> None:
    assert NATIVE_SPECS["sheet_metal"].style == "sheet_metal" and NATIVE_SPECS["rice"].style == "generic"


def test_user_category_uses_the_generic_style() -> None:
    spec = SceneSpec("my_widget", 300, 180, 1)
    assert spec.style == "generic"
    assert render_normal(spec, _rng(0)).shape == (180, 300)
    image, mask, _ = render_defective(SceneSpec("my_widget", 120, 90, 3), _rng(0))
    assert image.shape == (90, 120, 3) and mask.shape == (90, 120)


@pytest.mark.parametrize("bad", [dict(width=8), dict(channels=2), dict(category="a/b")])
def test_invalid_specs_are_refused(bad: dict) -> None:
    kwargs = dict(category="x", width=64, height=64, channels=3) | bad
    with pytest.raises(ValueError):
        SceneSpec(**kwargs)


@pytest.mark.parametrize("category", STYLE_CATEGORIES)
def test_same_seed_gives_identical_bytes(category: str) -> None:
    spec = SMALL[category]
    assert np.array_equal(render_normal(spec, _rng(7), "shift_3"), render_normal(spec, _rng(7), "shift_3"))
    a, b = render_defective(spec, _rng(7)), render_defective(spec, _rng(7))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


@pytest.mark.parametrize("category", STYLE_CATEGORIES)
def test_normal_images_vary_between_seeds(category: str) -> None:
    spec = SMALL[category]
    images = [render_normal(spec, _rng(seed)).astype(np.float32) for seed in range(3)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(images[i] - images[j]).mean() > 2.0


@pytest.mark.parametrize("category", STYLE_CATEGORIES)
def test_clean_scene_of_a_pair_is_the_normal_render(category: str) -> None:
    spec = SMALL[category]
    pair = render_pair(spec, _rng(3), "overexposed")
    assert np.array_equal(pair.clean, render_normal(spec, _rng(3), "overexposed"))


@pytest.mark.parametrize("category", STYLE_CATEGORIES)
def test_defects_change_exactly_the_masked_pixels(category: str) -> None:
    spec = SMALL[category]
    for seed in range(12):
        pair = render_pair(spec, _rng(seed))
        assert set(np.unique(pair.mask)) <= {0, 255}
        inside = pair.mask > 0
        assert inside.any(), f"empty mask for seed {seed}"
        diff = np.abs(pair.image.astype(np.int16) - pair.clean.astype(np.int16))
        if diff.ndim == 3:
            diff = diff.max(axis=2)
        assert (diff[inside] > 0).all(), f"{category} seed {seed} {pair.kinds}: masked pixels left unchanged"
        assert not diff[~inside].any(), f"{category} seed {seed} {pair.kinds}: pixels changed outside the mask"


@pytest.mark.parametrize("kind", DEFECT_KINDS)
@pytest.mark.parametrize("category", ["wallplugs", "sheet_metal", "walnuts", "fruit_jelly", "fabric"])
def test_every_kind_on_every_style(category: str, kind: str) -> None:
    spec = NATIVE_SPECS[category].scaled(0.25)
    pair = render_pair(spec, _rng(11), n_defects=1, kinds=(kind,), size_px=30.0)
    inside = pair.mask > 0
    assert inside.any() and pair.kinds in ([kind], ["contamination"])
    diff = np.abs(pair.image.astype(np.int16) - pair.clean.astype(np.int16))
    diff = diff.max(axis=2) if diff.ndim == 3 else diff
    assert (diff[inside] > 0).all() and not diff[~inside].any()


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_smallest_defects_are_a_few_pixels(kind: str) -> None:
    spec = NATIVE_SPECS["walnuts"].scaled(0.25)
    areas = [
        int((render_pair(spec, _rng(s), n_defects=1, kinds=(kind,), size_px=3.0).mask > 0).sum()) for s in range(4)
    ]
    assert all(0 < a <= 40 for a in areas), areas


def test_defect_size_spans_pixels_to_object_parts() -> None:
    spec = NATIVE_SPECS["wallplugs"].scaled(0.5)
    small = (render_pair(spec, _rng(0), n_defects=1, kinds=("discoloration",), size_px=4.0).mask > 0).sum()
    large = (render_pair(spec, _rng(0), n_defects=1, kinds=("discoloration",), size_px=80.0).mask > 0).sum()
    assert large > 20 * small
    smallest, largest = [], []
    for seed in range(25):
        mask = (render_defective(spec, _rng(seed))[1] > 0).astype(np.uint8)
        areas = cv2.connectedComponentsWithStats(mask, connectivity=8)[2][1:, cv2.CC_STAT_AREA]
        smallest.append(int(areas.min()))
        largest.append(int(areas.max()))
    # defects of a few pixels occur (as extra defects), and every defective image has one big enough to survive the
    # resize to the working resolution (a 2x downscale here)
    assert min(smallest) < 20, smallest
    assert min(largest) >= 100 and max(largest) > 1500, largest


def test_defects_do_not_show_in_global_brightness() -> None:
    """A detector that only looks at the image mean must not separate good from bad."""
    spec = SMALL["walnuts"]
    normal_means = [render_normal(spec, _rng(100 + s)).mean() for s in range(12)]
    shifts = []
    for seed in range(12):
        pair = render_pair(spec, _rng(seed))
        shifts.append(abs(float(pair.image.mean()) - float(pair.clean.mean())))
    assert np.median(shifts) < np.std(normal_means)


@pytest.mark.parametrize("category", STYLE_CATEGORIES)
def test_lighting_variants_differ_from_regular(category: str) -> None:
    spec = SMALL[category]
    regular = render_normal(spec, _rng(5)).astype(np.float32)
    for token in LIGHTING_TOKENS[1:]:
        other = render_normal(spec, _rng(5), token).astype(np.float32)
        assert other.shape == regular.shape
        assert np.abs(other - regular).mean() > 2.0, token  # mild by design: the demo must stay learnable
    assert render_normal(spec, _rng(5), "mixed").shape == regular.shape


def test_unknown_lighting_and_kind_are_refused() -> None:
    spec = SMALL["can"]
    with pytest.raises(ValueError):
        render_normal(spec, _rng(0), "sunny")
    with pytest.raises(ValueError):
        render_pair(spec, _rng(0), kinds=("rust",))


COUNTS = {
    "train": 5,
    "validation": 3,
    "test_public_good": 8,
    "test_public_bad": 12,
    "test_private": 6,
    "test_private_mixed": 6,
}


def test_plan_follows_the_official_layout() -> None:
    items = plan_dataset(SMALL["wallplugs"], COUNTS, seed=42)
    per_split = Counter(item.split for item in items)
    assert per_split == Counter(COUNTS)
    for item in items:
        folder, name = item.image_path.rsplit("/", 1)
        if item.split in ("train", "validation"):
            assert folder == f"{item.split}/good" and re.fullmatch(r"\d{3}_regular\.png", name)
            assert item.kind == "normal" and item.mask_path is None
        elif item.split == "test_public_good":
            assert folder == "test_public/good" and TEST_PUBLIC_NAME.match(name)
            assert item.kind == "normal" and item.mask_path is None
        elif item.split == "test_public_bad":
            assert folder == "test_public/bad" and TEST_PUBLIC_NAME.match(name)
            assert item.kind == "defective"
            assert item.mask_path == f"test_public/ground_truth/bad/{name[:-4]}_mask.png"
            assert item.render_lighting == item.lighting == name[4:-4]
        elif item.split == "test_private":
            assert folder == "test_private" and re.fullmatch(r"\d{3}_regular\.png", name)
            assert item.mask_path is None and item.render_lighting == "regular"
        else:
            assert folder == "test_private_mixed" and re.fullmatch(r"\d{3}_mixed\.png", name)
            assert item.mask_path is None and item.render_lighting in LIGHTING_TOKENS
    paths = [item.image_path for item in items]
    assert len(set(paths)) == len(paths)
    assert len({item.seed for item in items}) == len(items)
    bad_tokens = Counter(item.lighting for item in items if item.split == "test_public_bad")
    assert set(bad_tokens) == set(LIGHTING_TOKENS) and max(bad_tokens.values()) - min(bad_tokens.values()) <= 1


def test_plan_is_deterministic_and_validates_counts() -> None:
    spec = SMALL["walnuts"]
    assert plan_dataset(spec, COUNTS, seed=1) == plan_dataset(spec, COUNTS, seed=1)
    assert plan_dataset(spec, COUNTS, seed=1) != plan_dataset(spec, COUNTS, seed=2)
    assert plan_dataset(spec, {"train": 2}, seed=1)[0] == plan_dataset(spec, COUNTS, seed=1)[0]
    assert set(SPLITS) == set(COUNTS)
    with pytest.raises(ValueError):
        plan_dataset(spec, {"training": 3}, seed=1)


def test_render_item_is_order_independent_and_writes_masks() -> None:
    spec = SMALL["fruit_jelly"]
    items = plan_dataset(spec, {"train": 2, "test_public_bad": 3, "test_private_mixed": 2}, seed=9)
    forward = [render_item(spec, item) for item in items]
    backward = [render_item(spec, item) for item in reversed(items)][::-1]
    for item, a, b in zip(items, forward, backward, strict=True):
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k], b[k]) for k in a)
        image = a[item.image_path]
        assert image.shape == _expected_shape(spec)
        if item.mask_path is not None:
            mask = a[item.mask_path]
            assert mask.shape == image.shape[:2] and mask.dtype == np.uint8 and (mask == 255).any()
        else:
            assert list(a) == [item.image_path]
