"""Convolutional autoencoder detector: the original MAD-FH baseline, rebuilt so that its numbers can be trusted.

The prototype trained a 1024² autoencoder (8 stride-2 convolutions, a 512-d latent, Adam lr 1e-4, batch 16, one epoch,
MSE) and scored an image by its mean reconstruction error. This module keeps that model as the default configuration
but turns it into a detector of the shared interface: it also produces pixel maps (so segmentation metrics and the
benchmark's thresholds apply), it is seeded, it logs its losses, and it refuses to "train" on an empty data source,
which the prototype silently did.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from madfh_pipeline.models.base import AnomalyDetector, BatchSource, DetectorOutput

logger = logging.getLogger(__name__)

#: Accepted normalisation layers. ``group`` is the default because its behaviour is identical in training and
#: evaluation: with the prototype's one epoch (≈ 19 steps on wallplugs) BatchNorm's running statistics are still
#: dominated by their initial values, so evaluation would use a different network from the one that was trained.
NORMS = ("group", "batch", "none")
SCORE_REDUCTIONS = ("max", "mean")
LOSSES = ("mse",)

#: Constructor defaults of :class:`AutoencoderDetector`. The first block reproduces the prototype; the rest are the
#: knobs it lacked. Every key is stored in ``detector.config`` so a saved file rebuilds the same network even if these
#: defaults change later.
DEFAULT_CONFIG: dict[str, Any] = {
    # None: the side of the images it is trained on (the preprocessing canvas), so a 256² category trains at 256²
    # instead of silently upscaling to 1024² (16× the pixels, for no information); the prototype used 1024.
    "input_size": None,
    "latent_dim": 512,
    "depth": 8,
    "lr": 1e-4,
    "batch_size": 16,
    "epochs": 1,
    "loss": "mse",
    "base_channels": 16,
    "max_channels": 512,
    "norm": "group",
    "smoothing_sigma": 4.0,
    "score_reduction": "max",
    "seed": 0,
    "in_channels": None,
}


def check_geometry(input_size: int, depth: int) -> int:
    """Return the side of the bottleneck feature map, or explain why the geometry cannot work.

    Each stride-2 layer halves the side exactly only if the side is even at every step; otherwise the mirrored decoder
    would return a different size and the reconstruction error would be undefined.
    """
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"depth must be a positive integer (number of stride-2 conv layers), got {depth!r}.")
    if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < 1:
        raise ValueError(f"input_size must be a positive integer, got {input_size!r}.")
    factor = 2**depth
    if input_size % factor != 0:
        raise ValueError(
            f"input_size={input_size} is not divisible by 2**depth={factor} (depth={depth}): every stride-2 layer "
            f"must halve the image exactly. Use an input_size that is a multiple of {factor}, or a smaller depth."
        )
    return input_size // factor


def channel_schedule(depth: int, base_channels: int, max_channels: int) -> list[int]:
    """Output channels of each encoder layer: doubling from ``base_channels``, capped at ``max_channels``.

    Doubling while the resolution halves keeps the cost per layer roughly constant; the cap stops the deepest layers of
    a 1024² model (8 layers) from exploding to 4096 channels.
    """
    if base_channels < 1 or max_channels < 1:
        raise ValueError(f"base_channels and max_channels must be ≥ 1, got {base_channels} and {max_channels}.")
    return [min(base_channels * 2**i, max_channels) for i in range(depth)]


def _norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}.")


class ConvAutoencoder(nn.Module):
    """Square-input convolutional autoencoder with a vector bottleneck.

    Encoder: ``depth`` blocks of Conv(4, stride 2) → norm → LeakyReLU, then a linear layer from the flattened final
    feature map to ``latent_dim``. Decoder: the mirror image with transposed convolutions and a sigmoid, so outputs lie
    in [0, 1] like the inputs. The vector bottleneck (rather than a spatial one) is what forces the model to forget
    rare local structure, i.e. defects, which is the whole point of scoring by reconstruction error.
    """

    def __init__(
        self,
        input_size: int = 1024,
        in_channels: int = 3,
        *,
        depth: int = 8,
        base_channels: int = 16,
        max_channels: int = 512,
        latent_dim: int = 512,
        norm: str = "group",
    ) -> None:
        super().__init__()
        self.feature_size = check_geometry(input_size, depth)
        if in_channels < 1:
            raise ValueError(f"in_channels must be ≥ 1 (1 for gray, 3 for RGB), got {in_channels}.")
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be ≥ 1, got {latent_dim}.")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
        self.input_size = input_size
        self.in_channels = in_channels
        self.latent_dim = latent_dim
        self.channels = channel_schedule(depth, base_channels, max_channels)

        encoder: list[nn.Module] = []
        previous = in_channels
        for channels in self.channels:
            encoder += [
                nn.Conv2d(previous, channels, kernel_size=4, stride=2, padding=1),
                _norm_layer(norm, channels),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            previous = channels
        self.encoder = nn.Sequential(*encoder)

        flat = self.channels[-1] * self.feature_size**2
        self.to_latent = nn.Linear(flat, latent_dim)
        self.from_latent = nn.Sequential(nn.Linear(latent_dim, flat), nn.LeakyReLU(0.2, inplace=True))

        decoder: list[nn.Module] = []
        for i in range(len(self.channels) - 1, 0, -1):
            decoder += [
                nn.ConvTranspose2d(self.channels[i], self.channels[i - 1], kernel_size=4, stride=2, padding=1),
                _norm_layer(norm, self.channels[i - 1]),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        decoder += [nn.ConvTranspose2d(self.channels[0], in_channels, kernel_size=4, stride=2, padding=1), nn.Sigmoid()]
        self.decoder = nn.Sequential(*decoder)

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"ConvAutoencoder expects (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}.")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent vectors (B, latent_dim); exposed for fusion with other features (the prototype's "hybrid")."""
        self._check_input(x)
        return self.to_latent(self.encoder(x).flatten(1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, C, input_size, input_size) in [0, 1] from latent vectors."""
        features = self.from_latent(z).view(-1, self.channels[-1], self.feature_size, self.feature_size)
        return self.decoder(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def resize_images(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, C, H, W); anti-aliased when shrinking so that downscaled 2448×2048 images do not alias."""
    height, width = x.shape[-2:]
    if (height, width) == tuple(size):
        return x
    antialias = size[0] < height or size[1] < width
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, device: torch.device | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian with scipy's radius rule (``int(truncate * sigma + 0.5)``)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, H, W) or (B, 1, H, W) maps, on whatever device the maps live.

    Borders are mirrored (scipy's ``mode="mirror"``) so that edge pixels are not darkened by zero padding; an axis
    shorter than the kernel radius falls back to edge replication, which torch's reflect padding cannot do.
    ``sigma <= 0`` returns the maps unchanged.
    """
    if sigma <= 0:
        return maps
    squeeze = maps.ndim == 3
    x = maps.unsqueeze(1) if squeeze else maps
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"gaussian_blur expects (B, H, W) or (B, 1, H, W), got {tuple(maps.shape)}.")
    kernel = gaussian_kernel1d(sigma, truncate, device=x.device).to(x.dtype)
    radius = kernel.numel() // 2
    height, width = x.shape[-2:]
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect" if radius < width else "replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode="reflect" if radius < height else "replicate")
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[:, 0] if squeeze else x


def _rebatch(batches: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Regroup incoming batches into optimisation batches of ``batch_size`` (the last one may be smaller).

    The data loader's batch size is a memory/IO choice; the optimiser's batch size is a training hyper-parameter that
    the prototype fixed at 16. Decoupling them keeps results independent of how the pipeline happens to stream data.
    """
    buffer: list[torch.Tensor] = []
    buffered = 0
    for batch in batches:
        buffer.append(batch)
        buffered += batch.shape[0]
        while buffered >= batch_size:
            merged = torch.cat(buffer) if len(buffer) > 1 else buffer[0]
            yield merged[:batch_size]
            rest = merged[batch_size:]
            buffer = [rest] if rest.shape[0] else []
            buffered = rest.shape[0]
    if buffered:
        yield torch.cat(buffer) if len(buffer) > 1 else buffer[0]


class AutoencoderDetector(AnomalyDetector):
    """Reconstruction-error detector: train on normal images, flag pixels the autoencoder cannot reproduce.

    Config keys: see :data:`DEFAULT_CONFIG`; unknown keys are rejected so that a misspelt parameter cannot be ignored
    silently. Inputs of any H×W are resized (aspect not kept, as in the prototype) to ``input_size``², and maps are
    resized back, so callers never deal with the model's resolution.
    """

    name: ClassVar[str] = "autoencoder"

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        config = dict(config or {})
        unknown = sorted(set(config) - set(DEFAULT_CONFIG))
        if unknown:
            raise ValueError(f"Unknown autoencoder config key(s) {unknown}. Known keys: {sorted(DEFAULT_CONFIG)}.")
        super().__init__({**DEFAULT_CONFIG, **config})
        self._validate_config()
        self.model: ConvAutoencoder | None = None
        self.in_channels: int | None = self.config["in_channels"]
        self.input_size: int | None = self.config["input_size"]

    def _validate_config(self) -> None:
        cfg = self.config
        if cfg["input_size"] is not None:
            check_geometry(cfg["input_size"], cfg["depth"])
        elif not isinstance(cfg["depth"], int) or isinstance(cfg["depth"], bool) or cfg["depth"] < 1:
            check_geometry(2**10, cfg["depth"])  # raises the descriptive depth error
        channel_schedule(cfg["depth"], cfg["base_channels"], cfg["max_channels"])
        checks = [
            (cfg["latent_dim"] >= 1, "latent_dim must be ≥ 1"),
            (cfg["lr"] > 0, "lr must be > 0"),
            (int(cfg["batch_size"]) == cfg["batch_size"] and cfg["batch_size"] >= 1, "batch_size must be an int ≥ 1"),
            (int(cfg["epochs"]) == cfg["epochs"] and cfg["epochs"] >= 1, "epochs must be an int ≥ 1"),
            (cfg["loss"] in LOSSES, f"loss must be one of {LOSSES}"),
            (cfg["norm"] in NORMS, f"norm must be one of {NORMS}"),
            (cfg["smoothing_sigma"] >= 0, "smoothing_sigma must be ≥ 0 (0 disables smoothing)"),
            (cfg["score_reduction"] in SCORE_REDUCTIONS, f"score_reduction must be one of {SCORE_REDUCTIONS}"),
            (cfg["in_channels"] is None or cfg["in_channels"] >= 1, "in_channels must be None (infer) or ≥ 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Invalid autoencoder config: {message} (config={cfg}).")

    # ------------------------------------------------------------------------------------------------------------
    # helpers

    def _build_model(self, in_channels: int) -> ConvAutoencoder:
        cfg = self.config
        if self.input_size is None:
            raise RuntimeError("The autoencoder's input size is not known before the first batch.")
        return ConvAutoencoder(
            input_size=self.input_size,
            in_channels=in_channels,
            depth=cfg["depth"],
            base_channels=cfg["base_channels"],
            max_channels=cfg["max_channels"],
            latent_dim=cfg["latent_dim"],
            norm=cfg["norm"],
        )

    def _prepare(self, batch: torch.Tensor) -> torch.Tensor:
        """Check a (B, C, H, W) batch against the model's contract and bring it to the model's device and size."""
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ValueError(f"Expected a (B, C, H, W) float tensor in [0, 1], got {shape}.")
        if self.in_channels is not None and batch.shape[1] != self.in_channels:
            raise ValueError(
                f"Batch has {batch.shape[1]} channel(s) but the autoencoder was built for {self.in_channels}; "
                "preprocess every split the same way (gray vs RGB)."
            )
        x = batch.to(self.device, dtype=torch.float32, non_blocking=True)
        low, high = (float(x.min()), float(x.max())) if x.numel() else (0.0, 0.0)
        if low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(
                f"Images must be floats in [0, 1] (the decoder ends in a sigmoid), got values in [{low:.3g}, {high:.3g}]."
            )
        size = self._resolve_input_size(x.shape[-2], x.shape[-1])
        return resize_images(x, (size, size))

    def _resolve_input_size(self, height: int, width: int) -> int:
        """The model side: configured, or the larger image side rounded up to a multiple of 2**depth.

        Says so when a configured size upscales the images, because that multiplies the cost for no information.
        """
        if self.input_size is None:
            factor = 2 ** int(self.config["depth"])
            self.input_size = max(factor, math.ceil(max(height, width) / factor) * factor)
            logger.info(
                "autoencoder input size %d² from the %dx%d training images (input_size: null).",
                self.input_size,
                width,
                height,
            )
        elif self.model is None and self.input_size > max(height, width):
            logger.warning(
                "autoencoder input_size %d upscales the %dx%d images (%.1fx the pixels, about as much more time and "
                "memory, no more information); set detection.models.autoencoder.config.input_size: null to train at "
                "the images' size.",
                self.input_size,
                width,
                height,
                self.input_size**2 / (height * width),
            )
        return self.input_size

    def _require_model(self) -> ConvAutoencoder:
        if self.model is None:
            raise RuntimeError("The autoencoder is not fitted: call fit() or load a saved detector first.")
        return self.model

    # ------------------------------------------------------------------------------------------------------------
    # AnomalyDetector interface

    def fit(self, batches: BatchSource) -> dict[str, list[float]]:
        """Train from fresh, seeded weights for ``epochs`` passes; ``batches()`` is called once per pass.

        Returns ``{"loss": per-epoch mean loss (weighted by images), "step_loss": loss of every optimiser step}``.
        """
        previous = (self.model, self.in_channels)
        try:
            return self._fit(batches)
        except BaseException:
            # A failed fit must not leave a half-trained (or untrained) network behind that predict() would use.
            self.model, self.in_channels = previous
            raise

    def _fit(self, batches: BatchSource) -> dict[str, list[float]]:
        cfg = self.config
        epochs = int(cfg["epochs"])
        batch_size = int(cfg["batch_size"])
        self.in_channels = cfg["in_channels"]
        self.input_size = cfg["input_size"]
        self.model = None
        optimizer: torch.optim.Optimizer | None = None
        history: dict[str, list[float]] = {"loss": [], "step_loss": []}

        for epoch in range(epochs):
            started = time.perf_counter()
            total, images, steps = 0.0, 0, 0
            prepared = (self._prepare(b) for b in self._first_batch_builds_model(batches()))
            bar = tqdm(
                _rebatch(prepared, batch_size),
                desc=f"autoencoder epoch {epoch + 1}/{epochs}",
                unit="batch",
                leave=False,
                disable=None,
            )
            for x in bar:
                model = self._require_model()
                if optimizer is None:
                    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
                model.train()
                optimizer.zero_grad(set_to_none=True)
                loss = F.mse_loss(model(x), x)
                loss.backward()
                optimizer.step()
                value = float(loss.item())
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"Autoencoder loss became {value} at epoch {epoch + 1}, step {steps + 1}; lower lr "
                        f"(now {cfg['lr']}) or check the inputs are in [0, 1]."
                    )
                history["step_loss"].append(value)
                total += value * x.shape[0]
                images += x.shape[0]
                steps += 1
                bar.set_postfix(loss=f"{value:.5f}")
                logger.debug("autoencoder epoch %d step %d: loss %.6f", epoch + 1, steps, value)
            bar.close()
            if steps == 0:
                hint = (
                    ""
                    if epoch == 0
                    else " The first epoch had data: the BatchSource must return a fresh iterable on every call, "
                    "not the same exhausted generator."
                )
                raise ValueError(
                    f"The batch source yielded no images in epoch {epoch + 1}; refusing to train on nothing.{hint}"
                )
            history["loss"].append(total / images)
            logger.info(
                "autoencoder epoch %d/%d: mean loss %.6f over %d steps (%d images, %.1f s)",
                epoch + 1,
                epochs,
                history["loss"][-1],
                steps,
                images,
                time.perf_counter() - started,
            )
        self._require_model().eval()
        return history

    def _first_batch_builds_model(self, batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Build the seeded model when the first batch arrives, since ``in_channels`` may have to be read from it."""
        for batch in batches:
            if self.model is None:
                if not isinstance(batch, torch.Tensor) or batch.ndim != 4:
                    self._prepare(batch)  # raises the descriptive error
                if self.in_channels is None:
                    self.in_channels = int(batch.shape[1])
                self._resolve_input_size(int(batch.shape[-2]), int(batch.shape[-1]))
                # Seed only the initialisation, without disturbing the caller's global RNG stream.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(self.config["seed"]))
                    model = self._build_model(self.in_channels)
                self.model = model.to(self.device)
            yield batch

    @torch.no_grad()
    def predict(self, batch: torch.Tensor) -> DetectorOutput:
        """Smoothed per-pixel squared reconstruction error at the batch's H×W, and its max (or mean) per image."""
        model = self._require_model().eval()
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4:
            self._prepare(batch)  # raises the descriptive error
        height, width = batch.shape[-2:]
        sigma = float(self.config["smoothing_sigma"])
        scores: list[torch.Tensor] = []
        maps: list[np.ndarray] = []
        for chunk in batch.split(int(self.config["batch_size"])):
            x = self._prepare(chunk)
            error = (model(x) - x).pow(2).mean(dim=1, keepdim=True)
            error = gaussian_blur(resize_images(error, (height, width)), sigma)[:, 0]
            reduce = torch.amax if self.config["score_reduction"] == "max" else torch.mean
            scores.append(reduce(error, dim=(-2, -1)).cpu())
            maps.append(error.float().cpu().numpy())
        return DetectorOutput(
            scores=torch.cat(scores).numpy().astype(np.float32, copy=False),
            maps=np.concatenate(maps).astype(np.float32, copy=False),
        )

    @torch.no_grad()
    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """Latent vectors (B, latent_dim) float32, for fusing the CNN latent with other features."""
        model = self._require_model().eval()
        out = [
            model.encode(self._prepare(chunk)).float().cpu() for chunk in batch.split(int(self.config["batch_size"]))
        ]
        return torch.cat(out).numpy()

    def get_state(self) -> dict[str, Any]:
        model = self._require_model()
        return {
            "model": {key: value.detach().cpu().clone() for key, value in model.state_dict().items()},
            "in_channels": int(model.in_channels),
            "input_size": int(model.input_size),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        missing = {"model", "in_channels"} - set(state)
        if missing:
            raise ValueError(f"Autoencoder state is missing {sorted(missing)}; was it saved by this detector?")
        self.in_channels = int(state["in_channels"])
        self.input_size = int(state.get("input_size") or self.config["input_size"])
        model = self._build_model(self.in_channels)
        model.load_state_dict(state["model"])
        self.model = model.to(self.device).eval()

    def to(self, device: str | torch.device) -> AutoencoderDetector:
        super().to(device)
        if self.model is not None:
            self.model.to(self.device)
        return self
