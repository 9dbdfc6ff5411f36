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
    image_auroc,
    judge_extension,
    smoothed_auroc,
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


def test_smoothed_auroc_tends_to_the_rank_auroc_and_sees_margins_the_ranks_do_not() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([1.0, 2.0, 4.5, 3.0, 5.0, 6.0])
    assert smoothed_auroc(labels, scores, 1e-6) == pytest.approx(image_auroc(labels, scores))  # 8 of 9 pairs
    assert smoothed_auroc(labels, scores, 1e6) == pytest.approx(0.5, abs=1e-5)
    # the same ranks, the defects nearer the normals: the rank AUROC cannot tell, the smoothed one can
    closer = np.array([1.0, 2.0, 4.5, 3.0, 4.6, 4.7])
    assert image_auroc(labels, closer) == image_auroc(labels, scores)
    assert smoothed_auroc(labels, closer, 1.0) < smoothed_auroc(labels, scores, 1.0)
    assert math.isnan(smoothed_auroc(labels * 0, scores, 1.0))


def test_an_extension_passes_only_on_evidence_that_it_helps() -> None:
    """Out-of-fold scores of six calibration images (three normals, three defects), σ = 1."""
    y = np.array([0, 0, 0, 1, 1, 1])
    plain = np.array([1.0, 2.0, 3.0, 3.5, 6.0, 7.0])

    # a defect falls below a normal: the ranking got worse
    ok, why = judge_extension(y, plain, np.array([1.0, 2.0, 3.0, 2.5, 6.0, 7.0]), 1.0)
    assert not ok and "lowered" in why["reason"]
    # nothing reorders, but the weakest defect moved towards the normals: the ranks tie, the margin shrank — no
    # evidence of help (the rule before passed it)
    pits_covered = np.array([1.0, 2.0, 3.0, 3.1, 6.0, 7.0])
    ok, why = judge_extension(y, plain, pits_covered, 1.0)
    assert not ok and why["auroc"] == why["base_auroc"] and "no evidence" in why["reason"], why
    assert judge_extension(y, plain, pits_covered, 1.0, needs_gain=False)[0]
    # the false alarm nearest the defects moved down: the ranks tie, the margins grew
    ok, why = judge_extension(y, plain, np.array([1.0, 2.0, 1.5, 3.5, 6.0, 7.0]), 1.0)
    assert ok and why["smoothed_auroc"] > why["base_smoothed_auroc"] and why["normal_drop_sigma"] > 0, why
    # the ranking improves
    assert judge_extension(y, np.array([1.0, 2.0, 4.0, 3.5, 6.0, 7.0]), plain, 1.0)[0]
    # nothing moves: nothing to add
    assert not judge_extension(y, plain, plain.copy(), 1.0)[0]
    # every defect far above every normal (the smoothed AUROC saturates): the normals falling is the evidence
    far = np.array([1.0, 2.0, 3.0, 60.0, 70.0, 80.0])
    ok, why = judge_extension(y, far, far - np.array([0.0, 0.0, 2.0, 0.0, 0.0, 0.0]), 1.0)
    assert ok and why["smoothed_auroc"] == why["base_smoothed_auroc"] == 1.0, why
    assert not judge_extension(y, far, far - np.array([0.0, 0.0, 0.0, 5.0, 0.0, 0.0]), 1.0)[0]
    # a required gain of one pair's worth (1 / (defects · normals) = 1/4 here): one normal falling clear of the
    # defect just above it adds 0.42 / 4 pairs — not enough; both normals falling clear of both defects, 1.68 / 4
    y4 = np.array([0, 0, 1, 1])
    ok, why = judge_extension(y4, np.array([1.0, 3.0, 3.2, 8.0]), np.array([1.0, 0.0, 3.2, 8.0]), 1.0)
    assert ok and why["min_smoothed_gain"] == pytest.approx(1e-6), why
    ok, why = judge_extension(y4, np.array([1.0, 3.0, 3.2, 8.0]), np.array([1.0, 0.0, 3.2, 8.0]), 1.0, True, 1.0)
    assert not ok and why["min_smoothed_gain"] == 0.25 and "not enough" in why["reason"], why
    assert judge_extension(y4, np.array([2.9, 3.0, 3.2, 3.1]), np.array([0.0, 0.0, 3.2, 3.1]), 1.0, True, 1.0)[0]
    # the last bits of a score differ against a bigger bank: not a change
    assert not judge_extension(y, far, far - np.array([0.0, 0.0, 3e-7, 0.0, 0.0, 0.0]), 1.0)[0]
    assert not judge_extension(y, plain, plain - np.array([0.0, 0.0, 3e-7, 0.0, 0.0, 0.0]), 1.0)[0]


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
    """The bank these scenarios were built on. The parts, marks and squares below were sized so that each judgement
    has something to decide on this bank (a 64-d coreset projection, the default until d834d28); the same scenarios
    on another bank rank differently, so the bank is pinned rather than left to the default."""
    detector = PatchCore(SMALL_CONFIG | {"coreset_projection_dim": 64})
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


