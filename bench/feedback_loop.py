"""Does operator feedback measurably improve the detector? A simulated review loop, three ways to pick the images.

An operator who answers with the ground truth reviews ``k`` images per round from a *review pool*, chosen by
uncertainty (nearest the threshold), at random, or the way the review app's queue serves them (``mixed``: nearest
the threshold, with ``--explore-share`` of the places in random order; :mod:`madfh_pipeline.feedback.sampling`);
after each round the feedback step runs (:func:`madfh_pipeline.feedback.learning.apply_feedback`: confirmed false
alarms extend the memory bank, confirmed defects form a defect bank kept only if it helps, the threshold is
recalibrated) on all labels so far, starting from the previous round's model, as the feedback pipeline starts from
the active version. Each reviewed image carries the decision inspection would have recorded with the current model:
OK, REVIEW within ``--review-band-std`` validation σ of the threshold, or NG; a good image flagged REVIEW or NG is a
confirmed false alarm to the feedback step, as in the app.
A *held-out* set, never reviewed, reports after every round: false-alarm rate at 95 % recall, image AUROC and
AU-PRO@0.05 (canvas), plus the false-alarm and miss rates at the threshold in force.

Pool and held-out are a seeded, label-stratified half/half split of test_public. Random and mixed sampling are
repeated over ``--seeds`` draws and averaged. Inputs: a category folder in the MVTec AD 2 layout (BSData converted by
``bench/bsdata.py convert``), or ``--generate-demo`` (wallplugs demo scenes, more test images than the shipped demo).

    .venv/bin/python bench/feedback_loop.py --root /tmp/bsdata_root --category bsdata --size 256
    .venv/bin/python bench/feedback_loop.py --generate-demo /tmp/demo_fb --category wallplugs --size 1024 \
        --cache-features
    .venv/bin/python bench/feedback_loop.py --summarize run_a.json run_b.json   # pool draws, test against random
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from common import ROOT, BackboneCache, git_revision  # noqa: E402  bench/common.py (the script directory is on sys.path)

from madfh_pipeline import metrics as M  # noqa: E402
from madfh_pipeline.calibration import thresholds_from_normal  # noqa: E402
from madfh_pipeline.feedback.learning import (  # noqa: E402
    FeedbackSettings,
    apply_feedback,
    decision_rates,
    far_at_recall,
    image_auroc,
)
from madfh_pipeline.feedback.sampling import mixed_order  # noqa: E402
from madfh_pipeline.imaging import Geometry, read_image  # noqa: E402
from madfh_pipeline.inspection import decide, review_band  # noqa: E402
from madfh_pipeline.models.base import build_detector  # noqa: E402

logger = logging.getLogger("bench.feedback_loop")


def generate_demo(dest: Path, category: str, scale: float, width: int, height: int, seed: int) -> Path:
    """Wallplugs-like demo scenes (the demo generator's), more of them and smaller than native, for the loop."""
    from madfh_pipeline.demo.synth import SceneSpec, plan_dataset, render_item
    from madfh_pipeline.workers import write_bundle

    counts = {"train": 24, "validation": 8, "test_public_good": 8, "test_public_bad": 12}
    counts = {k: int(round(v * scale)) for k, v in counts.items()} | {"test_private": 0, "test_private_mixed": 0}
    spec = SceneSpec(category=category, width=width, height=height, channels=1 if category == "wallplugs" else 3)
    folder = dest / category
    if (folder / ".generated").is_file():
        return dest
    for item in plan_dataset(spec, counts, seed=seed):
        write_bundle(folder, render_item(spec, item))
    (folder / ".generated").write_text(json.dumps(counts))
    logger.info("Generated %s at %dx%d: %s", folder, width, height, counts)
    return dest


def _load(folder: Path, size: int) -> tuple[list[str], torch.Tensor]:
    names = sorted(p.name for p in folder.glob("*.png"))
    images = []
    for name in names:
        image = read_image(folder / name)
        images.append(Geometry.plan(image.shape[1], image.shape[0], size, size, "stretch").apply(image))
    array = np.stack([i[:, :, None] if i.ndim == 2 else i for i in images]).astype(np.float32) / 255.0
    return names, torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _masks(folder: Path, names: list[str], size: int) -> list[np.ndarray]:
    out = []
    for name in names:
        mask = read_image(folder / name.replace(".png", "_mask.png"), 1)
        out.append(Geometry.plan(mask.shape[1], mask.shape[0], size, size, "stretch").apply(mask, is_mask=True) > 0)
    return out


def _predict(detector: Any, images: torch.Tensor, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    scores, maps = [], []
    for chunk in images.split(batch):
        with torch.no_grad():
            out = detector.predict(chunk)
        scores.append(out.scores)
        maps.append(out.maps)
    return np.concatenate(scores).astype(np.float64), np.concatenate(maps)


def _calibrate(detector: Any, validation: torch.Tensor) -> None:
    scores, maps = _predict(detector, validation)
    detector.thresholds = thresholds_from_normal(list(maps), scores)


def _held_out_numbers(
    detector: Any, images: torch.Tensor, labels: np.ndarray, masks: list[np.ndarray]
) -> dict[str, float]:
    scores, maps = _predict(detector, images)
    pro = M.au_pro(masks, list(maps), fpr_limit=0.05)
    return {
        "far_at_recall_95": far_at_recall(labels, scores, 0.95),
        "image_auroc": image_auroc(labels, scores),
        "au_pro_005": pro,
        "threshold": float(detector.thresholds.image),
        **decision_rates(labels, scores, detector.thresholds.image),
    }


def main() -> None:  # noqa: PLR0915
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="folder holding <category>/ in the MVTec AD 2 layout")
    parser.add_argument("--generate-demo", type=Path, help="generate wallplugs-like demo scenes into this folder")
    parser.add_argument("--demo-scale", type=float, default=8.0)
    parser.add_argument("--demo-size", default="1224x1024")
    parser.add_argument("--category", default="bsdata")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3, help="random-sampling repetitions")
    parser.add_argument("--first-seed", type=int, default=0, help="seed of the first draw (more draws: 3, 6, ...)")
    parser.add_argument(
        "--strategies",
        default="uncertainty,random,mixed",
        help="comma-separated: uncertainty (nearest the threshold), random, mixed (the review queue's order: "
        "uncertainty with --explore-share of the slots in random order)",
    )
    parser.add_argument("--explore-share", type=float, default=0.3, help="exploration share of the mixed strategy")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument(
        "--review-band-std",
        type=float,
        default=1.0,
        help="half-width of the REVIEW band around the threshold in validation σ, as inspection decides "
        "(InspectionSettings.review_band_std; 0: NG/OK at the threshold, the bench before 2026-12-01)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 to run two benches side by side)")
    parser.add_argument(
        "--cache-features",
        action="store_true",
        help="keep each image's backbone features in memory (changes no number; each round then costs only the kNN)",
    )
    parser.add_argument("--replot", type=Path, help="only redraw --figure from this results JSON of an earlier run")
    parser.add_argument(
        "--summarize",
        type=Path,
        nargs="+",
        help="only pool the draws of these results JSONs (same data set and split; e.g. runs with other --first-seed) "
        "and compare each strategy's final false-alarm rate with random sampling's (exact permutation test)",
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a feedback setting for every round (YAML value; e.g. max_miss_rate=0.02), repeatable",
    )
    parser.add_argument("--output", type=Path)
    parser.add_argument("--figure", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    strategies = [name.strip() for name in args.strategies.split(",") if name.strip()]
    unknown = set(strategies) - {"uncertainty", "random", "mixed"}
    if unknown:
        raise SystemExit(f"Unknown strategies {sorted(unknown)}; expected uncertainty, random, mixed.")
    malformed = [item for item in args.setting if "=" not in item]
    if malformed:
        raise SystemExit(f"--setting expects KEY=VALUE, got {malformed}.")
    overrides = {key.strip(): yaml.safe_load(value) for key, _, value in (i.partition("=") for i in args.setting)}
    try:  # before the minutes of fitting: a bad setting fails now
        settings = FeedbackSettings.from_mapping({"holdout_fraction": 0.0} | overrides)
    except ValueError as exc:
        raise SystemExit(f"--setting: {exc}") from exc
    if args.summarize:
        pooled = summarize([json.loads(path.read_text()) for path in args.summarize])
        logger.info("Pooled draws after %d reviews:\n%s", pooled["reviews"], json.dumps(pooled["strategies"], indent=2))
        if args.output:
            args.output.write_text(json.dumps(pooled, indent=2))
        return
    if args.replot:
        results = json.loads(args.replot.read_text())
        figure = args.figure or args.replot.with_suffix(".png")
        plot(results, figure)
        logger.info("Figure %s redrawn from %s", figure, args.replot)
        return
    if args.generate_demo:
        width, height = (int(v) for v in args.demo_size.split("x"))
        root = generate_demo(args.generate_demo, args.category, args.demo_scale, width, height, seed=2026)
    elif args.root:
        root = args.root
    else:
        raise SystemExit("Give --root (a converted data set) or --generate-demo DIR.")
    folder = root / args.category
    _, train = _load(folder / "train/good", args.size)
    _, validation = _load(folder / "validation/good", args.size)
    good_names, good = _load(folder / "test_public/good", args.size)
    bad_names, bad = _load(folder / "test_public/bad", args.size)
    test = torch.cat([good, bad])
    names = [f"good/{n}" for n in good_names] + [f"bad/{n}" for n in bad_names]
    labels = np.array([0] * len(good_names) + [1] * len(bad_names))
    masks = [np.zeros((args.size, args.size), bool)] * len(good_names) + _masks(
        folder / "test_public/ground_truth/bad", bad_names, args.size
    )
    rng = np.random.default_rng(args.split_seed)
    pool = np.zeros(len(labels), bool)
    for label in (0, 1):
        idx = np.flatnonzero(labels == label)
        pool[rng.choice(idx, size=len(idx) // 2, replace=False)] = True
    held = ~pool
    logger.info(
        "%s: %d train, pool %d, held-out %d (defects %d).",
        args.category,
        len(train),
        pool.sum(),
        held.sum(),
        labels[held].sum(),
    )

    started = time.perf_counter()
    base = build_detector("patchcore", {})
    cache = BackboneCache() if args.cache_features else None
    if cache is not None:
        cache.wrap(base)  # copies of base share the wrapped forward, so every round's copy hits the same cache
    base.fit(lambda: train.split(8))
    _calibrate(base, validation)
    fit_s = time.perf_counter() - started
    held_masks = [m for m, h in zip(masks, held, strict=True) if h]
    round0 = _held_out_numbers(base, test[held], labels[held], held_masks)
    logger.info("round 0: %s", round0)
    pool_idx = np.flatnonzero(pool)
    lookup = {names[i]: test[i] for i in range(len(names))}

    def run(strategy: str, seed: int) -> list[dict[str, float]]:
        detector = copy.deepcopy(base)
        scores, _ = _predict(detector, test[pool_idx])
        reviewed: list[int] = []
        draw = np.random.default_rng(seed)
        curve = [round0]
        for round_index in range(1, args.rounds + 1):
            left = [j for j in range(len(pool_idx)) if j not in reviewed]
            std = max(base.thresholds.stats.get("image_std", 1.0), 1e-9)
            distance = np.abs(scores[left] - detector.thresholds.image) / std
            ranked = [left[j] for j in np.argsort(distance, kind="stable")]
            if strategy == "uncertainty":
                chosen = ranked[: args.per_round]
            elif strategy == "mixed":
                # the review queue's order with an exploration share (madfh_pipeline.feedback.sampling)
                chosen = mixed_order(ranked, list(draw.permutation(left)), args.explore_share, args.per_round)
            else:
                chosen = list(draw.choice(left, size=min(args.per_round, len(left)), replace=False))
            reviewed += chosen
            rows = []
            for j in reviewed:
                i = pool_idx[j]
                # inspection's rule: a good image flagged REVIEW or NG is a confirmed false alarm to the step
                decision = decide(float(scores[j]), review_band(detector.thresholds, args.review_band_std))
                rows.append(
                    {"image_id": names[i], "image_path": names[i], "label": int(labels[i]), "decision": decision}
                )
            # the previous round's model is the active version the feedback pipeline starts from
            updated, report = apply_feedback(copy.deepcopy(detector), pd.DataFrame(rows), lookup.__getitem__, settings)
            detector = updated
            scores, _ = _predict(detector, test[pool_idx])
            numbers = _held_out_numbers(detector, test[held], labels[held], held_masks) | {
                "n_labels": float(len(reviewed)),
                "patches_added": float(report.steps["extend_bank"].get("patches_added", 0)),
                # how the extension was judged (NaN when not judged): rank and smoothed AUROC, plain vs extended
                **{
                    f"extend_{key}": float(report.steps["extend_bank"].get(key, np.nan))
                    for key in ("base_auroc", "auroc", "base_smoothed_auroc", "smoothed_auroc", "normal_drop_sigma")
                },
                "defect_bank_kept": float(bool(report.steps["defect_bank"].get("kept"))),
                "defect_bank_weight": float(report.steps["defect_bank"].get("weight", 0.0)),
                "defect_bank_calibration_auroc": float(
                    report.steps["defect_bank"].get(
                        "calibration_auroc", report.steps["defect_bank"].get("base_auroc", np.nan)
                    )
                ),
                "defect_bank_base_auroc": float(report.steps["defect_bank"].get("base_auroc", np.nan)),
            }
            logger.info("%s seed %d round %d: %s", strategy, seed, round_index, numbers)
            curve.append(numbers)
        return curve

    results: dict[str, Any] = {
        "revision": git_revision(),
        "category": args.category,
        "size": args.size,
        "fit_seconds": fit_s,
        "features_cached": cache is not None,
        "n_pool": int(pool.sum()),
        "n_held_out": int(held.sum()),
        "rounds": args.rounds,
        "per_round": args.per_round,
        "explore_share": args.explore_share,
        "first_seed": args.first_seed,
        "split_seed": args.split_seed,
        "feedback_settings": overrides,
        # the defaults move between revisions: the resolved settings say what a run really used
        "feedback_settings_resolved": settings_record(settings),
        "review_band_std": args.review_band_std,
    }
    keys = ("far_at_recall_95", "image_auroc", "au_pro_005", "false_alarm_rate_at_threshold", "miss_rate_at_threshold")
    for strategy in strategies:
        if strategy == "uncertainty":  # deterministic: one run
            results["uncertainty"] = run("uncertainty", 0)
            continue
        curves = [run(strategy, s) for s in range(args.first_seed, args.first_seed + args.seeds)]
        results[strategy] = curves
        results[f"{strategy}_mean"] = [
            {k: float(np.nanmean([c[r][k] for c in curves])) for k in keys} for r in range(args.rounds + 1)
        ]
    results["date"] = time.strftime("%Y-%m-%d %H:%M")
    output = args.output or ROOT / "bench" / "results" / f"feedback_loop_{args.category}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    # beside the results unless asked for: a trial run must not overwrite the figure docs/ shows
    figure = args.figure or output.with_suffix(".png")
    plot(results, figure)
    logger.info("Results in %s, figure %s", output, figure)


def permutation_p(a: np.ndarray, b: np.ndarray, draws: int = 200_000, seed: int = 0) -> float:
    """One-sided p of mean(a) − mean(b) being this low if the labels a/b were exchangeable.

    Exact over every split when there are at most ``draws`` of them, else a seeded Monte-Carlo estimate. Why not a t
    test: a handful of draws per strategy, and FAR on a few dozen held-out images moves in steps, far from normal.
    """
    values = np.concatenate([a, b])
    observed = a.mean() - b.mean()
    n = len(a)
    if math.comb(len(values), n) <= draws:
        splits = (list(c) for c in itertools.combinations(range(len(values)), n))
    else:
        rng = np.random.default_rng(seed)
        splits = (list(rng.permutation(len(values))[:n]) for _ in range(draws))
    hits = total = 0
    for split in splits:
        mask = np.zeros(len(values), bool)
        mask[split] = True
        hits += values[mask].mean() - values[~mask].mean() <= observed + 1e-12
        total += 1
    return hits / total


def settings_record(settings: FeedbackSettings) -> dict[str, Any]:
    """Every feedback setting a run used, defaults included, as JSON (tuples become lists)."""
    return json.loads(json.dumps(asdict(settings)))


def _settings_key(run: dict[str, Any]) -> str:
    """What a run's feedback settings were, as far as its file can tell.

    Files written before the resolved settings were recorded carry only the overrides; the defaults those resolved
    against are those of the run's revision, so such a file matches only runs of the same revision and overrides.
    """
    if "feedback_settings_resolved" in run:
        return json.dumps(run["feedback_settings_resolved"], sort_keys=True)
    overrides = json.dumps(run.get("feedback_settings") or {}, sort_keys=True)
    return f"overrides {overrides} at revision {run.get('revision')}"


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every draw of every run, by strategy and draw seed (a seed in two runs counts once), compared with random.

    The runs must share data set, canvas, pool/held-out split and schedule, else their draws are not comparable.
    """
    keys = ("category", "size", "split_seed", "n_pool", "n_held_out", "rounds", "per_round", "review_band_std")
    differing = [k for k in keys if len({r.get(k) for r in runs}) > 1]
    if len({_settings_key(r) for r in runs}) > 1:
        differing.append("feedback_settings")
    if differing:
        raise SystemExit(
            f"These runs differ in {differing}; only runs of one data set, split, schedule, decision band and "
            "feedback settings pool (a file without resolved settings pools only with runs of its own revision)."
        )
    finals: dict[str, dict[int, float]] = {}
    for run in runs:
        for strategy in ("uncertainty", "random", "mixed"):
            if strategy not in run:
                continue
            curves = [run[strategy]] if strategy == "uncertainty" else run[strategy]
            first = 0 if strategy == "uncertainty" else int(run.get("first_seed", 0))
            for offset, curve in enumerate(curves):
                finals.setdefault(strategy, {})[first + offset] = float(curve[-1]["far_at_recall_95"])
    out: dict[str, Any] = {"reviews": runs[0]["rounds"] * runs[0]["per_round"], "strategies": {}}
    baseline = np.array(list(finals.get("random", {}).values()))
    for strategy, by_seed in finals.items():
        values = np.array([by_seed[s] for s in sorted(by_seed)])
        row: dict[str, Any] = {
            "draws": sorted(by_seed),
            "far_at_recall_95": values.round(4).tolist(),
            "mean": float(values.mean()),
            "sd": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
        }
        if strategy != "random" and len(baseline) > 1:
            row["minus_random"] = float(values.mean() - baseline.mean())
            if len(values) > 1:
                row["minus_random_se"] = float(
                    math.sqrt(values.var(ddof=1) / len(values) + baseline.var(ddof=1) / len(baseline))
                )
                row["p_lower_than_random"] = permutation_p(values, baseline)
        out["strategies"][strategy] = row
    return out


def extension_rule(resolved: dict[str, Any] | None) -> str:
    """The bank-extension rule in words for a figure's title; empty for files that did not record their settings."""
    if not resolved:
        return ""
    if not resolved.get("extend_bank", True):
        return "no bank extension"
    if not resolved.get("extend_needs_gain", False):
        return "extension passes if not lower"
    pairs = float(resolved.get("extend_min_gain_pairs", 0.0))
    return "extension needs evidence" + (f" (≥ {pairs:g} pairs)" if pairs > 0 else "")


def plot(results: dict[str, Any], figure: Path) -> None:
    """The three held-out curves of a run's results (also for ``--replot``: a figure without rerunning the loop)."""
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    x = np.arange(results["rounds"] + 1) * results["per_round"]
    share = results.get("explore_share", 0.0)
    styles = {
        "uncertainty": ("o-", "uncertainty sampling (nearest the threshold)"),
        "random": ("s--", "random sampling"),
        "mixed": ("^-", f"review queue: uncertainty + {share:.0%} random"),
    }
    for ax, key, title in zip(
        axes,
        ("far_at_recall_95", "image_auroc", "au_pro_005"),
        ("false-alarm rate at 95 % recall (lower is better)", "image AUROC", "AU-PRO@0.05 (canvas)"),
        strict=True,
    ):
        for strategy, (style, label) in styles.items():
            if strategy not in results:
                continue
            repeated = strategy != "uncertainty"
            curve = results[f"{strategy}_mean"] if repeated else results[strategy]
            label += f" (mean of {len(results[strategy])})" if repeated else ""
            ax.plot(x, [r[key] for r in curve], style, label=label)
        ax.set(xlabel="operator reviews", title=title)
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), frameon=False)
    band = results.get("review_band_std")
    decisions = "decisions NG/OK at the threshold" if not band else f"REVIEW band ±{band:g} σ as inspection"
    rule = extension_rule(results.get("feedback_settings_resolved"))
    fig.suptitle(
        f"Feedback loop on {results['category']} ({results['size']}², held-out {results['n_held_out']} images; "
        f"{decisions}{'; ' + rule if rule else ''})"
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(figure, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
