"""Image decoding and geometry shared by preprocessing, detection and export.

Kept in one place so that the forward transform (native → model size) and its inverse (anomaly map → native size
for the benchmark submission) can never drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

ResizeMode = Literal["stretch", "letterbox"]

#: Manifest columns that describe how an image was placed on the canvas (see :class:`Geometry`).
GEOMETRY_COLUMNS: tuple[str, ...] = (
    "src_width",
    "src_height",
    "dst_width",
    "dst_height",
    "scale_x",
    "scale_y",
    "pad_x",
    "pad_y",
)


class ImageReadError(ValueError):
    """A file that exists but cannot be decoded as an image (corrupt, truncated, zero bytes, wrong format)."""


def read_image(path: str | Path, channels: int | None = None) -> np.ndarray:
    """Decode an image as uint8 gray (H, W) or RGB (H, W, 3).

    16-bit files are scaled to 8 bit; alpha is dropped. ``channels`` converts (1 = gray, 3 = RGB); ``None`` keeps
    what the file holds. Raises :class:`ImageReadError` naming the file when it cannot be decoded.
    """
    path = Path(path)
    data = np.fromfile(path, dtype=np.uint8) if path.is_file() else None
    if data is None:
        raise FileNotFoundError(f"Image file not found: '{path}'.")
    if data.size == 0:
        raise ImageReadError(f"Image file is empty (0 bytes): '{path}'.")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageReadError(f"Image file is corrupt or not an image: '{path}'.")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageReadError(f"Unsupported pixel type {image.dtype} in '{path}'.")
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    elif image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    return convert_channels(image, channels) if channels else image


def write_png(path: str | Path, array: np.ndarray, compression: int | None = None) -> None:
    """Write gray or RGB uint8 as PNG whatever the file suffix (cv2.imwrite would pick a lossy codec for .jpg).

    ``compression=None`` keeps OpenCV's default, measured here as both the fastest and the smallest (17 ms and
    554 KiB for a 1024² gray image, against 33 ms at level 1 and 54 ms at level 3).
    """
    if array.ndim == 3 and array.shape[2] == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    params = [] if compression is None else [cv2.IMWRITE_PNG_COMPRESSION, compression]
    ok, buffer = cv2.imencode(".png", array, params)
    if not ok:
        raise OSError(f"Could not encode image for '{path}'.")
    buffer.tofile(str(path))


def convert_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Gray ↔ RGB conversion; a no-op when the image already has ``channels``."""
    if channels == 1 and image.ndim == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if channels == 3 and image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return image


def image_channels(image: np.ndarray) -> int:
    return 1 if image.ndim == 2 else int(image.shape[2])


@dataclass(frozen=True)
class Geometry:
    """How a native image maps onto the model canvas: scale, then paste at (pad_x, pad_y).

    ``stretch`` scales x and y independently and never pads; ``letterbox`` uses one scale and pads the rest with
    zeros, so defects keep their shape (sheet_metal is 4:1). The inverse lets anomaly maps go back to native size.
    """

    src_width: int
    src_height: int
    dst_width: int
    dst_height: int
    scale_x: float
    scale_y: float
    pad_x: int
    pad_y: int

    @property
    def content_width(self) -> int:
        return round(self.src_width * self.scale_x)

    @property
    def content_height(self) -> int:
        return round(self.src_height * self.scale_y)

    @property
    def content(self) -> tuple[slice, slice]:
        """(rows, cols) of the canvas that hold image content; letterbox padding lies outside and is not data."""
        return (
            slice(self.pad_y, self.pad_y + self.content_height),
            slice(self.pad_x, self.pad_x + self.content_width),
        )

    @classmethod
    def from_row(cls, row: Any) -> Geometry:
        """From a manifest row (mapping or namedtuple) holding the columns written by preprocessing."""
        get = row.get if hasattr(row, "get") else lambda key: getattr(row, key)
        return cls(**{name: get(name) for name in GEOMETRY_COLUMNS})

    @classmethod
    def plan(cls, src_width: int, src_height: int, dst_width: int, dst_height: int, mode: ResizeMode) -> Geometry:
        if mode == "stretch":
            return cls(
                src_width, src_height, dst_width, dst_height, dst_width / src_width, dst_height / src_height, 0, 0
            )
        if mode == "letterbox":
            scale = min(dst_width / src_width, dst_height / src_height)
            cw, ch = round(src_width * scale), round(src_height * scale)
            return cls(
                src_width,
                src_height,
                dst_width,
                dst_height,
                scale,
                scale,
                (dst_width - cw) // 2,
                (dst_height - ch) // 2,
            )
        raise ValueError(f"Unknown resize mode '{mode}': use 'stretch' or 'letterbox'.")

    def apply(self, image: np.ndarray, is_mask: bool = False) -> np.ndarray:
        """Native → canvas. Area interpolation for images (no aliasing of fine texture), nearest for masks."""
        interp = cv2.INTER_NEAREST if is_mask else cv2.INTER_AREA
        content = cv2.resize(image, (self.content_width, self.content_height), interpolation=interp)
        if is_mask:
            content = np.where(content > 0, 255, 0).astype(np.uint8)
        if self.pad_x == 0 and self.pad_y == 0 and content.shape[:2] == (self.dst_height, self.dst_width):
            return content
        canvas = np.zeros((self.dst_height, self.dst_width, *image.shape[2:]), dtype=image.dtype)
        canvas[self.content] = content
        return canvas

    def invert(self, anomaly_map: np.ndarray) -> np.ndarray:
        """Canvas → native, for float anomaly maps (linear interpolation; padding is cropped away)."""
        crop = anomaly_map[self.content]
        return cv2.resize(crop, (self.src_width, self.src_height), interpolation=cv2.INTER_LINEAR)

    def to_dict(self) -> dict[str, float | int]:
        return {
            "src_width": self.src_width,
            "src_height": self.src_height,
            "dst_width": self.dst_width,
            "dst_height": self.dst_height,
            "scale_x": self.scale_x,
            "scale_y": self.scale_y,
            "pad_x": self.pad_x,
            "pad_y": self.pad_y,
        }
