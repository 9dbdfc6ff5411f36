"""PatchCore: localisation and ranking on synthetic textures, persistence, tiling, the coreset's guarantees, the config
checks and the image-score rules."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from madfh_pipeline.models import patchcore as patchcore_module
from madfh_pipeline.models.base import AnomalyDetector, build_detector, load_detector, save_detector
from madfh_pipeline.models.patchcore import (
    DEFAULT_CONFIG,
    IMAGE_SCORES,
    PREDICT_ONLY_KEYS,
    PatchCore,
    _ReservoirPool,
    _StreamingCoreset,
    gaussian_blur2d,
    greedy_coreset,
    tile_starts,
    upsample_blur_matrix,
    validate_config,
)

SIZE = 128
SMALL_CONFIG = {"coreset_ratio": 0.2, "max_bank_size": 1000, "pool_max_patches": 20_000, "seed": 0}
PATCHES_PER_IMAGE = (SIZE // 8) ** 2  # Lite0's default layers: stride 8


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


@pytest.fixture(scope="module", autouse=True)
def shared_backbones() -> Iterator[None]:
    """Build each frozen backbone once per module: loading Lite0's weights is most of a detector's construction.

    Sharing is safe because the extractor is frozen and stateless (eval mode, no gradients); what is tested here is
    PatchCore, and tests/models/test_backbones.py covers building the backbones themselves.
    """
    built: dict[tuple[object, ...], object] = {}
    original = patchcore_module.build_backbone

    def shared(name: str, layers: object = None, weights_path: object = None) -> object:
        key = (name, tuple(layers) if layers else None, weights_path)
        if key not in built:
            built[key] = original(name, layers, weights_path)
        return built[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(patchcore_module, "build_backbone", shared)
        yield


@pytest.fixture(scope="module")
def train_images() -> torch.Tensor:
    return textures(12, seed=1)


@pytest.fixture(scope="module")
def fitted(train_images: torch.Tensor) -> PatchCore:
    detector = PatchCore(SMALL_CONFIG)
    detector.history = detector.fit(lambda: train_images.split(4))
    return detector


@pytest.fixture(scope="module")
def test_batch() -> torch.Tensor:
    """Four normal images, one with a bright and one with a dark square (positions 4 and 5)."""
    normal = textures(4, seed=2)
    return torch.cat([normal, plant_square(normal[:1], 72, 30, 12, 1.0), plant_square(normal[1:2], 20, 90, 12, 0.0)])


def test_registered_under_its_name() -> None:
    assert AnomalyDetector.registry["patchcore"] is PatchCore
    assert isinstance(build_detector("patchcore", SMALL_CONFIG), PatchCore)


def test_fit_history_and_bank_size(fitted: PatchCore) -> None:
    history, info = fitted.history, fitted.fit_info
    patches = 12 * PATCHES_PER_IMAGE
    assert history["images"] == [12.0]
    assert history["patches_seen"] == [float(patches)]
    assert history["bank_size"] == [float(math.ceil(0.2 * patches))]
    # Stage 1 keeps oversample × ratio of every block of patches (here one partial block: 3072 < 16384).
    rate = min(1.0, 0.2 * DEFAULT_CONFIG["coreset_oversample"])
    assert info["candidates"] == math.ceil(rate * patches)
    assert info["bank_capped_by"] is None and info["compactions"] == 0
    assert {"feature_seconds", "stage1_seconds", "coreset_seconds", "candidates", "bank_target"} <= set(history)
    assert fitted.memory_bank is not None
    assert fitted.memory_bank.shape == (math.ceil(0.2 * patches), fitted.embedding_dim)
    assert fitted.embedding_dim == 40 + 112  # embed_dim None: all channels of blocks.2 and blocks.4


def test_planted_defect_is_localised_and_ranked_first(fitted: PatchCore, test_batch: torch.Tensor) -> None:
    out = fitted.predict(test_batch)
    assert out.scores.shape == (6,) and out.scores.dtype == np.float32
    assert out.maps.shape == (6, SIZE, SIZE) and out.maps.dtype == np.float32
    assert out.scores[4] > out.scores[:4].max()
    assert out.scores[5] > out.scores[:4].max()
    row, col = argmax_2d(out.maps[4])
    assert 72 <= row < 84 and 30 <= col < 42
    row, col = argmax_2d(out.maps[5])
    assert 20 <= row < 32 and 90 <= col < 102


def test_gray_batches_work(train_images: torch.Tensor) -> None:
    detector = PatchCore({**SMALL_CONFIG, "num_neighbors": 1})
    gray = train_images[:6].mean(dim=1, keepdim=True)
    detector.fit(lambda: [gray])
    out = detector.predict(plant_square(gray[:1], 50, 50, 12, 1.0))
    assert out.maps.shape == (1, SIZE, SIZE)
    row, col = argmax_2d(out.maps[0])
    assert 50 <= row < 62 and 50 <= col < 62


# ---------------------------------------------------------------------------------------------------------------------
# The coreset sees every patch, within a memory bound
# ---------------------------------------------------------------------------------------------------------------------


def test_a_patch_seen_once_lands_in_the_bank(train_images: torch.Tensor) -> None:
    """One training image carries a pattern no other has; the stream must keep it even with a bank of 2 %.

    A uniform pre-sample would miss a given patch with probability 1 − (sample / patches): here the earlier design (a
    70-patch random pool) leaves the square's centre 45 away from the bank, as far as an unseen defect. Greedy
    k-center keeps the farthest points first, so the rare patch survives both stages of the stream.
    """
    rare = plant_square(train_images[3:4], 40, 40, 24, 0.0)
    images = torch.cat([train_images[:3], rare, train_images[4:6]])
    detector = PatchCore({"coreset_ratio": 0.02, "max_bank_size": None, "pool_max_patches": 20_000})
    detector.fit(lambda: images.split(3))
    assert detector.fit_info["bank_size"] == math.ceil(0.02 * 6 * PATCHES_PER_IMAGE)  # 31 of 1536 patches
    embedding = detector._embed(rare)[0]  # (D, 16, 16); the square covers grid cells 5..7, cell 6 is its centre
    to_bank = torch.cdist(embedding.flatten(1).T, detector.memory_bank).min(dim=1).values.view(16, 16)
    typical = float(to_bank.median())
    assert float(to_bank[6, 6]) < min(1.0, 0.05 * typical)  # the rare centre patch itself is in the bank


def test_bank_does_not_depend_on_batching(fitted: PatchCore, train_images: torch.Tensor) -> None:
    """Stage 1 gathers patches into blocks in stream order, so the bank is the same however images were batched."""
    other = PatchCore({**SMALL_CONFIG, "batch_size": 3})
    other.fit(lambda: train_images.split(6))
    torch.testing.assert_close(other.memory_bank, fitted.memory_bank)


def test_streaming_coreset_keeps_an_outlier_within_its_memory_bound() -> None:
    generator = torch.Generator().manual_seed(0)
    pool = _StreamingCoreset(rate=0.1, capacity=1500, projection_dim=16, seed=0, block=1000)
    outlier = None
    for chunk in range(40):
        rows = torch.randn(500, 48, generator=generator)
        if chunk == 23:
            rows[311] += 40.0
            outlier = rows[311].clone()
        pool.add(rows)
        assert pool.count <= 1500 and pool.pending_count < 1000  # bounded after every image, not only at the end
    candidates, projected = pool.candidates()
    assert pool.seen == 20_000
    assert pool.compactions >= 1 and pool.rate < 0.1  # 40 × 50 = 2000 candidates would not fit: merge-reduce ran
    assert candidates.shape == (pool.count, 48) and projected.shape == (pool.count, 16)
    assert (candidates == outlier).all(dim=1).any()


def test_compaction_keeps_images_equally_represented() -> None:
    pool = _StreamingCoreset(rate=0.2, capacity=1000, projection_dim=None, seed=0, block=500)
    for chunk in range(30):  # every image's rows carry its index in column 0
        rows = torch.randn(250, 8, generator=torch.Generator().manual_seed(chunk))
        rows[:, 0] = 100.0 * chunk
        pool.add(rows)
    per_image = torch.bincount((pool.candidates()[0][:, 0] / 100.0).round().long(), minlength=30)
    assert per_image.min() > 0
    assert per_image.max() <= 4 * per_image.min()  # without halving the rate, the last images would hold 8× more


def test_pool_bound_is_reported_when_it_binds(train_images: torch.Tensor, caplog: pytest.LogCaptureFixture) -> None:
    config = {"coreset_ratio": 0.5, "max_bank_size": 300, "pool_max_patches": 600}
    detector = PatchCore(config)
    with caplog.at_level(logging.INFO, logger="madfh_pipeline.models.patchcore"):
        history = detector.fit(lambda: [train_images[:4]])
    info = detector.fit_info
    assert info["candidates"] <= 600 and info["compactions"] >= 1
    assert info["bank_target"] == 512 and info["bank_size"] == 300
    assert info["bank_capped_by"] == "max_bank_size"
    assert history["bank_size"] == [300.0]
    assert "capped by max_bank_size" in caplog.text and "pool_max_patches=600" in caplog.text


def test_knn_pairs_bound_the_bank_by_inference_cost(train_images: torch.Tensor) -> None:
    """The bank is capped so that bank size × patches per image stays within max_knn_pairs, and the fit says so."""
    detector = PatchCore({"coreset_ratio": 0.5, "max_bank_size": None, "max_knn_pairs": PATCHES_PER_IMAGE * 100})
    detector.fit(lambda: [train_images[:4]])
    info = detector.fit_info
    assert info["patches_per_image"] == PATCHES_PER_IMAGE
    assert info["bank_target"] == 2 * PATCHES_PER_IMAGE and info["bank_size"] == 100
    assert info["bank_capped_by"] == "max_knn_pairs"


def test_random_sampling_is_still_available(train_images: torch.Tensor) -> None:
    detector = PatchCore(
        {"coreset_ratio": 1.0, "max_bank_size": 250, "pool_max_patches": 500, "coreset_sampling": "random"}
    )
    detector.fit(lambda: [train_images[:4]])
    assert detector.fit_info["candidates"] == 500 and detector.fit_info["bank_size"] == 250
    assert detector.fit_info["stage1_seconds"] == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Image score rules
# ---------------------------------------------------------------------------------------------------------------------


def _with_rule(fitted: PatchCore, **overrides: object) -> PatchCore:
    """Another detector that shares ``fitted``'s bank (only predict-time keys differ)."""
    detector = PatchCore({**fitted.config, **overrides})
    detector.set_state(fitted.get_state())
    return detector


