"""PatchCore (Roth et al., CVPR 2022) built for CPU-scale, high-resolution inspection.

The method: locally aware patch features from a frozen ImageNet backbone, a memory bank of normal patches thinned by
greedy k-center coreset selection, and nearest-neighbour distance as the anomaly score. What differs from the reference
implementations, and why:

- **Every patch is seen, memory stays bounded.** anomalib stacks every patch of every training image before the
  coreset (at 1024² that is 16 k patches per image, gigabytes for a category). Here the coreset runs in two stages
  while the patches stream by: blocks of 16 k patches (one 1024² image, sixteen 256² ones) are thinned by greedy
  k-center to ``coreset_oversample × coreset_ratio`` of their patches, and only these candidates are kept; the final
  greedy selection then picks the bank from the candidates. Greedy k-center keeps the farthest points first, so a
  pattern that occurs once in the whole training set survives both stages (a uniform random pre-sample, the earlier
  design and still available as ``coreset_sampling: random``, drops it with the probability of not sampling it: 80 %
  for 100 k of 512 k patches). The candidate set is bounded by ``pool_max_patches`` rows: when it fills up, it is
  halved by the same block-wise greedy and later blocks are thinned twice as hard (merge-reduce), so memory does not
  grow with the number of images and earlier images are not favoured. On BSData this two-stage bank scores like one
  greedy pass over all 512 k patches (anomalib's way) at an eighth of its cost; see docs/performance.md.
- **Fast greedy k-center.** The loop is inherently sequential, so the lever is the cost of one iteration: feature-major
  storage makes each iteration one cache-friendly matrix-vector product plus an in-place minimum, single-threaded on
  CPU (thousands of sub-millisecond iterations lose more to thread synchronisation than they gain). Embeddings wider
  than ``coreset_projection_dim`` (256) are first reduced by a Gaussian random projection (Johnson-Lindenstrauss);
  the default backbone's 152 channels are not. A 64-d projection (anomalib projects too) distorts distances enough
  that the bank depends on the draw: on BSData AU-PRO@0.3 spread over 0.712–0.733 across four seeds, against
  0.717–0.727 in the embedding's own distances, for about three times the first stage's cost (docs/performance.md).
- **A bank size that is a fraction, with bounds.** ``coreset_ratio`` of all patches seen, capped by ``max_bank_size``
  and by ``max_knn_pairs``: the exact kNN computes patches per image × bank size distances, so this second cap keeps
  inference cost bounded whatever the resolution (2²⁵ pairs: 4096 patches at 256² and 512² stay, 2048 at 1024²).
  When a bound binds, the log says so and ``fit_info["bank_capped_by"]`` names it.
- **Cheap exact kNN.** Scoring is exact nearest-neighbour search by chunked ``addmm`` (``||b||² − 2ab`` minimised per
  query, ``||a||²`` added after the minimum since it is constant per row).
- **Fused upsample + blur.** Bilinear upsampling and the Gaussian blur are both separable linear maps, so for the
  whole-image path they are folded into one (H × h) and one (W × w) matrix: two small matrix products replace an
  upsample plus a 33-tap convolution over millions of pixels.
- **One number per image, chosen by measurement.** ``image_score`` says how the map becomes the image score: the
  paper's reweighted maximum patch distance, the plain maximum patch distance, the maximum of the smoothed map (so the
  image decision and the map agree), or the mean of the map's top pixels. docs/performance.md has the study.
- **Optional tiling** for inputs larger than ``tile_size`` (small defects vanish when a 2448×2048 image is squashed):
  tiles are scored independently and stitched by averaging their overlap, before the blur.

The configuration is checked up front: unknown keys and out-of-range values are a ``ValueError`` naming the valid
keys or the allowed range, before any weights are loaded.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from madfh_pipeline.models.backbones import FeatureExtractor, build_backbone
from madfh_pipeline.models.base import AnomalyDetector, BatchSource, DetectorOutput
from madfh_pipeline.models.feedback_bank import FeedbackBankMixin
from madfh_pipeline.progress import progress

logger = logging.getLogger(__name__)

#: A tile as (top, left, height, width) in input pixels.
Box = tuple[int, int, int, int]

#: How a map becomes one image score (see :meth:`PatchCore._image_scores`).
IMAGE_SCORES: tuple[str, ...] = ("reweighted", "patch_max", "map_max", "map_top_mean")
#: How the coreset candidates are gathered: every patch through the two-stage greedy, or a uniform random pre-sample.
CORESET_SAMPLINGS: tuple[str, ...] = ("stream", "random")

#: The single source of PatchCore's defaults (the pipeline's parameters only override). Chosen by the study in
#: docs/performance.md ("PatchCore defaults"): on real data (BSData pitting at 256², ELPV solar cells) and on the
#: 1024² demo scenes, chosen on one half of each test set and reported on the other.
DEFAULT_CONFIG: dict[str, Any] = {
    "backbone": "efficientnet_lite0",
    "layers": None,  # None: the backbone's defaults (lite0: blocks.2 + blocks.4; resnets: layer2 + layer3)
    "weights_path": None,
    "embed_dim": None,  # None keeps all concatenated channels; an int averages channels down to that width
    "neighbourhood": 3,  # local aggregation kernel (PatchCore's p = 3)
    "coreset_ratio": 0.01,  # bank = this fraction of all training patches seen ...
    "max_bank_size": 4096,  # ... capped here; None: no cap
    "max_knn_pairs": 33_554_432,  # ... and so that bank size × patches per image <= 2**25 (inference cost); None: off
    "coreset_sampling": "stream",  # "stream": every patch, two-stage greedy; "random": uniform pre-sample first
    "coreset_oversample": 4.0,  # stage 1 keeps oversample × coreset_ratio of every block of patches
    "pool_max_patches": 250_000,  # memory bound of the candidate set, in patches (rows)
    "coreset_projection_dim": 256,  # wider embeddings are randomly projected to this for the greedy; None: never
    "image_score": "map_top_mean",  # one of IMAGE_SCORES
    "image_top_patches": 9,  # map_top_mean: how many patches' worth (stride² pixels each) of the highest map values
    "num_neighbors": 9,  # reweighted: PatchCore's neighbourhood of the nearest bank patch
    "tile_size": None,  # None: whole image; else square tiles of this many pixels for larger inputs
    "tile_overlap": 0.25,  # fraction of tile_size shared by neighbouring tiles
    "sigma": 4.0,  # Gaussian smoothing of the anomaly map, in input pixels
    "knn_chunk_size": 4096,  # queries per distance block: memory = knn_chunk_size × bank size × 4 bytes
    "knn_backend": "torch",  # "torch" (exact, chunked mm), "faiss" (exact IndexFlatL2), "auto" (faiss when importable)
    "seed": 0,
    "batch_size": None,  # images or tiles per backbone forward; None: by pixel budget (see _micro_batch)
}

#: Keys that change only how a fitted bank is used, never the bank itself: a detector that differs only in these can
#: take another's state (benchmarks use it to score several image-score rules with one fit).
PREDICT_ONLY_KEYS: tuple[str, ...] = (
    "image_score",
    "image_top_patches",
    "num_neighbors",
    "sigma",
    "knn_chunk_size",
    "knn_backend",
)

#: Pixels per backbone forward when ``batch_size`` is None. On CPU one 1024² image per forward is fastest (batch 4 at
#: 1024² measured 2.5× slower per image: the activations no longer fit in cache); GPUs want larger batches.
_CPU_PIXEL_BUDGET = 1024 * 1024
_GPU_PIXEL_BUDGET = 8 * 1024 * 1024
#: Patches per block of the first coreset stage (one 1024² image; sixteen 256² ones). Smaller blocks are cheaper (the
#: cost grows with block size × points kept) but cover common patterns too coarsely; see :class:`_StreamingCoreset`.
_STAGE1_BLOCK = 16384


# --------------------------------------------------------------------------------------------------------------------
# Helpers (module level so they can be tested and reused)
# --------------------------------------------------------------------------------------------------------------------


def greedy_coreset(
    features: torch.Tensor,
    k: int,
    projection_dim: int | None = 256,
    seed: int = 0,
    start: int | None = None,
    loop: str = "auto",
) -> torch.Tensor:
    """Indices of ``k`` points chosen by greedy k-center (farthest-point) selection.

    Why it is fast: the loop is inherently sequential (each choice depends on all previous ones), so the lever is the
    cost of one iteration. Points wider than ``projection_dim`` are projected to it with a Gaussian random matrix
    (anomalib uses a sparse random projection for the same reason; distances are only roughly preserved, and at 64
    dimensions the bank came to depend on the seed, see the module docstring) and stored feature-major with two extra rows, ``1`` and ``||x||²``, so that one BLAS
    matrix-vector product yields the full squared distance ``||x||² − 2x·c + ||c||²`` to the new centre. An iteration is
    then three streaming passes (gemv, in-place ``minimum``, ``argmax``) over a block that stays cache-resident for
    ~10⁵ points, with no (n, d) temporaries as in the naive version.

    On CPU the loop runs in numpy with BLAS limited to one thread (``loop="numpy"``): each iteration is too short to
    amortise waking a thread team, and on a shared 2-core machine a multi-threaded gemv waits for a descheduled thread
    in every one of the thousands of iterations (measured under load: 1.9 s single-threaded vs 15.9 s for the same
    loop in multi-threaded torch, 100 k points, 2048 centres). On CUDA the torch loop is used (``loop="torch"``).
    The selection stops early if every remaining point coincides with a chosen one, so the result holds distinct
    points only.
    """
    n, dim = features.shape
    k = min(int(k), n)
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    x = features.detach().float()
    if projection_dim is not None and dim > projection_dim:
        x = x @ gaussian_projection(dim, projection_dim, generator).to(x.device)
    sq_norms = (x * x).sum(dim=1)
    augmented = torch.cat([x.T, torch.ones(1, n, device=x.device), sq_norms[None]]).contiguous()  # (p + 2, n)
    # Points that coincide with a chosen one (up to float round-off of the expanded distance) count as covered.
    tolerance = 1e-6 * float(sq_norms.max().clamp_min(1e-12))
    first = int(torch.randint(n, (1,), generator=generator)) if start is None else int(start)
    if loop == "auto":
        loop = "torch" if x.device.type == "cuda" else "numpy"
    if loop == "numpy":
        selected = _greedy_loop_numpy(augmented.cpu().numpy(), k, first, tolerance)
    elif loop == "torch":
        selected = _greedy_loop_torch(augmented, k, first, tolerance)
    else:
        raise ValueError(f"loop must be 'auto', 'numpy' or 'torch', got {loop!r}.")
    return torch.tensor(selected, dtype=torch.long)


def gaussian_projection(dim: int, projection_dim: int, generator: torch.Generator) -> torch.Tensor:
    """(dim × projection_dim) Gaussian random projection, scaled so squared distances are preserved on average."""
    return torch.randn(dim, projection_dim, generator=generator) / math.sqrt(projection_dim)


def _greedy_loop_torch(augmented: torch.Tensor, k: int, first: int, tolerance: float) -> list[int]:
    p = augmented.shape[0] - 2
    device = augmented.device
    # centre = (−2c, ||c||², 1), built from column j of ``augmented`` = (c, 1, ||c||²) by one gather + one addcmul.
    swap = torch.cat([torch.arange(p), torch.tensor([p + 1, p])]).to(device)
    scale = torch.cat([torch.full((p,), -2.0), torch.tensor([1.0, 0.0])]).to(device)
    offset = torch.cat([torch.zeros(p), torch.tensor([0.0, 1.0])]).to(device)
    min_dist = torch.full((augmented.shape[1],), float("inf"), device=device)
    buffer = torch.empty_like(min_dist)
    index, selected = first, [first]
    for _ in range(k - 1):
        centre = torch.addcmul(offset, augmented[:, index][swap], scale)
        torch.mv(augmented.T, centre, out=buffer)  # squared distance of every point to the new centre
        torch.minimum(min_dist, buffer, out=min_dist)  # the chosen point itself drops to ~0 (≤ tolerance)
        index = int(torch.argmax(min_dist))
        if float(min_dist[index]) <= tolerance:
            break
        selected.append(index)
    return selected


def _greedy_loop_numpy(augmented: np.ndarray, k: int, first: int, tolerance: float) -> list[int]:
    p = augmented.shape[0] - 2
    scale = np.concatenate([np.full(p, -2.0, np.float32), np.array([1.0, 0.0], np.float32)])
    offset = np.concatenate([np.zeros(p, np.float32), np.array([0.0, 1.0], np.float32)])
    swap = np.concatenate([np.arange(p), [p + 1, p]])
    min_dist = np.full(augmented.shape[1], np.inf, dtype=np.float32)
    buffer = np.empty_like(min_dist)
    index, selected = first, [first]
    with _single_threaded_blas():
        for _ in range(k - 1):
            centre = augmented[swap, index] * scale + offset
            np.dot(centre, augmented, out=buffer)
            np.minimum(min_dist, buffer, out=min_dist)
            index = int(np.argmax(min_dist))
            if float(min_dist[index]) <= tolerance:
                break
            selected.append(index)
    return selected


_BLAS_CONTROLLER: Any = None


def _single_threaded_blas() -> AbstractContextManager[Any]:
    """Limit numpy's BLAS to one thread for a block (threadpoolctl ships with scikit-learn); no-op without it.

    Only the dynamically loaded BLAS of numpy/scipy is touched, never torch's thread settings (an explicit
    ``torch.set_num_threads`` has broken oneMKL calls on these machines, see DESIGN.md). The controller is built once:
    scanning the loaded libraries costs ~2 ms, which the first coreset stage would otherwise pay once per image.
    """
    global _BLAS_CONTROLLER  # noqa: PLW0603 - a process-wide cache of an expensive, immutable scan
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return nullcontext()
    if _BLAS_CONTROLLER is None:
        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles covering ``[0, length)``; the last tile is aligned to the end so none is partial."""
    if length <= tile:
        return [0]
    step = max(1, round(tile * (1.0 - overlap)))
    starts = list(range(0, length - tile + 1, step))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def _gaussian_kernel1d(sigma: float) -> torch.Tensor:
    radius = int(4.0 * sigma + 0.5)  # anomalib / PatchCore: kernel size 2·⌊4σ + 0.5⌋ + 1
    positions = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(positions**2) / (2.0 * sigma**2))
    return kernel / kernel.sum()


