"""What operators' verdicts teach the detector: a threshold, normal patches, a defect bank — each measured, Kedro-free.

Operators review what the detector doubts and answer OK or NG. Three things are learnt from those labels, in the
order the feedback pipeline applies them, and each only from the *calibration* part of the labels (a hashed split by
image id); the *held-out* part says whether it helped, before and after, with the same numbers every time:

(b) **Confirmed false alarms** are normal images the memory bank did not cover: the patches that raised the alarm
    (above the pixel threshold, the region the detector painted anomalous) join the bank (:meth:`extend_bank` of
    detectors that have a bank), so the same normal variation stops alarming — if, out of fold on the calibration
    labels, that shows it helps (:func:`judge_extension`): the variation may look like a subtle defect.
(c) **Confirmed defects** form a defect bank; an image whose most anomalous patches lie near a known defect gets its
    score raised, never lowered (semi-supervised re-ranking, :meth:`set_defect_bank`). Kept only if it measurably
    helps on the calibration labels *out of fold* (k-fold cross-fitting: each calibration image scored against a
    bank built from the defects of the other folds): image AUROC up — or, for a model that already carries a kept
    defect bank, not down (hysteresis, so that one more label does not flip the decision back and forth); otherwise
    dropped and the report says so.
(a) The **image threshold** is recalibrated from the labelled scores (after b and c; with a defect bank, from the
    out-of-fold scores): the highest threshold that still misses at most ``max_miss_rate`` of the confirmed defects,
    i.e. the lowest false-alarm rate at that miss rate.

The numbers: false-alarm rate at the recall target (threshold-free), image AUROC, and false-alarm / miss rates at the
threshold in force.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: Loads one image (by path) as the detector's input: a float tensor (C, H, W) in [0, 1] on the model canvas.
CanvasLoader = Callable[[str], torch.Tensor]

#: The same ranking can come out of the ROC's trapezoids a few ulps apart (0.857…72 vs 0.857…71, measured): that is
#: no change. A real one moves it by a defect/normal pair at least, 1/(defects · normals): 1e-6 with 1000 of each.
_AUROC_TOLERANCE = 1e-9
#: The same image scored against a bank with more rows differs in the last bits (another matmul blocking).
_SMOOTHED_TOLERANCE = 1e-6
_DROP_TOLERANCE_SIGMA = 1e-3


def far_at_recall(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, recall: float = 0.95
) -> float:
    """False-alarm rate at the highest threshold that still finds ``recall`` of the defects (threshold-free).

    NaN when there is no defect or no good image among the labels.
    """
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    bad, good = s[y == 1], s[y == 0]
    if bad.size == 0 or good.size == 0:
        return math.nan
    keep = math.ceil(recall * bad.size)  # defects that must be at or above the threshold
    threshold = np.sort(bad)[::-1][keep - 1]
    return float((good >= threshold).mean())


def threshold_for_miss_rate(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, max_miss_rate: float
) -> float | None:
    """The highest threshold (score ≥ t is flagged) that misses at most ``max_miss_rate`` of the defects.

    The highest such threshold has the lowest false-alarm rate among them. ``None`` without any labelled defect.
    """
    y = np.asarray(labels, dtype=int)
    bad = np.sort(np.asarray(scores, dtype=float)[y == 1])
    if bad.size == 0:
        return None
    allowed = math.floor(max_miss_rate * bad.size)  # defects that may fall below the threshold
    return float(bad[min(allowed, bad.size - 1)])


def decision_rates(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """False-alarm and miss rates of the decisions at ``threshold`` (what the line sees)."""
    y = np.asarray(labels, dtype=int)
    flagged = np.asarray(scores, dtype=float) >= threshold
    good, bad = y == 0, y == 1
    return {
        "false_alarm_rate_at_threshold": float(flagged[good].mean()) if good.any() else math.nan,
        "miss_rate_at_threshold": float((~flagged[bad]).mean()) if bad.any() else math.nan,
    }


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from madfh_pipeline.metrics import image_auroc as auroc

    y = np.asarray(labels, dtype=int)
    return auroc(y, scores) if 0 < y.sum() < y.size else math.nan


def smoothed_auroc(labels: np.ndarray, scores: np.ndarray, scale: float) -> float:
    """AUROC with each defect/normal pair counted by ``Φ((s_defect − s_normal) / scale)`` instead of 0, ½ or 1.

    Why: on a few dozen labels a change to the bank often reorders no pair at all, and the rank AUROC then cannot
    tell an extension that pulled the false alarms down from one that pulled the defects down towards the normals.
    Pairs within a few ``scale`` of each other still register that. NaN without both labels.
    """
    from scipy.special import ndtr

    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    bad, good = s[y == 1], s[y == 0]
    if bad.size == 0 or good.size == 0:
        return math.nan
    return float(ndtr((bad[:, None] - good[None, :]) / scale).mean())


def holdout_mask(image_ids: Iterable[str], fraction: float, salt: str = "feedback") -> np.ndarray:
    """True for the images kept out of learning (a stable hash of the image id, so a label never switches sides)."""
    out = []
    for image_id in image_ids:
        digest = hashlib.sha256(f"{salt}:{image_id}".encode()).digest()
        out.append(int.from_bytes(digest[:8], "big") / 2**64 < fraction)
    return np.asarray(out, dtype=bool)


def summary(labels: np.ndarray, scores: np.ndarray, threshold: float | None, recall: float) -> dict[str, float]:
    """``false_alarm_rate``: at the recall target (threshold-free); ``*_at_threshold``: the decisions in force."""
    out = {
        "n": float(len(labels)),
        "n_defects": float(np.sum(labels)),
        "false_alarm_rate": far_at_recall(labels, scores, recall),
        "image_auroc": image_auroc(labels, scores),
        "threshold": float(threshold) if threshold is not None else math.nan,
    }
    if threshold is not None:
        out |= decision_rates(labels, scores, threshold)
    return out


@dataclass
class FeedbackSettings:
    """How labels become model changes (the ``feedback`` parameters)."""

    holdout_fraction: float = 0.3
    salt: str = "feedback"
    recall: float = 0.95
    max_miss_rate: float = 0.05
    extend_bank: bool = True
    max_normal_patches_per_image: int = 256
    extend_alarm_region_only: bool = True
    extend_needs_gain: bool = True
    extend_min_gain_pairs: float = 0.0
    defect_bank: bool = True
    defect_weights: tuple[float, ...] = (0.1, 0.25, 0.5)
    defect_patches_per_image: int = 16
    defect_folds: int = 5
    batch_size: int = 4

    def __post_init__(self) -> None:
        if int(self.defect_folds) < 2:
            raise ValueError(
                "feedback.defect_folds must be at least 2 (one fold to build from, one to test), "
                f"got {self.defect_folds}."
            )

    @classmethod
    def from_mapping(cls, data: dict[str, Any] | None) -> FeedbackSettings:
        data = dict(data or {})
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"Unknown feedback setting(s) {unknown}; valid: {', '.join(cls.__dataclass_fields__)}.")
        if "defect_weights" in data:
            data["defect_weights"] = tuple(float(w) for w in data["defect_weights"])
        return cls(**data)


@dataclass
class FeedbackReport:
    """Before/after on the held-out labels, and what each step did."""

    n_labels: int
    n_calibration: int
    n_holdout: int
    before: dict[str, float]
    after: dict[str, float]
    calibration_before: dict[str, float]
    calibration_after: dict[str, float]
    steps: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _score(detector: Any, paths: Sequence[str], load: CanvasLoader, batch_size: int) -> np.ndarray:
    scores = []
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([load(p) for p in paths[start : start + batch_size]])
        with torch.no_grad():
            scores.append(detector.predict(batch).scores.astype(np.float64))
    return np.concatenate(scores) if scores else np.empty(0)


def _batches(paths: Sequence[str], load: CanvasLoader, batch_size: int) -> Callable[[], Iterable[torch.Tensor]]:
    def source() -> Iterable[torch.Tensor]:
        for start in range(0, len(paths), batch_size):
            yield torch.stack([load(p) for p in paths[start : start + batch_size]])

    return source


def _folds(image_ids: Sequence[str], labels: np.ndarray, k: int) -> np.ndarray:
    """Fold 0..k-1 per image, stratified by label: each label's images in a stable hash order, dealt round-robin.

    Stable (the same image keeps its fold as labels accumulate, up to the deal) and balanced: every fold holds
    ⌊n/k⌋ or ⌈n/k⌉ images of each label, so with ``k`` ≤ the number of defects every fold has a defect to test and
    every fold bank has defects to build from.
    """
    folds = np.zeros(len(image_ids), dtype=int)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        order = sorted(idx, key=lambda i: (hashlib.sha256(f"fold:{image_ids[i]}".encode()).hexdigest(), i))
        for rank, i in enumerate(order):
            folds[i] = rank % k
    return folds


def _defect_bank_step(
    detector: Any,
    paths: Sequence[str],
    ids: Sequence[str],
    labels: np.ndarray,
    calib: np.ndarray,
    load: CanvasLoader,
    settings: FeedbackSettings,
    had_bank: bool,
    plain: np.ndarray | None,
    extension: dict[int, torch.Tensor] | None = None,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Choose the defect bank's weight by k-fold cross-fitting on the calibration labels; keep it only if it helps.

    Why out of fold: scored against a bank built from its own patches, a confirmed defect is re-ranked to the top
    (AUROC 1.0 on the calibration labels every time), which says nothing about the next defect. Every calibration
    image is therefore scored against a bank built from the defects of the *other* folds (k = ``defect_folds``, at
    most the number of defects): with 5 folds each trial bank holds 80 % of the defects, close to the bank that is
    kept, so the estimate is neither as pessimistic nor as noisy as a 2-fold split on a few dozen labels. Each
    defect's patches are extracted once (they are chosen against the normal bank alone), and each image is scored
    once per fold it is tested in — once in all.

    The baseline is the detector *without* any defect bank: a model version that already carries one (from the
    previous feedback run, built from these same defects) would otherwise score its own defects in sample. The
    boost factor ``max(0, 2r − 1)`` does not depend on the weight, so one forward (at weight 1) gives the scores of
    every candidate weight: ``plain · (1 + w · factor)``. The weight with the highest out-of-fold AUROC wins (the
    smaller on a tie); it is kept if that AUROC beats the baseline's, or equals it when the model already carried a
    kept bank (hysteresis). The false-alarm rate at the recall target is reported but not a criterion: on a few dozen
    labels it is set by the single lowest-scoring defect. Returns the step's report and the out-of-fold scores of the
    kept weight (``None`` when the bank is dropped).

    ``extension``: the bank extension this run adds (false-alarm index → its patches), not yet in the bank. Scored
    against a bank that holds its own patches, a confirmed false alarm drops to an in-sample low, the baseline AUROC
    looks better than it is and a helpful defect bank is dropped (measured on BSData: held-out AUROC 0.959 → 0.942 the
    round an extension passed). So each fold is scored against the bank extended by the *other* folds' false alarms
    (folds stratified into defects, false alarms and other normals), baseline and re-ranked alike.
    """
    n = len(paths)
    calib_idx = np.flatnonzero(calib)
    defect_idx = np.array([i for i in calib_idx if labels[i] == 1], dtype=int)
    k = max(2, min(int(settings.defect_folds), len(defect_idx)))
    group = labels.copy()
    for i in extension or {}:
        group[i] = 2  # a stratum of its own, as in the extension's judgement
    fold = np.full(n, -1)
    fold[calib_idx] = _folds([ids[i] for i in calib_idx], group[calib_idx], k)
    if plain is None or extension:
        plain = np.full(n, np.nan)
        if not extension:
            plain[calib_idx] = _score(detector, [paths[i] for i in calib_idx], load, settings.batch_size)
    patches = detector.farthest_patches(
        _batches([paths[i] for i in defect_idx], load, settings.batch_size), settings.defect_patches_per_image
    )
    factor = np.zeros(n)
    for f in range(k):
        test = np.flatnonzero(fold == f)
        test_paths = [paths[i] for i in test]
        rows = [r for i, r in (extension or {}).items() if fold[i] != f and r.shape[0]]
        with detector.trial_extension(torch.cat(rows)) if rows else contextlib.nullcontext():
            if extension:
                plain[test] = _score(detector, test_paths, load, settings.batch_size)
            others = torch.cat([p for p, i in zip(patches, defect_idx, strict=True) if fold[i] != f])
            detector.set_defect_bank(others, 1.0)
            reranked = _score(detector, test_paths, load, settings.batch_size)
            detector.clear_defect_bank()
        base = plain[test]
        factor[test] = np.where(base > 0, reranked / np.where(base > 0, base, 1.0) - 1.0, 0.0)

    y, base_scores = labels[calib_idx], plain[calib_idx]
    base_auroc = image_auroc(y, base_scores)
    trials = []
    for weight in sorted(settings.defect_weights):
        trial = base_scores * (1.0 + weight * factor[calib_idx])
        trials.append(
            {"weight": weight, "auroc": image_auroc(y, trial), "far": far_at_recall(y, trial, settings.recall)}
        )
    best = max(trials, key=lambda t: t["auroc"]) if trials else None  # max keeps the first (smallest weight) on a tie
    report: dict[str, Any] = {
        "images": len(defect_idx),
        "evaluated": f"{k}-fold out of fold on the calibration labels"
        + (f", the bank extended by the other folds' false alarms ({len(extension)})" if extension else ""),
        "base_auroc": base_auroc,
        "base_far_at_recall": far_at_recall(y, base_scores, settings.recall),
        "previously_kept": had_bank,
        "trials": trials,
    }
    helps = best is not None and (
        best["auroc"] > base_auroc + _AUROC_TOLERANCE or (had_bank and best["auroc"] >= base_auroc - _AUROC_TOLERANCE)
    )
    if not helps:
        return report | {"kept": False, "reason": "no weight improved the calibration labels out of fold"}, None
    assert best is not None
    detector.set_defect_bank(torch.cat(patches), best["weight"])
    calibrated = np.full(n, np.nan)
    calibrated[calib_idx] = base_scores * (1.0 + best["weight"] * factor[calib_idx])
    return report | {
        "kept": True,
        "weight": best["weight"],
        "calibration_auroc": best["auroc"],
        "calibration_far": best["far"],
    }, calibrated


