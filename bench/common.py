"""What every benchmark records next to its numbers, so that a result can be traced to the code it measured."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

#: The project root (bench/ lives directly below it).
ROOT = Path(__file__).resolve().parents[1]
#: The detection parameters the benchmarks measure, unless ``--params`` names another file.
DEFAULT_PARAMS = ROOT / "conf" / "base" / "parameters_detection.yml"


def git_revision() -> str:
    """Commit of the code measured (``+dirty`` when src/ or conf/ have uncommitted changes)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src", "conf"], cwd=ROOT, capture_output=True, text=True, check=False
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name;key=value;key=value"`` → (name, overrides); values are YAML (``null``, ``[a, b]``, numbers).

    One syntax for every benchmark's config variants, so a variant found on one data set can be pasted into another.
    """
    name, *pairs = [part.strip() for part in spec.split(";") if part.strip()]
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"Variant '{spec}': expected key=value, got '{pair}'.")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides


def load_detection_params(path: Path) -> dict[str, Any]:
    """The ``detection`` parameters as the pipeline reads them; each ``models`` entry as ``{name, config}`` copies.

    Benchmarks change configs for their own data; copies keep those changes out of the loaded file's structure.
    """
    detection = dict(yaml.safe_load(path.read_text())["detection"])
    detection["models"] = {
        key: {"name": entry["name"], "config": dict(entry.get("config") or {})}
        for key, entry in detection["models"].items()
    }
    detection["runtime"] = dict(detection.get("runtime") or {})
    detection["thresholds"] = dict(detection.get("thresholds") or {})
    return detection


class BackboneCache:
    """Backbone outputs keyed by input content, shared by config variants that use the same backbone and layers.

    Why: a variant study fits and scores PatchCore dozens of times on the same images, and on a shared 2-core machine
    the frozen backbone's forward is most of each run, yet it computes the same features every time. Caching them
    changes no number (the backbone is deterministic in eval mode) but makes a variant cost only what differs between
    variants: coreset, kNN, maps. Timings measured with a warm cache exclude the backbone and are marked as such.
    """

    def __init__(self) -> None:
        self.store: dict[tuple[str, str], list[Any]] = {}
        self.hits = 0
        self.misses = 0

    def wrap(self, detector: Any) -> None:
        """Route ``detector.backbone``'s forward through the cache (keyed by backbone name, layers and each image's bytes)."""
        import hashlib

        import torch

        backbone = detector.backbone
        forward = backbone.forward
        tag = f"{backbone.name}:{','.join(backbone.layers)}"
        cache = self

        def cached_forward(images: torch.Tensor) -> list[torch.Tensor]:
            # per image, so that a study that regroups the same images into other batches (the feedback loop scores
            # the labelled images in batches that change every round) still hits
            data = images.detach().to("cpu", torch.float32).contiguous()
            keys = [(tag, hashlib.sha1(d.numpy().tobytes()).hexdigest() + str(tuple(d.shape))) for d in data]
            missing = [i for i, key in enumerate(keys) if key not in cache.store]
            cache.hits += len(keys) - len(missing)
            cache.misses += len(missing)
            if missing:
                outputs = forward(images[missing])
                for j, i in enumerate(missing):
                    cache.store[keys[i]] = [f[j : j + 1].cpu() for f in outputs]
            per_image = [cache.store[key] for key in keys]
            return [torch.cat([p[level] for p in per_image]).to(images.device) for level in range(len(per_image[0]))]

        backbone.forward = cached_forward


#: PatchCore variants of ``--sweep`` in bsdata.py and elpv.py ("name;key=value;..."; values YAML), each changing the
#: defaults in one respect. The same list on every data set, so that one default can be judged on all of them. They
#: probe the suspects of the image-level gap to anomalib on real data: how a map becomes one number, the bank (every
#: patch vs a random pre-sample, its size), the embedding width and the layers.
PATCHCORE_SWEEP: tuple[str, ...] = (
    # how a map becomes one number (same bank as the default)
    "score_reweighted;image_score=reweighted",
    "score_patch_max;image_score=patch_max",
    "score_map_max;image_score=map_max",
    "score_top1patch;image_top_patches=1",
    "score_top49patches;image_top_patches=49",
    # the bank: the earlier default (100 k random pre-sample, 128 channels, 2048 patches, reweighted score), its parts,
    # the bank size and the first stage's oversampling
    "old_default;coreset_sampling=random;pool_max_patches=100000;embed_dim=128;max_bank_size=2048;"
    "image_score=reweighted",
    "random100k;coreset_sampling=random;pool_max_patches=100000",
    "bank2048;max_bank_size=2048",
    "bank_1pct_uncapped;max_bank_size=null",
    "bank8192;coreset_ratio=0.02;max_bank_size=8192",
    "oversample8;coreset_oversample=8",
    "one_stage_greedy;coreset_oversample=100;pool_max_patches=600000",  # every patch a candidate: anomalib's way
    # embedding width
    "emb128;embed_dim=128",
    # layers
    "b2_b3;layers=[blocks.2, blocks.3]",
    "b3_b4;layers=[blocks.3, blocks.4]",
    "b2_b3_b4;layers=[blocks.2, blocks.3, blocks.4]",
    "b4_b5;layers=[blocks.4, blocks.5]",
    "b2_b4_b5;layers=[blocks.2, blocks.4, blocks.5]",
    # the configuration ELPV chose before (docs/performance.md, 2026-11-25), with today's bank and score
    "elpv_earlier_best;layers=[blocks.4, blocks.5];coreset_ratio=0.05;max_bank_size=8192",
)


def fit_key(detector: str, config: dict[str, Any]) -> str:
    """What a fitted model depends on: the detector and its config without the keys that act only at predict time.

    Variants with the same key can share one fit (benchmarks restore the state instead of fitting again).
    """
    import hashlib
    import json

    predict_only: set[str] = set()
    if detector == "patchcore":
        from madfh_pipeline.models.patchcore import PREDICT_ONLY_KEYS

        predict_only = set(PREDICT_ONLY_KEYS)
    relevant = {k: v for k, v in sorted(config.items()) if k not in predict_only}
    return hashlib.sha1(json.dumps([detector, relevant], sort_keys=True, default=str).encode()).hexdigest()
