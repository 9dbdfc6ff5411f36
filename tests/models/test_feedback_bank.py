"""Operators' verdicts into PatchCore's memory bank: a confirmed false alarm stops alarming, a confirmed defect type is
re-ranked up, and both survive the safe model file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from madfh_pipeline.models import patchcore as patchcore_module
from madfh_pipeline.models.base import load_detector, save_detector
from madfh_pipeline.models.patchcore import PatchCore
from tests.models.test_patchcore import SIZE, SMALL_CONFIG, plant_square, textures


@pytest.fixture(scope="module", autouse=True)
def shared_backbone() -> Iterator[None]:
    """One frozen Lite0 for the module (its construction dominates; it is stateless)."""
    original = patchcore_module.build_backbone
    cache: dict[object, object] = {}

    def shared(name: str, layers: object = None, weights_path: object = None) -> object:
        key = (name, tuple(layers) if layers else None, weights_path)
        if key not in cache:
            cache[key] = original(name, layers, weights_path)
        return cache[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(patchcore_module, "build_backbone", shared)
        yield


TRAIN = textures(8, seed=1)


def fitted() -> PatchCore:
    detector = PatchCore(SMALL_CONFIG)
    detector.fit(lambda: TRAIN.split(4))
    return detector


def one_batch(images: torch.Tensor):  # noqa: ANN201 - a BatchSource
    return lambda: iter([images])


def add_normal(detector: PatchCore, images: torch.Tensor, per_image: int, floor: float | None = None) -> int:
    """What the feedback step does with confirmed false alarms it keeps."""
    return detector.extend_bank(torch.cat(detector.farthest_patches(one_batch(images), per_image, floor)))


def defect_rows(detector: PatchCore, images: torch.Tensor, per_image: int) -> torch.Tensor:
    return torch.cat(detector.farthest_patches(one_batch(images), per_image))


def test_a_confirmed_false_alarm_stops_alarming() -> None:
    """A normal variation the bank never saw (a grey patch on a known part) alarms; once confirmed normal it does not."""
    detector = fitted()
    variation = plant_square(TRAIN[:1], 40, 40, 16, 0.5)
    normal = TRAIN[2:5]
    before = float(detector.predict(variation).scores[0])
    normal_before = detector.predict(normal).scores
    assert before > normal_before.max()
    bank_before = detector.memory_bank.shape[0]

    added = add_normal(detector, variation, 64)

    assert added == 64 and detector.memory_bank.shape[0] == bank_before + 64
    assert detector.normal_patches_added == 64
    normal_after = detector.predict(normal).scores
    assert float(detector.predict(variation).scores[0]) < normal_after.min()  # now scores like a normal part
    assert (normal_after <= normal_before + 1e-4).all()  # a larger bank never raises a distance


def test_a_false_alarm_adds_only_the_region_that_alarmed_when_given_a_floor() -> None:
    """With the pixel threshold as the floor, only patches painted anomalous join the bank: the grey square's, not the
    rest of the (already covered) part — and that is enough to stop the alarm: the part scores among the normal parts
    again, and at most a tenth of what the square added to the clean part's score is left."""
    detector = fitted()
    variation = plant_square(TRAIN[:1], 40, 40, 16, 0.5)
    clean = float(detector.predict(TRAIN[:1]).scores[0])
    before = float(detector.predict(variation).scores[0])
    rows = detector.patch_rows(variation)[0]
    distance, _ = detector._nearest(rows)
    floor = float(torch.quantile(distance.float(), 0.9))  # the top tenth of the image's patches
    expected = int((distance >= floor).sum())
    assert 0 < expected < 64

    added = add_normal(detector, variation, 64, floor)

    assert added == expected
    after = float(detector.predict(variation).scores[0])
    assert after <= float(detector.predict(TRAIN[2:5]).scores.max())
    assert after - clean < 0.1 * (before - clean)
    assert add_normal(detector, TRAIN[2:3], 64, 1e9) == 0  # nothing above


def test_defect_bank_reranks_and_weight_zero_is_a_no_op() -> None:
    detector = fitted()
    base = TRAIN[4:8]
    known_defect = plant_square(base[:1], 30, 30, 14, 0.0)  # a dark square: the kind operators confirmed
    other = torch.cat([base[1:], plant_square(base[1:2], 70, 70, 14, 0.0)])
    plain = detector.predict(other).scores

    detector.set_defect_bank(defect_rows(detector, known_defect, 8), weight=0.0)
    assert detector.defect_bank is not None and detector.defect_bank.shape[0] == 8
    torch.testing.assert_close(torch.from_numpy(detector.predict(other).scores), torch.from_numpy(plain))

    detector.defect_weight = 0.5
    reranked = detector.predict(other).scores
    # The new dark square lies near the defect bank: its score rises. Nothing moves down: an image unlike every
    # confirmed defect (a normal part, or a defect of a new type) keeps its unsupervised score.
    assert reranked[3] > plain[3] * 1.05
    assert (reranked >= plain - 1e-5).all()
    assert reranked[3] - reranked[:3].max() > plain[3] - plain[:3].max()
    detector.clear_defect_bank()
    torch.testing.assert_close(torch.from_numpy(detector.predict(other).scores), torch.from_numpy(plain))


def test_feedback_state_survives_the_model_file(tmp_path: Path) -> None:
    detector = fitted()
    add_normal(detector, plant_square(TRAIN[:1], 40, 40, 16, 0.5), 32)
    detector.set_defect_bank(defect_rows(detector, plant_square(textures(1, seed=9), 30, 30, 14, 0.0), 8), 0.3)
    images = torch.cat([textures(2, seed=10), plant_square(textures(1, seed=11), 60, 60, 14, 0.0)])
    expected = detector.predict(images).scores

    path = tmp_path / "patchcore.safetensors"
    save_detector(detector, path)
    loaded = load_detector(path)

    assert isinstance(loaded, PatchCore)
    assert loaded.defect_bank is not None and loaded.defect_bank.shape == (8, detector.embedding_dim)
    assert loaded.defect_weight == pytest.approx(0.3) and loaded.normal_patches_added == 32
    assert loaded.memory_bank.shape == detector.memory_bank.shape
    torch.testing.assert_close(torch.from_numpy(loaded.predict(images).scores), torch.from_numpy(expected))


def test_a_trial_extension_is_undone_after_its_block_even_on_error() -> None:
    detector = fitted()
    variation = plant_square(TRAIN[:1], 40, 40, 16, 0.5)
    bank = detector.memory_bank.clone()
    before = float(detector.predict(variation).scores[0])
    rows = torch.cat(detector.farthest_patches(one_batch(variation), 64))
    with detector.trial_extension(rows):
        assert detector.memory_bank.shape[0] == bank.shape[0] + 64
        assert float(detector.predict(variation).scores[0]) < before
    with pytest.raises(ZeroDivisionError), detector.trial_extension(rows):
        _ = 1 / 0
    torch.testing.assert_close(detector.memory_bank, bank)
    assert detector.normal_patches_added == 0 and float(detector.predict(variation).scores[0]) == before


def test_feedback_patches_need_a_fitted_bank() -> None:
    with pytest.raises(RuntimeError, match="fit it before adding feedback"):
        PatchCore(SMALL_CONFIG).farthest_patches(one_batch(textures(1, height=SIZE, width=SIZE)))
