"""Kedro dataset that lists one category of an MVTec AD 2 tree, lazily.

A category is gigabytes of 5-megapixel PNGs, so loading returns a *manifest* (one row per file, paths and facts
from the file system only) and never pixels; nodes decode images one at a time. The same class can also write a tree
in the layout (used by the demo data generator), given a mapping of relative paths to arrays or to callables that
render them, so that generation streams over all cores instead of holding a category in memory.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
from kedro.io import AbstractDataset, DatasetError
from tqdm.auto import tqdm

from madfh_pipeline.categories import IMAGE_SUFFIXES, SPLITS
from madfh_pipeline.workers import process_pool, render_and_write, write_bundle

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS: tuple[str, ...] = (
    "category",
    "relpath",
    "path",
    "role",
    "split",
    "label",
    "lighting",
    "stem",
    "mask_relpath",
    "mask_path",
    "mask_exists",
    "bytes",
    "mtime_ns",
)

_STEM_RE = re.compile(r"^(?P<index>\d+)_(?P<lighting>[A-Za-z0-9_]+)$")


class MissingRawDataError(DatasetError):
    """The configured raw root or category folder does not exist."""


def _classify(rel: PurePosixPath) -> dict[str, Any]:
    """Turn a path relative to the category root into split / label / role facts, or mark it stray."""
    parts = rel.parts
    suffix = rel.suffix.lower()
    facts: dict[str, Any] = {"role": "stray", "split": "", "label": "", "lighting": "", "stem": rel.stem}
    if suffix not in IMAGE_SUFFIXES:
        return facts
    if len(parts) == 3 and parts[0] in ("train", "validation") and parts[1] == "good":
        facts |= {"role": "image", "split": parts[0], "label": "good"}
    elif len(parts) == 3 and parts[0] == "test_public" and parts[1] in ("good", "bad"):
        facts |= {"role": "image", "split": "test_public", "label": parts[1]}
    elif len(parts) == 4 and parts[:3] == ("test_public", "ground_truth", "bad") and rel.stem.endswith("_mask"):
        facts |= {"role": "mask", "split": "test_public", "label": "bad", "stem": rel.stem[: -len("_mask")]}
    elif len(parts) == 2 and parts[0] in ("test_private", "test_private_mixed"):
        facts |= {"role": "image", "split": parts[0], "label": "unknown"}
    else:
        return facts
    match = _STEM_RE.match(facts["stem"])
    facts["lighting"] = match.group("lighting") if match else ""
    return facts


class MVTecAD2Dataset(AbstractDataset[pd.DataFrame, Mapping[str, Any]]):
    """One category folder of an MVTec AD 2 tree.

    ``load()`` returns a manifest DataFrame with one row per file found: images (with split, label, lighting token
    and the expected mask path for ``test_public/bad``), masks, and stray files (anything not in the layout) so the
    validation step can name them. ``save()`` writes ``{key: array}`` at the key, or ``{key: callable}`` where
    the callable renders a bundle ``{relative path: array}`` (an image and its mask) in a worker process.

    Args:
        path: The data root holding category folders (e.g. ``data/01_raw/mvtec_ad_2``); named ``path`` so Kedro
            resolves a relative root against the project folder, not the working directory.
        category: The category folder name.
        hint: Appended to the "missing data" error to tell the user how to obtain the data.
    """

    def __init__(
        self,
        path: str,
        category: str,
        hint: str = "",
        workers: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._root = Path(path)
        self._category = category
        self._hint = hint
        self._workers = workers or os.cpu_count() or 1
        self.metadata = metadata

    @property
    def category_dir(self) -> Path:
        return self._root / self._category

    def _describe(self) -> dict[str, Any]:
        return {"root": str(self._root), "category": self._category}

    def _exists(self) -> bool:
        return self.category_dir.is_dir()

    def load(self) -> pd.DataFrame:
        cat_dir = self.category_dir
        if not cat_dir.is_dir():
            where = "raw data root" if not self._root.is_dir() else "category folder"
            raise MissingRawDataError(
                f"MVTec AD 2 {where} not found: '{cat_dir if self._root.is_dir() else self._root}'. "
                f"Expected '{cat_dir}/train/good/*.png' etc. {self._hint}".strip()
            )
        rows: list[dict[str, Any]] = []
        for dirpath, dirnames, filenames in os.walk(cat_dir):
            # Hidden folders (.ipynb_checkpoints, .git, ...) are tooling, not data: not walked, not reported.
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in sorted(filenames):
                full = Path(dirpath) / fname
                rel = PurePosixPath(full.relative_to(cat_dir).as_posix())
                if fname.startswith("."):
                    continue  # editor/OS metadata (.DS_Store, ._foo) is not data and not worth a warning
                stat = full.stat()
                rows.append(
                    {
                        "category": self._category,
                        "relpath": str(rel),
                        "path": str(full),
                        "bytes": int(stat.st_size),
                        "mtime_ns": int(stat.st_mtime_ns),
                        **_classify(rel),
                    }
                )
        frame = pd.DataFrame(
            rows, columns=[c for c in MANIFEST_COLUMNS if c not in ("mask_relpath", "mask_path", "mask_exists")]
        )
        masks = set(frame.loc[frame["role"] == "mask", "relpath"]) if len(frame) else set()
        is_bad = (frame["role"] == "image") & (frame["split"] == "test_public") & (frame["label"] == "bad")
        frame["mask_relpath"] = np.where(is_bad, "test_public/ground_truth/bad/" + frame["stem"] + "_mask.png", "")
        frame["mask_path"] = np.where(is_bad, str(cat_dir) + "/" + frame["mask_relpath"], "")
        frame["mask_exists"] = frame["mask_relpath"].isin(masks)
        frame["split_order"] = frame["split"].map({s: i for i, s in enumerate(SPLITS)}).fillna(len(SPLITS))
        frame = frame.sort_values(["split_order", "label", "relpath"]).drop(columns="split_order")
        logger.info(
            "Listed %d files in %s (%d images, %d masks, %d stray).",
            len(frame),
            cat_dir,
            int((frame["role"] == "image").sum()),
            int((frame["role"] == "mask").sum()),
            int((frame["role"] == "stray").sum()),
        )
        return frame.reset_index(drop=True)[list(MANIFEST_COLUMNS)]

    def save(self, data: Mapping[str, Any]) -> None:
        """Write arrays at their keys; callables render bundles ``{relative path: array}`` in worker processes."""
        cat_dir = self.category_dir
        arrays = {k: v for k, v in data.items() if not callable(v)}
        bundles = [v for v in data.values() if callable(v)]
        write_bundle(cat_dir, arrays)
        progress = tqdm(total=len(bundles), desc=f"write {self._category}", unit="img", disable=None)
        if self._workers <= 1 or len(bundles) <= 1:
            for bundle in bundles:
                write_bundle(cat_dir, bundle())
                progress.update()
        else:
            with process_pool(self._workers) as pool:
                for _ in pool.map(render_and_write, [cat_dir] * len(bundles), bundles):
                    progress.update()
        progress.close()
        logger.info("Wrote %d files to %s.", len(arrays) + len(bundles), cat_dir)