def _extend_step(
    detector: Any,
    paths: Sequence[str],
    ids: Sequence[str],
    labels: np.ndarray,
    calib: np.ndarray,
    false_alarms: np.ndarray,
    load: CanvasLoader,
    settings: FeedbackSettings,
    plain: np.ndarray | None,
) -> tuple[dict[str, Any], dict[int, torch.Tensor] | None, np.ndarray | None]:
    """Which confirmed false alarms' alarm patches join the memory bank — judged out of fold, added by the caller.

    Why judged: a normal image's alarm region can look like a subtle defect (a wear mark next to a pit), and once in
    the bank it hides every defect that resembles it. Measured on BSData, a round that added five such images dropped
    held-out AUROC from 0.962 to 0.916 (docs/performance.md). So, like the defect bank, the extension is judged by
    k-fold cross-fitting on the calibration labels: every calibration image is scored against the bank extended by
    the false alarms of the *other* folds (folds stratified into defects, false alarms and other normals).

    The patches are added only on evidence that they help, judged in this order: the out-of-fold AUROC must not
    fall, and then rise; or, tied, the :func:`smoothed_auroc` (pairs weighed by their margin in validation σ) must
    rise; or, when every defect is so far above every normal that not even that moves, the normals' scores must
    fall (the extension's purpose: fewer alarms on the same variation, no defect anywhere near). Why not "not
    below", the rule before: on 10–50 labels most extensions reorder no calibration pair, the rank AUROC ties (26
    of the 27 extensions it passed on BSData), and such ties let through extensions that raised the held-out
    false-alarm rate (docs/performance.md); the smoothed AUROC sees whether the false alarms or the defects moved
    down. ``extend_needs_gain=False`` restores the old rule.
    With fewer than two false alarms or no confirmed defect there is nothing to judge with; the patches are then
    added (the operator's verdict, and only the alarm region) and the report says it was not judged.

    ``plain``: the calibration scores of the detector as it is (no defect bank), when the caller has them. Returns the
    report, the patches to add (false-alarm index → its rows; ``None`` when none pass) and ``plain`` (computed here
    when it was not given). The bank is not changed here: the defect bank is judged first, against out-of-fold
    scores of the extended bank (:func:`_defect_bank_step`), and then the caller adds the patches.
    """
    pixel = getattr(detector.thresholds, "pixel", None)
    floor = float(pixel) if settings.extend_alarm_region_only and pixel is not None and math.isfinite(pixel) else None
    patches = detector.farthest_patches(
        _batches([paths[i] for i in false_alarms], load, settings.batch_size),
        settings.max_normal_patches_per_image,
        floor,
    )
    report: dict[str, Any] = {"images": len(false_alarms), "min_distance": floor}
    calib_idx = np.flatnonzero(calib)
    n_defects = int(labels[calib_idx].sum())
    chosen = {int(i): rows for i, rows in zip(false_alarms, patches, strict=True)}
    count = sum(int(rows.shape[0]) for rows in patches)
    if len(false_alarms) < 2 or n_defects == 0:
        why = "fewer than 2 confirmed false alarms" if len(false_alarms) < 2 else "no confirmed defect"
        report |= {"patches_added": count, "judged": False, "reason": f"not judged: {why}"}
        return report, (chosen if count else None), plain
    n = len(paths)
    k = max(2, min(int(settings.defect_folds), len(false_alarms)))
    group = labels.copy()
    group[false_alarms] = 2  # a stratum of its own: every fold tests a false alarm, every complement adds one
    fold = np.full(n, -1)
    fold[calib_idx] = _folds([ids[i] for i in calib_idx], group[calib_idx], k)
    if plain is None:
        plain = np.full(n, np.nan)
        plain[calib_idx] = _score(detector, [paths[i] for i in calib_idx], load, settings.batch_size)
    extended = np.full(n, np.nan)
    for f in range(k):
        other = torch.cat([p for p, i in zip(patches, false_alarms, strict=True) if fold[i] != f])
        with detector.trial_extension(other):
            test = np.flatnonzero(fold == f)
            extended[test] = _score(detector, [paths[i] for i in test], load, settings.batch_size)
    y = labels[calib_idx]
    scale, source = _score_scale(detector, plain[calib_idx][y == 0])
    helps, verdict = judge_extension(
        y, plain[calib_idx], extended[calib_idx], scale, settings.extend_needs_gain, settings.extend_min_gain_pairs
    )
    report |= {"judged": True, "evaluated": f"{k}-fold out of fold", "smoothing_scale_from": source} | verdict
    if not helps:
        return report | {"patches_added": 0}, None, plain
    return report | {"patches_added": count}, (chosen if count else None), plain


