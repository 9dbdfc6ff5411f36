"""Procedural look-alike of the MVTec AD 2 data set, in its exact folder layout.

Why this exists: the real MVTec AD 2 images are CC BY-NC-SA and cannot be downloaded on the project's machines, yet the
pipelines, tests, CI and new users need images that *behave* like them: native resolutions and channels, normal images
that vary (pose, count, texture, exposure), defects of the benchmark's kinds with exact pixel masks (from a few pixels up
to a large part of an object), and the official lighting tokens.  Everything here is pure numpy / OpenCV, renders in
memory (no file I/O) and is deterministic: an item renders from its own seed alone, so items can be produced in any
order or in parallel and always come out byte-identical.

Rendering model (all in float32, linear [0, 1], grey images carried as ``H x W x 1`` internally):

1. a style-specific *scene* (``_Scene``): the image, the background a missing piece would reveal, a foreground mask
   (where defects may sit) and a typical object size (bounds the largest defect);
2. 1-3 *defects* are painted strictly inside their masks (``np.where(mask, new, old)``), then every masked pixel is
   nudged to differ from the clean scene by at least ``_MIN_DELTA`` so the mask never claims unchanged pixels;
3. a pointwise *lighting* transform (gain, colour cast, illumination gradient or spot) for the lighting token;
4. the same sensor noise (own random stream) on clean and defective renders, then rounding to uint8.

Because the scene, defects, lighting and noise draw from separate child streams of the caller's generator, the clean
scene of ``render_defective(seed)`` is exactly ``render_normal(seed)``: tests compare the two to check that a defect
changes the pixels under its mask and nothing outside it.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

logger = logging.getLogger(__name__)

LIGHTING_TOKENS: tuple[str, ...] = ("regular", "overexposed", "underexposed", "shift_1", "shift_2", "shift_3")
MIXED_TOKEN = "mixed"
DEFECT_KINDS: tuple[str, ...] = ("scratch", "crack", "missing_piece", "contamination", "dent", "discoloration")
SPLITS: tuple[str, ...] = (
    "train",
    "validation",
    "test_public_good",
    "test_public_bad",
    "test_private",
    "test_private_mixed",
)
STYLED_CATEGORIES: tuple[str, ...] = ("wallplugs", "sheet_metal", "walnuts", "fruit_jelly")

# Smallest change (in [0, 1] units, before lighting) between a defective pixel and the clean scene: about 4 grey levels,
# enough to survive rounding under regular light yet far too small to be seen by itself.
_MIN_DELTA = 4.0 / 255.0
# Sensor noise, in grey levels (1 sigma).
_NOISE_SIGMA = 1.2
_MIN_DEFECT_PX = 3.0
_TINY_DEFECT_SHARE = 0.3  # of the second and third defects of an image (the first is never tiny)

_F32 = np.float32


@dataclass(frozen=True)
class SceneSpec:
    """What to render: a category name (selects the style), the native size and the number of channels.

    Tests use down-scaled specs (``spec.scaled(0.1)``); the styles scale their object sizes with the image area, so a
    small render looks like a thumbnail of a native one.
    """

    category: str
    width: int
    height: int
    channels: int = 3

    def __post_init__(self) -> None:
        if not self.category or "/" in self.category or "\\" in self.category:
            raise ValueError(f"invalid category name: {self.category!r}")
        if self.width < 16 or self.height < 16:
            raise ValueError(f"image too small: {self.width}x{self.height} (min 16x16)")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")

    @property
    def style(self) -> str:
        """The renderer used: the category itself for the four styled ones, ``generic`` otherwise."""
        return self.category if self.category in STYLED_CATEGORIES else "generic"

    def scaled(self, factor: float) -> SceneSpec:
        """Same category and channels at ``factor`` times the size (for fast tests and previews)."""
        return SceneSpec(
            self.category,
            max(16, round(self.width * factor)),
            max(16, round(self.height * factor)),
            self.channels,
        )


@dataclass(frozen=True)
class DemoItem:
    """One file (plus its mask, for ``test_public/bad``) of the planned data set.

    ``lighting`` is the token in the file name (``mixed`` in ``test_private_mixed``); ``render_lighting`` is the lighting
    actually rendered.  ``kind`` is kept for private items too, so a demo evaluation can know the hidden truth.
    """

    split: str
    image_path: str
    mask_path: str | None
    kind: Literal["normal", "defective"]
    lighting: str
    render_lighting: str
    seed: int


@dataclass(frozen=True)
class DefectiveRender:
    """A defective image together with the identical scene without defects (for checks and visualisations)."""

    image: np.ndarray
    clean: np.ndarray
    mask: np.ndarray
    kinds: list[str]


@dataclass
class _Scene:
    image: np.ndarray  # float32 (H, W, C), [0, 1], before lighting
    background: np.ndarray  # float32 (H, W, C): what shows through where a piece is missing
    foreground: np.ndarray  # bool (H, W): where defects sit
    object_px: float  # typical object size in pixels: bounds the largest defect
    dark_field: bool = False  # dark-field optics: defects scatter light, so they tend to look bright
    on_objects: bool = True  # missing pieces are bites out of object borders rather than holes


# --------------------------------------------------------------------------------------------------------------------
# Small numeric helpers
# --------------------------------------------------------------------------------------------------------------------


def _child_rngs(rng: np.random.Generator, n: int) -> list[np.random.Generator]:
    """Independent child streams, so that (e.g.) adding a defect does not change the scene or the noise."""
    seeds = rng.integers(0, 2**63 - 1, size=n, dtype=np.int64)
    return [np.random.default_rng(int(s)) for s in seeds]


def _area_scale(spec: SceneSpec, native_w: int, native_h: int) -> float:
    return math.sqrt(spec.width * spec.height / float(native_w * native_h))


def _value_noise(rng: np.random.Generator, h: int, w: int, cell: float, aniso: float = 1.0) -> np.ndarray:
    """Smooth random field with features of about ``cell`` pixels (``aniso`` stretches them along x), unit std."""
    cy = max(cell, 1.0)
    cx = max(cell * aniso, 1.0)
    gh, gw = int(h / cy) + 3, int(w / cx) + 3
    grid = rng.standard_normal((gh, gw), dtype=_F32)
    if gh >= h and gw >= w:
        out = grid[:h, :w]
    elif min(cx, cy) >= 16 and min(h, w) >= 64:
        # Smooth fields: cubic up to a quarter of the size, then cheap linear steps (3x faster on large frames).
        mid = cv2.resize(grid, (max(2, w // 4), max(2, h // 4)), interpolation=cv2.INTER_CUBIC)
        out = cv2.resize(mid, (w, h), interpolation=cv2.INTER_LINEAR)
    else:
        out = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    std = float(out[::7, ::7].std()) + 1e-6
    return out * _F32(1.0 / std)


def _fractal(
    rng: np.random.Generator, h: int, w: int, cell: float, octaves: int, *, persistence: float = 0.5, aniso: float = 1.0
) -> np.ndarray:
    """Sum of value-noise octaves (coarse to fine), unit std: the basic texture of every style."""
    total = np.zeros((h, w), _F32)
    amp, norm = 1.0, 0.0
    for o in range(octaves):
        total += _F32(amp) * _value_noise(rng, h, w, cell / 2**o, aniso)
        norm += amp * amp
        amp *= persistence
    total *= _F32(1.0 / math.sqrt(norm))
    return total


def _low_res_field(fn: Callable[[np.ndarray, np.ndarray], np.ndarray], h: int, w: int, step: int = 8) -> np.ndarray:
    """Evaluate a smooth field on a coarse grid (normalised coordinates in [0, 1]) and upsample: cheap and exact enough."""
    gh, gw = max(2, h // step), max(2, w // step)
    ys = np.linspace(0.0, 1.0, gh, dtype=_F32)[:, None]
    xs = np.linspace(0.0, 1.0, gw, dtype=_F32)[None, :]
    small = np.broadcast_to(fn(xs, ys), (gh, gw)).astype(_F32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _as3(a: np.ndarray) -> np.ndarray:
    return a if a.ndim == 3 else a[:, :, None]


def _gray_of(rgb: np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _colour(spec: SceneSpec, rgb: Sequence[float]) -> np.ndarray:
    """A colour for this spec's channel count (luma for grey)."""
    rgb_arr = np.asarray(rgb, _F32)
    if spec.channels == 1:
        return np.array([_gray_of(rgb_arr)], _F32)
    return rgb_arr


