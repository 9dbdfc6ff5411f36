"""PatchCore: localisation and ranking on synthetic textures, persistence, tiling and the coreset's guarantees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from madfh_pipeline.models.base import AnomalyDetector, build_detector, load_detector, save_detector
from madfh_pipeline.models.patchcore import (
    PatchCore,
    _ReservoirPool,
    gaussian_blur2d,
    greedy_coreset,
    tile_starts,
    upsample_blur_matrix,
)

SIZE = 128
SMALL_CONFIG = {"coreset_ratio": 0.2, "max_bank_size": 1000, "seed": 0}


def textures(n: int, height: int = SIZE, width: int = SIZE, seed: int = 0) -> torch.Tensor:
    """Defect-free 'product surface': a smooth random pattern plus fine noise, RGB in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, height // 16, width // 16, generator=generator)
    smooth = F.interpolate(base, size=(height, width), mode="bilinear", align_corners=False)
    noise = torch.rand(n, 3, height, width, generator=generator)
    return (0.25 + 0.5 * smooth + 0.08 * noise).clamp(0.0, 1.0)


def plant_square(image: torch.Tensor, top: int, left: int, size: int, value: float) -> torch.Tensor:
    defective = image.clone()
    defective[..., top : top + size, left : left + size] = value
    return defective


def argmax_2d(array: np.ndarray) -> tuple[int, int]:
    row, col = np.unravel_index(int(np.argmax(array)), array.shape)
    return int(row), int(col)


@pytest.fixture(scope="module")
def train_images() -> torch.Tensor:
    return textures(12, seed=1)


@pytest.fixture(scope="module")
def fitted(train_images: torch.Tensor) -> PatchCore:
    detector = PatchCore(SMALL_CONFIG)
    detector.history = detector.fit(lambda: train_images.split(4))
    return detector


def test_registered_under_its_name() -> None:
    assert AnomalyDetector.registry["patchcore"] is PatchCore
    assert isinstance(build_detector("patchcore", SMALL_CONFIG), PatchCore)


def test_fit_history_and_bank_size(fitted: PatchCore) -> None:
    history = fitted.history
    patches = 12 * (SIZE // 8) ** 2
    assert history["images"] == [12.0]
    assert history["patches_seen"] == [float(patches)]
    assert history["bank_size"] == [float(np.ceil(0.2 * patches))]
    assert {"feature_seconds", "coreset_seconds", "pool_size"} <= set(history)
    assert fitted.memory_bank is not None
    assert fitted.memory_bank.shape == (np.ceil(0.2 * patches), fitted.embedding_dim)
    assert fitted.embedding_dim == 128


def test_planted_defect_is_localised_and_ranked_first(fitted: PatchCore) -> None:
    normal = textures(4, seed=2)
    top, left, size = 72, 30, 12
    bright = plant_square(normal[:1], top, left, size, 1.0)
    dark = plant_square(normal[1:2], 20, 90, size, 0.0)
    out = fitted.predict(torch.cat([normal, bright, dark]))

    assert out.scores.shape == (6,) and out.scores.dtype == np.float32
    assert out.maps.shape == (6, SIZE, SIZE) and out.maps.dtype == np.float32
    assert out.scores[4] > out.scores[:4].max()
    assert out.scores[5] > out.scores[:4].max()
    row, col = argmax_2d(out.maps[4])
    assert top <= row < top + size and left <= col < left + size
    row, col = argmax_2d(out.maps[5])
    assert 20 <= row < 20 + size and 90 <= col < 90 + size


def test_gray_batches_work(train_images: torch.Tensor) -> None:
    detector = PatchCore({**SMALL_CONFIG, "num_neighbors": 1})
    gray = train_images[:6].mean(dim=1, keepdim=True)
    detector.fit(lambda: [gray])
    out = detector.predict(plant_square(gray[:1], 50, 50, 12, 1.0))
    assert out.maps.shape == (1, SIZE, SIZE)
    row, col = argmax_2d(out.maps[0])
    assert 50 <= row < 62 and 50 <= col < 62


def test_save_load_round_trip_gives_identical_outputs(fitted: PatchCore, tmp_path: Path) -> None:
    batch = torch.cat([textures(2, seed=3), plant_square(textures(1, seed=4), 40, 40, 10, 1.0)])
    fitted.thresholds.pixel = 1.5
    save_detector(fitted, tmp_path / "patchcore.pt")
    restored = load_detector(tmp_path / "patchcore.pt")
    assert isinstance(restored, PatchCore)
    assert restored.thresholds.pixel == 1.5
    torch.testing.assert_close(restored.memory_bank, fitted.memory_bank)
    before, after = fitted.predict(batch), restored.predict(batch)
    np.testing.assert_array_equal(before.scores, after.scores)
    np.testing.assert_array_equal(before.maps, after.maps)
    assert set(restored.get_state()) == {"memory_bank", "embedding_dim", "fit_info"}  # no backbone weights


def test_state_from_another_configuration_is_rejected(fitted: PatchCore) -> None:
    other = PatchCore({**SMALL_CONFIG, "embed_dim": 64})
    with pytest.raises(ValueError, match="64"):
        other.set_state(fitted.get_state())


def test_predict_before_fit_fails_clearly() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        PatchCore(SMALL_CONFIG).predict(textures(1))


def test_tiling_gives_full_size_maps_and_localises(train_images: torch.Tensor) -> None:
    detector = PatchCore({**SMALL_CONFIG, "tile_size": 64, "tile_overlap": 0.25})
    detector.fit(lambda: [train_images[:6]])
    image = plant_square(textures(1, height=160, width=200, seed=5), 120, 150, 12, 0.0)
    out = detector.predict(image)
    assert out.maps.shape == (1, 160, 200)
    assert np.isfinite(out.maps).all()
    row, col = argmax_2d(out.maps[0])
    assert 120 <= row < 132 and 150 <= col < 162


def test_tile_starts_cover_the_whole_length() -> None:
    assert tile_starts(100, 128, 0.25) == [0]
    assert tile_starts(200, 64, 0.25) == [0, 48, 96, 136]
    for length, tile, overlap in [(1000, 256, 0.0), (1000, 256, 0.5), (257, 256, 0.1)]:
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] == length - tile
        assert all(b - a <= tile for a, b in zip(starts, starts[1:], strict=False))