def judge_extension(
    labels: np.ndarray,
    plain: np.ndarray,
    extended: np.ndarray,
    scale: float,
    needs_gain: bool = True,
    min_gain_pairs: float = 0.0,
) -> tuple[bool, dict[str, Any]]:
    """Whether out-of-fold scores with a bank extension (``extended``) beat those without it (``plain``).

    Lexicographic, as :func:`_extend_step` explains: a lower rank AUROC fails; a higher one passes; a tie passes
    when the smoothed AUROC (margins in ``scale``) rises, or, when it ties too (every defect far above every
    normal), when the normals' mean score falls. ``needs_gain=False``: every tie passes (the rule before).
    ``min_gain_pairs``: how much the smoothed AUROC must rise on a tie, in pairs (1 = ``1 / (defects · normals)``,
    one reordered pair's worth — the rank AUROC's own resolution; 0 = any rise beyond rounding).
    Returns the verdict and the numbers behind it, with a ``reason`` when it fails.
    """
    y = np.asarray(labels, dtype=int)
    plain, extended = np.asarray(plain, dtype=float), np.asarray(extended, dtype=float)
    numbers: dict[str, Any] = {
        "base_auroc": image_auroc(y, plain),
        "auroc": image_auroc(y, extended),
        "base_smoothed_auroc": smoothed_auroc(y, plain, scale),
        "smoothed_auroc": smoothed_auroc(y, extended, scale),
        "smoothing_scale": float(scale),
        "normal_drop_sigma": float(np.mean(plain[y == 0] - extended[y == 0]) / scale) if (y == 0).any() else math.nan,
        "needs_gain": bool(needs_gain),
        "min_smoothed_gain": max(_SMOOTHED_TOLERANCE, float(min_gain_pairs) / max(1, (y == 1).sum() * (y == 0).sum())),
    }
    if numbers["auroc"] < numbers["base_auroc"] - _AUROC_TOLERANCE:
        return False, numbers | {"reason": "the extension lowered the calibration AUROC out of fold"}
    if not needs_gain or numbers["auroc"] > numbers["base_auroc"] + _AUROC_TOLERANCE:
        return True, numbers
    moved = numbers["smoothed_auroc"] - numbers["base_smoothed_auroc"]
    if moved >= numbers["min_smoothed_gain"]:
        return True, numbers
    if abs(moved) <= _SMOOTHED_TOLERANCE and numbers["normal_drop_sigma"] > _DROP_TOLERANCE_SIGMA:
        return True, numbers
    reason = "no evidence out of fold that it helps (AUROC tied, smoothed AUROC not enough above, normals not lower)"
    return False, numbers | {"reason": reason}


