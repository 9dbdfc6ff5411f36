"""Defect regions drawn on the canvas, converted to the knowledge base's polygons in image pixels.

The canvas (streamlit-drawable-canvas, Fabric.js) reports objects in canvas pixels; the canvas shows the image
scaled to fit, so coordinates are multiplied back by ``image size / canvas size`` before they are stored with
``record_feedback(region_polygon=...)`` as ``[[[x, y], ...], ...]``. Rectangles and polygons are understood;
other shapes (free drawing) are refused with a message rather than stored approximately.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Polygon = list[list[float]]
_ORIGIN = {"left": 0.0, "top": 0.0, "center": 0.5, "right": 1.0, "bottom": 1.0}


class RegionError(ValueError):
    """A drawn shape that cannot be stored as a polygon."""


def _rect(obj: Mapping[str, Any]) -> Polygon:
    width = float(obj.get("width", 0)) * float(obj.get("scaleX", 1))
    height = float(obj.get("height", 0)) * float(obj.get("scaleY", 1))
    left = float(obj.get("left", 0)) - _ORIGIN[obj.get("originX", "left")] * width
    top = float(obj.get("top", 0)) - _ORIGIN[obj.get("originY", "top")] * height
    return [[left, top], [left + width, top], [left + width, top + height], [left, top + height]]


def _path(obj: Mapping[str, Any]) -> Polygon:
    """A closed path of M/L commands (how the canvas's polygon tool reports a polygon)."""
    points: Polygon = []
    for command in obj.get("path", []):
        if not command:
            continue
        letter = str(command[0]).upper()
        if letter in ("M", "L") and len(command) >= 3:
            points.append([float(command[1]), float(command[2])])
        elif letter != "Z":
            raise RegionError(f"A drawn path uses '{command[0]}' segments; draw rectangles or polygons.")
    return points


def _polygon(obj: Mapping[str, Any]) -> Polygon:
    """A Fabric polygon: points relative to ``pathOffset``, placed at ``left``/``top`` with its scale."""
    points = [[float(p["x"]), float(p["y"])] for p in obj.get("points", [])]
    if not points:
        return []
    offset = obj.get("pathOffset") or {}
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    center_x = float(offset.get("x", (min(xs) + max(xs)) / 2))
    center_y = float(offset.get("y", (min(ys) + max(ys)) / 2))
    scale_x, scale_y = float(obj.get("scaleX", 1)), float(obj.get("scaleY", 1))
    width = float(obj.get("width", max(xs) - min(xs))) * scale_x
    height = float(obj.get("height", max(ys) - min(ys))) * scale_y
    # Centre of the object on the canvas, from its origin point.
    left = float(obj.get("left", min(xs))) + (0.5 - _ORIGIN[obj.get("originX", "left")]) * width
    top = float(obj.get("top", min(ys))) + (0.5 - _ORIGIN[obj.get("originY", "top")]) * height
    return [[left + (x - center_x) * scale_x, top + (y - center_y) * scale_y] for x, y in points]


def polygons_from_canvas(
    drawing: Mapping[str, Any] | None, canvas_size: tuple[int, int], image_size: tuple[int, int]
) -> list[Polygon] | None:
    """The drawn rectangles and polygons in image pixels (clipped to the image), or None when nothing is drawn.

    ``canvas_size`` and ``image_size`` are ``(width, height)``.
    """
    objects: Sequence[Mapping[str, Any]] = (drawing or {}).get("objects", []) or []
    scale_x = image_size[0] / canvas_size[0]
    scale_y = image_size[1] / canvas_size[1]
    polygons: list[Polygon] = []
    for obj in objects:
        kind = str(obj.get("type", "")).lower()
        if kind == "rect":
            points = _rect(obj)
        elif kind == "path":
            points = _path(obj)
        elif kind == "polygon":
            points = _polygon(obj)
        else:
            raise RegionError(f"A drawn '{kind}' cannot be stored as a region; draw rectangles or polygons.")
        if len(points) < 3:
            continue
        polygons.append(
            [
                [
                    round(min(max(x * scale_x, 0.0), float(image_size[0])), 1),
                    round(min(max(y * scale_y, 0.0), float(image_size[1])), 1),
                ]
                for x, y in points
            ]
        )
    return polygons or None
