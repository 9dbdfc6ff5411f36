"""Plan a synthetic MVTec AD 2 category; the catalog's writer renders and saves it image by image."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from madfh_pipeline.categories import CategorySpec
from madfh_pipeline.demo.synth import SceneSpec, plan_dataset, render_item

logger = logging.getLogger(__name__)

SPLIT_KEYS = ("train", "validation", "test_public_good", "test_public_bad", "test_private", "test_private_mixed")


def generate_demo_category(
    category: dict[str, Any], demo: dict[str, Any]
) -> dict[str, Callable[[], dict[str, np.ndarray]]]:
    """Image path → callable rendering that image (and its mask) for every item of the demo category.

    Lazy so that the writer renders in worker processes and holds one native-resolution image at a time; each item
    renders from its own seed, so the output is byte-identical whatever the order or the number of workers.
    """
    cat = CategorySpec(**category)
    scale = float(demo.get("scale", 1.0))
    counts = {k: max(0, int(round(int(demo["counts"][k]) * scale))) for k in SPLIT_KEYS}
    size = demo.get("size_override") or {}
    spec = SceneSpec(
        category=cat.name,
        width=int(size.get("width", cat.width)),
        height=int(size.get("height", cat.height)),
        channels=cat.channels,
    )
    items = plan_dataset(spec, counts, seed=int(demo.get("seed", 0)))
    logger.info(
        "[%s] demo data set: %d images at %dx%d, %s (seed %s).",
        cat.name,
        len(items),
        spec.width,
        spec.height,
        counts,
        demo.get("seed", 0),
    )
    return {item.image_path: functools.partial(render_item, spec, item) for item in items}
