"""Tests of the autoencoder detector at toy sizes (64² inputs, 4 stride-2 layers), a few seconds in total on CPU."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from madfh_pipeline.models.autoencoder import (
    DEFAULT_CONFIG,
    AutoencoderDetector,
    ConvAutoencoder,
    gaussian_blur,
)
from madfh_pipeline.models.base import AnomalyDetector, Thresholds, load_detector, save_detector

SIZE = 64
DEFECT = (slice(20, 36), slice(24, 40))
TINY: dict[str, Any] = {
    "input_size": SIZE,
    "depth": 4,
    "base_channels": 8,
    "max_channels": 32,
    "latent_dim": 32,
    "lr": 3e-3,
    "batch_size": 8,
    "epochs": 8,
    "smoothing_sigma": 2.0,
}


def normal_images(n: int, seed: int, channels: int = 1) -> torch.Tensor:
    """Bright vertical stripes with a random phase plus sensor noise: a texture a 32-d latent can learn in seconds."""
    g = torch.Generator().manual_seed(seed)
    xx = torch.arange(SIZE, dtype=torch.float32).view(1, 1, SIZE)
    phase = torch.rand(n, 1, 1, generator=g) * 2 * torch.pi
    img = 0.75 + 0.15 * torch.sin(2 * torch.pi * xx / 16 + phase) + 0.02 * torch.randn(n, SIZE, SIZE, generator=g)
    return img.clamp(0, 1).unsqueeze(1).repeat(1, channels, 1, 1)


def with_defect(images: torch.Tensor) -> torch.Tensor:
    """Plant a flat mid-gray square. Mid-gray is what an untrained sigmoid decoder outputs, so an untrained model
    reconstructs the defect *better* than the texture around it: only learnt normality can make it stand out."""
    bad = images.clone()
    bad[:, :, DEFECT[0], DEFECT[1]] = 0.5
    return bad


def defect_mask() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[DEFECT] = True
    return mask


def source(images: torch.Tensor, batch: int = 8) -> Callable[[], Iterable[torch.Tensor]]:
    return lambda: iter(images.split(batch))


def contrast(maps: np.ndarray) -> float:
    """Mean map inside the defect region over mean map outside it."""
    mask = defect_mask()
    return float(maps[:, mask].mean() / maps[:, ~mask].mean())


@pytest.fixture(scope="module")
def train_images() -> torch.Tensor:
    return normal_images(64, seed=0)


@pytest.fixture(scope="module")
def trained(train_images: torch.Tensor) -> tuple[AutoencoderDetector, dict[str, list[float]]]:
    detector = AutoencoderDetector(TINY)
    history = detector.fit(source(train_images))
    return detector, history


# --------------------------------------------------------------------------------------------------------------------
# training


def test_registered_under_its_name() -> None:
    assert AnomalyDetector.registry["autoencoder"] is AutoencoderDetector


def test_defaults_match_the_original_prototype() -> None:
    config = AutoencoderDetector().config
    expected = {"latent_dim": 512, "depth": 8, "lr": 1e-4, "batch_size": 16, "epochs": 1}
    assert {k: config[k] for k in expected} == expected
    assert config["loss"] == "mse" and config["score_reduction"] == "max" and config["smoothing_sigma"] == 4.0
    # The one deliberate difference: the prototype's fixed 1024² became "the size of the training images".
    assert config["input_size"] is None
    assert config == DEFAULT_CONFIG


def _sized(height: int, width: int, n: int = 4) -> torch.Tensor:
    return (0.5 + 0.1 * torch.rand(n, 1, height, width, generator=torch.Generator().manual_seed(0))).clamp(0, 1)


@pytest.mark.parametrize(("height", "width", "depth", "side"), [(48, 40, 4, 48), (40, 50, 4, 64), (20, 20, 3, 24)])
def test_input_size_null_trains_at_the_image_size(
    height: int, width: int, depth: int, side: int, caplog: pytest.LogCaptureFixture
) -> None:
    """``input_size: null``: the larger image side, rounded up to a multiple of 2**depth (what the network needs)."""
    config = {**TINY, "input_size": None, "depth": depth, "epochs": 1}
    detector = AutoencoderDetector(config)
    with caplog.at_level(logging.INFO, logger="madfh_pipeline.models.autoencoder"):
        detector.fit(source(_sized(height, width)))
    assert detector.input_size == side and detector.model.input_size == side
    assert detector.config["input_size"] is None  # the config says what was asked; the state what it became
    assert detector.get_state()["input_size"] == side
    assert f"input size {side}²" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert detector.predict(_sized(height, width, 2)).maps.shape == (2, height, width)


def test_input_size_null_survives_save_and_load(tmp_path: Path) -> None:
    detector = AutoencoderDetector({**TINY, "input_size": None, "epochs": 1})
    detector.fit(source(_sized(48, 48)))
    save_detector(detector, tmp_path / "ae.safetensors")
    restored = load_detector(tmp_path / "ae.safetensors")
    assert restored.config["input_size"] is None and restored.input_size == 48
    probe = _sized(48, 48, 2)
    np.testing.assert_array_equal(restored.predict(probe).maps, detector.predict(probe).maps)


def test_configured_input_size_larger_than_the_images_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="madfh_pipeline.models.autoencoder"):
        AutoencoderDetector({**TINY, "epochs": 1}).fit(source(_sized(32, 32)))  # input_size 64: 4x the pixels
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = warning.getMessage()
    assert "input_size 64 upscales the 32x32 images" in message and "4.0x the pixels" in message
    assert "input_size: null" in message  # says how to avoid it
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="madfh_pipeline.models.autoencoder"):
        AutoencoderDetector({**TINY, "epochs": 1}).fit(source(_sized(SIZE, SIZE)))  # same size: nothing to say
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_loss_decreases_over_epochs(trained: tuple[AutoencoderDetector, dict[str, list[float]]]) -> None:
    _, history = trained
    loss = history["loss"]
    assert len(loss) == TINY["epochs"]
    assert len(history["step_loss"]) == TINY["epochs"] * 64 // TINY["batch_size"]
    assert all(np.isfinite(loss))
    assert loss[-1] < 0.25 * loss[0]
    assert loss[-1] < min(loss[:-1]) * 1.05  # no late blow-up


def test_fit_is_reproducible_with_the_same_seed(train_images: torch.Tensor) -> None:
    config = {**TINY, "epochs": 2}
    images = train_images[:16]
    first, second = AutoencoderDetector(config), AutoencoderDetector(config)
    assert first.fit(source(images)) == second.fit(source(images))
    probe = normal_images(2, seed=5)
    np.testing.assert_array_equal(first.predict(probe).maps, second.predict(probe).maps)
    other = AutoencoderDetector({**config, "seed": 1})
    assert other.fit(source(images))["loss"] != first.fit(source(images))["loss"]


def test_fit_regroups_incoming_batches_into_optimiser_batches() -> None:
    detector = AutoencoderDetector({**TINY, "epochs": 2, "batch_size": 4})
    history = detector.fit(source(normal_images(15, seed=2), batch=5))  # 5 + 5 + 5 images → steps of 4, 4, 4, 3
    assert len(history["step_loss"]) == 2 * 4
    assert len(history["loss"]) == 2


def test_fit_logs_epoch_losses(train_images: torch.Tensor, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="madfh_pipeline.models.autoencoder"):
        AutoencoderDetector({**TINY, "epochs": 1}).fit(source(train_images[:16]))
    messages = [r.getMessage() for r in caplog.records]
    assert any("epoch 1/1: mean loss" in m for m in messages)
    assert sum(m.startswith("autoencoder epoch 1 step") for m in messages) == 2  # 16 images, batches of 8


def test_empty_source_is_an_error(trained: tuple[AutoencoderDetector, dict[str, list[float]]]) -> None:
    detector = AutoencoderDetector(TINY)
    with pytest.raises(ValueError, match="no images"):
        detector.fit(lambda: iter([]))
    with pytest.raises(ValueError, match="no images"):
        detector.fit(lambda: iter([torch.zeros(0, 1, SIZE, SIZE)]))
    assert detector.model is None  # nothing half-built that predict() could use

    # A failed re-fit keeps the previously fitted network rather than an untrained one.
    fitted = AutoencoderDetector(TINY)
    fitted.set_state(trained[0].get_state())
    probe = normal_images(1, seed=6)
    before = fitted.predict(probe).maps
    with pytest.raises(ValueError, match="no images"):
        fitted.fit(lambda: iter([]))
    np.testing.assert_array_equal(fitted.predict(probe).maps, before)


def test_exhausted_generator_on_second_epoch_is_an_error(train_images: torch.Tensor) -> None:
    batches = iter(train_images[:16].split(8))
    with pytest.raises(ValueError, match="fresh iterable"):
        AutoencoderDetector({**TINY, "epochs": 2}).fit(lambda: batches)


def test_inputs_outside_unit_range_are_rejected(train_images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        AutoencoderDetector(TINY).fit(source(train_images * 255))


# --------------------------------------------------------------------------------------------------------------------
# scoring


def test_defect_region_lights_up_after_training(trained: tuple[AutoencoderDetector, dict[str, list[float]]]) -> None:
    detector, _ = trained
    normal = normal_images(4, seed=1)
    defective = with_defect(normal)
    out_bad, out_good = detector.predict(defective), detector.predict(normal)

    assert contrast(out_bad.maps) > 5.0
    assert contrast(out_good.maps) < 2.0  # the region itself is not special on normal images
    assert out_bad.scores.min() > out_good.scores.max()

    # The bar is not passable without learning: the same architecture, untrained, fails it.
    fresh = AutoencoderDetector(TINY)
    torch.manual_seed(123)
    geometry = {k: TINY[k] for k in ("input_size", "depth", "base_channels", "max_channels", "latent_dim")}
    untrained = ConvAutoencoder(in_channels=1, **geometry)
    fresh.set_state({"model": untrained.state_dict(), "in_channels": 1})
    assert contrast(fresh.predict(defective).maps) < 5.0


def test_output_shapes_follow_the_batch_not_the_model(
    trained: tuple[AutoencoderDetector, dict[str, list[float]]],
) -> None:
    detector, _ = trained
    batch = torch.rand(3, 1, 48, 80) * 0.2 + 0.7
    out = detector.predict(batch)
    assert out.scores.shape == (3,) and out.scores.dtype == np.float32
    assert out.maps.shape == (3, 48, 80) and out.maps.dtype == np.float32
    assert (out.maps >= 0).all()
    larger = detector.predict(torch.rand(20, 1, SIZE, SIZE))  # more than batch_size: chunked internally
    assert larger.maps.shape == (20, SIZE, SIZE)


def test_predict_requires_a_fitted_model_and_matching_channels(
    trained: tuple[AutoencoderDetector, dict[str, list[float]]],
) -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        AutoencoderDetector(TINY).predict(torch.rand(1, 1, SIZE, SIZE))
    detector, _ = trained
    with pytest.raises(ValueError, match="channel"):
        detector.predict(torch.rand(1, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        detector.predict(torch.rand(1, SIZE, SIZE))


def test_mean_and_max_reductions(trained: tuple[AutoencoderDetector, dict[str, list[float]]]) -> None:
    detector, _ = trained
    state = detector.get_state()
    by_mean = AutoencoderDetector({**TINY, "score_reduction": "mean"})
    by_mean.set_state(state)
    batch = with_defect(normal_images(3, seed=7))
    out_max, out_mean = detector.predict(batch), by_mean.predict(batch)
    np.testing.assert_array_equal(out_max.maps, out_mean.maps)
    np.testing.assert_allclose(out_max.scores, out_max.maps.max(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(out_mean.scores, out_mean.maps.mean(axis=(1, 2)), rtol=1e-5)
    assert (out_max.scores > out_mean.scores).all()


def test_rgb_channels_are_inferred_from_the_first_batch() -> None:
    detector = AutoencoderDetector({**TINY, "epochs": 1})
    detector.fit(source(normal_images(8, seed=3, channels=3)))
    assert detector.in_channels == 3 and detector.get_state()["in_channels"] == 3
    assert detector.predict(normal_images(2, seed=4, channels=3)).maps.shape == (2, SIZE, SIZE)
    assert detector.embed(normal_images(2, seed=4, channels=3)).shape == (2, TINY["latent_dim"])


# --------------------------------------------------------------------------------------------------------------------
# configuration and model


@pytest.mark.parametrize(
    ("input_size", "depth"),
    [(100, 4), (64, 7), (96, 6), (64, 0)],
)
def test_bad_geometry_is_rejected(input_size: int, depth: int) -> None:
    with pytest.raises(ValueError, match="divisible|depth"):
        ConvAutoencoder(input_size=input_size, in_channels=1, depth=depth)
    with pytest.raises(ValueError, match="divisible|depth"):
        AutoencoderDetector({**TINY, "input_size": input_size, "depth": depth})


@pytest.mark.parametrize(
    "override",
    [{"score_reduction": "median"}, {"loss": "l1"}, {"epochs": 0}, {"smoothing_sigma": -1}, {"norm": "layer"}],
)
def test_bad_config_values_are_rejected(override: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        AutoencoderDetector({**TINY, **override})


def test_unknown_config_keys_are_rejected() -> None:
    with pytest.raises(ValueError, match="Unknown autoencoder config"):
        AutoencoderDetector({**TINY, "latent_dims": 8})


def test_conv_autoencoder_shapes_and_range() -> None:
    model = ConvAutoencoder(input_size=SIZE, in_channels=3, depth=4, base_channels=4, max_channels=16, latent_dim=8)
    assert model.channels == [4, 8, 16, 16] and model.feature_size == 4
    x = torch.rand(2, 3, SIZE, SIZE)
    assert model.encode(x).shape == (2, 8)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    with pytest.raises(ValueError, match="expects"):
        model(torch.rand(2, 3, 32, 32))


def test_default_architecture_reaches_a_4x4_bottleneck() -> None:
    model = ConvAutoencoder()  # the prototype's 1024², 8 layers, 512-d latent
    assert model.feature_size == 4 and model.latent_dim == 512 and len(model.channels) == 8
    assert model.to_latent.in_features == model.channels[-1] * 16


# --------------------------------------------------------------------------------------------------------------------
# smoothing and persistence


@pytest.mark.parametrize("sigma", [0.7, 2.0, 4.0])
def test_gaussian_blur_matches_scipy(sigma: float) -> None:
    maps = np.random.default_rng(0).random((2, 40, 57)).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(maps), sigma).numpy()
    reference = np.stack([gaussian_filter(m, sigma, mode="mirror", truncate=4.0) for m in maps])
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_gaussian_blur_edge_cases() -> None:
    flat = torch.full((1, 5, 7), 0.3)
    np.testing.assert_allclose(gaussian_blur(flat, 4.0).numpy(), 0.3, atol=1e-6)  # kernel wider than the map
    maps = torch.rand(2, 1, 9, 9)
    assert gaussian_blur(maps, 0.0) is maps


def test_save_load_round_trip_gives_identical_outputs(
    trained: tuple[AutoencoderDetector, dict[str, list[float]]], tmp_path: Path
) -> None:
    detector, _ = trained
    detector.thresholds = Thresholds(pixel=0.01, image=0.05, rule="mean+3.0std")
    path = tmp_path / "models" / "autoencoder.pt"
    save_detector(detector, path)
    restored = load_detector(path)
    assert isinstance(restored, AutoencoderDetector)
    assert restored.config == detector.config and restored.in_channels == 1
    assert restored.thresholds == detector.thresholds
    batch = with_defect(normal_images(3, seed=9))
    expected, actual = detector.predict(batch), restored.predict(batch)
    np.testing.assert_array_equal(actual.scores, expected.scores)
    np.testing.assert_array_equal(actual.maps, expected.maps)


def test_state_round_trip_without_files(trained: tuple[AutoencoderDetector, dict[str, list[float]]]) -> None:
    detector, _ = trained
    copy = AutoencoderDetector(detector.config)
    copy.set_state(detector.get_state())
    batch = normal_images(2, seed=11)
    np.testing.assert_array_equal(copy.predict(batch).maps, detector.predict(batch).maps)
    with pytest.raises(ValueError, match="missing"):
        copy.set_state({"model": {}})


def test_to_moves_the_model(trained: tuple[AutoencoderDetector, dict[str, list[float]]]) -> None:
    detector, _ = trained
    assert detector.to("cpu") is detector
    assert next(detector.model.parameters()).device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(trained: tuple[AutoencoderDetector, dict[str, list[float]]]) -> None:
    detector, _ = trained
    copy = AutoencoderDetector(detector.config)
    copy.set_state(detector.get_state())
    copy.to("cuda")
    batch = with_defect(normal_images(2, seed=13))
    np.testing.assert_allclose(copy.predict(batch).maps, detector.predict(batch).maps, rtol=1e-3, atol=1e-5)
    copy.fit(source(normal_images(16, seed=0)))  # trains on the GPU too
    assert next(copy.model.parameters()).is_cuda
