"""Tests of the demo_data node: a lazy plan of a synthetic category in the MVTec AD 2 layout."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from madfh_pipeline.datasets import MVTecAD2Dataset
from madfh_pipeline.pipelines.demo_data.nodes import generate_demo_category
from madfh_pipeline.pipelines.demo_data.pipeline import create_pipeline

CATEGORY = {"name": "wallplugs", "width": 2448, "height": 2048, "channels": 1}
COUNTS = {
    "train": 3,
    "validation": 2,
    "test_public_good": 2,
    "test_public_bad": 3,
    "test_private": 1,
    "test_private_mixed": 2,
}


def _demo(**overrides: object) -> dict:
    return {"seed": 5, "scale": 1.0, "counts": dict(COUNTS), "size_override": {"width": 64, "height": 48}} | overrides


def _split_of(path: str) -> str:
    parts = path.split("/")
    return f"{parts[0]}_{parts[1]}" if parts[0] == "test_public" else parts[0]


def test_plan_has_the_layout_and_counts() -> None:
    plan = generate_demo_category(CATEGORY, _demo())
    assert all(callable(v) for v in plan.values())
    assert Counter(_split_of(p) for p in plan) == Counter(COUNTS)
    assert "train/good/000_regular.png" in plan and "test_private_mixed/001_mixed.png" in plan


def test_bundles_render_at_the_size_override_with_masks_for_bad() -> None:
    plan = generate_demo_category(CATEGORY, _demo())
    for path, render in plan.items():
        bundle = render()
        assert bundle[path].shape == (48, 64) and bundle[path].dtype == np.uint8  # gray category
        if path.startswith("test_public/bad/"):
            (mask_path,) = set(bundle) - {path}
            assert mask_path == path.replace("test_public/bad/", "test_public/ground_truth/bad/")[:-4] + "_mask.png"
            assert set(np.unique(bundle[mask_path]).tolist()) <= {0, 255}
            assert bundle[mask_path].any()
        else:
            assert list(bundle) == [path]


def test_rgb_category_renders_rgb() -> None:
    plan = generate_demo_category({"name": "walnuts", "width": 2448, "height": 2048, "channels": 3}, _demo())
    assert plan["validation/good/001_regular.png"]()["validation/good/001_regular.png"].shape == (48, 64, 3)


def test_scale_multiplies_counts() -> None:
    plan = generate_demo_category(CATEGORY, _demo(scale=2.0))
    assert Counter(_split_of(p) for p in plan) == Counter({k: 2 * v for k, v in COUNTS.items()})
    assert len(generate_demo_category(CATEGORY, _demo(scale=0.0))) == 0


def test_same_seed_same_pixels_other_seed_other_pixels() -> None:
    a = generate_demo_category(CATEGORY, _demo())["train/good/002_regular.png"]()
    b = generate_demo_category(CATEGORY, _demo())["train/good/002_regular.png"]()
    c = generate_demo_category(CATEGORY, _demo(seed=6))["train/good/002_regular.png"]()
    np.testing.assert_array_equal(a["train/good/002_regular.png"], b["train/good/002_regular.png"])
    assert not np.array_equal(a["train/good/002_regular.png"], c["train/good/002_regular.png"])


def test_without_size_override_renders_native_size() -> None:
    tiny = {"name": "gizmo", "width": 40, "height": 24, "channels": 1}
    plan = generate_demo_category(tiny, _demo(size_override=None))
    assert plan["train/good/000_regular.png"]()["train/good/000_regular.png"].shape == (24, 40)


def test_missing_count_key_fails() -> None:
    counts = dict(COUNTS)
    del counts["test_private"]
    with pytest.raises(KeyError, match="test_private"):
        generate_demo_category(CATEGORY, _demo(counts=counts))


def test_written_plan_reads_back_as_a_valid_tree(tmp_path: Path) -> None:
    plan = generate_demo_category(CATEGORY, _demo())
    dataset = MVTecAD2Dataset(path=str(tmp_path), category="wallplugs", workers=1)
    dataset.save(plan)
    frame = dataset.load()
    assert (frame["role"] != "stray").all()
    images = frame[frame["role"] == "image"]
    assert len(images) == sum(COUNTS.values())
    assert (frame["role"] == "mask").sum() == COUNTS["test_public_bad"]
    bad = images[images["label"] == "bad"]
    assert bad["mask_exists"].all()


def test_pipeline_wiring() -> None:
    (node,) = create_pipeline().nodes
    assert node.name == "generate_demo_category"
    assert node.inputs == ["params:category", "params:demo_data"]
    assert node.outputs == ["demo_images"]
