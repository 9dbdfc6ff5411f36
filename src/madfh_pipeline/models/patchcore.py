"""PatchCore (Roth et al., CVPR 2022) built for CPU-scale, high-resolution inspection.

The method: locally aware patch features from a frozen ImageNet backbone, a memory bank of normal patches thinned by
greedy k-center coreset selection, and nearest-neighbour distance as the anomaly score. What differs from the reference
implementations, and why:

- **Bounded training memory.** Instead of stacking every patch of every training image (anomalib keeps them all: at
  1024² that is 16 k patches per image, gigabytes for a category), patches stream into a fixed-size uniform random
  pool (priority/reservoir sampling), so peak memory does not grow with the number of images.
- **Fast coreset.** The greedy k-center loop is the classic bottleneck (anomalib's took 479 s of a 510 s fit on this
  kind of machine). It runs here on the bounded pool, in a low-dimensional Gaussian random projection (distances are
  approximately preserved, Johnson-Lindenstrauss, which is all k-center needs), with feature-major storage so each
  iteration is one cache-friendly matrix-vector product plus an in-place minimum, single-threaded on CPU (thousands of
  sub-millisecond iterations lose more to thread synchronisation than they gain): about a millisecond per selected
  point instead of a pass over every patch in the full dimension.
- **Cheap exact kNN.** Scoring is exact nearest-neighbour search by chunked ``addmm`` (``||b||² − 2ab`` minimised per
  query, ``||a||²`` added after the minimum since it is constant per row). The default ``embed_dim`` and
  ``max_bank_size`` keep this at a fraction of the backbone time at 1024², so inference throughput stays close to the
  bare backbone's.
- **Fused upsample + blur.** Bilinear upsampling and the Gaussian blur are both separable linear maps, so for the
  whole-image path they are folded into one (H × h) and one (W × w) matrix: two small matrix products replace an
  upsample plus a 33-tap convolution over millions of pixels.
- **Optional tiling** for inputs larger than ``tile_size`` (small defects vanish when a 2448×2048 image is squashed):
  tiles are scored independently and stitched by averaging their overlap, before the blur.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from madfh_pipeline.models.backbones import FeatureExtractor, build_backbone
from madfh_pipeline.models.base import AnomalyDetector, BatchSource, DetectorOutput

logger = logging.getLogger(__name__)

#: A tile as (top, left, height, width) in input pixels.
Box = tuple[int, int, int, int]

#: Defaults chosen for EfficientNet-Lite0 at 1024² on a 2-core CPU, where the backbone takes ~0.7 s per image:
#: embed_dim 128 and a bank of at most 2048 patches keep the exact kNN near 0.1 s (predict ran at 0.86× the bare
#: backbone's throughput); the pool of 100 k patches bounds training memory (~50 MB, ~100 MB while buffering) and, at 64
#: projected dimensions (26 MB, cache-resident), keeps the coreset to a few seconds whatever the number of images.
DEFAULT_CONFIG: dict[str, Any] = {
    "backbone": "efficientnet_lite0",
    "layers": None,  # None: the backbone's defaults (lite0: blocks.2 + blocks.4; resnets: layer2 + layer3)
    "weights_path": None,
    "embed_dim": 128,  # None keeps all concatenated channels
    "neighbourhood": 3,  # local aggregation kernel (PatchCore's p = 3)
    "coreset_ratio": 0.01,  # fraction of all training patches seen; None: use max_bank_size only
    "max_bank_size": 2048,  # cap that bounds inference cost; None: no cap
    "pool_max_patches": 100_000,  # uniform random pre-sample kept from training before the coreset
    "coreset_projection_dim": 64,  # random projection used by the greedy selection; None: full dimension
    "num_neighbors": 9,  # PatchCore image-score reweighting; 1 disables it (score = max patch distance)
    "tile_size": None,  # None: whole image; else square tiles of this many pixels for larger inputs
    "tile_overlap": 0.25,  # fraction of tile_size shared by neighbouring tiles
    "sigma": 4.0,  # Gaussian smoothing of the anomaly map, in input pixels
    "knn_chunk_size": 4096,  # queries per distance block: memory = knn_chunk_size × bank size × 4 bytes
    "knn_backend": "torch",  # "torch" (exact, chunked mm), "faiss" (exact IndexFlatL2), "auto" (faiss when importable)
    "seed": 0,
    "batch_size": None,  # images or tiles per backbone forward; None: by pixel budget (see _micro_batch)
}

#: Pixels per backbone forward when ``batch_size`` is None. On CPU one 1024² image per forward is fastest (batch 4 at
#: 1024² measured 2.5× slower per image: the activations no longer fit in cache); GPUs want larger batches.
_CPU_PIXEL_BUDGET = 1024 * 1024
_GPU_PIXEL_BUDGET = 8 * 1024 * 1024


# --------------------------------------------------------------------------------------------------------------------
# Helpers (module level so they can be tested and reused)
# --------------------------------------------------------------------------------------------------------------------


def greedy_coreset(
    features: torch.Tensor,
    k: int,
    projection_dim: int | None = 64,
    seed: int = 0,
    start: int | None = None,
    loop: str = "auto",
) -> torch.Tensor:
    """Indices of ``k`` points chosen by greedy k-center (farthest-point) selection.

    Why it is fast: the loop is inherently sequential (each choice depends on all previous ones), so the lever is the
    cost of one iteration. Points are projected to ``projection_dim`` dimensions with a Gaussian random matrix
    (anomalib uses a sparse random projection for the same reason; distances are roughly preserved, which is all
    k-center needs) and stored feature-major with two extra rows, ``1`` and ``||x||²``, so that one BLAS
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
        projection = torch.randn(dim, projection_dim, generator=generator) / math.sqrt(projection_dim)
        x = x @ projection.to(x.device)
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


