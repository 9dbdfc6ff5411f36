"""Work that runs in worker processes, and the pool that runs it.

Workers fork from a *forkserver* that has imported only this module (OpenCV, NumPy, :mod:`madfh_pipeline.imaging`):
not fork from the parent, whose torch thread pools can deadlock a forked child, and not spawn, which re-imports the
parent's ``__main__`` (the Kedro CLI, pandas, torch) in every worker — seconds each, more than the images cost.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from madfh_pipeline.imaging import Geometry, ImageReadError, convert_channels, image_channels, read_image, write_png

logger = logging.getLogger(__name__)


def _write(path: Path, array: np.ndarray, compression: int | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, array, compression)


def process_image(task: dict[str, Any]) -> dict[str, Any]:
    """Decode, validate, resize and write one image (and its mask). Runs in a worker process.

    Returns the facts for the manifest; a problem is reported in ``problem`` rather than raised, so one bad file
    never stops the category. Warnings go back in ``messages`` for the parent to log: a worker process has no
    logging handlers of its own, so its log records would reach stderr bare (no time, no level, not in info.log).
    """
    result: dict[str, Any] = {"relpath": task["relpath"], "problem": "", "status": "processed", "messages": []}
    try:
        image = read_image(task["path"])
    except (ImageReadError, FileNotFoundError) as exc:
        return result | {"problem": str(exc), "status": "skipped"}
    height, width = image.shape[:2]
    result |= {"src_width": width, "src_height": height, "src_channels": image_channels(image)}
    if task["check_size"] and (width, height) != (task["width"], task["height"]):
        problem = f"size {width}x{height} does not match the category's {task['width']}x{task['height']}"
        return result | {"problem": problem, "status": "skipped"}
    mask = None
    if task["mask_path"]:
        try:
            mask = read_image(task["mask_path"], channels=1)
        except (ImageReadError, FileNotFoundError) as exc:
            return result | {"problem": f"unreadable mask: {exc}", "status": "skipped"}
        if mask.shape != (height, width):
            problem = f"mask {task['mask_relpath']} is {mask.shape[1]}x{mask.shape[0]}, image is {width}x{height}"
            return result | {"problem": problem, "status": "skipped"}
        values = np.unique(mask)
        if not set(values.tolist()) <= {0, 255} and not set(values.tolist()) <= {0, 1}:
            problem = f"mask {task['mask_relpath']} is not binary ({len(values)} distinct values)"
            return result | {"problem": problem, "status": "skipped"}
        result["mask_pixels"] = int(np.count_nonzero(mask))
        if result["mask_pixels"] == 0:
            result["messages"].append(f"Mask '{task['mask_relpath']}' is empty although the image is in bad/.")
    geometry = Geometry.plan(width, height, task["target_width"], task["target_height"], task["mode"])
    image = convert_channels(image, task["channels"])
    root = Path(task["store_root"])
    _write(root / task["relpath"], geometry.apply(image), task["compression"])
    if mask is not None:
        _write(root / task["mask_relpath"], geometry.apply(mask, is_mask=True), task["compression"])
    return result | geometry.to_dict()


def init_worker() -> None:
    # One OpenCV thread per process: the pool already uses every core, more threads only contend.
    cv2.setNumThreads(1)


def write_bundle(root: Path, bundle: Mapping[str, np.ndarray], compression: int | None = None) -> None:
    """Write ``{relative path: array}`` below ``root`` as PNGs."""
    for rel, array in bundle.items():
        _write(root / rel, array, compression)


def render_and_write(root: Path, render: Callable[[], Mapping[str, np.ndarray]]) -> None:
    """Call a renderer (e.g. a demo item) and write what it returns; the rendering happens in the worker."""
    write_bundle(root, render())


@contextmanager
def _anonymous_main() -> Iterator[None]:
    """Hide the parent's ``__main__`` while workers start.

    Every forkserver child otherwise re-runs the parent's main script (``multiprocessing`` passes its path along
    so that functions defined there unpickle): under ``kedro run`` that is the Kedro CLI, 0.4–0.7 s of imports and
    a logging set-up per worker, per node. Work sent to these workers lives in importable modules, never in
    ``__main__``, so the children need none of it.
    """
    saved = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = saved


class LeanProcessPool(ProcessPoolExecutor):
    """A process pool whose workers start without the parent's ``__main__`` (see :func:`_anonymous_main`).

    Workers start inside ``submit`` (forkserver pools grow on demand), so that is where the main module is hidden.
    The swap lasts for the submit call only; another thread that pickles an object defined in ``__main__`` in that
    instant would not find it (Kedro's runners do not: nodes and datasets live in importable modules).
    """

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        with _anonymous_main():
            return super().submit(fn, *args, **kwargs)


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes forked from a lean server, one OpenCV thread each."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["madfh_pipeline.workers", "madfh_pipeline.demo.synth"])
    return LeanProcessPool(max_workers=workers, mp_context=context, initializer=init_worker)