def _clip_box(
    x0: int, y0: int, patch: tuple[int, ...], frame: tuple[int, ...]
) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """Slices of the canvas (``frame`` = its shape) and of a local patch (``patch`` = its shape) placed at (x0, y0).

    None when they do not overlap (objects may hang over the image border)."""
    bh, bw, h, w = patch[0], patch[1], frame[0], frame[1]
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(w, x0 + bw), min(h, y0 + bh)
    if cx0 >= cx1 or cy0 >= cy1:
        return None
    return (slice(cy0, cy1), slice(cx0, cx1)), (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))


def _warp_sprite(
    sprite: np.ndarray, theta: float, cx: float, cy: float, scale: float = 1.0
) -> tuple[np.ndarray, int, int]:
    """Rotate a sprite (sh x sw x n, n <= 4) by ``theta`` about its centre and place that centre at (cx, cy).

    ``scale`` canvas pixels per sprite pixel lets smooth sprites be computed at lower resolution.  Returns the warped
    patch and its top-left corner on the canvas; only the patch is warped, never the full frame.
    """
    sh, sw = sprite.shape[0] * scale, sprite.shape[1] * scale
    c, s = math.cos(theta) * scale, math.sin(theta) * scale
    cu, su = math.cos(theta), math.sin(theta)
    bw = int(math.ceil(abs(cu) * sw + abs(su) * sh)) + 3
    bh = int(math.ceil(abs(su) * sw + abs(cu) * sh)) + 3
    x0, y0 = int(math.floor(cx - bw / 2)), int(math.floor(cy - bh / 2))
    tx = (cx - x0) - (cu * sw / 2 - su * sh / 2)
    ty = (cy - y0) - (su * sw / 2 + cu * sh / 2)
    m = np.array([[c, -s, tx], [s, c, ty]], np.float64)
    warped = cv2.warpAffine(
        sprite, m, (bw, bh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0)
    )
    if warped.ndim == 2:
        warped = warped[:, :, None]
    return warped, x0, y0


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur whose cost does not grow with sigma: wide blurs run on a down-sampled copy."""
    f = int(sigma // 3)
    if f < 2:
        return cv2.GaussianBlur(a, (0, 0), max(sigma, 0.5))
    h, w = a.shape[:2]
    small = cv2.resize(a, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma / f)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _cast_shadow(canvas: np.ndarray, alpha: np.ndarray, x0: int, y0: int, *, strength: float, blur: float) -> None:
    """Darken the canvas under a soft, offset copy of an object's alpha (objects lie on the tray / on each other)."""
    h, w = canvas.shape[:2]
    pad = int(3 * blur) + 1  # room for the penumbra, else the shadow ends in a visible box edge
    soft = _blur(cv2.copyMakeBorder(alpha, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0), blur)
    x0, y0 = x0 - pad, y0 - pad
    boxes = _clip_box(x0, y0, soft.shape, (h, w))
    if boxes is None:
        return
    cs, ls = boxes
    factor = 1.0 - _F32(strength) * soft[ls]
    canvas[cs] *= factor if canvas.ndim == 2 else factor[:, :, None]


def _blend(canvas: np.ndarray, fg: np.ndarray, layer: np.ndarray, alpha: np.ndarray, boxes: tuple) -> None:
    cs, ls = boxes
    a = alpha[ls][:, :, None]
    canvas[cs] = canvas[cs] * (1.0 - a) + layer * a
    fg[cs] |= alpha[ls] > 0.5


def _light_dir(rng: np.random.Generator) -> tuple[float, float, float]:
    """A key light from the upper left, varied a little per image (unit vector, z towards the camera)."""
    ang = math.radians(rng.uniform(200.0, 250.0))
    lx, ly, lz = math.cos(ang) * 0.6, math.sin(ang) * 0.6, 0.8
    n = math.sqrt(lx * lx + ly * ly + lz * lz)
    return lx / n, ly / n, lz / n


# --------------------------------------------------------------------------------------------------------------------
# Scene styles
# --------------------------------------------------------------------------------------------------------------------


def _wallplug_sprite(length: float, diam: float, light: tuple[float, float, float], albedo: float) -> np.ndarray:
    """A ribbed plastic wall plug along +x: (shade, alpha) channels; shading from its surface of revolution."""
    pad = 3
    sw = int(math.ceil(length)) + 2 * pad
    sh = int(math.ceil(diam * 1.2)) + 2 * pad
    u = np.arange(sw, dtype=_F32) - pad + 0.5
    v = np.arange(sh, dtype=_F32)[:, None] - sh / 2 + 0.5
    t = u / _F32(length)
    phase = (t / _F32(0.055)) % 1.0
    tooth = np.where(phase < 0.8, 0.54 - 0.07 * phase / 0.8, 0.47 + 0.07 * (phase - 0.8) / 0.2)
    r = np.where(t < 0.07, 0.56, np.where(t < 0.12, 0.46, np.where(t <= 0.86, tooth, 0.5 - 0.9 * (t - 0.86))))
    r = (r * diam).astype(_F32)
    dr = np.gradient(r).astype(_F32)
    cross = np.clip(v / r[None, :], -1.0, 1.0)
    nz = np.sqrt(np.maximum(1.0 - cross * cross, 0.0))
    inv = 1.0 / np.sqrt(1.0 + dr * dr)
    lx, ly, lz = light
    ndotl = (-dr[None, :] * lx + cross * ly + nz * lz) * inv[None, :]
    hx, hy, hz = lx, ly, lz + 1.0
    hn = math.sqrt(hx * hx + hy * hy + hz * hz)
    ndoth = np.clip((-dr[None, :] * hx + cross * hy + nz * hz) * inv[None, :] / hn, 0.0, 1.0)
    shade = albedo * (0.3 + 0.7 * np.clip(ndotl, 0.0, 1.0)) + 0.18 * ndoth**24
    slot = (t[None, :] > 0.5) & (np.abs(v) < 0.045 * diam)
    shade = np.where(slot, shade * 0.35, shade)
    head_bore = (t[None, :] < 0.02) & (np.abs(v) < 0.25 * diam)
    shade = np.where(head_bore, shade * 0.6, shade)
    alpha = np.clip(r[None, :] - np.abs(v) + 0.5, 0.0, 1.0) * np.clip(u + 0.5, 0, 1) * np.clip(length - u + 0.5, 0, 1)
    return np.dstack([shade, alpha]).astype(_F32)