def test_image_score_rules(fitted: PatchCore, test_batch: torch.Tensor) -> None:
    outputs = {rule: _with_rule(fitted, image_score=rule).predict(test_batch) for rule in IMAGE_SCORES}
    maps = outputs["map_max"].maps
    for out in outputs.values():  # the rule changes the image score only, never the map
        np.testing.assert_array_equal(out.maps, maps)
    np.testing.assert_allclose(outputs["map_max"].scores, maps.reshape(6, -1).max(axis=1))
    count = math.ceil(DEFAULT_CONFIG["image_top_patches"] * 8 * 8)  # patches of stride 8, in map pixels
    top = -np.sort(-maps.reshape(6, -1), axis=1)[:, :count].mean(axis=1)
    np.testing.assert_allclose(outputs["map_top_mean"].scores, top, rtol=1e-5)
    # The paper's reweighting scales the largest patch distance by a weight in (0, 1).
    assert (outputs["reweighted"].scores < outputs["patch_max"].scores).all()
    assert (outputs["reweighted"].scores > 0).all()
    single = _with_rule(fitted, image_score="reweighted", num_neighbors=1).predict(test_batch)
    np.testing.assert_array_equal(single.scores, outputs["patch_max"].scores)
    for rule, out in outputs.items():  # every rule ranks both planted defects above the normal images
        assert min(out.scores[4], out.scores[5]) > out.scores[:4].max(), rule