def _blur_1d(signals: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur along the last axis of (N, L) signals, reflect padding (replicate when L is too short)."""
    kernel = _gaussian_kernel1d(sigma).to(signals)
    radius = kernel.numel() // 2
    mode = "reflect" if radius < signals.shape[-1] else "replicate"
    padded = F.pad(signals[:, None], (radius, radius), mode=mode)
    return F.conv1d(padded, kernel.view(1, 1, -1))[:, 0]


def upsample_blur_matrix(source: int, target: int, sigma: float) -> torch.Tensor:
    """(target × source) matrix = 1-D Gaussian blur ∘ bilinear upsampling (align_corners=False).

    Both operations are linear and separable, so applying this matrix along rows and columns reproduces
    ``gaussian_blur(interpolate(map))`` exactly, at the cost of two small matrix products.
    """
    eye = torch.eye(source, dtype=torch.float64)
    up = F.interpolate(eye[:, None], size=target, mode="linear", align_corners=False)[:, 0]  # (source, target)
    if sigma > 0:
        up = _blur_1d(up, sigma)
    return up.T.contiguous()


def gaussian_blur2d(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps with reflect padding (for stitched, full-resolution maps)."""
    if sigma <= 0:
        return maps
    batch, height, width = maps.shape
    rows = _blur_1d(maps.reshape(-1, width), sigma).view(batch, height, width)
    cols = _blur_1d(rows.transpose(1, 2).reshape(-1, height), sigma).view(batch, width, height)
    return cols.transpose(1, 2).contiguous()


class _ReservoirPool:
    """Uniform random sample of at most ``capacity`` rows from a stream (priority sampling).

    Every row gets a uniform random key and the pool keeps the rows with the smallest keys, which is exactly a uniform
    sample without replacement of everything seen, whatever the number of images. Rows are buffered and compacted
    when the buffer reaches twice the capacity, so the per-batch cost is amortised O(batch); once full, rows whose
    key exceeds the pool's current largest key are dropped on arrival without being copied.
    """

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = int(capacity)
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self.rows: list[torch.Tensor] = []
        self.keys: list[torch.Tensor] = []
        self.buffered = 0
        self.seen = 0
        self.threshold = float("inf")

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to("cpu", torch.float32)
        keys = torch.rand(rows.shape[0], generator=self.generator)
        self.seen += rows.shape[0]
        if self.threshold < float("inf"):
            keep = keys < self.threshold
            rows, keys = rows[keep], keys[keep]
        if rows.shape[0] == 0:
            return
        self.rows.append(rows.contiguous())
        self.keys.append(keys)
        self.buffered += rows.shape[0]
        if self.buffered >= 2 * self.capacity:
            self._compact()

    def _compact(self) -> None:
        rows, keys = torch.cat(self.rows), torch.cat(self.keys)
        if rows.shape[0] > self.capacity:
            keys, order = torch.topk(keys, self.capacity, largest=False)
            rows = rows[order]
            self.threshold = float(keys.max())
        self.rows, self.keys, self.buffered = [rows], [keys], rows.shape[0]

    def tensor(self) -> torch.Tensor:
        if not self.rows:
            return torch.empty(0, 0)
        self._compact()
        return self.rows[0]


class _StreamingCoreset:
    """First coreset stage over every patch, with a bounded candidate set (see the module docstring).

    ``add`` takes patches in stream order (one image or tile at a time); they are gathered into blocks of ``block``
    patches, whatever the batching, and each block keeps ``rate`` of its patches by greedy k-center in a fixed random
    projection. Both the full rows (for the bank) and their projections (for the final selection) are kept. When more
    than ``capacity`` candidates are held, every block of candidates is halved by the same greedy and ``rate`` is
    halved, so all images stay equally represented (merge-reduce) and memory stays at ``capacity × (D + p) × 4`` bytes
    plus one block.

    Why blocks of many patches rather than one image: k-center spends its first picks on a block's outliers, so a
    block must be large enough that the picks left over still cover its common patterns finely. With one 256² image
    per block (1024 patches, 41 picks) BSData's image AUROC fell from 0.939 (one greedy over all 512 k patches) to
    0.902; with 16 k-patch blocks it was 0.934 (docs/performance.md). A block is also what one 1024² image holds.

    Everything here is numpy under a one-thread BLAS limit: the work per block is a few hundred small operations, and
    torch's thread pool made each of them cost ~20 ms on a loaded 2-core machine.
    """

    def __init__(
        self, rate: float, capacity: int, projection_dim: int | None, seed: int, block: int = _STAGE1_BLOCK
    ) -> None:
        self.rate = min(1.0, float(rate))
        self.capacity = int(capacity)
        self.projection_dim = projection_dim
        self.seed = int(seed)
        self.block = int(block)
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)
        self.rng = np.random.default_rng(self.seed)
        self.projection: np.ndarray | None = None
        self.pending: list[np.ndarray] = []
        self.pending_count = 0
        self.rows: list[np.ndarray] = []
        self.projected: list[np.ndarray] = []
        self.count = 0
        self.seen = 0
        self.compactions = 0
        self.seconds = 0.0

    def _project(self, rows: np.ndarray) -> np.ndarray:
        dim = rows.shape[1]
        if self.projection_dim is None or dim <= self.projection_dim:
            return np.ascontiguousarray(rows, dtype=np.float32)
        if self.projection is None:  # the same draw as greedy_coreset's, from a generator seeded alike
            self.projection = gaussian_projection(dim, int(self.projection_dim), self.generator).numpy()
        return np.ascontiguousarray(rows @ self.projection, dtype=np.float32)

    def _thin(self, projected: np.ndarray, rate: float) -> np.ndarray:
        """Positions kept from one block: the first ``ceil(rate · n)`` greedy k-center picks (all when rate is 1)."""
        n = projected.shape[0]
        keep = max(1, math.ceil(rate * n))
        if keep >= n:
            return np.arange(n)
        sq_norms = np.einsum("ij,ij->i", projected, projected)
        augmented = np.concatenate([projected.T, np.ones((1, n), np.float32), sq_norms[None]]).astype(np.float32)
        tolerance = 1e-6 * max(float(sq_norms.max()), 1e-12)
        first = int(self.rng.integers(n))
        return np.asarray(_greedy_loop_numpy(np.ascontiguousarray(augmented), keep, first, tolerance))

    def add(self, rows: torch.Tensor) -> None:
        started = time.perf_counter()
        data = rows.detach().to("cpu", torch.float32).numpy()
        self.seen += data.shape[0]
        self.pending.append(data)
        self.pending_count += data.shape[0]
        if self.pending_count >= self.block:
            with _single_threaded_blas():
                self._flush(final=False)
        self.seconds += time.perf_counter() - started

    def _flush(self, final: bool) -> None:
        """Thin every full block of pending patches (and the partial last one when ``final``)."""
        data = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        full = (data.shape[0] // self.block) * self.block
        end = data.shape[0] if final else full
        for start in range(0, end, self.block):
            block = data[start : min(start + self.block, end)]
            projected = self._project(block)
            chosen = self._thin(projected, self.rate)
            self.rows.append(block[chosen])
            self.projected.append(projected[chosen])
            self.count += chosen.size
            while self.count > self.capacity:
                self._compact()
        self.pending = [] if end == data.shape[0] else [data[end:]]
        self.pending_count = data.shape[0] - end

    def _compact(self) -> None:
        rows, projected = np.concatenate(self.rows), np.concatenate(self.projected)
        kept = np.concatenate(
            [
                self._thin(projected[start : start + self.block], 0.5) + start
                for start in range(0, rows.shape[0], self.block)
            ]
        )
        self.rows, self.projected = [rows[kept]], [projected[kept]]
        self.count = kept.size
        self.rate /= 2.0
        self.compactions += 1
        logger.info(
            "PatchCore coreset: candidate set reached pool_max_patches=%d; halved to %d, later images thinned to %.4g "
            "of their patches",
            self.capacity,
            self.count,
            self.rate,
        )

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(full rows, projected rows) of all candidates, as tensors sharing the pool's memory; thins the last block."""
        if self.pending_count:
            started = time.perf_counter()
            with _single_threaded_blas():
                self._flush(final=True)
            self.seconds += time.perf_counter() - started
        if not self.rows:
            return torch.empty(0, 0), torch.empty(0, 0)
        self.rows, self.projected = [np.concatenate(self.rows)], [np.concatenate(self.projected)]
        return torch.from_numpy(self.rows[0]), torch.from_numpy(self.projected[0])


# --------------------------------------------------------------------------------------------------------------------
# Configuration checks
# --------------------------------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """The full configuration (defaults + ``config``), or a ``ValueError`` naming every problem at once.

    Why strict: a misspelt key (``coreset_rato``) used to be ignored with a warning and the run went on with the
    default, producing a model that is not the one asked for. Checking everything before the backbone's weights are
    loaded makes a bad parameters file fail in a second, with every mistake listed.
    """
    unknown = sorted(set(config) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(
            f"Unknown PatchCore config key(s): {', '.join(unknown)}. Valid keys: {', '.join(sorted(DEFAULT_CONFIG))}."
        )
    cfg = {**DEFAULT_CONFIG, **config}
    errors: list[str] = []

    def positive_int(key: str, optional: bool = False, minimum: int = 1) -> None:
        value = cfg[key]
        if value is None and optional:
            return
        if not _is_int(value) or value < minimum:
            errors.append(f"{key} must be an integer >= {minimum}{' or null' if optional else ''}, got {value!r}")

    def choice(key: str, options: tuple[str, ...]) -> None:
        if cfg[key] not in options:
            errors.append(f"{key} must be one of {', '.join(options)}, got {cfg[key]!r}")

    if not isinstance(cfg["backbone"], str) or not cfg["backbone"]:
        errors.append(f"backbone must be a backbone name, got {cfg['backbone']!r}")
    layers = cfg["layers"]
    if layers is not None and (
        isinstance(layers, str)
        or not isinstance(layers, list | tuple)
        or not layers
        or not all(isinstance(layer, str) for layer in layers)
    ):
        errors.append(f"layers must be a non-empty list of layer names or null, got {layers!r}")
    if cfg["weights_path"] is not None and not isinstance(cfg["weights_path"], str | Path):
        errors.append(f"weights_path must be a file path or null, got {cfg['weights_path']!r}")
    positive_int("embed_dim", optional=True)
    if not _is_int(cfg["neighbourhood"]) or cfg["neighbourhood"] < 1 or cfg["neighbourhood"] % 2 == 0:
        errors.append(f"neighbourhood must be a positive odd kernel size, got {cfg['neighbourhood']!r}")
    if not _is_number(cfg["coreset_ratio"]) or not 0.0 < cfg["coreset_ratio"] <= 1.0:
        errors.append(f"coreset_ratio must be a fraction in (0, 1], got {cfg['coreset_ratio']!r}")
    positive_int("max_bank_size", optional=True)
    positive_int("max_knn_pairs", optional=True)
    choice("coreset_sampling", CORESET_SAMPLINGS)
    if not _is_number(cfg["coreset_oversample"]) or cfg["coreset_oversample"] < 1.0:
        errors.append(f"coreset_oversample must be a number >= 1, got {cfg['coreset_oversample']!r}")
    positive_int("pool_max_patches")
    if (
        _is_int(cfg["pool_max_patches"])
        and _is_int(cfg["max_bank_size"])
        and cfg["pool_max_patches"] < 2 * cfg["max_bank_size"]
    ):
        errors.append(
            f"pool_max_patches ({cfg['pool_max_patches']}) must be at least twice max_bank_size "
            f"({cfg['max_bank_size']}): the bank is chosen from the candidates it bounds"
        )
    positive_int("coreset_projection_dim", optional=True)
    choice("image_score", IMAGE_SCORES)
    if not _is_number(cfg["image_top_patches"]) or cfg["image_top_patches"] <= 0:
        errors.append(f"image_top_patches must be a positive number of patches, got {cfg['image_top_patches']!r}")
    positive_int("num_neighbors")
    positive_int("tile_size", optional=True, minimum=32)
    if not _is_number(cfg["tile_overlap"]) or not 0.0 <= cfg["tile_overlap"] < 1.0:
        errors.append(f"tile_overlap is a fraction of tile_size in [0, 1), got {cfg['tile_overlap']!r}")
    if not _is_number(cfg["sigma"]) or cfg["sigma"] < 0:
        errors.append(f"sigma must be a number >= 0 (0: no smoothing), got {cfg['sigma']!r}")
    positive_int("knn_chunk_size")
    choice("knn_backend", ("torch", "faiss", "auto"))
    positive_int("seed", minimum=0)
    positive_int("batch_size", optional=True)
    if errors:
        raise ValueError("Invalid PatchCore config: " + "; ".join(errors) + ".")
    return cfg


# --------------------------------------------------------------------------------------------------------------------
# The detector
# --------------------------------------------------------------------------------------------------------------------


class PatchCore(FeedbackBankMixin, AnomalyDetector):
    """PatchCore anomaly detector; see the module docstring and :data:`DEFAULT_CONFIG` for the options."""

    name = "patchcore"

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(validate_config(dict(config or {})))
        cfg = self.config
        self.backbone: FeatureExtractor = build_backbone(cfg["backbone"], cfg["layers"], cfg["weights_path"])
        self._projections = self._channel_projections()
        self.memory_bank: torch.Tensor | None = None
        self._bank_sq: torch.Tensor | None = None
        self._faiss_index: Any = None
        self._resample_cache: dict[tuple[int, int, str], torch.Tensor] = {}
        self.fit_info: dict[str, Any] = {}
        self.defect_bank = None  # operators' confirmed defects (FeedbackBankMixin); none until feedback
        self.defect_weight = 0.0
        self.normal_patches_added = 0

    # ---------------------------------------------------------------- configuration
    def _channel_projections(self) -> list[torch.Tensor | None]:
        """Per-layer channel-averaging matrices (PatchCore's adaptive average pooling over channels).

        Each layer gets an equal share of ``embed_dim`` (so no layer dominates the distance by channel count alone);
        a layer with fewer channels than its share keeps all of them and passes the remainder on, because duplicating
        channels (what adaptive pooling does when upsampling) would add kNN cost without information.
        Pooling is linear, so it is applied at each layer's own resolution, before spatial upsampling, where it is
        cheapest.
        """
        channels = self.backbone.channels
        embed_dim = self.config["embed_dim"]
        if embed_dim is None or int(embed_dim) >= sum(channels):
            return [None] * len(channels)
        remaining, dims = int(embed_dim), []
        order = sorted(range(len(channels)), key=lambda i: channels[i])
        for position, i in enumerate(order):
            share = remaining // (len(channels) - position)
            dims.append((i, min(channels[i], max(1, share))))
            remaining -= dims[-1][1]
        out_dims = dict(dims)
        projections: list[torch.Tensor | None] = []
        for i, c in enumerate(channels):
            if out_dims[i] == c:
                projections.append(None)
            else:  # (out, in) matrix equal to adaptive_avg_pool1d over channels
                pool = F.adaptive_avg_pool1d(torch.eye(c)[None], out_dims[i])[0]  # (c, out)
                projections.append(pool.T.contiguous())
        return projections

    @property
    def embedding_dim(self) -> int:
        return sum(
            c if p is None else p.shape[0] for c, p in zip(self.backbone.channels, self._projections, strict=True)
        )

    @property
    def feature_stride(self) -> int:
        return min(self.backbone.strides)

    # ---------------------------------------------------------------- feature embedding
    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aware patch embeddings (N, D, h, w) on the finest requested layer's grid."""
        kernel = int(self.config["neighbourhood"])
        features = self.backbone(images.to(self.device, torch.float32))
        grid = features[0].shape[-2:]
        for f in features[1:]:
            if f.shape[-2] * f.shape[-1] > grid[0] * grid[1]:
                grid = f.shape[-2:]
        parts = []
        for feature, projection in zip(features, self._projections, strict=True):
            if projection is not None:
                feature = F.conv2d(feature, projection[:, :, None, None])  # channel pooling as a 1×1 conv
            if kernel > 1:
                feature = F.avg_pool2d(feature, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
            if feature.shape[-2:] != grid:
                feature = F.interpolate(feature, size=grid, mode="bilinear", align_corners=False)
            parts.append(feature)
        return torch.cat(parts, dim=1)

    def _tiles(self, height: int, width: int) -> list[Box]:
        """(top, left, tile height, tile width) for every tile; a single full-image tile when tiling is off."""
        tile = self.config["tile_size"]
        if tile is None or (height <= int(tile) and width <= int(tile)):
            return [(0, 0, height, width)]
        tile, overlap = int(tile), float(self.config["tile_overlap"])
        th, tw = min(tile, height), min(tile, width)
        return [
            (top, left, th, tw)
            for top in tile_starts(height, tile, overlap)
            for left in tile_starts(width, tile, overlap)
        ]

    def _micro_batch(self, height: int, width: int) -> int:
        """Images or tiles per backbone forward: the configured ``batch_size``, else a device-dependent pixel budget."""
        if self.config["batch_size"] is not None:
            return int(self.config["batch_size"])
        budget = _GPU_PIXEL_BUDGET if self.device.type == "cuda" else _CPU_PIXEL_BUDGET
        return max(1, budget // max(1, height * width))

    def _embedding_chunks(self, images: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[Box]]]:
        """Embeddings of all images (or tiles) in backbone-sized chunks: (image index, embeddings, tile boxes)."""
        batch, _, height, width = images.shape
        boxes = self._tiles(height, width)
        jobs = [(b, box) for b in range(batch) for box in boxes]
        step = self._micro_batch(boxes[0][2], boxes[0][3])
        for start in range(0, len(jobs), step):
            chunk = jobs[start : start + step]
            crops = torch.stack([images[b, :, top : top + h, left : left + w] for b, (top, left, h, w) in chunk])
            owners = torch.tensor([b for b, _ in chunk])
            yield owners, self._embed(crops), [box for _, box in chunk]

    # ---------------------------------------------------------------- fit
    @torch.no_grad()
    def fit(self, batches: BatchSource) -> dict[str, list[float]]:
        """One pass over the normal images: every patch goes through the coreset's first stage, then the bank is chosen.

        Returns one-element histories of the numbers in :attr:`fit_info` (images, patches_per_image, patches_seen, candidates,
        bank_target, bank_size, compactions, feature_seconds, stage1_seconds, coreset_seconds): where the time went and
        whether a bound was reached. ``fit_info["bank_capped_by"]`` names the bound that limited the bank, if any.
        """
        cfg = self.config
        stream = cfg["coreset_sampling"] == "stream"
        ratio = float(cfg["coreset_ratio"])
        if stream:
            pool: _StreamingCoreset | _ReservoirPool = _StreamingCoreset(
                ratio * float(cfg["coreset_oversample"]),
                int(cfg["pool_max_patches"]),
                cfg["coreset_projection_dim"],
                int(cfg["seed"]),
                block=_STAGE1_BLOCK,  # looked up at fit time, so a study can change the module constant
            )
        else:
            pool = _ReservoirPool(int(cfg["pool_max_patches"]), int(cfg["seed"]))
        n_images, patches_per_image = 0, 0
        started = time.perf_counter()
        for batch in progress(batches(), desc="PatchCore features", unit="batch", leave=False):
            n_images += batch.shape[0]
            for _, embeddings, _ in self._embedding_chunks(batch):
                patches_per_image = max(patches_per_image, embeddings.shape[-2] * embeddings.shape[-1])
                rows = embeddings.permute(0, 2, 3, 1).reshape(embeddings.shape[0], -1, embeddings.shape[1])
                if stream:  # image by image in stream order: blocks, and so the bank, do not depend on batching
                    for image_rows in rows:
                        pool.add(image_rows)
                else:
                    pool.add(rows.reshape(-1, rows.shape[-1]))
        if n_images == 0:
            raise ValueError("PatchCore.fit got no training images.")
        stage1_in_loop = pool.seconds if isinstance(pool, _StreamingCoreset) else 0.0
        feature_seconds = time.perf_counter() - started - stage1_in_loop

        if isinstance(pool, _StreamingCoreset):
            candidates, projected = pool.candidates()  # thins the last, partial block (stage 1 time)
            projection_dim = None  # already projected, with the projection of the first stage
            stage1_seconds = pool.seconds
        else:
            candidates = projected = pool.tensor()
            projection_dim = cfg["coreset_projection_dim"]
            stage1_seconds = 0.0
        started = time.perf_counter()
        target = max(1, math.ceil(ratio * pool.seen))
        size, capped_by = target, None
        if cfg["max_bank_size"] is not None and size > int(cfg["max_bank_size"]):
            size, capped_by = int(cfg["max_bank_size"]), "max_bank_size"
        if cfg["max_knn_pairs"] is not None and size * patches_per_image > int(cfg["max_knn_pairs"]):
            size, capped_by = max(1, int(cfg["max_knn_pairs"]) // patches_per_image), "max_knn_pairs"
        if size > candidates.shape[0]:
            size, capped_by = candidates.shape[0], "pool_max_patches"
        if size >= candidates.shape[0]:
            bank = candidates
        else:
            chosen = greedy_coreset(projected.to(self.device), size, projection_dim, seed=int(cfg["seed"]))
            bank = candidates[chosen.cpu()]
        coreset_seconds = time.perf_counter() - started
        self._set_bank(bank)
        self.fit_info = {
            "images": n_images,
            "patches_per_image": patches_per_image,
            "patches_seen": pool.seen,
            "candidates": int(candidates.shape[0]),
            "bank_target": target,
            "bank_size": int(bank.shape[0]),
            "bank_capped_by": capped_by,
            "compactions": pool.compactions if isinstance(pool, _StreamingCoreset) else 0,
            "feature_seconds": round(feature_seconds, 3),
            "stage1_seconds": round(stage1_seconds, 3),
            "coreset_seconds": round(coreset_seconds, 3),
        }
        logger.info(
            "PatchCore fit (%s): %d images, %d patches seen, %d candidates, bank %d; features %.1f s, coreset stage 1 "
            "%.1f s, final selection %.1f s",
            cfg["coreset_sampling"],
            n_images,
            pool.seen,
            candidates.shape[0],
            bank.shape[0],
            feature_seconds,
            stage1_seconds,
            coreset_seconds,
        )
        if capped_by is not None:
            logger.info(
                "PatchCore bank capped by %s: %d patches instead of coreset_ratio × patches seen = %d.",
                capped_by,
                bank.shape[0],
                target,
            )
        return {
            key: [float(value)]
            for key, value in self.fit_info.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }

    def _set_bank(self, bank: torch.Tensor) -> None:
        self.memory_bank = bank.to(self.device, torch.float32).contiguous()
        self._bank_sq = (self.memory_bank * self.memory_bank).sum(dim=1)
        self._faiss_index = None

    # ---------------------------------------------------------------- nearest neighbours
    def _use_faiss(self) -> bool:
        backend = self.config["knn_backend"]
        if backend == "torch" or self.device.type != "cpu":
            return False
        try:
            import faiss  # noqa: F401
        except ImportError:
            if backend == "faiss":
                raise ImportError("knn_backend='faiss' needs the faiss package (pip install faiss-cpu).") from None
            return False
        return True

    def _nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact nearest bank patch for each query row: (distance, bank index)."""
        assert self.memory_bank is not None and self._bank_sq is not None
        if self._use_faiss():
            import faiss

            if self._faiss_index is None:
                self._faiss_index = faiss.IndexFlatL2(self.memory_bank.shape[1])
                self._faiss_index.add(np.ascontiguousarray(self.memory_bank.cpu().numpy()))
            sq, idx = self._faiss_index.search(np.ascontiguousarray(queries.cpu().numpy()), 1)
            return torch.from_numpy(sq[:, 0]).clamp_min_(0).sqrt_(), torch.from_numpy(idx[:, 0]).long()
        bank_t, bank_sq = self.memory_bank.T, self._bank_sq[None]
        dists, indices = [], []
        for chunk in queries.split(int(self.config["knn_chunk_size"])):
            partial = torch.addmm(bank_sq, chunk, bank_t, beta=1.0, alpha=-2.0)  # ||b||² − 2ab
            best, index = partial.min(dim=1)
            best.add_((chunk * chunk).sum(dim=1)).clamp_min_(0.0).sqrt_()
            dists.append(best)
            indices.append(index)
        return torch.cat(dists), torch.cat(indices)

    def _reweight(self, scores: torch.Tensor, features: torch.Tensor, nn_index: torch.Tensor) -> torch.Tensor:
        """PatchCore's image score: s* scaled by 1 − softmax over distances to the nearest bank patch's neighbours.

        A test patch whose nearest bank patch lies in a dense region of the bank is less anomalous than its raw distance
        suggests; one near an isolated (rare) bank patch is more. Same formula as the paper and anomalib.
        """
        assert self.memory_bank is not None and self._bank_sq is not None
        k = min(int(self.config["num_neighbors"]), self.memory_bank.shape[0])
        if k <= 1:
            return scores
        anchors = self.memory_bank[nn_index]  # (n, D)
        sq = self._bank_sq[None] - 2.0 * anchors @ self.memory_bank.T  # + ||anchor||², same for the whole row
        support = torch.topk(sq, k, dim=1, largest=False).indices  # (n, k), the anchor itself first
        distances = torch.linalg.vector_norm(features[:, None, :] - self.memory_bank[support], dim=-1)
        weights = 1.0 - torch.softmax(distances, dim=1)[:, 0]
        return weights * scores

    # ---------------------------------------------------------------- predict
    def _resample_matrix(self, source: int, target: int, blur: bool) -> torch.Tensor:
        key = (source, target, "blur" if blur else "plain")
        if key not in self._resample_cache:
            sigma = float(self.config["sigma"]) if blur else 0.0
            self._resample_cache[key] = upsample_blur_matrix(source, target, sigma).float().to(self.device)
        return self._resample_cache[key]

    def _image_scores(
        self, maps: torch.Tensor, patch_max: torch.Tensor, features: torch.Tensor, nn_index: torch.Tensor
    ) -> torch.Tensor:
        """One number per image, by ``image_score``.

        ``reweighted`` is the paper's (and anomalib's) score: the largest patch distance, scaled by how isolated its
        nearest bank patch is. ``patch_max`` leaves out the reweighting. ``map_max`` is the largest value of the final,
        smoothed map, so that the image decision and the map agree (PaDiM's rule). ``map_top_mean`` averages the
        map's highest ``image_top_patches × stride²`` pixels: a robust maximum that one odd patch of a normal image moves
        less than it moves ``map_max``, over an area counted in patches so that it means the same at 256² and at 1024²
        (a fixed fraction of the image, 1 %, scored BSData well at 256² but diluted small defects at 1024²).
        """
        rule = self.config["image_score"]
        if rule == "reweighted":
            return self._reweight(patch_max, features, nn_index)
        if rule == "patch_max":
            return patch_max
        flat = maps.reshape(maps.shape[0], -1)
        if rule == "map_max":
            return flat.amax(dim=1)
        count = min(flat.shape[1], max(1, math.ceil(float(self.config["image_top_patches"]) * self.feature_stride**2)))
        return torch.topk(flat, count, dim=1).values.mean(dim=1)

    @torch.no_grad()
    def predict(self, batch: torch.Tensor) -> DetectorOutput:
        """Patch score = distance to the nearest bank patch; map = scores upsampled to H×W and Gaussian-blurred."""
        if self.memory_bank is None:
            raise RuntimeError("PatchCore has no memory bank: call fit() or load a saved detector first.")
        if batch.ndim != 4:
            raise ValueError(f"Expected a batch of shape (B, C, H, W), got {tuple(batch.shape)}.")
        batch_size, _, height, width = batch.shape
        boxes = self._tiles(height, width)
        whole_image = len(boxes) == 1 and boxes[0] == (0, 0, height, width)
        images = batch.to(self.device, torch.float32)
        maps = torch.zeros(batch_size, height, width, device=self.device)
        counts = torch.zeros(height, width, device=self.device)
        for top, left, h, w in boxes:
            counts[top : top + h, left : left + w] += 1.0
        best_score = torch.full((batch_size,), -float("inf"), device=self.device)
        best_feature = torch.zeros(batch_size, self.embedding_dim, device=self.device)
        best_nn = torch.zeros(batch_size, dtype=torch.long, device=self.device)

        for owners, embeddings, chunk_boxes in self._embedding_chunks(images):
            n, dim, gh, gw = embeddings.shape
            flat = embeddings.permute(0, 2, 3, 1).reshape(-1, dim)
            dist, nn_index = self._nearest(flat)
            dist, nn_index = dist.to(self.device).view(n, gh * gw), nn_index.to(self.device).view(n, gh * gw)
            patch_max, where = dist.max(dim=1)
            for i in range(n):  # keep, per image, the most anomalous patch over all its tiles
                owner = int(owners[i])
                if patch_max[i] > best_score[owner]:
                    best_score[owner] = patch_max[i]
                    best_feature[owner] = flat.view(n, gh * gw, dim)[i, where[i]]
                    best_nn[owner] = nn_index[i, where[i]]
            grids = dist.view(n, gh, gw)
            for i, (top, left, h, w) in enumerate(chunk_boxes):
                # Whole image: fused upsample + blur. Tiles: plain upsample now, blur once after stitching.
                along_h = self._resample_matrix(gh, h, blur=whole_image)
                along_w = self._resample_matrix(gw, w, blur=whole_image)
                maps[int(owners[i]), top : top + h, left : left + w] += along_h @ grids[i] @ along_w.T

        if not whole_image:
            maps = gaussian_blur2d(maps / counts, float(self.config["sigma"]))
        scores = self._image_scores(maps, best_score, best_feature, best_nn)
        scores = self.rerank(scores, best_feature, best_score)  # no-op without a defect bank
        return DetectorOutput(
            scores=scores.float().cpu().numpy().astype(np.float32),
            maps=maps.float().cpu().numpy().astype(np.float32),
        )

    # ---------------------------------------------------------------- state
    def get_state(self) -> dict[str, Any]:
        """The bank (a tensor) and plain JSON values: what the safe model file stores; no backbone weights."""
        if self.memory_bank is None:
            raise RuntimeError("PatchCore is not fitted: nothing to save.")
        return {
            "memory_bank": self.memory_bank.detach().cpu().clone(),
            "embedding_dim": int(self.embedding_dim),
            "fit_info": dict(self.fit_info),
        } | self.feedback_state()

    def set_state(self, state: dict[str, Any]) -> None:
        bank = state.get("memory_bank")
        if not isinstance(bank, torch.Tensor):
            raise ValueError(f"PatchCore state needs 'memory_bank' as a torch tensor, got {type(bank).__name__}.")
        bank = bank.to(torch.float32)
        if bank.ndim != 2 or bank.shape[1] != self.embedding_dim:
            raise ValueError(
                f"Saved memory bank has shape {tuple(bank.shape)} but this configuration embeds patches in "
                f"{self.embedding_dim} dimensions; was it saved with another backbone, layers or embed_dim?"
            )
        self._set_bank(bank)
        self.fit_info = dict(state.get("fit_info") or {})
        self.set_feedback_state(state)

    def to(self, device: str | torch.device) -> PatchCore:
        super().to(device)
        self.backbone.to(self.device)
        self._projections = [None if p is None else p.to(self.device) for p in self._projections]
        self._resample_cache = {}
        if self.memory_bank is not None:
            self._set_bank(self.memory_bank)
        return self