def _render_wallplugs(spec: SceneSpec, rng: np.random.Generator) -> _Scene:
    """Loose plastic wall plugs spread on a dark tray, grey, top light: random count, pose and shadows.

    Plugs do not lie on top of each other: every crossing of two ribbed bodies is a configuration of its own, and a
    training set of tens of images cannot cover them, so a detector would learn the pile instead of the parts (the
    real category's plugs lie loose too). Objects stay inside the field of view for the same reason.
    """
    h, w = spec.height, spec.width
    k = _area_scale(spec, 2448, 2048)
    tray = rng.uniform(0.15, 0.24)
    bg = tray * (1.0 + 0.10 * _fractal(rng, h, w, 400 * k, 2) + 0.04 * _value_noise(rng, h, w, 3 * k))
    bg *= _low_res_field(lambda x, y: 1.0 - 0.18 * ((x - 0.5) ** 2 + (y - 0.5) ** 2), h, w)
    bg = np.clip(bg, 0.0, 1.0)[:, :, None].astype(_F32)
    canvas = bg.copy()
    fg = np.zeros((h, w), bool)
    occupied = np.zeros((h, w), bool)
    length = k * rng.uniform(340.0, 420.0)
    diam = length * rng.uniform(0.21, 0.25)
    reach = max(1, int(0.35 * diam))  # each plug keeps this much free space: plugs are 2 × reach apart at least
    gap = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1, 2 * reach + 1))
    gx, gy, gz = _light_dir(rng)
    n, placed = int(rng.integers(12, 22)), 0
    margin = 0.7 * length
    for _ in range(6 * n):
        if placed == n:
            break
        theta = rng.uniform(0.0, 2 * math.pi)
        c, s = math.cos(theta), math.sin(theta)
        cx, cy = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
        light = (gx * c + gy * s, -gx * s + gy * c, gz)
        sprite = _wallplug_sprite(length * rng.uniform(0.97, 1.03), diam, light, rng.uniform(0.55, 0.68))
        warped, x0, y0 = _warp_sprite(sprite, theta, cx, cy)
        alpha = np.ascontiguousarray(warped[:, :, 1])
        boxes = _clip_box(x0, y0, warped.shape, (h, w))
        if boxes is None:
            continue
        cs, ls = boxes
        # The dilation needs room beyond the sprite's tight box, or the free space would be cut off at its edges.
        body = cv2.dilate(cv2.copyMakeBorder((alpha > 0.02).astype(np.uint8), *(reach,) * 4, cv2.BORDER_CONSTANT), gap)
        padded = _clip_box(x0 - reach, y0 - reach, body.shape, (h, w))
        if padded is None:
            continue
        pcs, pls = padded
        if (occupied[pcs] & (body[pls] > 0)).any():
            continue
        occupied[pcs] |= body[pls] > 0
        off = 0.12 * diam
        _cast_shadow(
            canvas, alpha, x0 + round(-gx * off * 2), y0 + round(-gy * off * 2), strength=0.55, blur=0.12 * diam
        )
        _blend(canvas, fg, warped[ls][:, :, :1], alpha, (cs, ls))
        placed += 1
    canvas *= (1.0 + 0.025 * _value_noise(rng, h, w, 1.5 * k))[:, :, None]
    return _Scene(canvas, bg, fg, object_px=length, on_objects=True)


def _render_sheet_metal(spec: SceneSpec, rng: np.random.Generator) -> _Scene:
    """A brushed metal strip under dark-field light: dark streaky surface, bright lit edges, black surround."""
    h, w = spec.height, spec.width
    k = _area_scale(spec, 4224, 1056)
    ys = np.arange(h, dtype=_F32)[:, None]
    xs = np.arange(w, dtype=_F32)[None, :]
    slope = rng.uniform(-0.004, 0.004)
    top = h * rng.uniform(0.07, 0.14) + slope * (xs - w / 2)
    bottom = h * rng.uniform(0.86, 0.93) + slope * (xs - w / 2)
    inside = np.clip(np.minimum(ys - top, bottom - ys) + 0.5, 0.0, 1.0)
    base = rng.uniform(0.10, 0.16)
    streaks = (
        _fractal(rng, h, w, 6 * k, 2, persistence=0.6, aniso=60.0) * 0.45
        + _value_noise(rng, h, w, 1.0, aniso=25.0) * 0.25
    )
    centre, freq = rng.uniform(0.3, 0.7), rng.uniform(1.0, 2.0)  # uneven ring light along the strip
    glow = _low_res_field(lambda x, y: 1.0 + 0.25 * np.cos((x - centre) * math.pi * freq) * (0.6 + 0.4 * y), h, w)
    metal = base * glow * (1.0 + 0.35 * streaks)
    edge_w = max(1.0, 9.0 * k)
    d_edge = np.minimum(np.abs(ys - top), np.abs(ys - bottom))
    edge = rng.uniform(0.55, 0.8) * np.exp(-((d_edge / edge_w) ** 2))
    surround = 0.02 + 0.006 * _value_noise(rng, h, w, 2.0)
    img = surround * (1.0 - inside) + metal * inside + edge
    img = np.clip(img, 0.0, 1.0).astype(_F32)[:, :, None]
    hole_bg = np.broadcast_to(surround[:, :, None], img.shape).astype(_F32)
    fg = inside > 0.5
    strip_h = float(np.median(bottom - top))
    return _Scene(img, hole_bg, fg, object_px=0.6 * strip_h, dark_field=True, on_objects=False)


def _walnut_sprite(a: float, b: float, rng: np.random.Generator, light: tuple[float, float, float]) -> np.ndarray:
    """A walnut seen from above, long axis along +x: (shade, seam, alpha) channels."""
    pad = 3
    sw, sh = int(math.ceil(2.25 * a)) + 2 * pad, int(math.ceil(2.25 * b)) + 2 * pad
    x = (np.arange(sw, dtype=_F32) - sw / 2 + 0.5)[None, :] / _F32(a)
    y = (np.arange(sh, dtype=_F32) - sh / 2 + 0.5)[:, None] / _F32(b)
    r = np.sqrt(x * x + y * y)
    phi = np.arctan2(y, x)
    edge = np.ones_like(r)
    for harmonic in range(2, 7):
        edge += _F32(rng.uniform(0.0, 0.035)) * np.cos(harmonic * phi + _F32(rng.uniform(0, 2 * math.pi)))
    edge += 0.09 * np.clip(np.cos(phi), 0.0, 1.0) ** 12  # pointed tip
    rn = r / edge
    alpha = np.clip((edge - r) * _F32(min(a, b)) + 0.5, 0.0, 1.0)
    nz = np.sqrt(np.clip(1.0 - rn * rn, 0.0, 1.0))
    nx, ny = x / edge, y / edge
    norm = np.sqrt(nx * nx + ny * ny + nz * nz) + 1e-6
    lx, ly, lz = light
    shade = 0.3 + 0.7 * np.clip((nx * lx + ny * ly + nz * lz) / norm, 0.0, 1.0)
    seam_w = 0.045
    seam = 0.6 * np.exp(-((y / seam_w) ** 2)) - 0.6 * np.exp(-(((np.abs(y) - 1.8 * seam_w) / seam_w) ** 2))
    seam = seam * (rn < 0.97)
    return np.dstack([shade, seam, alpha]).astype(_F32)


