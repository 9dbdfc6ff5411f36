"""MiniCPM-V 4.6 as a frozen vision backbone: loader, patch-token grid, pooled embedding (plain torch, no Kedro).

Why this module exists: the original prototype's "MiniCPM hybrid" never loaded the model. Here the model is loaded
with transformers' **native** classes (``MiniCPMV4_6ForConditionalGeneration`` + ``MiniCPMV4_6Processor``, no
``trust_remote_code``), absent weights are one clear :class:`MiniCPMVMissingModelError` and a checkpoint that is not
MiniCPM-V 4.6 — or the tiny random test model of :mod:`madfh_pipeline.models.vlm_tiny` used without saying so — is
refused, so nothing can pretend to be MiniCPM.

How MiniCPM-V 4.6 lays out image tokens (read from ``transformers/models/minicpmv4_6``):

1. The processor resizes an image (bicubic, antialiased) so both sides are multiples of ``patch_size × 4`` (16x mode)
   or ``patch_size × 2`` (4x mode), normalises with the processor's mean/std (0.5/0.5 on [0, 1] pixels for 4.6), and
   — for large images — adds slices of about ``scale_resolution``² (448²). Each unit is cut into ``patch_size``²
   (14²) patches, **row-major**, and all units of all images are *packed* NaViT-style into one tensor
   ``(1, C, patch_size, sum(h·w)·patch_size)`` with ``target_sizes`` ``(units, 2)`` = patch rows/cols per unit.
2. The vision tower (SigLIP2-400M: 27 layers, width 1152) embeds the patches (a stride-``patch_size`` conv) and adds
   position embeddings looked up by bucketising each patch's *fractional* (row, col) onto a 70×70 table, so any grid
   size works. Attention runs within each unit (``cu_seqlens``).
3. 16x mode (the default of the model): after encoder layer ``insert_layer_id`` (6) a window-attention merger turns
   every 2×2 window into one token (row-major over the half-resolution grid); the remaining layers run at stride
   2·patch; ``post_layernorm`` follows. 4x mode skips that merger: all layers run at patch stride.
4. The ``Merger`` (outside the tower) merges 2×2 again and projects to the language model's width (1024); these are
   the tokens the LLM sees: (h/4)·(w/4) per unit in 16x mode, (h/2)·(w/2) in 4x mode.

What :class:`MiniCPMVVisionBackbone` returns: the tower's own tokens, *before* the final merger, reshaped to
``(B, D, h, w)`` with the layout kept. ``grid="patch"`` (default) runs the tower as in 4x mode, so ``h, w = H/14,
W/14`` (stride 14 model pixels) and ``D = 1152``; ``grid="merged"`` runs it as in 16x mode (stride 28 after layer 6).
``layer`` picks an intermediate encoder layer instead of the normed output. The image is **not** sliced: one resize
to ``image_size`` keeps a single, regular grid a detector can align with a CNN map (tile the image upstream for
higher resolution). The pooled embedding is the mean of the grid tokens, or (``pooling="merger"``) the mean of the
LLM-space tokens the model's own merger makes from the tower output.

Memory is bounded by the batch the caller passes (:func:`iter_batches`, :meth:`MiniCPMVVisionBackbone.iter_features`
stream any number of images); everything runs under ``torch.inference_mode``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from madfh_pipeline.models.backbones import MissingModelError

logger = logging.getLogger(__name__)

#: The Hugging Face id of the model this module is written for (1.3 B parameters: SigLIP2-400M + Qwen3.5-0.8B).
DEFAULT_MODEL_ID = "openbmb/MiniCPM-V-4.6"
#: ``model_type`` of a MiniCPM-V 4.6 ``config.json``; anything else is refused (older MiniCPM-V use remote code).
MINICPMV_MODEL_TYPE = "minicpmv4_6"
#: Key set to ``true`` in the ``config.json`` of the tiny random test model (see :mod:`.vlm_tiny`).
TINY_RANDOM_CONFIG_FLAG = "madfh_tiny_random"
#: How to get the weights on a machine with internet; quoted by every missing-model error.
DOWNLOAD_HINT = f"hf download {DEFAULT_MODEL_ID} --local-dir <dir>"

DTypeName = Literal["auto", "bfloat16", "float16", "float32"]
_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")


class MiniCPMVMissingModelError(MissingModelError):
    """MiniCPM-V weights are not available offline; the message names the id/path, the parameter and the download."""


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MiniCPMV:
    """A loaded MiniCPM-V 4.6: model and processor plus where they came from, shared by the backbone and the judge.

    One object for both so a run loads the 1.3 B-parameter model once even when it extracts features *and* asks the
    model whether an image is defective.
    """

    model: nn.Module  # MiniCPMV4_6ForConditionalGeneration, eval mode, frozen
    processor: Any  # MiniCPMV4_6Processor (image processor + tokenizer + chat template)
    source: str  # the model id or local path it was loaded from
    device: torch.device
    dtype: torch.dtype
    is_tiny_random: bool  # True only for the random test model (its config carries TINY_RANDOM_CONFIG_FLAG)

    @property
    def label(self) -> str:
        """Short name for logs, run tags and ``backbone.name``; says "tiny-random" so test numbers never pass as real."""
        return "minicpmv4_6-tiny-random" if self.is_tiny_random else "minicpmv4_6"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA when present, else CPU. An explicit CUDA device without CUDA is an error, not a fallback."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' was requested but CUDA is not available here; use 'auto' or 'cpu'.")
    return resolved


def resolve_dtype(dtype: DTypeName | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 on GPUs that support it, float16 on other GPUs, float32 on CPU.

    Why not transformers' own "auto": the MiniCPM-V 4.6 ``config.json`` declares no dtype, so "auto" would load
    float32 everywhere (twice the GPU memory); and half precision on CPU is slow or unsupported for some kernels.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto', 'bfloat16', 'float16' or 'float32', got {dtype!r}.")
    return _DTYPES[dtype]


def _looks_like_path(source: str) -> bool:
    """A source is a local path when it exists or cannot be a hub id (``org/name`` has exactly one slash)."""
    if Path(source).expanduser().exists():
        return True
    if source.startswith(("/", ".", "~")) or "\\" in source or (len(source) > 1 and source[1] == ":"):
        return True
    return source.count("/") != 1


def _missing(source: str, reason: str, param: str) -> MiniCPMVMissingModelError:
    return MiniCPMVMissingModelError(
        f"MiniCPM-V weights not available: '{source}' — {reason}. Set '{param}' to a local folder holding a "
        f"MiniCPM-V 4.6 checkpoint (config.json, *.safetensors, tokenizer and processor files) or to a model id in "
        f"the Hugging Face cache. To get it, on a machine with internet run `{DOWNLOAD_HINT}` and copy <dir> here "
        f"(about 2.6 GB in bfloat16). Nothing is downloaded implicitly and there is no random-weight fallback."
    )


def _check_local_folder(folder: Path, source: str, param: str) -> None:
    """Name what is missing in a local folder before transformers' generic "Repo id must be in the form" message."""
    if not folder.exists():
        raise _missing(source, f"the local path '{folder}' does not exist", param)
    if not folder.is_dir():
        raise _missing(source, f"'{folder}' is a file, expected the folder of a checkpoint", param)
    if not (folder / "config.json").is_file():
        raise _missing(source, f"the folder '{folder}' has no config.json", param)
    if not any(any(folder.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise _missing(source, f"the folder '{folder}' has no weight files (*.safetensors)", param)


def _hub_missing_reason(exc: BaseException) -> str | None:
    """The reason to report when ``exc`` (or its cause chain) means "the files are not here", else None.

    Checked against what transformers 5 really raises: an ``OSError`` caused by huggingface_hub's
    ``LocalEntryNotFoundError`` when offline (``HF_HUB_OFFLINE=1`` or ``local_files_only``) and the id is not cached;
    ``EntryNotFoundError`` / ``RepositoryNotFoundError`` for a file or repository that does not exist.
    """
    from huggingface_hub import errors

    kinds: tuple[tuple[type[BaseException], str], ...] = (
        (
            errors.LocalEntryNotFoundError,
            "not in the local Hugging Face cache and downloads are off (offline mode or local_files_only)",
        ),
        (errors.EntryNotFoundError, "a required file is missing from the repository or cache"),
        (errors.RepositoryNotFoundError, "no such repository on the hub (or it is private)"),
        (errors.HFValidationError, "neither an existing local folder nor a valid model id"),
    )
    seen: BaseException | None = exc
    while seen is not None:
        for kind, reason in kinds:
            if isinstance(seen, kind):
                return reason
        seen = seen.__cause__ or seen.__context__
    return None


def load_minicpmv(
    model: str | os.PathLike[str] = DEFAULT_MODEL_ID,
    *,
    dtype: DTypeName | torch.dtype = "auto",
    device: str | torch.device = "auto",
    local_files_only: bool = True,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    attn_implementation: str | None = None,
    allow_random_weights: bool = False,
    param_name: str = "model",
) -> MiniCPMV:
    """Load MiniCPM-V 4.6 (model + processor) from a model id or a local folder; frozen, in eval mode.

    ``local_files_only`` defaults to True like the CNN backbones: a 2.6 GB download must be a deliberate step
    (``hf download``), not a side effect of a pipeline run. ``param_name`` is the parameter the error messages tell
    the user to set (the Kedro pipeline passes its own key). ``allow_random_weights`` must be True to load the tiny
    random test model; a real run never sets it.

    Raises :class:`MiniCPMVMissingModelError` when the weights are absent, ``ValueError`` for a checkpoint that is not
    MiniCPM-V 4.6 or a random test model loaded without ``allow_random_weights``.
    """
    from transformers import AutoProcessor, MiniCPMV4_6ForConditionalGeneration, PretrainedConfig

    source = os.fspath(model)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if _looks_like_path(source):
        _check_local_folder(Path(source).expanduser(), source, param_name)
        source = str(Path(source).expanduser())
    hub_kwargs: dict[str, Any] = {"local_files_only": local_files_only, "revision": revision, "cache_dir": cache_dir}
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(source, **hub_kwargs)
    except OSError as exc:
        reason = _hub_missing_reason(exc)
        if reason is None:
            raise
        raise _missing(source, f"{reason}; no local folder of that name exists either", param_name) from exc

    model_type = config_dict.get("model_type")
    if model_type != MINICPMV_MODEL_TYPE:
        raise ValueError(
            f"'{source}' is not a MiniCPM-V 4.6 checkpoint (config model_type {model_type!r}, expected "
            f"'{MINICPMV_MODEL_TYPE}'). Older MiniCPM-V versions need remote code that breaks on transformers 5; use "
            f"{DEFAULT_MODEL_ID}."
        )
    is_tiny_random = bool(config_dict.get(TINY_RANDOM_CONFIG_FLAG, False))
    if is_tiny_random and not allow_random_weights:
        raise ValueError(
            f"'{source}' is the tiny RANDOMLY initialised MiniCPM-V made for tests ('{TINY_RANDOM_CONFIG_FLAG}' in its "
            f"config.json); its features and answers are meaningless. Point '{param_name}' at real weights "
            f"({DOWNLOAD_HINT}), or pass allow_random_weights=True in a test."
        )

    try:
        processor = AutoProcessor.from_pretrained(source, **hub_kwargs)
        network = MiniCPMV4_6ForConditionalGeneration.from_pretrained(
            source, dtype=torch_dtype, attn_implementation=attn_implementation, **hub_kwargs
        )
    except OSError as exc:  # e.g. config cached but the weights or tokenizer files are not
        reason = _hub_missing_reason(exc)
        if reason is None:
            raise
        raise _missing(source, reason, param_name) from exc

    network = network.to(torch_device).eval()
    network.requires_grad_(False)
    if is_tiny_random:
        logger.warning(
            "Loaded the tiny RANDOM MiniCPM-V test model from %s: for tests only, its outputs mean nothing.", source
        )
    else:
        logger.info("Loaded MiniCPM-V 4.6 from %s on %s (%s)", source, torch_device, torch_dtype)
    return MiniCPMV(network, processor, source, torch_device, torch_dtype, is_tiny_random)


# --------------------------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------------------------


def iter_batches(images: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Stack a stream of single images ``(C, H, W)`` (or a ``(N, C, H, W)`` tensor) into batches of ``batch_size``.

    Lazy on purpose: at most one batch of images exists at a time, so memory is bounded by ``batch_size`` whatever
    the number of images (a category has hundreds of multi-megapixel images).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    pending: list[torch.Tensor] = []
    for image in images:
        if image.ndim != 3:
            raise ValueError(f"iter_batches expects single images of shape (C, H, W), got {tuple(image.shape)}.")
        pending.append(image)
        if len(pending) == batch_size:
            yield torch.stack(pending)
            pending = []
    if pending:
        yield torch.stack(pending)


def check_images(images: torch.Tensor) -> None:
    """Reject what would silently give garbage: wrong rank or channels, integer pixels, values outside [0, 1]."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"Expected images of shape (B, 1|3, H, W), got {tuple(images.shape)}.")
    if not images.is_floating_point():
        raise TypeError(f"Expected float images in [0, 1], got dtype {images.dtype} (divide uint8 pixels by 255).")
    if images.numel() and (float(images.min()) < -1e-3 or float(images.max()) > 1 + 1e-3):
        raise ValueError(
            f"Expected pixel values in [0, 1], got [{float(images.min()):.3f}, {float(images.max()):.3f}]."
        )


# --------------------------------------------------------------------------------------------------------------------
# Vision backbone
# --------------------------------------------------------------------------------------------------------------------


def _round_to_unit(length: int, unit: int) -> int:
    """The processor's ``ensure_divide``: nearest multiple of ``unit``, at least one unit."""
    return max(round(length / unit) * unit, unit)


class MiniCPMVVisionBackbone(nn.Module):
    """MiniCPM-V 4.6's vision tower as a frozen feature extractor: ``features(images) -> (grid, pooled)``.

    Input: float tensor ``(B, C, H, W)`` in [0, 1], C = 1 (replicated to RGB here) or 3, on any device. Output on the
    model's device, float32: ``grid`` ``(B, embedding_dim, h, w)`` with row ``i``, column ``j`` the token of the patch
    at that place, and ``pooled`` ``(B, pooled_dim)``.

    Args:
        vlm: the loaded model (:func:`load_minicpmv`).
        image_size: the resolution the tower sees. ``"native"``: the processor's slice resolution (448² for 4.6, the
            size its tower was trained on); ``"input"``: the caller's size rounded to the nearest valid multiple;
            an int (square) or ``(height, width)``: that size, which must be a multiple of :attr:`size_unit`.
        grid: ``"patch"`` runs the tower as in the model's 4x mode (no window merger; every layer at patch stride);
            ``"merged"`` as in its default 16x mode (2×2 window merger after layer ``insert_layer_id``).
        layer: ``None``: the tower's output after ``post_layernorm`` (what the model's merger consumes); an int:
            the raw output of that encoder layer (0-based, negative counts from the end), computed without running
            the deeper layers unless ``pooling="merger"`` needs them.
        pooling: ``"mean"``: mean of the grid tokens (``pooled_dim = embedding_dim``); ``"merger"``: mean of the
            LLM-space tokens made by the model's merger from the tower output (``pooled_dim`` = LLM width).
    """

    def __init__(
        self,
        vlm: MiniCPMV,
        *,
        image_size: int | tuple[int, int] | Literal["native", "input"] = "native",
        grid: Literal["patch", "merged"] = "patch",
        layer: int | None = None,
        pooling: Literal["mean", "merger"] = "mean",
    ) -> None:
        super().__init__()
        if grid not in ("patch", "merged"):
            raise ValueError(f"grid must be 'patch' or 'merged', got {grid!r}.")
        if pooling not in ("mean", "merger"):
            raise ValueError(f"pooling must be 'mean' or 'merger', got {pooling!r}.")
        self.vlm = vlm
        inner = vlm.model.model  # MiniCPMV4_6Model
        self.tower = inner.vision_tower
        self.merger = inner.merger
        vision_config = self.tower.config
        self.patch_size = int(vision_config.patch_size)
        self.num_layers = int(vision_config.num_hidden_layers)
        self.grid_mode = grid
        self.pooling = pooling
        self.layer = layer
        if layer is not None and not -self.num_layers <= layer < self.num_layers:
            raise ValueError(f"layer must be in [{-self.num_layers}, {self.num_layers - 1}] or None, got {layer}.")
        self._layer_index = self.num_layers - 1 if layer is None else layer % self.num_layers
        insert = int(vision_config.insert_layer_id)
        #: Encoder layer after which the 2×2 window merger runs (None: it does not run).
        self.merge_after: int | None = insert if grid == "merged" and 0 <= insert < self.num_layers else None
        # Run only as deep as needed; the merger pooling needs the tower's final output.
        self._last_layer = self.num_layers - 1 if (layer is None or pooling == "merger") else self._layer_index

        #: Pixels of the resized model input per grid cell.
        self.stride = self.patch_size * (
            2 if self.merge_after is not None and self._layer_index > self.merge_after else 1
        )
        #: Input sides must be multiples of this, as in the processor (2×2 merges must tile the patch grid).
        self.size_unit = self.patch_size * (4 if grid == "merged" else 2)
        self.embedding_dim = int(vision_config.hidden_size)
        self.pooled_dim = int(inner.config.text_config.hidden_size) if pooling == "merger" else self.embedding_dim
        self.name = f"{vlm.label}/{grid}/{'out' if layer is None else f'layer{self._layer_index}'}"

        image_processor = vlm.processor.image_processor
        if int(image_processor.patch_size) != self.patch_size:
            raise ValueError(
                f"Processor patch_size {image_processor.patch_size} differs from the vision tower's {self.patch_size}: "
                f"the checkpoint folder mixes files of different models."
            )
        self.image_size = self._resolve_image_size(image_size, int(image_processor.scale_resolution))
        self.register_buffer(
            "mean", torch.tensor(image_processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(image_processor.image_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.to(vlm.device)
        logger.info(
            "MiniCPM-V backbone %s: input %s, stride %d, grid dim %d, pooled dim %d",
            self.name,
            self.image_size or "caller's size",
            self.stride,
            self.embedding_dim,
            self.pooled_dim,
        )

    def _resolve_image_size(
        self, image_size: int | tuple[int, int] | str, scale_resolution: int
    ) -> tuple[int, int] | None:
        if image_size == "input":
            return None
        if image_size == "native":
            side = _round_to_unit(scale_resolution, self.size_unit)
            return side, side
        if isinstance(image_size, int):
            size = (image_size, image_size)
        elif isinstance(image_size, (tuple, list)) and len(image_size) == 2:
            size = (int(image_size[0]), int(image_size[1]))
        else:
            raise ValueError(f"image_size must be 'native', 'input', an int or (height, width), got {image_size!r}.")
        bad = [side for side in size if side <= 0 or side % self.size_unit]
        if bad:
            near = tuple(_round_to_unit(side, self.size_unit) for side in size)
            raise ValueError(
                f"image_size {size} must be positive multiples of {self.size_unit} (patch {self.patch_size} × the "
                f"2×2 merges of grid='{self.grid_mode}'); nearest valid: {near}."
            )
        return size

    def train(self, mode: bool = True) -> MiniCPMVVisionBackbone:
        """Stay in eval mode: the backbone is frozen."""
        return super().train(False)

    def model_input_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an input of this size is resized to before the tower."""
        if self.image_size is not None:
            return self.image_size
        return _round_to_unit(height, self.size_unit), _round_to_unit(width, self.size_unit)

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) of the grid :meth:`features` returns for inputs of this size (to align with a CNN map)."""
        model_h, model_w = self.model_input_size(height, width)
        return model_h // self.stride, model_w // self.stride

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Resize and normalise as the MiniCPM-V processor does: bicubic + antialias, then (x − mean) / std.

        The processor resizes uint8 PIL-like images; doing it here on float tensors keeps the whole batch on the GPU
        and avoids a round trip through PIL (the difference is below one grey level).
        """
        check_images(images)
        x = images.to(device=self.mean.device, dtype=torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        size = self.model_input_size(x.shape[-2], x.shape[-1])
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp_(0.0, 1.0)
        return (x - self.mean) / self.std

    def pack(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NaViT-pack normalised ``(B, 3, H, W)`` images like the processor: ``(1, 3, p, B·h·w·p)`` + target sizes.

        Patch ``(r, c)`` of image ``b`` becomes token ``b·h·w + r·w + c`` (row-major), which is what makes the grid
        reshape in :meth:`features` valid.
        """
        batch, channels, height, width = pixels.shape
        p = self.patch_size
        rows, cols = height // p, width // p
        patches = F.unfold(pixels, kernel_size=p, stride=p)  # (B, C·p·p, L), L row-major
        patches = patches.view(batch, channels, p, p, rows * cols).permute(1, 2, 0, 4, 3)  # (C, p, B, L, p)
        packed = patches.reshape(1, channels, p, batch * rows * cols * p)
        target_sizes = torch.tensor([[rows, cols]] * batch, dtype=torch.int32, device=pixels.device)
        return packed, target_sizes

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(grid (B, embedding_dim, h, w), pooled (B, pooled_dim))`` for one batch, float32 on the model device.

        The tower's forward is followed step by step (embeddings → layers → optional window merger → post-norm) so
        that it can stop at ``layer``; tests check it equals transformers' own ``vision_tower`` forward.
        Outputs are inference tensors: ``.clone()`` them before using them in autograd.
        """
        from transformers.utils.generic import get_max_seqlen

        pixels = self.prepare(images).to(self.tower.dtype)
        batch = pixels.shape[0]
        pixel_values, target_sizes = self.pack(pixels)
        rows, cols = int(target_sizes[0, 0]), int(target_sizes[0, 1])

        hidden = self.tower.embeddings(pixel_values, target_sizes=target_sizes)
        cu_seqlens = F.pad(torch.cumsum(target_sizes[:, 0] * target_sizes[:, 1], dim=0, dtype=torch.int32), (1, 0))
        max_seqlen = get_max_seqlen(cu_seqlens, self.tower.config)
        attn_kwargs: dict[str, Any] = {"attention_mask": None, "cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
        grid_tokens: torch.Tensor | None = None
        grid_hw = (rows, cols)
        for index, encoder_layer in enumerate(self.tower.encoder.layers[: self._last_layer + 1]):
            hidden = encoder_layer(hidden, **attn_kwargs)
            if self.layer is not None and index == self._layer_index:  # a layer's own output, before any merge
                grid_tokens, grid_hw = hidden, (rows, cols)
            if index == self.merge_after:
                hidden = self.tower.vit_merger(hidden, target_sizes)
                attn_kwargs, target_sizes, cu_seqlens = self.tower.get_downsampled_inputs(
                    target_sizes=target_sizes, max_seqlens=max_seqlen, device=hidden.device
                )
                rows, cols = rows // 2, cols // 2
        if self._last_layer == self.num_layers - 1:
            hidden = self.tower.post_layernorm(hidden)
        if self.layer is None:
            grid_tokens, grid_hw = hidden, (rows, cols)
        assert grid_tokens is not None  # set above: layer None → output, else the requested index ≤ _last_layer

        grid = grid_tokens.reshape(batch, grid_hw[0], grid_hw[1], -1).permute(0, 3, 1, 2).float().contiguous()
        if self.pooling == "merger":
            merged = self.merger(hidden, target_sizes)  # list of (tokens, llm_dim), one per image
            pooled = torch.stack([tokens.float().mean(dim=0) for tokens in merged])
        else:
            pooled = grid.mean(dim=(2, 3))
        return grid, pooled

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features(images)

    def iter_features(
        self, images: Iterable[torch.Tensor], batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Stream ``(grid, pooled)`` per batch, on CPU, for any number of single images ``(C, H, W)``."""
        for batch in iter_batches(images, batch_size):
            grid, pooled = self.features(batch)
            yield grid.cpu(), pooled.cpu()

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, image_size={self.image_size}, stride={self.stride}, "
            f"embedding_dim={self.embedding_dim}, pooled_dim={self.pooled_dim}"
        )


def build_minicpmv_backbone(
    model: str | os.PathLike[str] = DEFAULT_MODEL_ID,
    *,
    image_size: int | tuple[int, int] | Literal["native", "input"] = "native",
    grid: Literal["patch", "merged"] = "patch",
    layer: int | None = None,
    pooling: Literal["mean", "merger"] = "mean",
    dtype: DTypeName | torch.dtype = "auto",
    device: str | torch.device = "auto",
    local_files_only: bool = True,
    allow_random_weights: bool = False,
    param_name: str = "model",
) -> MiniCPMVVisionBackbone:
    """Load the model and wrap its vision tower in one call: the flat-config builder a backbone registry can call.

    Use :func:`load_minicpmv` plus :class:`MiniCPMVVisionBackbone` directly when the judge shares the same model.
    """
    vlm = load_minicpmv(
        model,
        dtype=dtype,
        device=device,
        local_files_only=local_files_only,
        allow_random_weights=allow_random_weights,
        param_name=param_name,
    )
    return MiniCPMVVisionBackbone(vlm, image_size=image_size, grid=grid, layer=layer, pooling=pooling)
