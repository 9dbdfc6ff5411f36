"""Tests of madfh_pipeline.imaging: decoding every pixel format we meet, and the native <-> canvas geometry."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from madfh_pipeline.imaging import (
    Geometry,
    ImageReadError,
    convert_channels,
    image_channels,
    read_image,
)


def _gray(h: int = 12, w: int = 16) -> np.ndarray:
    return (np.arange(h * w, dtype=np.int64).reshape(h, w) * 7 % 256).astype(np.uint8)


def test_read_gray_png(tmp_path: Path) -> None:
    image = _gray()
    cv2.imwrite(str(tmp_path / "g.png"), image)
    out = read_image(tmp_path / "g.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, image)


def test_read_rgb_png_returns_rgb_order(tmp_path: Path) -> None:
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 200  # red
    rgb[..., 2] = 10  # blue
    cv2.imwrite(str(tmp_path / "c.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = read_image(str(tmp_path / "c.png"))
    assert out.shape == (4, 5, 3)
    np.testing.assert_array_equal(out, rgb)


def test_read_16_bit_is_scaled_to_8_bit(tmp_path: Path) -> None:
    image = np.array([[0, 255, 256, 65535], [4660, 512, 1000, 32768]], np.uint16)
    cv2.imwrite(str(tmp_path / "d.png"), image)
    out = read_image(tmp_path / "d.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 0, 1, 255], [18, 2, 3, 128]])


def test_read_alpha_is_dropped(tmp_path: Path) -> None:
    bgra = np.zeros((3, 3, 4), np.uint8)
    bgra[..., 0] = 30  # B
    bgra[..., 1] = 60  # G
    bgra[..., 2] = 90  # R
    bgra[..., 3] = 7  # alpha
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    out = read_image(tmp_path / "a.png")
    assert out.shape == (3, 3, 3)
    np.testing.assert_array_equal(out[0, 0], [90, 60, 30])


def test_channels_argument_converts(tmp_path: Path) -> None:
    image = _gray()
    cv2.imwrite(str(tmp_path / "g.png"), image)
    rgb = read_image(tmp_path / "g.png", channels=3)
    assert rgb.shape == (*image.shape, 3)
    np.testing.assert_array_equal(rgb[..., 1], image)
    gray = read_image(tmp_path / "g.png", channels=1)
    np.testing.assert_array_equal(gray, image)


def test_corrupt_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    with pytest.raises(ImageReadError, match=r"corrupt or not an image: '.*broken\.png'"):
        read_image(path)


def test_truncated_png_is_an_image_read_error(tmp_path: Path) -> None:
    ok, encoded = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    assert ok
    path = tmp_path / "truncated.png"
    path.write_bytes(encoded.tobytes()[: len(encoded) // 3])
    with pytest.raises(ImageReadError, match="truncated.png"):
        read_image(path)


def test_empty_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    with pytest.raises(ImageReadError, match=r"empty \(0 bytes\): '.*empty\.png'"):
        read_image(path)


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        read_image(tmp_path / "nothere.png")


def test_convert_channels_and_image_channels() -> None:
    gray = _gray(3, 4)
    rgb = convert_channels(gray, 3)
    assert rgb.shape == (3, 4, 3) and image_channels(rgb) == 3
    assert image_channels(gray) == 1
    assert convert_channels(gray, 1) is gray
    assert convert_channels(rgb, 3) is rgb
    np.testing.assert_array_equal(convert_channels(rgb, 1), gray)


# ---- geometry ----


def test_stretch_plan() -> None:
    g = Geometry.plan(2448, 2048, 1024, 1024, "stretch")
    assert g.to_dict() == {
        "src_width": 2448,
        "src_height": 2048,
        "dst_width": 1024,
        "dst_height": 1024,
        "scale_x": 1024 / 2448,
        "scale_y": 0.5,
        "pad_x": 0,
        "pad_y": 0,
    }
    assert (g.content_width, g.content_height) == (1024, 1024)


def test_letterbox_plan_for_sheet_metal() -> None:
    g = Geometry.plan(4224, 1056, 1024, 1024, "letterbox")
    assert g.scale_x == g.scale_y == 1024 / 4224
    assert (g.content_width, g.content_height) == (1024, 256)
    assert (g.pad_x, g.pad_y) == (0, 384)


def test_letterbox_plan_pads_x_for_tall_images() -> None:
    g = Geometry.plan(1400, 1900, 512, 512, "letterbox")
    assert g.scale_x == 512 / 1900
    assert (g.content_width, g.content_height) == (377, 512)
    assert (g.pad_x, g.pad_y) == ((512 - 377) // 2, 0)


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="Unknown resize mode 'crop'"):
        Geometry.plan(10, 10, 5, 5, "crop")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["stretch", "letterbox"])
@pytest.mark.parametrize("channels", [1, 3])
def test_apply_gives_the_canvas_shape(mode: str, channels: int) -> None:
    rng = np.random.default_rng(1)
    shape = (30, 100) if channels == 1 else (30, 100, 3)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    out = Geometry.plan(100, 30, 40, 32, mode).apply(image)  # type: ignore[arg-type]
    assert out.shape == ((32, 40) if channels == 1 else (32, 40, 3))
    assert out.dtype == np.uint8


def test_letterbox_pads_with_zeros_and_keeps_content() -> None:
    image = np.full((30, 100), 200, np.uint8)
    g = Geometry.plan(100, 30, 40, 40, "letterbox")
    assert (g.content_width, g.content_height, g.pad_x, g.pad_y) == (40, 12, 0, 14)
    out = g.apply(image)
    assert (out[:14] == 0).all() and (out[26:] == 0).all()
    assert (out[14:26] == 200).all()


def test_mask_stays_binary_after_resize() -> None:
    mask = np.zeros((97, 131), np.uint8)
    mask[10:50, 20:77] = 255
    mask[60:62, 100:103] = 1  # 0/1 masks exist too; the canvas mask is 0/255
    for mode in ("stretch", "letterbox"):
        out = Geometry.plan(131, 97, 48, 48, mode).apply(mask, is_mask=True)  # type: ignore[arg-type]
        assert set(np.unique(out).tolist()) == {0, 255}
    # an image (not a mask) is area-interpolated and does get intermediate values
    assert len(np.unique(Geometry.plan(131, 97, 48, 48, "stretch").apply(mask))) > 2


@pytest.mark.parametrize("mode", ["stretch", "letterbox"])
def test_invert_returns_native_size(mode: str) -> None:
    g = Geometry.plan(4224, 1056, 256, 256, mode)  # type: ignore[arg-type]
    back = g.invert(np.zeros((256, 256), np.float32))
    assert back.shape == (1056, 4224)
    assert back.dtype == np.float32


@pytest.mark.parametrize(
    ("mode", "native_xy"), [("letterbox", (300, 40)), ("letterbox", (20, 70)), ("stretch", (250, 15))]
)
def test_bright_spot_maps_back_to_where_it_was(mode: str, native_xy: tuple[int, int]) -> None:
    width, height = 400, 100  # 4:1 like sheet_metal: letterbox pads 48 rows above and below on a 128 canvas
    x, y = native_xy
    image = np.zeros((height, width), np.float32)
    image[y - 3 : y + 4, x - 3 : x + 4] = 1.0
    g = Geometry.plan(width, height, 128, 128, mode)  # type: ignore[arg-type]
    if mode == "letterbox":
        assert (g.pad_x, g.pad_y) == (0, 48)
    canvas = g.apply(image)
    back = g.invert(canvas)
    assert back.shape == (height, width)
    peak_y, peak_x = np.unravel_index(int(np.argmax(back)), back.shape)
    assert abs(peak_x - x) <= 4 and abs(peak_y - y) <= 4
    # far from the spot the map stays empty (padding was cropped, not stretched into the image)
    assert back[(y + 40) % height, (x + 150) % width] == 0.0
