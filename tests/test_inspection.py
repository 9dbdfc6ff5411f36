"""The inspection core: the pipeline's exact preprocessing, decisions and the REVIEW band, native regions and text,
input validation, batch equals single, and a folder that cannot run code."""

from __future__ import annotations

import base64
import json
import pickle
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from madfh_pipeline.demo.synth import SceneSpec
from madfh_pipeline.imaging import read_image
from madfh_pipeline.inspection import (
    INSPECTION_FORMAT,
    InputLimits,
    InspectionModel,
    InspectionSettings,
    InvalidImageError,
    PreprocessingSpec,
    decide,
    decode_base64,
    decode_image,
    review_band,
    to_tensor,
    validate_image,
)
from madfh_pipeline.models.base import ModelFileError
from madfh_pipeline.serving.demo import build_demo_model, render_defective, render_normals

SPEC = SceneSpec("sheet_metal", 96, 80, 1)


@pytest.fixture(scope="module")
def model() -> InspectionModel:
    return build_demo_model(category="sheet_metal", width=96, height=80, channels=1)


@pytest.fixture(scope="module")
def bad() -> tuple[np.ndarray, np.ndarray]:
    return render_defective(SPEC, seed=50, size_px=20)


@pytest.fixture(scope="module")
def goods() -> list[np.ndarray]:
    return render_normals(SPEC, 3, seed=99)


