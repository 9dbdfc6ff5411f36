"""Detectors built on MiniCPM-V: the hybrid (CNN + VLM patch features in one memory bank) and the VLM judge.

Both receive pixels only, like every detector (so they can be served); the VLM vision tokens they need come from a
:class:`VlmFeatureSource`, which first looks them up by content hash in the feature store the ``vlm_features`` stage
wrote (``attach_features``) and runs MiniCPM-V only for images it has not seen. The model is loaded lazily and once
per process (hybrid and judge share it).

**Hybrid.** Sources (a CNN backbone and the VLM vision tower, or any list of them) are brought to one grid — the
finest source's — and fused either by *concatenation with per-source normalisation* (channels standardised with
training statistics, then each source scaled by 1/√D so each contributes equally to a distance whatever its width)
into one memory bank, or by *late fusion* (a bank per source; each source's distance map z-scored with the distances of
held-out training patches, then averaged). Which one is the default was chosen by measurement
(``bench/fusion.py``; docs/vlm.md): with no MiniCPM-V weights here, the measurement uses a second offline CNN source
standing in for the VLM, and says so.

**Judge.** MMAD-style: the image score is P("yes") from MiniCPM-V's next-token logits to a configurable question
(:class:`~madfh_pipeline.models.vlm_judge.MiniCPMVJudge`); it is not trained. Its anomaly map is the VLM source's
patch-kNN distance map, i.e. the hybrid's VLM part, fitted on the same train/good images; thresholds come from
validation/good like every other detector.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from madfh_pipeline.datasets.feature_store import FeatureStore, content_hash
from madfh_pipeline.models.backbones import build_backbone
from madfh_pipeline.models.base import AnomalyDetector, BatchSource, DetectorOutput

logger = logging.getLogger(__name__)

#: Settings of the VLM source (the ``vlm`` block of a detector config, mirroring ``parameters_vlm.yml``).
VLM_DEFAULTS: dict[str, Any] = {
    "model": "openbmb/MiniCPM-V-4.6",
    "dtype": "auto",
    "device": "auto",
    "local_files_only": True,
    "allow_random_weights": False,  # tests only: the tiny random model
    "image_size": "native",
    "grid": "patch",
    "layer": None,
    "batch_size": 2,
}

_SHARED_VLM: dict[tuple[Any, ...], Any] = {}


def vlm_settings(config: Mapping[str, Any] | None) -> dict[str, Any]:
    config = dict(config or {})
    unknown = sorted(set(config) - set(VLM_DEFAULTS))
    if unknown:
        raise ValueError(f"Unknown vlm setting(s) {unknown}; valid: {', '.join(VLM_DEFAULTS)}.")
    return VLM_DEFAULTS | config


def shared_vlm(settings: Mapping[str, Any], param_name: str = "vlm.model") -> Any:
    """Load MiniCPM-V once per process for these settings (the hybrid, the judge and the feature stage share it)."""
    from madfh_pipeline.models.vlm import load_minicpmv

    key = (str(settings["model"]), str(settings["dtype"]), str(settings["device"]), bool(settings["local_files_only"]))
    if key not in _SHARED_VLM:
        _SHARED_VLM[key] = load_minicpmv(
            settings["model"],
            dtype=settings["dtype"],
            device=settings["device"],
            local_files_only=bool(settings["local_files_only"]),
            allow_random_weights=bool(settings["allow_random_weights"]),
            param_name=param_name,
        )
    return _SHARED_VLM[key]


def vlm_backbone(settings: Mapping[str, Any]) -> Any:
    from madfh_pipeline.models.vlm import MiniCPMVVisionBackbone

    image_size = settings["image_size"]
    if isinstance(image_size, list):
        image_size = tuple(image_size)
    return MiniCPMVVisionBackbone(
        shared_vlm(settings), image_size=image_size, grid=settings["grid"], layer=settings["layer"]
    )


class VlmFeatureSource:
    """MiniCPM-V vision tokens for a batch of images: from the feature store when it has them, else computed."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = vlm_settings(settings)
        self._backbone: Any = None
        self.store: FeatureStore | None = None
        self.reused = 0
        self.computed = 0

    @property
    def backbone(self) -> Any:
        if self._backbone is None:
            self._backbone = vlm_backbone(self.settings)
        return self._backbone

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(grid (B, D, h, w), pooled (B, D'))`` on CPU, float32."""
        found: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * images.shape[0]
        if self.store is not None:
            found = self.store.lookup([content_hash(image) for image in images])
        missing = [i for i, item in enumerate(found) if item is None]
        if missing:
            grid, pooled = self.backbone.features(images[missing])
            for j, i in enumerate(missing):
                found[i] = (grid[j].float().cpu(), pooled[j].float().cpu())
        self.reused += images.shape[0] - len(missing)
        self.computed += len(missing)
        grids = torch.stack([item[0] for item in found])  # type: ignore[index]
        pooled_all = torch.stack([item[1] for item in found])  # type: ignore[index]
        return grids, pooled_all


def _blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return maps
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(maps.device)
    out = maps[:, None]
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return out[:, 0]


def _nearest(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Exact distance of each query row to its nearest bank row (chunked, no (n, m) matrix for all queries)."""
    bank_sq = (bank * bank).sum(dim=1)[None]
    out = []
    for part in queries.split(chunk):
        d = torch.addmm(bank_sq, part, bank.T, beta=1.0, alpha=-2.0).min(dim=1).values
        out.append(d.add_((part * part).sum(dim=1)).clamp_min_(0).sqrt_())
    return torch.cat(out)


def _subsample_bank(patches: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Thin ``patches`` to ``size`` rows with greedy k-center (PatchCore's coreset), or keep all if fewer."""
    if patches.shape[0] <= size:
        return patches
    from madfh_pipeline.models.patchcore import greedy_coreset

    chosen = greedy_coreset(patches, size, 64, seed=seed)
    return patches[chosen]


class _AlignedPool:
    """A bounded uniform sample of patch positions, the same positions for every source (random priorities).

    Memory does not grow with the number of training images; rows of all sources stay aligned, so late fusion's
    held-out rows and concat fusion's joint rows describe the same patches.
    """

    def __init__(self, n_sources: int, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: list[torch.Tensor] | None = None
        self.keys: torch.Tensor | None = None
        self.n_sources = n_sources
        self.seen = 0

    def add(self, rows: list[torch.Tensor]) -> None:
        keys = torch.rand(rows[0].shape[0], generator=self.generator)
        self.seen += rows[0].shape[0]
        if self.rows is not None and self.keys is not None:
            rows = [torch.cat([old, new]) for old, new in zip(self.rows, rows, strict=True)]
            keys = torch.cat([self.keys, keys])
        if keys.shape[0] > self.capacity:
            top = torch.topk(keys, self.capacity).indices
            rows, keys = [r[top] for r in rows], keys[top]
        self.rows, self.keys = rows, keys

    def tensors(self) -> list[torch.Tensor]:
        if self.rows is None:
            raise ValueError("No training patches were seen.")
        return self.rows


HYBRID_DEFAULTS: dict[str, Any] = {
    "cnn": {"backbone": "efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "weights_path": None},
    "vlm": {},
    "sources": ["cnn", "vlm"],  # which sources to fuse (the bench fuses two CNN layer sets: "cnn", "cnn2")
    "cnn2": None,  # a second CNN source, standing in for the VLM where its weights are absent (bench only)
    "fusion": "late",  # late (a bank per source, z-scored maps; chosen in bench/fusion.py) or concat (one bank)
    "weights": None,  # per-source weights (default equal)
    "neighbourhood": 3,
    "bank_ratio": 0.01,
    "max_bank_size": 4096,
    "pool_max_patches": 100_000,
    "holdout_fraction": 0.1,  # late fusion: training patches kept out of the bank to z-score each source's distances
    "sigma": 4.0,
    "seed": 0,
}


class HybridDetector(AnomalyDetector):
    """Memory-bank kNN over fused CNN and MiniCPM-V patch features (see the module docstring)."""

    name: ClassVar[str] = "hybrid"

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        config = dict(config or {})
        unknown = sorted(set(config) - set(HYBRID_DEFAULTS))
        if unknown:
            raise ValueError(f"Unknown hybrid config key(s) {unknown}; valid keys: {', '.join(HYBRID_DEFAULTS)}.")
        merged = {**HYBRID_DEFAULTS, **config}
        merged["vlm"] = vlm_settings(merged["vlm"]) if "vlm" in merged["sources"] else dict(merged["vlm"] or {})
        super().__init__(merged)
        if merged["fusion"] not in ("concat", "late"):
            raise ValueError(f"fusion must be 'concat' or 'late', got {merged['fusion']!r}.")
        unknown_sources = [s for s in merged["sources"] if s not in ("cnn", "cnn2", "vlm")]
        if unknown_sources or not merged["sources"]:
            raise ValueError(f"sources must be a non-empty list of cnn, cnn2, vlm; got {merged['sources']}.")
        self._cnn: dict[str, Any] = {}
        self.vlm_source = VlmFeatureSource(merged["vlm"]) if "vlm" in merged["sources"] else None
        self.stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per source: channel mean, std
        self.banks: list[torch.Tensor] = []
        self.calibration: list[tuple[float, float]] = []  # late fusion: per source mean, std of held-out distances

    # ---------------------------------------------------------------- features
    def attach_features(self, store: FeatureStore | None) -> None:
        """Use the ``vlm_features`` stage's stored tokens where the pixels match (see the module docstring)."""
        if self.vlm_source is not None:
            self.vlm_source.store = store

    def _cnn_source(self, name: str) -> Any:
        if name not in self._cnn:
            spec = self.config[name]
            if not spec:
                raise ValueError(f"Source '{name}' is listed but has no config.")
            self._cnn[name] = build_backbone(spec["backbone"], spec.get("layers"), spec.get("weights_path"))
        return self._cnn[name]

    def _source_grids(self, images: torch.Tensor) -> list[torch.Tensor]:
        grids = []
        kernel = int(self.config["neighbourhood"])
        for source in self.config["sources"]:
            if source == "vlm":
                assert self.vlm_source is not None
                grid, _ = self.vlm_source.features(images)
            else:
                grid, _ = self._cnn_source(source).features(images.cpu())
            grid = grid.float().cpu()
            if kernel > 1:
                grid = F.avg_pool2d(grid, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
            grids.append(grid)
        size = max((g.shape[-2:] for g in grids), key=lambda s: s[0] * s[1])
        return [
            g if g.shape[-2:] == size else F.interpolate(g, size=size, mode="bilinear", align_corners=False)
            for g in grids
        ]

    def _weights(self) -> list[float]:
        weights = self.config["weights"] or [1.0] * len(self.config["sources"])
        if len(weights) != len(self.config["sources"]):
            raise ValueError("weights must give one number per source.")
        return [float(w) for w in weights]

    def _normalise(self, index: int, rows: torch.Tensor) -> torch.Tensor:
        mean, std = self.stats[self.config["sources"][index]]
        return (rows - mean) / std / math.sqrt(rows.shape[1]) * self._weights()[index]

    @staticmethod
    def _rows(grid: torch.Tensor) -> torch.Tensor:
        return grid.permute(0, 2, 3, 1).reshape(-1, grid.shape[1])

    # ---------------------------------------------------------------- fit
    @torch.no_grad()
    def fit(self, batches: BatchSource) -> dict[str, list[float]]:
        cfg = self.config
        pool = _AlignedPool(len(cfg["sources"]), int(cfg["pool_max_patches"]), int(cfg["seed"]))
        n_images = 0
        for batch in batches():
            n_images += batch.shape[0]
            pool.add([self._rows(g) for g in self._source_grids(batch)])
        if n_images == 0:
            raise ValueError("HybridDetector.fit got no training images.")
        samples = pool.tensors()
        for name, sample in zip(cfg["sources"], samples, strict=True):
            self.stats[name] = (sample.mean(dim=0), sample.std(dim=0).clamp_min(1e-6))
        seen = pool.seen
        size = max(1, min(int(cfg["max_bank_size"]), math.ceil(float(cfg["bank_ratio"]) * seen)))
        normalised = [self._normalise(i, s) for i, s in enumerate(samples)]
        if cfg["fusion"] == "concat":
            self.banks = [_subsample_bank(torch.cat(normalised, dim=1), size, int(cfg["seed"]))]
            self.calibration = []
        else:
            generator = torch.Generator().manual_seed(int(cfg["seed"]))
            order = torch.randperm(normalised[0].shape[0], generator=generator)
            n_hold = max(1, int(float(cfg["holdout_fraction"]) * len(order)))
            hold, keep = order[:n_hold], order[n_hold:]
            self.banks, self.calibration = [], []
            for rows in normalised:
                bank = _subsample_bank(rows[keep], size, int(cfg["seed"]))
                d = _nearest(rows[hold], bank)
                self.banks.append(bank)
                self.calibration.append((float(d.mean()), float(d.std().clamp_min(1e-6))))
        if self.vlm_source is not None:
            logger.info(
                "hybrid fit: VLM features of %d images reused from the feature store, %d computed.",
                self.vlm_source.reused,
                self.vlm_source.computed,
            )
        return {
            "images": [float(n_images)],
            "patches_seen": [float(seen)],
            "bank_size": [float(self.banks[0].shape[0])],
        }

    # ---------------------------------------------------------------- predict
    @torch.no_grad()
    def predict(self, batch: torch.Tensor) -> DetectorOutput:
        if not self.banks:
            raise RuntimeError("HybridDetector has no memory bank: call fit() or load a saved detector first.")
        batch_size, _, height, width = batch.shape
        grids = self._source_grids(batch)
        gh, gw = grids[0].shape[-2:]
        rows = [self._normalise(i, self._rows(g)) for i, g in enumerate(grids)]
        if self.config["fusion"] == "concat":
            distance = _nearest(torch.cat(rows, dim=1), self.banks[0])
        else:
            parts = []
            for r, bank, (mean, std) in zip(rows, self.banks, self.calibration, strict=True):
                parts.append((_nearest(r, bank) - mean) / std)
            distance = torch.stack(parts).mean(dim=0)
        grid = distance.view(batch_size, 1, gh, gw)
        maps = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        maps = _blur(maps, float(self.config["sigma"]))
        scores = maps.amax(dim=(1, 2))
        return DetectorOutput(scores=scores.numpy().astype(np.float32), maps=maps.numpy().astype(np.float32))

    # ---------------------------------------------------------------- state
    def get_state(self) -> dict[str, Any]:
        if not self.banks:
            raise RuntimeError("HybridDetector is not fitted: nothing to save.")
        return {
            "banks": list(self.banks),
            "calibration": [list(c) for c in self.calibration],
            "stats": {name: {"mean": m, "std": s} for name, (m, s) in self.stats.items()},
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.banks = [torch.as_tensor(b, dtype=torch.float32) for b in state["banks"]]
        self.calibration = [(float(a), float(b)) for a, b in state.get("calibration", [])]
        self.stats = {
            name: (torch.as_tensor(v["mean"]).float(), torch.as_tensor(v["std"]).float())
            for name, v in state["stats"].items()
        }


JUDGE_DEFAULTS: dict[str, Any] = {
    "vlm": {},
    "prompt": "Is there a defect or anomaly in this image? Answer yes or no.",
    "yes_words": ["yes"],
    "no_words": ["no"],
    "map": "vlm_knn",  # the VLM source's patch-kNN map (the hybrid's VLM part), or "none" (a flat map)
    "max_bank_size": 4096,
    "bank_ratio": 0.05,
    "pool_max_patches": 50_000,
    "neighbourhood": 1,
    "sigma": 4.0,
    "seed": 0,
}


class VlmJudgeDetector(AnomalyDetector):
    """MiniCPM-V asked whether the image shows a defect: image score = P("yes"); map from VLM patch kNN."""

    name: ClassVar[str] = "vlm_judge"

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        config = dict(config or {})
        unknown = sorted(set(config) - set(JUDGE_DEFAULTS))
        if unknown:
            raise ValueError(f"Unknown vlm_judge config key(s) {unknown}; valid keys: {', '.join(JUDGE_DEFAULTS)}.")
        merged = {**JUDGE_DEFAULTS, **config}
        merged["vlm"] = vlm_settings(merged["vlm"])
        if merged["map"] not in ("vlm_knn", "none"):
            raise ValueError(f"map must be 'vlm_knn' or 'none', got {merged['map']!r}.")
        super().__init__(merged)
        self.vlm_source = VlmFeatureSource(merged["vlm"])
        self._judge: Any = None
        self.map_model: HybridDetector | None = None
        if merged["map"] == "vlm_knn":
            self.map_model = HybridDetector(
                {
                    "sources": ["vlm"],
                    "vlm": merged["vlm"],
                    "neighbourhood": merged["neighbourhood"],
                    "max_bank_size": merged["max_bank_size"],
                    "bank_ratio": merged["bank_ratio"],
                    "pool_max_patches": merged["pool_max_patches"],
                    "sigma": merged["sigma"],
                    "seed": merged["seed"],
                }
            )
            self.map_model.vlm_source = self.vlm_source  # one feature source (and one cache) for both

    @property
    def judge(self) -> Any:
        if self._judge is None:
            from madfh_pipeline.models.vlm_judge import MiniCPMVJudge

            self._judge = MiniCPMVJudge(
                shared_vlm(self.config["vlm"]),
                prompt=self.config["prompt"],
                yes_words=tuple(self.config["yes_words"]),
                no_words=tuple(self.config["no_words"]),
            )
        return self._judge

    def attach_features(self, store: FeatureStore | None) -> None:
        self.vlm_source.store = store

    def fit(self, batches: BatchSource) -> dict[str, list[float]]:
        """Nothing to train for the judge; the map's VLM patch bank is built from train/good."""
        if self.map_model is None:
            n = sum(b.shape[0] for b in batches())
            return {"images": [float(n)]}
        return self.map_model.fit(batches)

    @torch.no_grad()
    def predict(self, batch: torch.Tensor) -> DetectorOutput:
        scores = self.judge.score(batch).float().cpu().numpy().astype(np.float32)
        if self.map_model is not None:
            maps = self.map_model.predict(batch).maps
        else:
            maps = np.broadcast_to(scores[:, None, None], (batch.shape[0], *batch.shape[-2:])).astype(np.float32)
        return DetectorOutput(scores=scores, maps=np.ascontiguousarray(maps))

    def get_state(self) -> dict[str, Any]:
        return {"map_model": self.map_model.get_state() if self.map_model is not None else None}

    def set_state(self, state: dict[str, Any]) -> None:
        if self.map_model is not None:
            if not state.get("map_model"):
                raise ValueError("Saved vlm_judge has no map bank but this config asks for map: vlm_knn.")
            self.map_model.set_state(state["map_model"])


def required_features(detector: AnomalyDetector) -> Sequence[str]:
    """Feature stores a detector can use (the nodes attach them when the pipeline provides them)."""
    return ("vlm_features",) if hasattr(detector, "attach_features") else ()


def check_vlm_available(settings: Mapping[str, Any], param_name: str = "vlm.model") -> None:
    """Fail at once, with the one clear message, when MiniCPM-V's files are not here — before hours of other work.

    Reads only the checkpoint's config (no weights), exactly as :func:`~madfh_pipeline.models.vlm.load_minicpmv`
    resolves it.
    """
    from transformers import PretrainedConfig

    from madfh_pipeline.models import vlm as vlm_module

    source = str(settings["model"])
    if vlm_module._looks_like_path(source):
        vlm_module._check_local_folder(Path(source).expanduser(), source, param_name)
        return
    try:
        PretrainedConfig.get_config_dict(source, local_files_only=bool(settings["local_files_only"]))
    except OSError as exc:
        reason = vlm_module._hub_missing_reason(exc)
        if reason is None:
            raise
        raise vlm_module._missing(source, reason, param_name) from None  # one message, not three tracebacks