def test_predict_only_keys_do_not_change_the_bank(fitted: PatchCore, train_images: torch.Tensor) -> None:
    overrides = {"image_score": "map_top_mean", "image_top_patches": 4, "num_neighbors": 3, "sigma": 2.0}
    assert set(overrides) <= set(PREDICT_ONLY_KEYS)
    other = PatchCore({**SMALL_CONFIG, **overrides})
    other.fit(lambda: train_images.split(4))
    torch.testing.assert_close(other.memory_bank, fitted.memory_bank)


# ---------------------------------------------------------------------------------------------------------------------
# Saved state
# ---------------------------------------------------------------------------------------------------------------------


def test_state_holds_only_tensors_and_json_values(fitted: PatchCore, test_batch: torch.Tensor) -> None:
    from safetensors.torch import load as load_tensors
    from safetensors.torch import save as save_tensors

    state = fitted.get_state()
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    plain = {key: value for key, value in state.items() if not isinstance(value, torch.Tensor)}
    assert set(tensors) == {"memory_bank"}
    text = json.dumps(plain, allow_nan=False)  # raises on numpy scalars, tuples of tensors, NaN ...
    restored = {**load_tensors(save_tensors(tensors)), **json.loads(text)}
    copy = PatchCore(fitted.config)
    copy.set_state(restored)
    before, after = fitted.predict(test_batch), copy.predict(test_batch)
    np.testing.assert_array_equal(before.scores, after.scores)
    np.testing.assert_array_equal(before.maps, after.maps)
    assert copy.fit_info == fitted.fit_info