def _render_walnuts(spec: SceneSpec, rng: np.random.Generator) -> _Scene:
    """Walnuts in bulk on a dark tray, RGB: wrinkled brown shells (maze-like grooves with relief shading), random pose.

    Everything in this scene is smooth at the pixel scale (the finest wrinkles are ~15 px wide), so large frames are
    rendered at half size and upsampled: 4x less work, and the sensor noise added later restores pixel-level grain.
    """
    if min(spec.height, spec.width) < 400:
        return _render_walnuts_at(spec, rng)
    half = _render_walnuts_at(SceneSpec(spec.category, spec.width // 2, spec.height // 2, spec.channels), rng)
    size = (spec.width, spec.height)

    def up(a: np.ndarray) -> np.ndarray:
        return _as3(cv2.resize(a, size, interpolation=cv2.INTER_LINEAR))

    fg = cv2.resize(half.foreground.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    return _Scene(up(half.image), up(half.background), fg, object_px=2 * half.object_px, on_objects=True)


def _render_walnuts_at(spec: SceneSpec, rng: np.random.Generator) -> _Scene:
    h, w = spec.height, spec.width
    k = _area_scale(spec, 2448, 2048)
    bg_col = _colour(spec, np.array([0.10, 0.095, 0.09]) * rng.uniform(0.8, 1.2))
    bg = bg_col[None, None, :] * (1.0 + 0.12 * _fractal(rng, h, w, 300 * k, 2))[:, :, None]
    bg = np.clip(bg, 0.0, 1.0).astype(_F32)
    # Wrinkles: a height field with narrow dark grooves along the zero lines of multi-octave noise (a brain-like maze,
    # as on a walnut shell), relief-shaded by its own gradient.
    maze = np.abs(_fractal(rng, h, w, 68 * k, 3))
    height = np.sqrt(np.clip(maze / 0.9, 0.0, 1.0)) + 0.25 * _value_noise(rng, h, w, 12 * k)
    height = cv2.GaussianBlur(height.astype(_F32), (0, 0), max(0.5, 3.0 * k))
    gx_l, gy_l, _ = _light_dir(rng)
    gx = cv2.Sobel(height, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(height, cv2.CV_32F, 0, 1, ksize=3)
    relief = np.clip(1.0 + 1.5 * (gx * gx_l + gy * gy_l), 0.4, 1.7)
    tex = ((0.25 + 0.75 * height) * relief).astype(_F32)
    light = _light_dir(rng)
    # Per walnut, only single-channel attribute maps (light, seam, tone, hue) and a coverage map are blended; colour
    # is computed once at the end.
    hh, hw = h, w
    attrs = np.zeros((hh, hw, 4), _F32)
    attrs[:, :, 0] = 1.0
    cover = np.zeros((hh, hw), _F32)
    diam = k * rng.uniform(420.0, 480.0)
    step = diam * 0.9
    nx, ny = int(hw / step) + 2, int(hh / step) + 2
    cells = [(i, j) for j in range(ny) for i in range(nx)]
    for idx in rng.permutation(len(cells)):
        if rng.random() > 0.88:
            continue
        i, j = cells[idx]
        cx = (i - 0.3 + rng.uniform(-0.2, 0.2)) * step
        cy = (j - 0.3 + rng.uniform(-0.2, 0.2)) * step
        a = 0.5 * diam * rng.uniform(0.95, 1.1)
        b = a * rng.uniform(0.78, 0.92)
        theta = rng.uniform(0.0, 2 * math.pi)
        c, s = math.cos(theta), math.sin(theta)
        loc_light = (light[0] * c + light[1] * s, -light[0] * s + light[1] * c, light[2])
        warped, x0, y0 = _warp_sprite(_walnut_sprite(a, b, rng, loc_light), theta, cx, cy)
        alpha = np.ascontiguousarray(warped[:, :, 2])
        shadow_off = 0.1 * diam
        light_map = attrs[:, :, 0]
        _cast_shadow(
            light_map,
            alpha,
            x0 + round(-light[0] * shadow_off),
            y0 + round(-light[1] * shadow_off),
            strength=0.6,
            blur=0.06 * diam,
        )
        boxes = _clip_box(x0, y0, warped.shape, (hh, hw))
        if boxes is None:
            continue
        cs, ls = boxes
        tone, hue = rng.uniform(0.85, 1.12), rng.uniform(0.0, 1.0)
        vals = np.dstack(
            [warped[ls][:, :, 0], warped[ls][:, :, 1]] + [np.full(warped[ls].shape[:2], v, _F32) for v in (tone, hue)]
        )
        al = alpha[ls]
        attrs[cs] = attrs[cs] * (1.0 - al[:, :, None]) + vals * al[:, :, None]
        cover[cs] = cover[cs] * (1.0 - al) + al
    light_map, seam, tone, hue = (attrs[:, :, i] for i in range(4))
    pale, dark = _colour(spec, (0.72, 0.54, 0.36)), _colour(spec, (0.52, 0.36, 0.22))
    shell_scalar = tex * tone * (1.0 + 0.35 * seam) * cover
    canvas = np.empty_like(bg)
    inv_cover = 1.0 - cover
    for ch in range(bg.shape[2]):
        albedo = (pale[ch] + (dark[ch] - pale[ch]) * hue) * shell_scalar
        canvas[:, :, ch] = light_map * (bg[:, :, ch] * inv_cover + albedo)
    np.clip(canvas, 0.0, 1.0, out=canvas)
    return _Scene(canvas, bg, cover > 0.5, object_px=diam, on_objects=True)


def _blob_polygon(
    rng: np.random.Generator, centre: tuple[float, float], radii: tuple[float, float], wobble: float
) -> np.ndarray:
    """A smooth irregular closed outline (int32 points for cv2.fillPoly)."""
    (cx, cy), (rx, ry) = centre, radii
    n = 32
    ang = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    rad = np.ones(n)
    for harmonic in range(2, 5):
        rad += rng.uniform(0.0, wobble) * np.cos(harmonic * ang + rng.uniform(0, 2 * math.pi))
    rot = rng.uniform(0.0, 2 * math.pi)
    px, py = rx * rad * np.cos(ang), ry * rad * np.sin(ang)
    xs = cx + px * math.cos(rot) - py * math.sin(rot)
    ys = cy + px * math.sin(rot) + py * math.cos(rot)
    return np.round(np.stack([xs, ys], axis=1)).astype(np.int32)


_JELLY_COLOURS = (
    (0.95, 0.18, 0.15),  # raspberry red
    (0.98, 0.55, 0.10),  # orange
    (0.98, 0.85, 0.20),  # lemon
    (0.45, 0.85, 0.25),  # green apple
    (0.60, 0.25, 0.65),  # blackcurrant
)


def _render_fruit_jelly(spec: SceneSpec, rng: np.random.Generator) -> _Scene:
    """Back-lit translucent fruit jelly pieces in a compartment tray: light passes through, so thick parts look deep
    and saturated, thin rims glow, and air bubbles show as bright dots with dark rings."""
    h, w = spec.height, spec.width
    k = _area_scale(spec, 2100, 1520)
    cx0, cy0 = rng.uniform(0.45, 0.55), rng.uniform(0.45, 0.55)
    vign = _low_res_field(lambda x, y: 1.0 - 0.25 * ((x - cx0) ** 2 + (y - cy0) ** 2) * 2.0, h, w)
    back = _colour(spec, np.array([1.0, 0.97, 0.9]) * rng.uniform(0.82, 0.9))
    rows, cols = 3, 4
    margin_x, margin_y = 0.05 * w, 0.06 * h
    cw, ch = (w - 2 * margin_x) / cols, (h - 2 * margin_y) / rows
    wall = np.zeros((h, w), np.uint8)
    wall_px = max(1, round(22 * k))
    for r_i in range(rows + 1):
        y = round(margin_y + r_i * ch)
        cv2.line(wall, (round(margin_x), y), (round(w - margin_x), y), 255, wall_px)
    for c_i in range(cols + 1):
        x = round(margin_x + c_i * cw)
        cv2.line(wall, (x, round(margin_y)), (x, round(h - margin_y)), 255, wall_px)
    wall_f = cv2.GaussianBlur(wall.astype(_F32) / 255.0, (0, 0), max(0.7, 4 * k))
    tray = np.ones((h, w), _F32)
    tray[int(margin_y) : int(h - margin_y), int(margin_x) : int(w - margin_x)] = 0.86
    tray = cv2.GaussianBlur(tray, (0, 0), max(0.7, 6 * k))
    trans = tray * (1.0 - 0.5 * wall_f) * vign * (1.0 + 0.02 * _fractal(rng, h, w, 60 * k, 2))
    bg = (trans[:, :, None] * back[None, None, :]).astype(_F32)
    canvas = bg.copy()
    fg = np.zeros((h, w), bool)
    size = 0.36 * min(cw, ch) * rng.uniform(0.95, 1.05)
    palette = list(_JELLY_COLOURS)
    for r_i in range(rows):
        for c_i in range(cols):
            if rng.random() < 0.08:
                continue
            pcx = margin_x + (c_i + 0.5 + rng.uniform(-0.06, 0.06)) * cw
            pcy = margin_y + (r_i + 0.5 + rng.uniform(-0.06, 0.06)) * ch
            rx = size * rng.uniform(0.9, 1.15)
            ry = size * rng.uniform(0.7, 0.95)
            half = int(math.ceil(1.4 * max(rx, ry))) + 4
            x0, y0 = round(pcx) - half, round(pcy) - half
            poly = _blob_polygon(rng, (half + pcx - round(pcx), half + pcy - round(pcy)), (rx, ry), 0.06)
            m = np.zeros((2 * half, 2 * half), np.uint8)
            cv2.fillPoly(m, [poly], 255, lineType=cv2.LINE_AA)
            alpha = m.astype(_F32) / 255.0
            dist = cv2.distanceTransform((m > 127).astype(np.uint8), cv2.DIST_L2, 3)
            thick = np.sqrt(np.clip(dist / (0.6 * min(rx, ry)), 0.0, 1.0))
            for _ in range(int(rng.integers(0, 7))):
                br = max(1.0, k * rng.uniform(3.0, 14.0))
                bx = half + rng.uniform(-0.6, 0.6) * rx
                by = half + rng.uniform(-0.6, 0.6) * ry
                rr = int(math.ceil(2 * br)) + 1
                bx0, by0 = max(0, int(bx) - rr), max(0, int(by) - rr)
                win = (slice(by0, int(by) + rr + 1), slice(bx0, int(bx) + rr + 1))
                yy, xx = np.ogrid[win[0], win[1]]
                d2 = ((xx - bx) ** 2 + (yy - by) ** 2).astype(_F32) / _F32(br * br)
                t_win = thick[win]
                ring = 0.35 * np.exp(-(((np.sqrt(d2) - 1.0) / 0.25) ** 2)) * (t_win > 0)
                thick[win] = t_win - 0.5 * np.exp(-d2 * 2.0) * t_win + ring
            col = np.array(palette[int(rng.integers(len(palette)))]) + rng.normal(0.0, 0.03, 3)
            col = np.clip(col, 0.05, 1.0)
            absorb = -np.log(_colour(spec, col))
            density = rng.uniform(1.3, 1.9)
            boxes = _clip_box(x0, y0, (2 * half, 2 * half), (h, w))
            if boxes is None:
                continue
            cs, ls = boxes
            t_loc = thick[ls][:, :, None]
            transmission = np.exp(-absorb[None, None, :] * density * (0.35 + t_loc))
            rim = np.exp(-dist[ls] / max(1.0, 10.0 * k))[:, :, None]
            sugar = 1.0 + 0.05 * rng.standard_normal(t_loc.shape[:2]).astype(_F32)[:, :, None]
            layer = bg[cs] * transmission * (1.0 + 0.35 * rim) * sugar
            _blend(canvas, fg, layer.astype(_F32), alpha, (cs, ls))
    canvas = np.clip(canvas, 0.0, 1.0).astype(_F32)
    return _Scene(canvas, bg, fg, object_px=2 * size, on_objects=True)


def _render_generic(spec: SceneSpec, rng: np.random.Generator) -> _Scene:
    """Fallback for any other category: a textured surface with a few shaded objects of random colour and shape.

    Plausible enough for can / fabric / rice / vial or a user's own product, and it keeps every pipeline runnable.
    """
    h, w = spec.height, spec.width
    k = math.sqrt(h * w) / 2048.0
    base = _colour(spec, rng.uniform(0.25, 0.6, 3))
    tex = 1.0 + 0.12 * _fractal(rng, h, w, 120 * k, 3) + 0.05 * _value_noise(rng, h, w, 2 * k, aniso=rng.uniform(1, 6))
    bg = np.clip(base[None, None, :] * tex[:, :, None], 0.0, 1.0).astype(_F32)
    canvas = bg.copy()
    fg = np.zeros((h, w), bool)
    light = _light_dir(rng)
    n_obj = int(rng.integers(1, 6))
    size = min(h, w) * rng.uniform(0.18, 0.3)
    for _ in range(n_obj):
        a = 0.5 * size * rng.uniform(0.8, 1.3)
        b = a * rng.uniform(0.5, 1.0)
        sprite = _walnut_sprite(a, b, rng, light)
        sprite[:, :, 1] = 0.0
        theta = rng.uniform(0.0, 2 * math.pi)
        warped, x0, y0 = _warp_sprite(sprite, theta, rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h)
        alpha = np.ascontiguousarray(warped[:, :, 2])
        _cast_shadow(canvas, alpha, x0 + round(0.05 * size), y0 + round(0.05 * size), strength=0.4, blur=0.05 * size)
        boxes = _clip_box(x0, y0, warped.shape, (h, w))
        if boxes is None:
            continue
        cs, ls = boxes
        col = _colour(spec, rng.uniform(0.35, 0.9, 3))
        layer = col[None, None, :] * warped[ls][:, :, 0:1] * tex[cs][:, :, None]
        _blend(canvas, fg, layer.astype(_F32), alpha, (cs, ls))
    if fg.sum() < 0.02 * h * w:
        fg[:] = True
    return _Scene(np.clip(canvas, 0.0, 1.0).astype(_F32), bg, fg, object_px=size, on_objects=True)


_RENDERERS: dict[str, Callable[[SceneSpec, np.random.Generator], _Scene]] = {
    "wallplugs": _render_wallplugs,
    "sheet_metal": _render_sheet_metal,
    "walnuts": _render_walnuts,
    "fruit_jelly": _render_fruit_jelly,
    "generic": _render_generic,
}


def _render_scene(spec: SceneSpec, rng: np.random.Generator) -> _Scene:
    scene = _RENDERERS[spec.style](spec, rng)
    exposure = _F32(rng.uniform(0.93, 1.07))  # normal images vary in exposure too
    scene.image = np.clip(scene.image * exposure, 0.0, 1.0)
    scene.background = np.clip(scene.background * exposure, 0.0, 1.0)
    return scene


# --------------------------------------------------------------------------------------------------------------------
# Defects
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Roi:
    img: np.ndarray  # clean scene patch (H, W, C)
    bg: np.ndarray
    fg: np.ndarray
    cx: float  # defect centre in patch coordinates
    cy: float


def _wander(rng: np.random.Generator, cx: float, cy: float, length: float, jitter: float) -> np.ndarray:
    """A path of about ``length`` pixels through (cx, cy): gently curved (scratch) or jagged (crack) by ``jitter``."""
    n = max(2, int(length / max(2.0, length / 14.0)) + 1)
    step = length / (n - 1)
    heading = rng.uniform(0.0, 2 * math.pi)
    turn = rng.normal(0.0, 0.08)
    pts = [(0.0, 0.0)]
    for _ in range(n - 1):
        heading += turn + rng.normal(0.0, jitter)
        x, y = pts[-1]
        pts.append((x + step * math.cos(heading), y + step * math.sin(heading)))
    arr = np.array(pts)
    arr -= arr.mean(axis=0)
    arr += (cx, cy)
    return np.round(arr).astype(np.int32)


def _soft_profile(m: np.ndarray, sigma: float) -> np.ndarray:
    """A 0..1 profile that peaks in the middle of a mask and is zero outside it (never bleeds past the mask)."""
    prof = cv2.GaussianBlur(m.astype(_F32), (0, 0), max(0.5, sigma))
    peak = float(prof.max()) + 1e-6
    return np.where(m, 0.35 + 0.65 * prof / peak, 0.0).astype(_F32)


def _defect_scratch(roi: _Roi, s: float, scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    pts = _wander(rng, roi.cx, roi.cy, s, 0.04)
    # Lines of one native pixel vanish in the resize to the working resolution: only tiny defects are that thin.
    thick = int(np.clip(round(rng.uniform(0.8, 1.6) * s / 40.0), 1 if s < 20 else 3, 9))
    m = np.zeros(roi.fg.shape, np.uint8)
    cv2.polylines(m, [pts], False, 1, thickness=thick, lineType=cv2.LINE_8)
    m = (m > 0) & roi.fg
    prof = _soft_profile(m, thick / 2.0)[:, :, None]
    # Dark field: scratches scatter light (bright). Bright field: a groove, dark on a bright part (a brighter line
    # would saturate), either sign on a dark one.
    bright_part = float(roi.img[m].mean()) > 0.5 if m.any() else False
    sign = 1.0 if scene.dark_field else -1.0 if bright_part or rng.random() < 0.5 else 1.0
    amp = rng.uniform(0.2, 0.35)
    return m, roi.img + _F32(sign * amp) * prof


def _defect_crack(roi: _Roi, s: float, scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    m = np.zeros(roi.fg.shape, np.uint8)
    main = _wander(rng, roi.cx, roi.cy, s, 0.5)
    thick = int(np.clip(round(rng.uniform(0.6, 1.3) * s / 50.0), 1 if s < 20 else 3, 7))
    cv2.polylines(m, [main], False, 1, thickness=thick, lineType=cv2.LINE_8)
    for _ in range(int(rng.integers(0, 3)) if s > 30 else 0):
        start = main[int(rng.integers(len(main)))]
        branch = _wander(rng, float(start[0]), float(start[1]), s * rng.uniform(0.2, 0.4), 0.6)
        branch += start - branch[0]
        cv2.polylines(m, [branch], False, 1, thickness=1, lineType=cv2.LINE_8)
    m = (m > 0) & roi.fg
    prof = _soft_profile(m, thick / 2.0)[:, :, None]
    if scene.dark_field:
        return m, roi.img + _F32(rng.uniform(0.15, 0.3)) * prof
    depth = _F32(rng.uniform(0.5, 0.8))
    return m, roi.img * (1.0 - depth * prof)


def _defect_missing(roi: _Roi, s: float, scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    cx, cy = roi.cx, roi.cy
    if scene.on_objects and rng.random() < 0.7:
        # Move the centre onto the object's outline, so the piece is bitten out of the border.
        ang = rng.uniform(0.0, 2 * math.pi)
        for step in np.linspace(0.0, 1.2 * s, 16):
            x, y = int(round(cx + step * math.cos(ang))), int(round(cy + step * math.sin(ang)))
            if not (0 <= y < roi.fg.shape[0] and 0 <= x < roi.fg.shape[1]) or not roi.fg[y, x]:
                cx, cy = float(x), float(y)
                break
    m = np.zeros(roi.fg.shape, np.uint8)
    cv2.fillPoly(m, [_blob_polygon(rng, (cx, cy), (s / 2, s / 2 * rng.uniform(0.5, 1.0)), 0.25)], 1)
    m = (m > 0) & roi.fg
    new = roi.bg.copy()
    ksize = max(1, int(round(s / 25.0)))
    inner = cv2.erode(m.astype(np.uint8), np.ones((2 * ksize + 1, 2 * ksize + 1), np.uint8)) > 0
    rim = (m & ~inner)[:, :, None]
    edge = roi.img + 0.25 if scene.dark_field else roi.img * 0.6
    return m, np.where(rim, edge, new)


def _defect_contamination(
    roi: _Roi, s: float, scene: _Scene, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    s = min(s, 0.35 * scene.object_px) if s > _MIN_DEFECT_PX else s
    m = np.zeros(roi.fg.shape, np.uint8)
    if rng.random() < 0.35 and s > 12:  # a fibre or hair
        cv2.polylines(m, [_wander(rng, roi.cx, roi.cy, s, 0.25)], False, 1, thickness=int(rng.integers(3, 6)))
    else:
        cv2.fillPoly(m, [_blob_polygon(rng, (roi.cx, roi.cy), (s / 2, s / 2 * rng.uniform(0.5, 1.0)), 0.3)], 1)
    m = m > 0
    if not m.any():
        m[int(round(roi.cy)), int(round(roi.cx))] = True
    c = roi.img.shape[2]
    choice = rng.random()
    if choice < 0.45:
        col = np.full(c, rng.uniform(0.03, 0.15), _F32)  # dark particle
    elif choice < 0.75:
        col = np.full(c, rng.uniform(0.7, 0.95), _F32)  # bright particle (dust, chip)
    else:
        col = rng.uniform(0.1, 0.8, c).astype(_F32)  # foreign colour
    opacity = _F32(rng.uniform(0.55, 0.9))
    grain = (0.85 + 0.3 * rng.random(m.shape)).astype(_F32)[:, :, None]
    new = roi.img * (1.0 - opacity) + col[None, None, :] * grain * opacity
    return m, new


def _defect_dent(roi: _Roi, s: float, scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    hh, ww = roi.fg.shape
    sx = max(0.8, s / 4.0)
    sy = sx * rng.uniform(0.5, 1.0)
    rot = rng.uniform(0.0, math.pi)
    yy, xx = np.mgrid[0:hh, 0:ww].astype(_F32)
    dx, dy = xx - roi.cx, yy - roi.cy
    u = dx * math.cos(rot) + dy * math.sin(rot)
    v = -dx * math.sin(rot) + dy * math.cos(rot)
    g = np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))
    m = (g > math.exp(-1.5)) & roi.fg
    # A dent lit from the side: a shadowed hollow, deepest on one flank.  One-signed on purpose, so the change has no
    # zero line inside the mask (bright field: darker; dark field: the tilted walls scatter light, so brighter).
    ang = rng.uniform(0.0, 2 * math.pi)
    flank = np.clip(u / sx * math.cos(ang) + v / sy * math.sin(ang), -1.0, 1.0)
    amp = _F32(rng.uniform(0.3, 0.5))
    bump = g * (1.0 + 0.7 * flank)
    shade = 1.0 + amp * 1.5 * bump if scene.dark_field else 1.0 - amp * bump
    # The pressed-in surface also loses its texture (ribs, grain): blend towards a smoothed copy near the centre.
    flat = cv2.GaussianBlur(roi.img, (0, 0), max(1.0, s / 12.0)).reshape(roi.img.shape)
    press = np.clip(1.5 * g, 0.0, 1.0)[:, :, None].astype(_F32)
    return m, (roi.img * (1.0 - press) + flat * press) * shade[:, :, None]


def _defect_discoloration(
    roi: _Roi, s: float, scene: _Scene, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    m = np.zeros(roi.fg.shape, np.uint8)
    cv2.fillPoly(m, [_blob_polygon(rng, (roi.cx, roi.cy), (s / 2, s / 2 * rng.uniform(0.5, 1.0)), 0.3)], 1)
    m = (m > 0) & roi.fg
    # A stain has an edge: a profile as wide as the blob would be a shading gradient, which normal parts show too.
    a = _soft_profile(m, max(1.0, s / 20.0))[:, :, None]
    c = roi.img.shape[2]
    if c == 1:
        gain = np.array([rng.choice([rng.uniform(0.45, 0.65), rng.uniform(1.35, 1.6)])], _F32)
    else:
        gain = (1.0 + rng.normal(0.0, 0.25, 3)) * rng.uniform(0.75, 1.05)
        if np.abs(gain - 1.0).max() < 0.2:
            gain[int(rng.integers(3))] += 0.25
    gain = np.asarray(gain, _F32)
    return m, roi.img * (1.0 + a * (gain[None, None, :] - 1.0))


_DEFECTS: dict[str, Callable[[_Roi, float, _Scene, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _defect_scratch,
    "crack": _defect_crack,
    "missing_piece": _defect_missing,
    "contamination": _defect_contamination,
    "dent": _defect_dent,
    "discoloration": _defect_discoloration,
}


def _pick_centre(fg: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    h, w = fg.shape
    for _ in range(200):
        y, x = int(rng.integers(h)), int(rng.integers(w))
        if fg[y, x]:
            return x, y
    ys, xs = np.nonzero(fg)
    if len(ys) == 0:
        return int(rng.integers(w)), int(rng.integers(h))
    i = int(rng.integers(len(ys)))
    return int(xs[i]), int(ys[i])


def _defect_size(rng: np.random.Generator, max_px: float, object_px: float, allow_tiny: bool = True) -> float:
    """Defect size in pixels: with ``allow_tiny``, ``_TINY_DEFECT_SHARE`` of them are log-uniform down to a few pixels (the
    hard, tiny ones); the rest span 0.3 of an object up to ``max_px``."""
    tiny = allow_tiny and rng.random() < _TINY_DEFECT_SHARE
    low = _MIN_DEFECT_PX if tiny else max(_MIN_DEFECT_PX, 0.3 * object_px)
    return math.exp(rng.uniform(math.log(low), math.log(max(max_px, low * 1.01))))


def _apply_defects(
    scene: _Scene,
    rng: np.random.Generator,
    n_defects: int | None,
    kinds: Sequence[str] | None,
    size_px: float | None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Paint defects strictly inside their masks; return the defective scene, the 0/255 mask and the kinds used."""
    h, w = scene.foreground.shape
    img = scene.image.copy()
    mask = np.zeros((h, w), np.uint8)
    n = n_defects if n_defects is not None else int(rng.choice([1, 2, 3], p=[0.55, 0.3, 0.15]))
    pool = tuple(kinds) if kinds else DEFECT_KINDS
    unknown = set(pool) - set(DEFECT_KINDS)
    if unknown:
        raise ValueError(f"unknown defect kinds {sorted(unknown)}; known: {DEFECT_KINDS}")
    max_px = max(2 * _MIN_DEFECT_PX, 0.6 * scene.object_px)
    used: list[str] = []
    for index in range(n):
        kind = str(pool[int(rng.integers(len(pool)))])
        for _attempt in range(12):
            # The first defect is never tiny: a defect of a few native pixels vanishes when the image is resized for
            # the detector, and an image whose only defect cannot be seen at the working resolution would test the
            # resize, not the detector. Tiny defects come on top and still count, region by region, in AU-PRO.
            s = size_px if size_px is not None else _defect_size(rng, max_px, scene.object_px, allow_tiny=index > 0)
            x, y = _pick_centre(scene.foreground, rng)
            r = int(math.ceil(1.3 * s)) + 6
            x0, y0, x1, y1 = max(0, x - r), max(0, y - r), min(w, x + r + 1), min(h, y + r + 1)
            win = (slice(y0, y1), slice(x0, x1))
            roi = _Roi(scene.image[win], scene.background[win], scene.foreground[win], float(x - x0), float(y - y0))
            m, new = _DEFECTS[kind](roi, s, scene, rng)
            if not m.any():
                continue
            new = np.clip(new, 0.0, 1.0).astype(_F32)
            # Every masked pixel must differ from the clean scene by a visible-to-a-metric margin.
            diff = new - roi.img
            weak = m & (np.abs(diff).max(axis=2) < _MIN_DELTA)
            if weak.any():
                direction = np.where(diff.sum(axis=2) < 0, -1.0, 1.0)
                direction = np.where(roi.img.mean(axis=2) + direction * _MIN_DELTA > 1.0, -1.0, direction)
                direction = np.where(roi.img.mean(axis=2) + direction * _MIN_DELTA < 0.0, 1.0, direction)
                nudged = np.clip(roi.img + (direction * _MIN_DELTA)[:, :, None], 0.0, 1.0)
                new = np.where(weak[:, :, None], nudged, new)
            patch = img[win]
            patch[m] = new[m]
            mask[win][m] = 255
            used.append(kind)
            break
        else:
            logger.debug("no room for a %s defect after 12 attempts", kind)
    if not used:  # the scene had no usable foreground: fall back to a particle anywhere
        return _apply_defects(
            _Scene(scene.image, scene.background, np.ones((h, w), bool), scene.object_px, scene.dark_field),
            rng,
            1,
            ("contamination",),
            size_px,
        )
    return img, mask, used


# --------------------------------------------------------------------------------------------------------------------
# Lighting, noise, quantisation
# --------------------------------------------------------------------------------------------------------------------


def _lighting(token: str, h: int, w: int, c: int, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    """A pointwise photometric transform for a lighting token (pointwise, so it never moves a defect's pixels)."""
    if token == "regular":
        return lambda x: x
    if token == "overexposed":
        gain = _F32(rng.uniform(1.15, 1.3))
        return lambda x: x * gain
    if token == "underexposed":
        gain = _F32(rng.uniform(0.6, 0.72))
        return lambda x: x * gain
    if token == "shift_1":  # illumination gradient across the field of view
        ang = rng.uniform(0.0, 2 * math.pi)
        strength = rng.uniform(0.2, 0.3)
        field = _low_res_field(
            lambda x, y: 1.0 + strength * ((x - 0.5) * math.cos(ang) + (y - 0.5) * math.sin(ang)) * 2.0, h, w
        )[:, :, None]
        return lambda x: x * field
    if token == "shift_2":  # different light source: colour cast (RGB) or flat, low-contrast light (grey)
        if c == 3:
            warm = rng.random() < 0.5
            gains = np.array([1.12, 1.0, 0.88] if warm else [0.9, 0.97, 1.12], _F32) * _F32(rng.uniform(0.95, 1.05))
            return lambda x: x * gains[None, None, :]
        contrast = _F32(rng.uniform(0.8, 0.88))
        offset = _F32(rng.uniform(0.06, 0.1))
        return lambda x: x * contrast + offset
    if token == "shift_3":  # off-centre spot light with strong fall-off
        sx, sy = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)
        sigma = rng.uniform(0.3, 0.45)
        field = _low_res_field(
            lambda x, y: 0.8 + 0.3 * np.exp(-((x - sx) ** 2 + (y - sy) ** 2) / (2 * sigma * sigma)), h, w
        )[:, :, None]
        return lambda x: x * field
    raise ValueError(f"unknown lighting token {token!r}; known: {LIGHTING_TOKENS + (MIXED_TOKEN,)}")


def _to_uint8(x: np.ndarray, noise: Sequence[np.ndarray]) -> np.ndarray:
    y = x * _F32(255.0)
    for c, plane in enumerate(noise):
        y[:, :, c] += plane
    y += _F32(0.5)
    np.clip(y, 0.0, 255.0, out=y)
    out = y.astype(np.uint8)
    return out[:, :, 0] if out.shape[2] == 1 else out


def _resolve_lighting(lighting: str, rng: np.random.Generator) -> str:
    if lighting == MIXED_TOKEN:
        return str(LIGHTING_TOKENS[int(rng.integers(len(LIGHTING_TOKENS)))])
    if lighting not in LIGHTING_TOKENS:
        raise ValueError(f"unknown lighting token {lighting!r}; known: {LIGHTING_TOKENS + (MIXED_TOKEN,)}")
    return lighting


def _finish(
    images: Sequence[np.ndarray],
    spec: SceneSpec,
    light_rng: np.random.Generator,
    noise_rng: np.random.Generator,
    lighting: str,
) -> list[np.ndarray]:
    """Apply one lighting and one noise realisation to each float image (identical for all, so pairs stay aligned)."""
    token = _resolve_lighting(lighting, light_rng)
    transform = _lighting(token, spec.height, spec.width, spec.channels, light_rng)
    # One noise plane, read at a different column offset per channel: independent per channel and pixel for a third
    # of the cost of drawing H x W x 3 normals.
    off = 17
    plane = noise_rng.standard_normal((spec.height, spec.width + off * (spec.channels - 1)), dtype=_F32)
    plane *= _F32(_NOISE_SIGMA)
    noise = [plane[:, off * c : off * c + spec.width] for c in range(spec.channels)]
    return [_to_uint8(transform(img), noise) for img in images]


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------


def render_normal(spec: SceneSpec, rng: np.random.Generator, lighting: str = "regular") -> np.ndarray:
    """A defect-free image: uint8, ``H x W`` (grey) or ``H x W x 3`` (RGB, channel order R, G, B).

    Equals the ``clean`` image of ``render_pair`` called with a generator in the same state.
    """
    scene_rng, _defect_rng, light_rng, noise_rng = _child_rngs(rng, 4)
    scene = _render_scene(spec, scene_rng)
    return _finish([scene.image], spec, light_rng, noise_rng, lighting)[0]


def render_pair(
    spec: SceneSpec,
    rng: np.random.Generator,
    lighting: str = "regular",
    *,
    n_defects: int | None = None,
    kinds: Sequence[str] | None = None,
    size_px: float | None = None,
) -> DefectiveRender:
    """A defective image, the same scene without defects, the 0/255 mask and the defect kinds.

    ``n_defects`` (default 1-3 at random), ``kinds`` (default: all of ``DEFECT_KINDS``) and ``size_px`` (default:
    log-uniform over 0.3-0.6 object sizes, extra defects sometimes down to 3 px) pin the defects down for tests and
    illustrations.
    """
    scene_rng, defect_rng, light_rng, noise_rng = _child_rngs(rng, 4)
    scene = _render_scene(spec, scene_rng)
    defective, mask, used = _apply_defects(scene, defect_rng, n_defects, kinds, size_px)
    image, clean = _finish([defective, scene.image], spec, light_rng, noise_rng, lighting)
    return DefectiveRender(image=image, clean=clean, mask=mask, kinds=used)


def render_defective(
    spec: SceneSpec, rng: np.random.Generator, lighting: str = "regular"
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A defective image (uint8), its mask (uint8 0/255, same H x W) and the kinds of its 1-3 defects."""
    scene_rng, defect_rng, light_rng, noise_rng = _child_rngs(rng, 4)
    scene = _render_scene(spec, scene_rng)
    defective, mask, used = _apply_defects(scene, defect_rng, None, None, None)
    image = _finish([defective], spec, light_rng, noise_rng, lighting)[0]
    return image, mask, used


def _derive_seed(seed: int, category: str, split: str, index: int) -> int:
    """A per-item seed from (seed, category, split, index): stable across processes and platforms (no ``hash()``)."""
    entropy = [seed % 2**64, zlib.crc32(category.encode("utf-8")), SPLITS.index(split), index + 1]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def plan_dataset(
    spec: SceneSpec, counts: Mapping[str, int], seed: int, private_defect_fraction: float = 0.5
) -> list[DemoItem]:
    """Plan every file of one category, with paths relative to ``<root>/<category>/`` in the official layout.

    ``counts`` keys are ``SPLITS`` (missing ones count 0).  test_public lighting tokens are spread evenly over the six
    tokens (shuffled); the private sets mix good and bad images (``private_defect_fraction``) without ground truth;
    ``test_private_mixed`` renders a random token per image but is named ``NNN_mixed.png`` like the official one.
    """
    unknown = set(counts) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; expected some of {SPLITS}")
    items: list[DemoItem] = []
    for split in SPLITS:
        n = int(counts.get(split, 0))
        if n < 0:
            raise ValueError(f"negative count for {split}: {n}")
        split_rng = np.random.default_rng(_derive_seed(seed, spec.category, split, -1))
        tokens = [LIGHTING_TOKENS[i % len(LIGHTING_TOKENS)] for i in range(n)]
        tokens = [tokens[i] for i in split_rng.permutation(n)]
        for i in range(n):
            item_seed = _derive_seed(seed, spec.category, split, i)
            mask_path: str | None = None
            kind: Literal["normal", "defective"] = "normal"
            if split in ("train", "validation"):
                token = render = "regular"
                path = f"{split}/good/{i:03d}_regular.png"
            elif split == "test_public_good":
                token = render = tokens[i]
                path = f"test_public/good/{i:03d}_{token}.png"
            elif split == "test_public_bad":
                token = render = tokens[i]
                kind = "defective"
                path = f"test_public/bad/{i:03d}_{token}.png"
                mask_path = f"test_public/ground_truth/bad/{i:03d}_{token}_mask.png"
            elif split == "test_private":
                token = render = "regular"
                kind = "defective" if split_rng.random() < private_defect_fraction else "normal"
                path = f"test_private/{i:03d}_regular.png"
            else:
                token = MIXED_TOKEN
                render = str(LIGHTING_TOKENS[int(split_rng.integers(len(LIGHTING_TOKENS)))])
                kind = "defective" if split_rng.random() < private_defect_fraction else "normal"
                path = f"test_private_mixed/{i:03d}_mixed.png"
            items.append(DemoItem(split, path, mask_path, kind, token, render, item_seed))
    logger.info("planned %d demo items for %s (seed %d)", len(items), spec.category, seed)
    return items


def render_item(spec: SceneSpec, item: DemoItem) -> dict[str, np.ndarray]:
    """Render one planned item from its own seed: ``{image_path: image}`` plus ``{mask_path: mask}`` for public bad."""
    rng = np.random.default_rng(item.seed)
    if item.kind == "normal":
        return {item.image_path: render_normal(spec, rng, item.render_lighting)}
    image, mask, _kinds = render_defective(spec, rng, item.render_lighting)
    out = {item.image_path: image}
    if item.mask_path is not None:
        out[item.mask_path] = mask
    return out