def _score_scale(detector: Any, normal_scores: np.ndarray) -> tuple[float, str]:
    """The σ that :func:`smoothed_auroc` measures margins in: the validation σ of image scores (the REVIEW band's
    unit) when the thresholds carry it, else the spread of the labelled normals' scores."""
    stats = getattr(getattr(detector, "thresholds", None), "stats", None) or {}
    sigma = float(stats.get("image_std", math.nan))
    if math.isfinite(sigma) and sigma > 0:
        return sigma, "validation image_std"
    spread = float(np.std(normal_scores)) if normal_scores.size > 1 else math.nan
    if math.isfinite(spread) and spread > 0:
        return spread, "std of the labelled normals' scores"
    return 1.0, "1.0 (no validation σ and no spread among the labelled normals)"


def apply_feedback(
    detector: Any,
    labelled: Any,
    load: CanvasLoader,
    settings: FeedbackSettings | None = None,
) -> tuple[Any, FeedbackReport]:
    """Learn from labelled images (a DataFrame with ``image_id``, ``image_path``, ``label`` 0/1, ``decision``).

    Returns the updated detector (a changed copy is the caller's new model version) and the report. The detector is
    changed in place; pass a copy to keep the old one.
    """
    settings = settings or FeedbackSettings()
    frame = labelled.reset_index(drop=True)
    labels = frame["label"].to_numpy(dtype=int)
    paths = frame["image_path"].tolist()
    hold = holdout_mask(frame["image_id"], settings.holdout_fraction, settings.salt)
    calib = ~hold
    threshold_before = detector.thresholds.image
    scores_before = _score(detector, paths, load, settings.batch_size)
    steps: dict[str, Any] = {}

    # The old defect bank (built from these same defects) would score them in sample while (b) and (c) are judged.
    previous_defects = detector.feedback_state() if hasattr(detector, "feedback_state") else {}
    had_bank = previous_defects.get("defect_bank") is not None and float(previous_defects.get("defect_weight", 0)) > 0
    if hasattr(detector, "clear_defect_bank"):
        detector.clear_defect_bank()
    # calibration scores without a defect bank, shared by (b) and (c) while the memory bank is unchanged
    plain: np.ndarray | None = None if had_bank else np.where(calib, scores_before, np.nan)
    ids = frame["image_id"].astype(str).tolist()

    # (b) confirmed false alarms: normal images the bank did not cover
    false_alarms = np.array(
        [
            i
            for i, (y, d, c) in enumerate(zip(labels, frame["decision"], calib, strict=True))
            if c and y == 0 and d in ("NG", "REVIEW")
        ],
        dtype=int,
    )
    extension: dict[int, torch.Tensor] | None = None  # judged now, added after the defect bank is judged with it
    if settings.extend_bank and len(false_alarms) and hasattr(detector, "farthest_patches"):
        steps["extend_bank"], extension, plain = _extend_step(
            detector, paths, ids, labels, calib, false_alarms, load, settings, plain
        )
    else:
        reason = (
            "disabled"
            if not settings.extend_bank
            else (
                "no confirmed false alarm" if not len(false_alarms) else f"{type(detector).__name__} has no memory bank"
            )
        )
        steps["extend_bank"] = {"images": len(false_alarms), "patches_added": 0, "skipped": reason}

    # (c) confirmed defects: a defect bank that re-ranks, kept only if it helps out of fold on the calibration labels
    defects = [i for i in np.flatnonzero(calib) if labels[i] == 1]
    calibrated: np.ndarray | None = None  # out-of-fold calibration scores of the kept defect bank
    if settings.defect_bank and len(defects) >= 2 and hasattr(detector, "farthest_patches"):
        steps["defect_bank"], calibrated = _defect_bank_step(
            detector, paths, ids, labels, calib, load, settings, had_bank, plain, extension
        )
    else:
        reason = (
            "disabled"
            if not settings.defect_bank
            else (
                f"{type(detector).__name__} has no memory bank"
                if not hasattr(detector, "farthest_patches")
                else "needs at least 2 confirmed defects (one to build from, one to test on)"
            )
        )
        if had_bank:  # nothing new to judge it with: the model keeps the bank it had
            detector.set_defect_bank(previous_defects["defect_bank"], float(previous_defects["defect_weight"]))
            reason += "; the previous version's defect bank stays"
        steps["defect_bank"] = {"images": len(defects), "kept": had_bank, "reason": reason}

    if extension:
        detector.extend_bank(torch.cat(list(extension.values())))

    # (a) the threshold, from the (re-)scored calibration labels
    scores_after = _score(detector, paths, load, settings.batch_size)
    # A confirmed defect is in the defect bank it is scored against (its own patches: re-ranked to the top), so its
    # in-sample score says nothing about the next defect; the threshold comes from the out-of-fold scores.
    threshold_scores = scores_after[calib] if calibrated is None else calibrated[calib]
    new_threshold = threshold_for_miss_rate(labels[calib], threshold_scores, settings.max_miss_rate)
    if new_threshold is not None:
        detector.thresholds.image = new_threshold
        detector.thresholds.rule += (
            f"; recalibrated on {int(calib.sum())} operator labels (max miss rate {settings.max_miss_rate})"
        )
        steps["threshold"] = {"before": threshold_before, "after": new_threshold}
    else:
        steps["threshold"] = {"before": threshold_before, "after": threshold_before, "skipped": "no labelled defect"}
    threshold_after = detector.thresholds.image
    report = FeedbackReport(
        n_labels=len(frame),
        n_calibration=int(calib.sum()),
        n_holdout=int(hold.sum()),
        before=summary(labels[hold], scores_before[hold], threshold_before, settings.recall),
        after=summary(labels[hold], scores_after[hold], threshold_after, settings.recall),
        calibration_before=summary(labels[calib], scores_before[calib], threshold_before, settings.recall),
        calibration_after=summary(labels[calib], scores_after[calib], threshold_after, settings.recall),
        steps=steps,
    )
    logger.info("Feedback: %s", {k: report.steps[k] for k in report.steps})
    return detector, report
