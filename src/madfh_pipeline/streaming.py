"""Stream processed images from an :class:`ImageStore` as float batches, never a whole split in memory.

A background thread decodes the next batch while the model works on the current one, so PNG decoding (about a
third of a CPU forward pass at 1024²) overlaps with compute.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from madfh_pipeline.datasets.image_store import ImageStore


def to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W) or (H, W, C) arrays → float32 (B, C, H, W) in [0, 1]."""
    stacked = np.stack([img[:, :, None] if img.ndim == 2 else img for img in images])
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).float().div_(255.0)


def image_batches(
    store: ImageStore, keys: Sequence[str], batch_size: int, channels: int | None = None, prefetch: int = 2
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Yield ``(keys, batch)`` pairs in order; decoding runs one batch ahead in a thread.

    A consumer that stops early (``break``, an exception in the model) stops the producer too, so no thread or
    decoded batch outlives the loop.
    """
    chunks = [list(keys[i : i + batch_size]) for i in range(0, len(keys), batch_size)]
    if not chunks:
        return
    buffer: queue.Queue[tuple[list[str], torch.Tensor] | BaseException | None] = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(item: tuple[list[str], torch.Tensor] | BaseException | None) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for chunk in chunks:
                if not put((chunk, to_tensor([store.read(k, channels) for k in chunk]))):
                    return
        except BaseException as exc:  # re-raised in the consumer, with the file named by read_image
            put(exc)
            return
        put(None)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while not buffer.empty():
            buffer.get_nowait()
        thread.join()
