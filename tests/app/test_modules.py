"""The app's plain modules: configuration, confinement to the data roots, maps and overlays, regions, uploads."""

from __future__ import annotations

import io
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from madfh_pipeline.app.config import ConfigError, load_config
from madfh_pipeline.app.files import (
    AnomalyMap,
    PathNotAllowedError,
    UnsupportedMapError,
    confine,
    load_image,
    load_map,
    overlay,
    scale_map,
)
from madfh_pipeline.app.regions import RegionError, polygons_from_canvas
from madfh_pipeline.app.review_settings import (
    ReviewSettingsError,
    check_band,
    load_explore_share,
    load_review_settings,
    save_explore_share,
)
from madfh_pipeline.app.uploads import UploadLimits, UploadRejectedError, check_upload, safe_name


def test_config_from_flags_and_environment(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "more").mkdir()
    env = {
        "MADFH_KB_URL": "sqlite:///env.sqlite",
        "MADFH_DATA_ROOTS": f"data:{tmp_path / 'more'}",
        "MADFH_UPLOAD_MAX_MB": "5",
        "MADFH_TEXT_SEARCH": "0",
    }
    cfg = load_config([], env, tmp_path)
    assert cfg.kb_url == "sqlite:///env.sqlite" and cfg.data_roots == (tmp_path / "data", tmp_path / "more")
    assert cfg.upload_max_mb == 5 and not cfg.text_search
    assert cfg.feedback_args("wallplugs") == ["kedro", "run", "--env", "demo", "--pipelines=feedback_wallplugs"]
    flags = ["--kb-url", "sqlite:///flag.sqlite", "--data-root", "more", "--feedback-command", "make fb C={category}"]
    cfg = load_config(flags, env, tmp_path)  # flags win
    assert cfg.kb_url == "sqlite:///flag.sqlite" and cfg.data_roots == (tmp_path / "more",)
    assert cfg.feedback_args("walnuts") == ["make", "fb", "C=walnuts"]
    assert cfg.upload_root == tmp_path / "more" / "05_model_input" / "uploads"
    for argv, environ, message in [
        ([], {}, "--kb-url"),
        ([], {"MADFH_KB_URL": "sqlite:///x"}, "--data-root"),
        (["--data-root", "missing"], {"MADFH_KB_URL": "sqlite:///x"}, "not found"),
        (["--feedback-command", "kedro run"], env, "{category}"),
        (["--bogus"], env, "Bad review-app arguments"),
        ([], {**env, "MADFH_TEXT_SEARCH": "maybe"}, "yes/no"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(argv, environ, tmp_path)


def test_confine_refuses_everything_outside_the_roots(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    inside = root / "img" / "a.png"
    inside.write_bytes(b"x")
    (root / "img" / "link.png").symlink_to(tmp_path / "outside.png")
    assert confine("data/img/a.png", [root], tmp_path) == inside
    assert confine(str(inside), [root], tmp_path) == inside
    for bad in (
        "../../etc/passwd",
        "/etc/passwd",
        "data/../../etc/passwd",
        "data/img/../../secret",
        "data/img/link.png",
        "",
        "data/\x00a.png",
    ):
        with pytest.raises(PathNotAllowedError):
            confine(bad, [root], tmp_path)


def test_maps_npy_png_tiff_scaled_with_the_threshold(tmp_path: Path) -> None:
    values = np.linspace(2.0, 12.0, 20 * 10, dtype=np.float32).reshape(10, 20)
    np.save(tmp_path / "m.npy", values)
    loaded = load_map(tmp_path / "m.npy")
    assert loaded.scores and loaded.values.shape == (10, 20)
    scaled = scale_map(loaded, threshold=7.0)
    assert scaled.min() == 0.0 and scaled.max() == 1.0
    assert scaled[np.isclose(values, 7.0, atol=0.03)] == pytest.approx(0.5, abs=0.01)  # threshold at the middle
    below = scale_map(AnomalyMap(values * 0.5, True), threshold=7.0)  # never reaches the threshold: cool half
    assert below.max() < 0.5

    cv2.imwrite(str(tmp_path / "m.png"), np.full((4, 5), 255, np.uint8))
    picture = load_map(tmp_path / "m.png")
    assert not picture.scores and picture.values.max() == 1.0
    tifffile.imwrite(tmp_path / "m.tiff", values.astype(np.float16))
    assert load_map(tmp_path / "m.tiff").scores
    for name, content in [("m.txt", b"x"), ("cube.npy", None)]:
        if content is None:
            np.save(tmp_path / name, np.zeros((2, 3, 4)))
        else:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(UnsupportedMapError):
            load_map(tmp_path / name)


def test_overlay_resizes_the_map_and_follows_opacity(tmp_path: Path) -> None:
    image = np.full((30, 40, 3), 100, np.uint8)
    heat = np.zeros((8, 8), np.float32)
    heat[:4, :4] = 1.0
    assert np.array_equal(overlay(image, heat, 0.0), image)
    full = overlay(image, heat, 1.0)
    assert full.shape == image.shape
    assert not np.array_equal(full[2, 2], full[28, 38])  # hot corner vs cold corner
    with pytest.raises(ValueError):
        overlay(image, heat, 1.5)
    Image.fromarray(np.full((5, 6), 65535, np.uint16)).save(tmp_path / "deep.png")
    assert load_image(tmp_path / "deep.png").shape == (5, 6, 3)


def test_regions_from_canvas_objects_in_image_pixels() -> None:
    drawing = {
        "objects": [
            {"type": "rect", "left": 10, "top": 20, "width": 30, "height": 10, "scaleX": 2, "scaleY": 1},
            {"type": "path", "path": [["M", 0, 0], ["L", 50, 0], ["L", 50, 40], ["z"]]},
            {
                "type": "polygon",
                "left": 100,
                "top": 100,
                "width": 20,
                "height": 20,
                "points": [{"x": 0, "y": 0}, {"x": 20, "y": 0}, {"x": 20, "y": 20}],
                "pathOffset": {"x": 10, "y": 10},
            },
        ]
    }
    polygons = polygons_from_canvas(drawing, canvas_size=(200, 150), image_size=(400, 300))
    assert polygons[0] == [[20.0, 40.0], [140.0, 40.0], [140.0, 60.0], [20.0, 60.0]]
    assert polygons[1] == [[0.0, 0.0], [100.0, 0.0], [100.0, 80.0]]
    assert polygons[2] == [[200.0, 200.0], [240.0, 200.0], [240.0, 240.0]]
    assert polygons_from_canvas({"objects": []}, (10, 10), (10, 10)) is None
    with pytest.raises(RegionError, match="freedraw|'path'|circle"):
        polygons_from_canvas({"objects": [{"type": "circle"}]}, (10, 10), (10, 10))


def _png(width: int = 8, height: int = 6) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (height, width), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_upload_checks() -> None:
    limits = UploadLimits(max_bytes=10_000, max_pixels=100)
    assert check_upload(_png(), "Part 1.PNG", limits).name == "Part_1.png"
    tiff = io.BytesIO()
    Image.new("L", (4, 4)).save(tiff, "TIFF")
    assert check_upload(tiff.getvalue(), "a.tif", limits).format == "TIFF"
    assert safe_name("é weird name!.jpeg") == "weird_name.jpeg"
    for name, data, message in [
        ("../../etc/passwd", _png(), "without folders"),
        ("passwd", _png(), "needs an image suffix"),
        ("a.exe", _png(), "only .png"),
        ("a.png", b"", "empty"),
        ("a.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not a PNG"),
        ("a.png", _png(20, 20), "pixels"),
        ("a.png", _png(10, 10)[: len(_png(10, 10)) // 2], "damaged"),
        ("a.png", b"x" * 20_000, "larger than"),
    ]:
        with pytest.raises(UploadRejectedError, match=message):
            check_upload(data, name, limits)


def test_review_settings_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "review_settings.json"
    assert load_review_settings(path) == {}
    for content, message in [
        ("{", "not valid JSON"),
        ('{"version": 9, "categories": {}}', "not version 1"),
        ('{"version": 1, "categories": {"w": {"review_band_std": "x"}}}', "must be a number"),
        ('{"version": 1, "categories": {"w": {"review_band_std": -1}}}', "between 0 and"),
    ]:
        path.write_text(content)
        with pytest.raises(ReviewSettingsError, match=message):
            load_review_settings(path)
    for bad in (float("nan"), 11.0, True):
        with pytest.raises(ReviewSettingsError):
            check_band(bad)
    path.write_text('{"version": 1, "categories": {"w": {"explore_share": 0.8}}}')
    with pytest.raises(ReviewSettingsError, match=re.escape(f"explore_share of w in {path} must be between 0 and 0.5")):
        load_explore_share(path, "w")
    with pytest.raises(ReviewSettingsError, match="explore_share must be finite"):
        save_explore_share(path, "w", float("nan"), "anna")