def _single_threaded_blas() -> AbstractContextManager[Any]:
    """Limit numpy's BLAS to one thread for a block (threadpoolctl ships with scikit-learn); no-op without it.

    Only the dynamically loaded BLAS of numpy/scipy is touched, never torch's thread settings (an explicit
    ``torch.set_num_threads`` has broken oneMKL calls on these machines, see DESIGN.md).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


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


# --------------------------------------------------------------------------------------------------------------------
# The detector
# --------------------------------------------------------------------------------------------------------------------


class PatchCore(AnomalyDetector):
    """PatchCore anomaly detector; see the module docstring and :data:`DEFAULT_CONFIG` for the options."""

    name = "patchcore"

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        config = dict(config or {})
        unknown = sorted(set(config) - set(DEFAULT_CONFIG))
        if unknown:  # warn, not fail: Kedro parameter groups may carry keys meant for other detectors
            logger.warning("PatchCore ignores unknown config keys: %s", ", ".join(unknown))
        super().__init__({**DEFAULT_CONFIG, **config})
        self._validate_config()
        cfg = self.config
        self.backbone: FeatureExtractor = build_backbone(cfg["backbone"], cfg["layers"], cfg["weights_path"])
        self._projections = self._channel_projections()
        self.memory_bank: torch.Tensor | None = None
        self._bank_sq: torch.Tensor | None = None
        self._faiss_index: Any = None
        self._resample_cache: dict[tuple[int, int, str], torch.Tensor] = {}
        self.fit_info: dict[str, float] = {}

    # ---------------------------------------------------------------- configuration
    def _validate_config(self) -> None:
        cfg = self.config
        if int(cfg["neighbourhood"]) < 1 or int(cfg["neighbourhood"]) % 2 == 0:
            raise ValueError(f"neighbourhood must be a positive odd kernel size, got {cfg['neighbourhood']}.")
        if cfg["coreset_ratio"] is None and cfg["max_bank_size"] is None:
            raise ValueError("Set coreset_ratio and/or max_bank_size: otherwise the memory bank size is undefined.")
        if cfg["coreset_ratio"] is not None and not 0.0 < float(cfg["coreset_ratio"]) <= 1.0:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {cfg['coreset_ratio']}.")
        if not 0.0 <= float(cfg["tile_overlap"]) < 1.0:
            raise ValueError(f"tile_overlap is a fraction of tile_size in [0, 1), got {cfg['tile_overlap']}.")
        if cfg["tile_size"] is not None and int(cfg["tile_size"]) < 32:
            raise ValueError(f"tile_size must be at least 32 pixels, got {cfg['tile_size']}.")
        if cfg["knn_backend"] not in ("torch", "faiss", "auto"):
            raise ValueError(f"knn_backend must be 'torch', 'faiss' or 'auto', got {cfg['knn_backend']!r}.")
        for key in ("pool_max_patches", "knn_chunk_size", "batch_size", "num_neighbors"):
            if cfg[key] is not None and int(cfg[key]) < 1:
                raise ValueError(f"{key} must be >= 1, got {cfg[key]}.")

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
        """One pass over the normal images: stream patches into the bounded pool, then thin it to the memory bank.

        Returns one-element histories: images, patches_seen, pool_size, bank_size, feature_seconds, coreset_seconds
        (the last two show where the time went; the coreset should stay a small fraction).
        """
        cfg = self.config
        pool = _ReservoirPool(int(cfg["pool_max_patches"]), int(cfg["seed"]))
        n_images = 0
        started = time.perf_counter()
        for batch in tqdm(batches(), desc="PatchCore features", unit="batch", leave=False):
            n_images += batch.shape[0]
            for _, embeddings, _ in self._embedding_chunks(batch):
                pool.add(embeddings.permute(0, 2, 3, 1).reshape(-1, embeddings.shape[1]))
        if n_images == 0:
            raise ValueError("PatchCore.fit got no training images.")
        feature_seconds = time.perf_counter() - started

        started = time.perf_counter()
        candidates = pool.tensor()
        target = candidates.shape[0]
        if cfg["coreset_ratio"] is not None:
            target = min(target, max(1, math.ceil(float(cfg["coreset_ratio"]) * pool.seen)))
        if cfg["max_bank_size"] is not None:
            target = min(target, int(cfg["max_bank_size"]))
        if target >= candidates.shape[0]:
            bank = candidates
        else:
            chosen = greedy_coreset(
                candidates.to(self.device), target, cfg["coreset_projection_dim"], seed=int(cfg["seed"])
            )
            bank = candidates[chosen.cpu()]
        coreset_seconds = time.perf_counter() - started
        self._set_bank(bank)
        self.fit_info = {
            "images": float(n_images),
            "patches_seen": float(pool.seen),
            "pool_size": float(candidates.shape[0]),
            "bank_size": float(bank.shape[0]),
            "feature_seconds": feature_seconds,
            "coreset_seconds": coreset_seconds,
        }
        logger.info(
            "PatchCore fit: %d images, %d patches seen, pool %d, bank %d; features %.1f s, coreset %.1f s",
            n_images,
            pool.seen,
            candidates.shape[0],
            bank.shape[0],
            feature_seconds,
            coreset_seconds,
        )
        return {key: [value] for key, value in self.fit_info.items()}

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
        scores = self._reweight(best_score, best_feature, best_nn)
        return DetectorOutput(
            scores=scores.float().cpu().numpy().astype(np.float32),
            maps=maps.float().cpu().numpy().astype(np.float32),
        )

    # ---------------------------------------------------------------- state
    def get_state(self) -> dict[str, Any]:
        if self.memory_bank is None:
            raise RuntimeError("PatchCore is not fitted: nothing to save.")
        return {
            "memory_bank": self.memory_bank.detach().cpu().clone(),
            "embedding_dim": self.embedding_dim,
            "fit_info": dict(self.fit_info),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        bank = torch.as_tensor(state["memory_bank"], dtype=torch.float32)
        if bank.ndim != 2 or bank.shape[1] != self.embedding_dim:
            raise ValueError(
                f"Saved memory bank has shape {tuple(bank.shape)} but this configuration embeds patches in "
                f"{self.embedding_dim} dimensions; was it saved with another backbone, layers or embed_dim?"
            )
        self._set_bank(bank)
        self.fit_info = dict(state.get("fit_info", {}))

    def to(self, device: str | torch.device) -> PatchCore:
        super().to(device)
        self.backbone.to(self.device)
        self._projections = [None if p is None else p.to(self.device) for p in self._projections]
        self._resample_cache = {}
        if self.memory_bank is not None:
            self._set_bank(self.memory_bank)
        return self