def test_coreset_selects_distinct_points_and_keeps_outliers() -> None:
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(3000, 96, generator=generator)
    points[1234] += 50.0  # a rare, far-away pattern that must survive the thinning
    chosen = greedy_coreset(points, 64, projection_dim=32, seed=1)
    assert chosen.numel() == 64
    assert chosen.unique().numel() == 64
    assert 1234 in chosen.tolist()


@pytest.mark.parametrize("loop", ["numpy", "torch"])
def test_coreset_equals_naive_greedy_k_center(loop: str) -> None:
    points = torch.randn(2000, 24, generator=torch.Generator().manual_seed(3))
    min_dist, expected, index = torch.full((2000,), float("inf")), [5], 5
    for _ in range(99):
        min_dist = torch.minimum(min_dist, ((points - points[index]) ** 2).sum(dim=1))
        index = int(min_dist.argmax())
        expected.append(index)
    assert greedy_coreset(points, 100, projection_dim=None, start=5, loop=loop).tolist() == expected


def test_coreset_stops_when_everything_is_covered() -> None:
    points = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).repeat(50, 1)
    chosen = greedy_coreset(points, 10, projection_dim=None)
    assert sorted(points[chosen].tolist()) == [[0.0, 0.0], [1.0, 1.0]]


def test_reservoir_pool_is_bounded_and_uniform() -> None:
    pool = _ReservoirPool(capacity=500, seed=0)
    for chunk in range(20):
        pool.add(torch.full((1000, 2), float(chunk)))
    sample = pool.tensor()
    assert sample.shape == (500, 2)
    assert pool.seen == 20_000
    per_chunk = torch.bincount(sample[:, 0].long(), minlength=20)
    assert per_chunk.min() >= 10  # expected 25 per chunk: later images are not favoured or starved


def test_pool_cap_bounds_the_bank(train_images: torch.Tensor) -> None:
    detector = PatchCore({"coreset_ratio": 1.0, "max_bank_size": 300, "pool_max_patches": 500})
    history = detector.fit(lambda: [train_images[:4]])
    assert history["pool_size"] == [500.0]
    assert history["bank_size"] == [300.0]


def test_knn_is_exact(fitted: PatchCore) -> None:
    queries = torch.randn(700, fitted.embedding_dim) * 3.0
    fitted.config["knn_chunk_size"] = 128  # several chunks
    try:
        dist, index = fitted._nearest(queries)
    finally:
        fitted.config["knn_chunk_size"] = 4096
    reference = torch.cdist(queries.double(), fitted.memory_bank.double())
    torch.testing.assert_close(dist.double(), reference.min(dim=1).values, rtol=1e-4, atol=1e-3)
    assert (reference.gather(1, index[:, None])[:, 0] - reference.min(dim=1).values).abs().max() < 1e-3


def test_fused_upsample_blur_equals_upsample_then_blur() -> None:
    grid = torch.rand(2, 16, 12)
    expected = gaussian_blur2d(F.interpolate(grid[:, None], size=(128, 96), mode="bilinear")[:, 0], 4.0)
    rows, cols = upsample_blur_matrix(16, 128, 4.0).float(), upsample_blur_matrix(12, 96, 4.0).float()
    torch.testing.assert_close(rows @ grid @ cols.T, expected, atol=1e-5, rtol=1e-5)


def test_invalid_configuration_is_rejected() -> None:
    with pytest.raises(ValueError, match="neighbourhood"):
        PatchCore({"neighbourhood": 2})
    with pytest.raises(ValueError, match="tile_overlap"):
        PatchCore({"tile_overlap": 1.5})
    with pytest.raises(ValueError, match="knn_backend"):
        PatchCore({"knn_backend": "annoy"})