def _grey_marks_and_dark_squares(
    dark_size: int, dark_value: float
) -> tuple[PatchCore, dict[str, torch.Tensor], list[dict[str, object]]]:
    """A calibrated PatchCore, eight parts each plain, with a grey mark (flagged NG, a normal variation) and with a
    dark square (the defect); parts 0–6 labelled, part 7 is the next day's."""
    detector = _fitted()
    parts = textures(8, seed=1)  # the training parts
    noise = torch.Generator().manual_seed(7)
    out: dict[str, torch.Tensor] = {}
    for i in range(8):
        jitter = (parts[i : i + 1] + 0.03 * torch.randn(parts[i : i + 1].shape, generator=noise)).clamp(0, 1)
        out[f"normal_{i}"] = jitter[0]
        out[f"grey_{i}"] = plant_square(jitter, 10 + 9 * (i % 4), 20 + 11 * (i % 3), 12, 0.5)[0]
        out[f"dark_{i}"] = plant_square(jitter, 70 - 5 * (i % 4), 60 + 7 * (i % 3), dark_size, dark_value)[0]
    validation = detector.predict(torch.stack([out[f"normal_{i}"] for i in range(8)]))
    detector.thresholds = thresholds_from_normal(list(validation.maps), validation.scores)
    rows: list[dict[str, object]] = [
        {
            "image_id": n,
            "image_path": n,
            "label": int(n.startswith("dark")),
            "decision": "NG" if n.startswith("grey") else "OK",
        }
        for n in out
        if not n.endswith("_7")
    ]
    return detector, out, rows


def test_a_false_alarm_unlike_the_defects_joins_the_bank_and_stops_alarming() -> None:
    """Known parts: a grey mark (a normal variation) alarms, a dark square is the defect. The grey marks' patches do
    not cover dark squares, so out of fold the extension does not lower the AUROC: they are added, and the next grey
    mark scores like a normal part."""
    detector, out, rows = _grey_marks_and_dark_squares(dark_size=10, dark_value=0.05)
    settings = FeedbackSettings(holdout_fraction=0.0, defect_bank=False, batch_size=8)
    grey_before = float(detector.predict(out["grey_7"][None]).scores[0])

    _, report = apply_feedback(detector, pd.DataFrame(rows), out.__getitem__, settings)

    extend = report.steps["extend_bank"]
    assert extend["judged"] is True and extend["auroc"] >= extend["base_auroc"], extend
    assert 0 < extend["patches_added"] <= 7 * settings.max_normal_patches_per_image, str(extend)
    assert extend["min_distance"] == pytest.approx(detector.thresholds.pixel)
    grey_after = float(detector.predict(out["grey_7"][None]).scores[0])
    dark_after = float(detector.predict(out["dark_7"][None]).scores[0])
    assert grey_after < grey_before and grey_after < dark_after


def test_the_defect_bank_is_judged_against_the_extension_out_of_fold() -> None:
    """Faint dark squares, some below the grey marks: the extension passes (the ranks tie out of fold, the margins
    grow). The defect bank must then be judged against a baseline in which no false alarm is scored against its own
    patches — the extension's out-of-fold ranking (same folds: same AUROC) — not the extended model's in-sample one,
    which has the grey marks at the bottom and left any defect bank nothing to improve."""
    detector, out, rows = _grey_marks_and_dark_squares(dark_size=6, dark_value=0.3)
    settings = FeedbackSettings(holdout_fraction=0.0, batch_size=8)

    updated, report = apply_feedback(detector, pd.DataFrame(rows), out.__getitem__, settings)

    extend, defect = report.steps["extend_bank"], report.steps["defect_bank"]
    assert extend["patches_added"] > 0 and extend["smoothed_auroc"] > extend["base_smoothed_auroc"], extend
    assert defect["images"] == extend["images"] == 7  # five folds for both, stratified alike
    assert "extended by the other folds' false alarms (7)" in defect["evaluated"], defect
    assert defect["base_auroc"] == pytest.approx(extend["auroc"]), (defect, extend)
    updated.clear_defect_bank()
    in_sample = [float(updated.predict(out[str(r["image_id"])][None]).scores[0]) for r in rows]
    labels = np.array([r["label"] for r in rows])
    assert image_auroc(labels, np.array(in_sample)) > defect["base_auroc"] + 0.05