def test_save_load_round_trip_gives_identical_outputs(fitted: PatchCore, tmp_path: Path) -> None:
    batch = torch.cat([textures(2, seed=3), plant_square(textures(1, seed=4), 40, 40, 10, 1.0)])
    fitted.thresholds.pixel = 1.5
    save_detector(fitted, tmp_path / "patchcore.model")
    restored = load_detector(tmp_path / "patchcore.model")
    assert isinstance(restored, PatchCore)
    assert restored.thresholds.pixel == 1.5
    torch.testing.assert_close(restored.memory_bank, fitted.memory_bank)
    before, after = fitted.predict(batch), restored.predict(batch)
    np.testing.assert_array_equal(before.scores, after.scores)
    np.testing.assert_array_equal(before.maps, after.maps)
    state_keys = {"memory_bank", "embedding_dim", "fit_info", "defect_weight", "normal_patches_added"}
    assert set(restored.get_state()) == state_keys  # no backbone weights; no defect bank before feedback


def test_state_from_another_configuration_is_rejected(fitted: PatchCore) -> None:
    other = PatchCore({**SMALL_CONFIG, "embed_dim": 64})
    with pytest.raises(ValueError, match="64"):
        other.set_state(fitted.get_state())
    with pytest.raises(ValueError, match="torch tensor"):
        other.set_state({"memory_bank": np.zeros((4, 64), dtype=np.float32)})


def test_predict_before_fit_fails_clearly() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        PatchCore(SMALL_CONFIG).predict(textures(1))


# ---------------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------------


def test_unknown_keys_are_rejected_with_the_valid_keys() -> None:
    with pytest.raises(ValueError, match="coreset_rato") as error:
        PatchCore({"coreset_rato": 0.1})
    for key in DEFAULT_CONFIG:
        assert key in str(error.value)


def test_invalid_values_are_all_named_before_any_weights_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("the backbone was built before the config was checked")

    monkeypatch.setattr(patchcore_module, "build_backbone", no_weights)
    bad = {
        "neighbourhood": 2,
        "tile_overlap": 1.5,
        "knn_backend": "annoy",
        "coreset_ratio": 0.0,
        "image_score": "mean",
        "embed_dim": True,  # a bool is no width
        "max_bank_size": 4096,
        "pool_max_patches": 5000,  # < 2 × max_bank_size
    }
    with pytest.raises(ValueError) as error:
        PatchCore(bad)
    message = str(error.value)
    for key in ("neighbourhood", "tile_overlap", "knn_backend", "coreset_ratio", "image_score", "embed_dim"):
        assert key in message
    assert "twice max_bank_size" in message
    assert "reweighted" in message  # the allowed image-score rules are listed


def test_defaults_are_valid_and_complete() -> None:
    assert validate_config({}) == DEFAULT_CONFIG
    assert set(PREDICT_ONLY_KEYS) <= set(DEFAULT_CONFIG)
    assert DEFAULT_CONFIG["image_score"] in IMAGE_SCORES


# ---------------------------------------------------------------------------------------------------------------------
# Tiling, coreset and kNN building blocks
# ---------------------------------------------------------------------------------------------------------------------


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


def test_knn_is_exact(fitted: PatchCore) -> None:
    queries = torch.randn(700, fitted.embedding_dim) * 3.0
    fitted.config["knn_chunk_size"] = 128  # several chunks
    try:
        dist, index = fitted._nearest(queries)
    finally:
        fitted.config["knn_chunk_size"] = DEFAULT_CONFIG["knn_chunk_size"]
    reference = torch.cdist(queries.double(), fitted.memory_bank.double())
    torch.testing.assert_close(dist.double(), reference.min(dim=1).values, rtol=1e-4, atol=1e-3)
    assert (reference.gather(1, index[:, None])[:, 0] - reference.min(dim=1).values).abs().max() < 1e-3


def test_fused_upsample_blur_equals_upsample_then_blur() -> None:
    grid = torch.rand(2, 16, 12)
    expected = gaussian_blur2d(F.interpolate(grid[:, None], size=(128, 96), mode="bilinear")[:, 0], 4.0)
    rows, cols = upsample_blur_matrix(16, 128, 4.0).float(), upsample_blur_matrix(12, 96, 4.0).float()
    torch.testing.assert_close(rows @ grid @ cols.T, expected, atol=1e-5, rtol=1e-5)