class Payload:
    """Unpickling creates ``marker``: what a crafted model file could do instead of loading tensors."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(self.marker), "w")


# --------------------------------------------------------------------------------------------------------------------
# Same preprocessing as the pipeline
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "channels", "native_channels"),
    [("stretch", 3, 1), ("letterbox", 1, 1), ("letterbox", 3, 3), ("stretch", 1, 3)],
)
def test_canvas_is_byte_identical_to_the_preprocessing_worker(
    tmp_path: Path, mode: str, channels: int, native_channels: int
) -> None:
    from madfh_pipeline.workers import process_image

    rng = np.random.default_rng(3)
    shape = (123, 301) if native_channels == 1 else (123, 301, 3)
    image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    source = tmp_path / "raw.png"
    cv2.imwrite(str(source), image if native_channels == 1 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    task = {
        "relpath": "x.png", "path": str(source), "mask_path": "", "mask_relpath": "", "width": 301, "height": 123,
        "check_size": True, "target_width": 64, "target_height": 48, "mode": mode, "channels": channels,
        "store_root": str(tmp_path / "store"), "compression": None,
    }  # fmt: skip
    facts = process_image(task)
    assert facts["problem"] == ""
    stored = read_image(tmp_path / "store" / "x.png")
    canvas, geometry = PreprocessingSpec(64, 48, mode, channels).to_canvas(image)  # type: ignore[arg-type]
    assert canvas.dtype == np.uint8 and np.array_equal(canvas, stored)
    assert geometry.to_dict() == {k: facts[k] for k in geometry.to_dict()}


def test_to_tensor_matches_the_pipeline_stream() -> None:
    from madfh_pipeline.streaming import to_tensor as pipeline_to_tensor

    canvases = [np.random.default_rng(i).integers(0, 256, (8, 6, 3), dtype=np.uint8) for i in range(2)]
    assert torch.equal(to_tensor(canvases), pipeline_to_tensor(canvases))


def test_scores_equal_the_detector_on_the_stored_canvas(model: InspectionModel, bad: tuple) -> None:
    image = bad[0]
    result = model.inspect(image)
    canvas, _ = model.preprocessing.to_canvas(image)
    out = model.detector.predict(to_tensor([canvas]))
    assert result.score == pytest.approx(float(out.scores[0]), rel=1e-6)
    np.testing.assert_allclose(result.anomaly_map, out.maps[0], rtol=1e-6, atol=1e-5)


def test_prepare_gives_the_canvas_the_detector_sees(model: InspectionModel, bad: tuple) -> None:
    canvas, geometry, native, channels = model.prepare(np.dstack([bad[0]] * 3))
    expected, expected_geometry = model.preprocessing.to_canvas(bad[0])
    assert np.array_equal(canvas, expected) and geometry == expected_geometry
    assert native.shape == (80, 96, 3) and channels == 3


def test_parameters_take_the_category_overrides(model: InspectionModel) -> None:
    category = {"name": "sheet_metal", "width": 96, "height": 80, "channels": 1,
                "preprocessing": {"mode": "letterbox"}}  # fmt: skip
    built = InspectionModel.from_parameters(
        model.detector, {"target_width": 64, "target_height": 64, "mode": "stretch", "output_channels": None},
        category, {"review_band_std": 0.5},
    )  # fmt: skip
    assert built.preprocessing == PreprocessingSpec(64, 64, "letterbox", 1)
    assert built.settings.review_band_std == 0.5
    with pytest.raises(ValueError, match="Unknown inspection setting"):
        InspectionModel.from_parameters(model.detector, {"target_width": 8, "target_height": 8}, category, {"bnad": 1})


# --------------------------------------------------------------------------------------------------------------------
# Decisions, regions, text
# --------------------------------------------------------------------------------------------------------------------


def test_review_band_is_in_validation_std_units(model: InspectionModel) -> None:
    std = model.detector.thresholds.stats["image_std"]
    thr = model.threshold
    banded = InspectionModel(model.detector, model.preprocessing, model.category, InspectionSettings(review_band_std=2))
    assert banded.review_band == pytest.approx((thr - 2 * std, thr + 2 * std))
    assert banded.decide(thr - 2 * std - 1e-6) == "OK"
    assert banded.decide(thr - 2 * std) == "REVIEW"
    assert banded.decide(thr + 2 * std - 1e-6) == "REVIEW"
    assert banded.decide(thr + 2 * std) == "NG"
    plain = InspectionModel(model.detector, model.preprocessing, model.category, InspectionSettings(review_band_std=0))
    assert plain.decide(thr) == "NG" and plain.decide(np.nextafter(thr, -np.inf)) == "OK"  # the pipeline's >= rule
    # the module functions the feedback-loop bench simulates inspection with are the model's own rule
    assert review_band(model.detector.thresholds, 2) == banded.review_band
    assert [decide(s, banded.review_band) for s in (thr - 3 * std, thr, thr + 3 * std)] == ["OK", "REVIEW", "NG"]


def test_defective_image_is_ng_with_grounded_native_regions(model: InspectionModel, bad: tuple) -> None:
    image, truth = bad
    result = model.inspect(image, image_id="bad")
    assert result.decision == "NG" and result.score >= result.review_band[1]
    assert result.region_mask.shape == image.shape[:2] and result.region_mask.dtype == bool
    assert result.anomaly_map.shape == (80, 96)
    assert result.regions and result.n_regions >= len(result.regions)
    x0, y0, x1, y1 = result.regions[0].bbox
    assert (truth[y0:y1, x0:x1] > 0).any(), "the strongest region must overlap the true defect"
    assert result.regions[0].peak >= model.pixel_threshold
    assert "defect region" in result.explanation and len(result.description.regions) >= 1
    assert "is above the threshold" in result.explanation
    record = result.to_record()
    assert record["image_id"] == "bad" and json.loads(record["regions"])[0]["bbox"] == [x0, y0, x1, y1]
    json.dumps(record)  # plain values only


def test_normal_images_are_ok_and_described_as_normal(model: InspectionModel, goods: list[np.ndarray]) -> None:
    for image in goods:
        result = model.inspect(image)
        assert result.decision == "OK", result.score
        assert result.explanation.startswith("The image looks normal.")


def test_any_size_and_rgb_input_is_inspected_on_the_canvas(model: InspectionModel, bad: tuple) -> None:
    big = cv2.resize(bad[0], (192, 160), interpolation=cv2.INTER_CUBIC)
    result = model.inspect(np.dstack([big] * 3))
    assert result.anomaly_map.shape == (80, 96)
    assert result.region_mask.shape == (160, 192) and (result.width, result.height) == (192, 160)
    assert result.input_channels == 3 and result.decision == "NG"


def test_compact_map_scaling_puts_the_pixel_threshold_at_127(model: InspectionModel, bad: tuple) -> None:
    result = model.inspect(bad[0])
    lo, hi = result.map_range
    assert (lo + hi) / 2 == pytest.approx(model.pixel_threshold)
    compact = result.compact_map(48)
    assert compact.shape == (40, 48) and compact.dtype == np.uint8
    small = cv2.resize(result.anomaly_map, (48, 40), interpolation=cv2.INTER_AREA)
    inside = (small > lo) & (small < hi)
    decoded = lo + compact.astype(np.float64) / 255.0 * (hi - lo)
    assert np.abs(decoded - small)[inside].max() <= (hi - lo) / 255.0
    png = cv2.imdecode(np.frombuffer(base64.b64decode(result.map_png_base64(48)), np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(png, compact)


def test_batch_equals_single_and_names_a_bad_input(model: InspectionModel, goods: list[np.ndarray], bad: tuple) -> None:
    images = [*goods, bad[0]]
    batch = model.inspect_batch(images, ["a", "b", "c", "d"])
    for image, result in zip(images, batch, strict=True):
        assert result.score == pytest.approx(model.inspect(image).score, rel=1e-5)
    assert [r.image_id for r in batch] == ["a", "b", "c", "d"]
    with pytest.raises(InvalidImageError, match="'c'"):
        model.inspect_batch([goods[0], goods[1], np.zeros((4, 4), np.uint8)], ["a", "b", "c"])


# --------------------------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------------------------


def test_validation_accepts_the_read_image_conventions() -> None:
    limits = InputLimits()
    gray = np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8)
    assert np.array_equal(validate_image(gray[:, :, None], limits), gray)
    assert np.array_equal(validate_image(gray.astype(np.uint16) << 8, limits), gray)
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 7)])
    assert np.array_equal(validate_image(rgba, limits), rgba[:, :, :3])


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((40, 50), np.float32), "pixel type"),
        (np.zeros((40, 50, 2), np.uint8), "2 channels"),
        (np.zeros((40, 50, 5), np.uint8), "5 channels"),
        (np.zeros((40,), np.uint8), "shape"),
        (np.zeros((8, 50), np.uint8), "too small"),
        (np.zeros((40, 20_000), np.uint8), "too large"),
        ([[1, 2], [3, 4]], "numpy array"),
    ],
)
def test_validation_refuses_with_a_clear_message(image: Any, message: str) -> None:
    with pytest.raises(InvalidImageError, match=message):
        validate_image(image, InputLimits())


def test_strict_channel_policy_refuses_another_channel_count() -> None:
    rgb = np.zeros((40, 50, 3), np.uint8)
    assert validate_image(rgb, InputLimits(channel_policy="convert"), category_channels=1).shape == (40, 50, 3)
    with pytest.raises(InvalidImageError, match="category takes 1"):
        validate_image(rgb, InputLimits(channel_policy="strict"), category_channels=1)


def test_decoding_refuses_non_images_before_decoding_a_bomb() -> None:
    with pytest.raises(InvalidImageError, match="Not an image"):
        decode_image(b"plain text, no image")
    with pytest.raises(InvalidImageError, match="empty"):
        decode_image(b"")
    ok, png = cv2.imencode(".png", np.zeros((30, 40), np.uint8))
    with pytest.raises(InvalidImageError, match="corrupt or truncated"):
        decode_image(png.tobytes()[:40])
    header = bytearray(png.tobytes())
    header[16:24] = (100_000).to_bytes(4, "big") + (100_000).to_bytes(4, "big")  # claims 10^10 pixels
    with pytest.raises(InvalidImageError, match="too large"):
        decode_image(bytes(header))
    with pytest.raises(InvalidImageError, match="too large"):
        decode_image(png.tobytes(), InputLimits(max_bytes=10))
    rgb = np.dstack([np.full((30, 40), v, np.uint8) for v in (10, 20, 30)])
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert np.array_equal(decode_image(encoded.tobytes()), rgb)  # R, G, B order like read_image


def test_base64_is_checked() -> None:
    assert decode_base64("data:image/png;base64," + base64.b64encode(b"abc").decode()) == b"abc"
    with pytest.raises(InvalidImageError, match="base64"):
        decode_base64("not base64 !!")
    with pytest.raises(InvalidImageError, match="too large"):
        decode_base64("A" * 200, InputLimits(max_bytes=10))


# --------------------------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip(model: InspectionModel, bad: tuple, tmp_path: Path) -> None:
    folder = model.save(tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["detector.safetensors", "inspection.json"]
    config = json.loads((folder / "inspection.json").read_text())
    assert config["format"] == INSPECTION_FORMAT and config["category"]["name"] == "sheet_metal"
    loaded = InspectionModel.load(folder)
    assert loaded.version == model.version and loaded.settings == model.settings
    assert loaded.preprocessing == model.preprocessing and loaded.category == model.category
    assert loaded.inspect(bad[0]).score == pytest.approx(model.inspect(bad[0]).score, rel=1e-6)


def test_a_mixed_up_folder_is_refused(model: InspectionModel, tmp_path: Path) -> None:
    folder = model.save(tmp_path / "m")
    other = InspectionModel(
        build_demo_model(category="sheet_metal", n_train=4, n_validation=3, seed=5).detector,
        model.preprocessing,
        model.category,
    )
    shutil.copy(other.save(tmp_path / "other") / "detector.safetensors", folder / "detector.safetensors")
    with pytest.raises(ModelFileError, match="mixed up"):
        InspectionModel.load(folder)
    (folder / "inspection.json").write_text(json.dumps({"format": "madfh_inspection/0"}))
    with pytest.raises(ModelFileError, match="this version reads"):
        InspectionModel.load(folder)
    with pytest.raises(ModelFileError, match="no inspection.json"):
        InspectionModel.load(tmp_path)


def test_uncalibrated_detector_is_refused(model: InspectionModel) -> None:
    from madfh_pipeline.models.base import Thresholds

    detector = model.detector
    saved = detector.thresholds
    try:
        detector.thresholds = Thresholds(pixel=1.0, image=None)
        with pytest.raises(ValueError, match="calibrate it first"):
            InspectionModel(detector, model.preprocessing, model.category)
    finally:
        detector.thresholds = saved


@pytest.mark.parametrize("writer", ["pickle", "torch_save"])
def test_a_file_crafted_to_run_code_is_refused_and_never_runs(
    model: InspectionModel, tmp_path: Path, writer: str
) -> None:
    folder = model.save(tmp_path / "m")
    marker = tmp_path / "payload_ran"
    target = folder / "detector.safetensors"
    if writer == "pickle":
        target.write_bytes(pickle.dumps(Payload(marker)))
    else:  # a legacy-looking torch file (format madfh_detector/1) carrying the payload
        torch.save({"format": "madfh_detector/1", "name": "patchcore", "state": Payload(marker)}, target)
    with pytest.raises(ModelFileError, match="not a safetensors detector file") as caught:
        InspectionModel.load(folder)
    assert "python -m madfh_pipeline.models.convert" in str(caught.value)
    assert not marker.exists()
    if writer == "torch_save":  # (torch.load dispatches on the .safetensors suffix, so load a copy named .pt)
        torch.load(shutil.copy(target, tmp_path / "payload.pt"), weights_only=False)
    else:
        pickle.loads(target.read_bytes())
    assert marker.exists(), "the crafted file must really carry a payload, or this test proves nothing"


def test_settings_round_trip_and_reject_unknown_keys() -> None:
    settings = InspectionSettings.from_mapping({"review_band_std": 1.5, "limits": {"max_side": 300}})
    assert settings.limits.max_side == 300
    assert InspectionSettings.from_mapping(settings.to_dict()) == settings
    with pytest.raises(ValueError, match="Unknown inspection.limits setting"):
        InspectionSettings.from_mapping({"limits": {"max_sides": 3}})
    with pytest.raises(ValueError, match="Unknown describer"):
        InspectionSettings(describer={"colour": 1})
    with pytest.raises(ValueError, match="runtime"):
        replace(settings, runtime="tensorrt")
