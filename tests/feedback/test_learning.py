"""What operators' labels teach a real PatchCore: the threshold rule, the bank extension, the out-of-fold defect bank."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from madfh_pipeline.calibration import thresholds_from_normal
from madfh_pipeline.feedback.learning import (
    FeedbackSettings,
    _folds,
    apply_feedback,
    far_at_recall,
    holdout_mask,
    threshold_for_miss_rate,
)
from madfh_pipeline.models.base import Thresholds
from madfh_pipeline.models.patchcore import PatchCore
from tests.models.test_patchcore import SMALL_CONFIG, plant_square, textures


def test_far_at_recall_and_threshold_rule_on_a_hand_made_case() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([1.0, 2.0, 3.0, 6.0, 4.0, 5.0, 7.0, 8.0])
    # 95 % recall of 4 defects keeps all 4: threshold 4.0 flags one good image (6.0) of four
    assert far_at_recall(labels, scores, 0.95) == pytest.approx(0.25)
    assert far_at_recall(labels, scores, 0.5) == 0.0  # threshold 7.0
    assert threshold_for_miss_rate(labels, scores, 0.0) == 4.0
    assert threshold_for_miss_rate(labels, scores, 0.25) == 5.0  # one of four may be missed
    assert threshold_for_miss_rate(labels * 0, scores, 0.1) is None
    assert math.isnan(far_at_recall(labels * 0, scores))


def test_folds_are_stable_stratified_and_never_empty() -> None:
    ids = [f"img{i}" for i in range(23)]
    labels = np.array([1] * 7 + [0] * 16)
    folds = _folds(ids, labels, 5)
    assert (folds == _folds(ids, labels, 5)).all()  # a hash, not a random draw
    for label, n in ((1, 7), (0, 16)):
        counts = np.bincount(folds[labels == label], minlength=5)
        assert counts.sum() == n and counts.max() - counts.min() <= 1  # dealt round-robin: balanced per label
    assert set(folds[labels == 1]) == set(range(5))  # k <= defects: every fold tests a defect
    assert list(_folds(["a", "a"], np.array([1, 1]), 2)) in ([0, 1], [1, 0])  # the same hash twice still splits


def test_settings_reject_fewer_than_two_folds() -> None:
    with pytest.raises(ValueError, match="defect_folds must be at least 2"):
        FeedbackSettings.from_mapping({"defect_folds": 1})


@pytest.fixture(scope="module")
def images() -> dict[str, torch.Tensor]:
    """Normal parts the bank has not seen, some with a grey patch (false alarms), parts with a faint dark square (one
    defect type, ranked imperfectly: image AUROC ≈ 0.92 before feedback) and with an obvious one."""
    normal, flagged, defective = textures(10, seed=3), textures(10, seed=4), textures(10, seed=5)  # distinct parts
    out: dict[str, torch.Tensor] = {}
    for i in range(10):
        out[f"normal_{i}"] = normal[i]
        out[f"grey_{i}"] = plant_square(flagged[i : i + 1], 16 + 8 * (i % 4), 20 + 6 * (i % 3), 14, 0.5)[0]
        out[f"dark_{i}"] = plant_square(defective[i : i + 1], 70 - 5 * (i % 4), 60 + 7 * (i % 3), 8, 0.15)[0]
        out[f"strong_{i}"] = plant_square(defective[i : i + 1], 70 - 5 * (i % 4), 60 + 7 * (i % 3), 14, 0.0)[0]
    return out


def _fitted() -> PatchCore:
    detector = PatchCore(SMALL_CONFIG)
    detector.fit(lambda: textures(8, seed=1).split(4))
    return detector


def test_feedback_judges_the_bank_extension_keeps_a_helpful_defect_bank_and_reports_before_after(
    images: dict[str, torch.Tensor],
) -> None:
    detector = _fitted()
    used = {k: v for k, v in images.items() if not k.startswith("strong")}
    plain = {k: float(detector.predict(v[None]).scores[0]) for k, v in used.items()}
    threshold = float(np.median(list(plain.values())))
    # the pixel threshold as calibration sets it: from defect-free parts the bank has not seen
    validation = detector.predict(torch.stack([images[f"normal_{i}"] for i in range(10)]))
    pixel = thresholds_from_normal(list(validation.maps), validation.scores).pixel
    detector.thresholds = Thresholds(image=threshold, pixel=pixel, rule="test")
    rows = [
        {
            "image_id": name,
            "image_path": name,
            "label": int(name.startswith("dark")),
            "decision": "NG" if plain[name] >= threshold else "OK",
        }
        for name in used
    ]
    settings = FeedbackSettings(holdout_fraction=0.3, max_miss_rate=0.0, batch_size=8)
    _, report = apply_feedback(detector, pd.DataFrame(rows), images.__getitem__, settings)

    hold = holdout_mask([r["image_id"] for r in rows], 0.3)
    grey_alarms = [r for r, h in zip(rows, hold, strict=True) if not h and r["label"] == 0 and r["decision"] == "NG"]
    extend = report.steps["extend_bank"]
    # Parts the bank never saw alarm all over, defects and false alarms alike: the false alarms' patches would cover
    # the defective parts too. Judged out of fold, the extension lowers the AUROC, so nothing is added.
    assert extend["images"] == len(grey_alarms) > 1 and extend["judged"] is True, extend
    assert extend["auroc"] < extend["base_auroc"] and extend["patches_added"] == 0, extend
    assert "lowered" in extend["reason"]
    defect = report.steps["defect_bank"]
    assert defect["evaluated"].startswith(f"{min(5, defect['images'])}-fold")
    assert defect["kept"] is True, defect  # one defect type: the other folds' bank recognises it
    assert detector.defect_bank is not None and detector.defect_weight == defect["weight"]
    assert detector.defect_bank.shape[0] == defect["images"] * settings.defect_patches_per_image  # every defect
    # the threshold comes from out-of-fold scores: no calibration defect is missed by it (max_miss_rate 0)
    assert report.calibration_after["miss_rate_at_threshold"] == 0.0
    assert report.after["image_auroc"] >= report.before["image_auroc"]
    assert report.after["false_alarm_rate"] <= report.before["false_alarm_rate"]
    assert set(report.to_dict()) >= {"before", "after", "steps", "n_holdout", "n_calibration"}


def _defect_bank_only(
    images: dict[str, torch.Tensor], defect: str
) -> tuple[PatchCore, list[dict[str, object]], FeedbackSettings]:
    """A fitted PatchCore, every normal part and the ``defect`` parts labelled, the defect bank the only step."""
    detector = _fitted()
    names = [k for k in images if k.startswith(("normal", defect))]
    rows = [{"image_id": n, "image_path": n, "label": int(n.startswith(defect)), "decision": "OK"} for n in names]
    detector.thresholds = Thresholds(image=1e9, pixel=1.0, rule="test")
    return detector, rows, FeedbackSettings(holdout_fraction=0.0, extend_bank=False, batch_size=8)


def test_a_defect_bank_that_cannot_help_is_dropped(images: dict[str, torch.Tensor]) -> None:
    """Every confirmed defect already scores above every normal part: re-ranking cannot raise the AUROC, so the
    bank is dropped; the report says why."""
    detector, rows, settings = _defect_bank_only(images, "strong")
    _, report = apply_feedback(detector, pd.DataFrame(rows), images.__getitem__, settings)
    defect = report.steps["defect_bank"]
    assert defect.get("base_auroc") == 1.0 and defect["kept"] is False, defect
    assert "out of fold" in defect["reason"] and detector.defect_bank is None


def test_a_second_feedback_run_judges_the_new_bank_against_a_model_without_the_old_one(
    images: dict[str, torch.Tensor],
) -> None:
    """The feedback pipeline starts from the active version, which already carries the defect bank of these same
    defects. Its baseline must be the model without that bank (else its own defects score in sample, the baseline
    AUROC is 1.0 and the bank is dropped every other run); and a bank kept before stays kept on a tie (hysteresis)."""
    detector, rows, settings = _defect_bank_only(images, "dark")
    first, report1 = apply_feedback(detector, pd.DataFrame(rows), images.__getitem__, settings)
    step1 = report1.steps["defect_bank"]
    assert step1["kept"] is True and step1["previously_kept"] is False, step1
    second, report2 = apply_feedback(first, pd.DataFrame(rows), images.__getitem__, settings)
    step2 = report2.steps["defect_bank"]
    assert step2["previously_kept"] is True
    assert step2["base_auroc"] == pytest.approx(step1["base_auroc"])  # not the in-sample AUROC of the old bank
    assert step2["base_auroc"] < 1.0 and step2["kept"] is True, step2
    assert second.defect_bank is not None and second.defect_bank.shape[0] == 10 * settings.defect_patches_per_image


def test_a_false_alarm_unlike_the_defects_joins_the_bank_and_stops_alarming() -> None:
    """Known parts: a grey mark (a normal variation) alarms, a dark square is the defect. The grey marks' patches do
    not cover dark squares, so out of fold the extension does not lower the AUROC: they are added, and the next grey
    mark scores like a normal part."""
    detector = _fitted()
    parts = textures(8, seed=1)  # the training parts
    noise = torch.Generator().manual_seed(7)
    out: dict[str, torch.Tensor] = {}
    for i in range(8):
        jitter = (parts[i : i + 1] + 0.03 * torch.randn(parts[i : i + 1].shape, generator=noise)).clamp(0, 1)
        out[f"normal_{i}"] = jitter[0]
        out[f"grey_{i}"] = plant_square(jitter, 10 + 9 * (i % 4), 20 + 11 * (i % 3), 12, 0.5)[0]
        out[f"dark_{i}"] = plant_square(jitter, 70 - 5 * (i % 4), 60 + 7 * (i % 3), 10, 0.05)[0]
    validation = detector.predict(torch.stack([out[f"normal_{i}"] for i in range(8)]))
    detector.thresholds = thresholds_from_normal(list(validation.maps), validation.scores)
    rows = [
        {
            "image_id": n,
            "image_path": n,
            "label": int(n.startswith("dark")),
            "decision": "NG" if n.startswith("grey") else "OK",
        }
        for n in out
        if not n.endswith("_7")  # part 7 is the next day's part
    ]
    settings = FeedbackSettings(holdout_fraction=0.0, defect_bank=False, batch_size=8)
    grey_before = float(detector.predict(out["grey_7"][None]).scores[0])

    _, report = apply_feedback(detector, pd.DataFrame(rows), out.__getitem__, settings)

    extend = report.steps["extend_bank"]
    assert extend["judged"] is True and extend["auroc"] >= extend["base_auroc"], extend
    assert 0 < extend["patches_added"] <= 7 * settings.max_normal_patches_per_image
    assert extend["min_distance"] == pytest.approx(detector.thresholds.pixel)
    grey_after = float(detector.predict(out["grey_7"][None]).scores[0])
    dark_after = float(detector.predict(out["dark_7"][None]).scores[0])
    assert grey_after < grey_before and grey_after < dark_after
