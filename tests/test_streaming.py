"""Tests of the batch streamer: order, shapes, value range, channel handling and errors raised in the consumer."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from madfh_pipeline.datasets import ImageStore
from madfh_pipeline.imaging import ImageReadError
from madfh_pipeline.streaming import image_batches, to_tensor


def _gray_store(root: Path, n: int, height: int = 6, width: int = 5) -> tuple[ImageStore, list[str], list[np.ndarray]]:
    """``n`` gray images whose first pixel is their index, so order is visible in the batches."""
    store = ImageStore(root)
    rng = np.random.default_rng(0)
    keys, images = [], []
    for i in range(n):
        image = rng.integers(0, 256, (height, width), dtype=np.uint8)
        image[0, 0] = i
        key = f"train/good/{i:03d}_regular.png"
        store.write(key, image)
        keys.append(key)
        images.append(image)
    return store, keys, images


def test_to_tensor_shapes_dtype_and_range() -> None:
    gray = [np.full((4, 3), 255, np.uint8), np.zeros((4, 3), np.uint8)]
    out = to_tensor(gray)
    assert out.shape == (2, 1, 4, 3)
    assert out.dtype == torch.float32
    assert float(out[0].min()) == 1.0 and float(out[1].max()) == 0.0
    rgb = np.zeros((4, 3, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 51, 0
    out = to_tensor([rgb])
    assert out.shape == (1, 3, 4, 3)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([1.0, 0.2, 0.0]))


def test_batches_in_order_with_sizes_and_values(tmp_path: Path) -> None:
    store, keys, images = _gray_store(tmp_path, 7)
    batches = list(image_batches(store, keys, batch_size=3))
    assert [chunk for chunk, _ in batches] == [keys[0:3], keys[3:6], keys[6:7]]
    assert [tuple(batch.shape) for _, batch in batches] == [(3, 1, 6, 5), (3, 1, 6, 5), (1, 1, 6, 5)]
    stacked = torch.cat([batch for _, batch in batches])
    assert stacked.dtype == torch.float32
    assert 0.0 <= float(stacked.min()) and float(stacked.max()) <= 1.0
    expected = torch.from_numpy(np.stack(images)[:, None].astype(np.float32) / 255.0)
    torch.testing.assert_close(stacked, expected, rtol=0, atol=1e-7)
    assert [round(float(v) * 255) for v in stacked[:, 0, 0, 0]] == list(range(7))


def test_keys_are_streamed_in_the_given_order(tmp_path: Path) -> None:
    store, keys, _ = _gray_store(tmp_path, 4)
    order = [keys[2], keys[0], keys[3], keys[1]]
    batches = list(image_batches(store, order, batch_size=2, prefetch=1))
    assert [k for chunk, _ in batches for k in chunk] == order
    firsts = torch.cat([b for _, b in batches])[:, 0, 0, 0]
    assert [round(float(v) * 255) for v in firsts] == [2, 0, 3, 1]


def test_rgb_images_give_three_channels_in_rgb_order(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    image = np.zeros((4, 6, 3), np.uint8)
    image[..., 0] = 200  # red
    image[..., 2] = 10  # blue
    store.write("a.png", image)
    store.write("b.png", image)
    [(chunk, batch)] = list(image_batches(store, ["a.png", "b.png"], batch_size=8))
    assert chunk == ["a.png", "b.png"]
    assert tuple(batch.shape) == (2, 3, 4, 6)
    torch.testing.assert_close(batch[1, :, 2, 3], torch.tensor([200 / 255, 0.0, 10 / 255]))


def test_channels_argument_converts(tmp_path: Path) -> None:
    store, keys, images = _gray_store(tmp_path, 2)
    [(_, batch)] = list(image_batches(store, keys, batch_size=2, channels=3))
    assert tuple(batch.shape) == (2, 3, 6, 5)
    torch.testing.assert_close(batch[:, 0], batch[:, 2])
    torch.testing.assert_close(batch[0, 1], torch.from_numpy(images[0].astype(np.float32) / 255.0))
    rgb = np.zeros((3, 3, 3), np.uint8)
    rgb[..., 1] = 255
    store.write("rgb.png", rgb)
    [(_, batch)] = list(image_batches(store, ["rgb.png"], batch_size=1, channels=1))
    assert tuple(batch.shape) == (1, 1, 3, 3)


def test_empty_keys_yield_nothing(tmp_path: Path) -> None:
    assert list(image_batches(ImageStore(tmp_path), [], batch_size=4)) == []


def test_corrupt_file_raises_in_the_consumer_after_the_good_batches(tmp_path: Path) -> None:
    store, keys, _ = _gray_store(tmp_path, 4)
    store.path(keys[2]).write_bytes(b"this is not a png")
    received: list[list[str]] = []
    consumer = threading.get_ident()
    with pytest.raises(ImageReadError, match=r"corrupt.*002_regular\.png") as info:
        for chunk, _ in image_batches(store, keys, batch_size=2):
            assert threading.get_ident() == consumer
            received.append(chunk)
    assert received == [keys[:2]]  # the batch before the broken file still arrived
    assert str(store.path(keys[2])) in str(info.value)


def test_missing_file_raises_file_not_found_naming_it(tmp_path: Path) -> None:
    store, keys, _ = _gray_store(tmp_path, 1)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.png"):
        list(image_batches(store, [*keys, "nowhere.png"], batch_size=1))


def test_abandoned_stream_releases_its_producer_thread(tmp_path: Path) -> None:
    store, keys, _ = _gray_store(tmp_path, 12, 4, 4)
    before = set(threading.enumerate())
    stream = image_batches(store, keys, batch_size=1, prefetch=1)
    next(stream)
    stream.close()  # what a `break` or an exception in the consumer does
    deadline = time.monotonic() + 1.0
    leaked = [t for t in threading.enumerate() if t not in before]
    while leaked and time.monotonic() < deadline:
        time.sleep(0.05)
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked
