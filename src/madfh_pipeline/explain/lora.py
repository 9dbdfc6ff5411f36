"""LoRA fine-tuning of a vision-to-text model (BLIP by default) on grounded defect descriptions.

The prototype's explainer "trained" by skipping every batch and reported success. This module is built so that
cannot happen again:

- every batch of every epoch is a real optimiser step; a non-finite loss or gradient stops training at once with
  :class:`NonFiniteLossError` (step, value and image ids in the message);
- after training, the mean loss of the last ``loss_window`` steps must lie at least ``min_relative_drop`` below the
  mean of the first ``loss_window`` steps, otherwise :class:`LossNotDecreasingError` — a run too short to judge is
  refused before it starts;
- only LoRA parameters may train: :func:`assert_only_lora_trainable` counts them and fails on any other parameter
  that requires a gradient;
- a missing base model is one :class:`MissingBaseModelError` naming the id/path, the parameter to set and the
  ``hf download`` command that fetches it — never a random-weights stand-in.

The model and processor classes are parameters (dotted names), so another ``from_pretrained`` vision-to-text model
whose forward takes ``pixel_values``, ``input_ids``, ``attention_mask`` and ``labels`` and returns ``.loss`` can
replace BLIP; set ``target_modules`` for it. Adapters are saved with PEFT's ``save_pretrained`` (safetensors) next to
the processor and a JSON spec; nothing pickled is ever loaded. Plain torch/transformers/peft: no Kedro.

BLIP details that matter: its text decoder starts generation from ``bos_token_id`` (``[DEC]``) while its tokenizer
starts every text with ``[CLS]``; training must replace that first token with ``[DEC]`` as the original BLIP code does
(``decoder_start="blip"``), or the model is trained on a prefix it never sees when generating.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from madfh_pipeline.explain.dataset import TrainingPair
from madfh_pipeline.explain.describer import canonical_text

logger = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "Salesforce/blip-image-captioning-base"
DEFAULT_MODEL_CLASS = "transformers.BlipForConditionalGeneration"
DEFAULT_PROCESSOR_CLASS = "transformers.BlipProcessor"
#: The text decoder's attention projections in transformers' BLIP (``BlipTextSelfAttention``): query/key/value of the
#: causal self-attention and of the cross-attention to the image tokens — the cross-attention is where the image
#: enters the text. A regex (PEFT full-matches it against module names), so the vision tower's ``qkv`` and the
#: decoder's feed-forward ``dense`` layers are never touched.
DEFAULT_TARGET_MODULES = r"text_decoder\.bert\.encoder\.layer\.\d+\.(attention|crossattention)\.self\.(query|key|value)"
#: The parameter a missing-model error asks the user to set.
BASE_MODEL_PARAMETER = "base_model"
SPEC_FILE = "explainer.json"
PROCESSOR_DIR = "processor"
SPEC_VERSION = 1

StepCallback = Callable[[int, float], None]
_S = TypeVar("_S")


# --------------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------------


class MissingBaseModelError(FileNotFoundError):
    """The base model (or its processor) is not available offline; the message says how to provide it."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; training stops at that step."""

    def __init__(self, message: str, step: int, value: float) -> None:
        super().__init__(message)
        self.step = step
        self.value = value


class LossNotDecreasingError(RuntimeError):
    """The loss did not fall over the configured window: the adapters learnt nothing worth saving."""

    def __init__(self, message: str, losses: Sequence[float], first_mean: float, last_mean: float) -> None:
        super().__init__(message)
        self.losses = list(losses)
        self.first_mean = first_mean
        self.last_mean = last_mean


class TrainableParameterError(RuntimeError):
    """A parameter other than a LoRA adapter would train, or no LoRA parameter would."""


# --------------------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------------------


def _from_mapping(cls: type[_S], params: Mapping[str, Any] | _S | None, what: str) -> _S:
    """Build a settings dataclass from a parameters dict, rejecting unknown keys (a typo must not be ignored)."""
    if isinstance(params, cls):
        return params
    params = dict(params or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"Unknown {what} setting(s) {unknown}; known: {sorted(known)}.")
    return cls(**params)


@dataclass(frozen=True)
class LoraSettings:
    """PEFT LoRA hyper-parameters. ``target_modules``: a regex (full match on module names) or a list of name
    suffixes. The prototype used r 4–16 and alpha 8–32."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = DEFAULT_TARGET_MODULES

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.r < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Invalid LoRA settings r={self.r}, alpha={self.alpha}, dropout={self.dropout}.")

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any] | LoraSettings | None) -> LoraSettings:
        return _from_mapping(cls, params, "LoRA")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if isinstance(self.target_modules, tuple):
            data["target_modules"] = list(self.target_modules)
        return data


@dataclass(frozen=True)
class TrainSettings:
    """Training loop settings.

    ``device``: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:1"``... ``loss_window`` and
    ``min_relative_drop``: the loss check (see :func:`check_loss_trend`); training needs at least ``2 ×
    loss_window`` steps. ``max_text_tokens``: a longer target is an error naming the image, not a silent truncation.
    ``max_grad_norm``: gradient clipping (0 = none; the norm is still checked for being finite).
    """

    epochs: int = 3
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "auto"
    loss_window: int = 10
    min_relative_drop: float = 0.05
    max_text_tokens: int = 192
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.loss_window < 1 or self.max_text_tokens < 2:
            raise ValueError("epochs, batch_size and loss_window must be >= 1, max_text_tokens >= 2.")
        if self.lr < 0 or not 0.0 <= self.min_relative_drop < 1.0:
            raise ValueError(
                f"lr must be >= 0 and min_relative_drop in [0, 1); got {self.lr}, {self.min_relative_drop}."
            )

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any] | TrainSettings | None) -> TrainSettings:
        return _from_mapping(cls, params, "training")


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding: greedy when ``num_beams == 1``, beam search otherwise; never sampling (explanations must be
    reproducible)."""

    max_new_tokens: int = 160
    num_beams: int = 1
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.num_beams < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens, num_beams and batch_size must be >= 1.")

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any] | GenerationSettings | None) -> GenerationSettings:
        return _from_mapping(cls, params, "generation")


@dataclass
class TrainingReport:
    """What a training run did: one loss per optimiser step (all batches, all epochs) and the loss check's means."""

    steps: int
    epochs: int
    losses: list[float]
    first_window_mean: float
    last_window_mean: float
    trainable_params: int
    total_params: int
    device: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExplainerSpec:
    """Everything besides tensors needed to rebuild a saved explainer; written as ``explainer.json``."""

    base_model: str
    model_class: str = DEFAULT_MODEL_CLASS
    processor_class: str = DEFAULT_PROCESSOR_CLASS
    decoder_start: str = "none"
    lora: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    version: int = SPEC_VERSION


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def resolve_class(name: str) -> type:
    """``"transformers.BlipProcessor"`` or ``"package.module.Class"`` → the class; a bare name is looked up in
    transformers."""
    module_name, _, attr = name.rpartition(".")
    module_name = module_name or "transformers"
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"Cannot import class '{name}' (module '{module_name}', attribute '{attr}').") from exc
    if not isinstance(cls, type):
        raise ValueError(f"'{name}' is not a class.")
    return cls


def resolve_device(device: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _looks_like_path(source: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else (absolute, relative with ./, deeper) is a folder."""
    return source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1 or Path(source).exists()


def _missing_model_message(source: str, what: str, local_files_only: bool, cause: BaseException) -> str:
    """One message: what is missing, why, which parameter to set and the command that fetches the model."""
    if _looks_like_path(source) and not Path(source).expanduser().exists():
        problem = f"Explainer base model folder '{source}' does not exist"
        repo = DEFAULT_BASE_MODEL
    else:
        reason = str(cause).splitlines()[0].rstrip(".") if str(cause) else type(cause).__name__
        offline = " from local files only (local_files_only: true)" if local_files_only else ""
        problem = f"Explainer base model '{source}' ({what}) could not be loaded{offline}: {reason}"
        repo = DEFAULT_BASE_MODEL if _looks_like_path(source) else source
    folder = f"data/06_models/{repo.rsplit('/', 1)[-1]}"
    return (
        f"{problem}. Set the explainer parameter '{BASE_MODEL_PARAMETER}' to a local copy: on a machine with "
        f"internet run `hf download {repo} --local-dir {folder}`, copy the folder here and set "
        f"{BASE_MODEL_PARAMETER}: {folder} (or keep the id with the model in the Hugging Face cache)."
    )


def _from_pretrained(cls: type, source: str | Path, what: str, local_files_only: bool, **kwargs: Any) -> Any:
    from huggingface_hub.errors import HFValidationError

    try:
        return cls.from_pretrained(str(source), local_files_only=local_files_only, **kwargs)
    # transformers reports missing or unreachable files as OSError subclasses; a folder that does not exist is
    # taken for a hub id and fails huggingface_hub's id validation instead.
    except (OSError, HFValidationError) as exc:
        raise MissingBaseModelError(_missing_model_message(str(source), what, local_files_only, exc)) from exc


def load_processor(
    source: str | Path, processor_class: str = DEFAULT_PROCESSOR_CLASS, local_files_only: bool = True
) -> Any:
    """The processor (image preprocessing + tokenizer) of a model id or folder."""
    return _from_pretrained(resolve_class(processor_class), source, f"processor {processor_class}", local_files_only)


def load_base_model(
    base_model: str | Path = DEFAULT_BASE_MODEL,
    model_class: str = DEFAULT_MODEL_CLASS,
    local_files_only: bool = True,
) -> nn.Module:
    """The pretrained vision-to-text model, frozen (no parameter requires a gradient) and in eval mode.

    No code runs from the checkpoint: transformers 5 reads ``model.safetensors``, or a ``pytorch_model.bin`` with
    ``torch.load(weights_only=True)`` (the hub's BLIP base may ship only the latter, so safetensors is not forced).
    """
    model = _from_pretrained(resolve_class(model_class), base_model, f"model {model_class}", local_files_only)
    model.requires_grad_(False)
    return model.eval()


def resolve_decoder_start(model: nn.Module, processor: Any, decoder_start: str = "auto") -> int | None:
    """The token that must replace the tokenizer's first token in training inputs, or ``None``.

    ``"auto"``: ``BlipForConditionalGeneration`` starts from ``config.text_config.bos_token_id``; others keep the
    tokenizer's ids. ``"blip"`` / ``"none"`` force either.
    """
    if decoder_start == "auto":
        # Exactly BLIP's captioner: BLIP-2 and other "Blip..." classes decode with other language models.
        decoder_start = "blip" if type(_base(model)).__name__ == "BlipForConditionalGeneration" else "none"
    if decoder_start == "none":
        return None
    if decoder_start != "blip":
        raise ValueError(f"decoder_start must be 'auto', 'blip' or 'none'; got '{decoder_start}'.")
    text_config = getattr(_base(model).config, "text_config", None)
    bos = getattr(text_config, "bos_token_id", None)
    if bos is None or getattr(processor.tokenizer, "cls_token_id", None) is None:
        raise ValueError("decoder_start='blip' needs config.text_config.bos_token_id and a tokenizer with a CLS token.")
    return int(bos)


def _base(model: nn.Module) -> nn.Module:
    """The wrapped transformers model of a PEFT model (LoRA layers are injected into it in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


# --------------------------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------------------------


def assert_only_lora_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; raises :class:`TrainableParameterError` when any parameter that requires a
    gradient is not a LoRA adapter, or when none does."""
    total = trainable = 0
    offenders: list[str] = []
    for name, param in model.named_parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
            if "lora_" not in name:
                offenders.append(name)
    if offenders:
        raise TrainableParameterError(
            f"{len(offenders)} non-LoRA parameter(s) require gradients, e.g. {offenders[:5]}; only LoRA adapters may "
            "train (the base model must stay frozen)."
        )
    if trainable == 0:
        raise TrainableParameterError("No LoRA parameter requires a gradient: training would change nothing.")
    return trainable, total


def add_lora(model: nn.Module, settings: LoraSettings | Mapping[str, Any] | None = None, seed: int = 0) -> nn.Module:
    """Wrap a frozen base model with fresh LoRA adapters (a ``peft.PeftModel``); only the adapters train.

    PEFT raises when ``target_modules`` matches no module, so a wrong name cannot give an adapter-less "fine-tune".
    ``seed`` fixes the adapters' random initialisation (it seeds torch's global generator).
    """
    from peft import LoraConfig, get_peft_model

    settings = LoraSettings.from_mapping(settings)
    target = settings.target_modules if isinstance(settings.target_modules, str) else list(settings.target_modules)
    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=target, bias="none"
    )
    model.requires_grad_(False)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    trainable, total = assert_only_lora_trainable(peft_model)
    logger.info("LoRA adapters: %d trainable of %d parameters (%.3f %%)", trainable, total, 100 * trainable / total)
    return peft_model


def lora_module_names(model: nn.Module) -> list[str]:
    """Names of the modules that carry LoRA adapters (for logging and tests)."""
    return sorted(name for name, module in model.named_modules() if hasattr(module, "lora_A") and module.lora_A)


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


def check_loss_trend(losses: Sequence[float], window: int, min_relative_drop: float) -> tuple[float, float]:
    """(first_mean, last_mean) of the first and last ``window`` losses; raises :class:`LossNotDecreasingError` unless
    ``last_mean <= first_mean * (1 - min_relative_drop)`` (a relative margin: cross-entropy's scale depends on the
    vocabulary, a relative drop does not)."""
    if window < 1 or len(losses) < 2 * window:
        raise ValueError(f"The loss check needs at least 2 × {window} losses, got {len(losses)}.")
    first_mean = float(np.mean(losses[:window]))
    last_mean = float(np.mean(losses[-window:]))
    if not last_mean <= first_mean * (1.0 - min_relative_drop):
        raise LossNotDecreasingError(
            f"Training loss did not fall: mean of the last {window} steps {last_mean:.4f} is not at least "
            f"{100 * min_relative_drop:.1f} % below the mean of the first {window} steps {first_mean:.4f}. Check the "
            "learning rate, the data (do texts and images belong together?) and the target modules.",
            losses,
            first_mean,
            last_mean,
        )
    return first_mean, last_mean


def processor_input_size(processor: Any) -> tuple[int, int]:
    """(height, width) the image processor resizes to; the composite inputs are built at this size."""
    size = getattr(getattr(processor, "image_processor", None), "size", None)
    size = dict(size) if size is not None and not isinstance(size, int) else size
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict) and "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    if isinstance(size, dict) and "shortest_edge" in size:
        return int(size["shortest_edge"]), int(size["shortest_edge"])
    raise ValueError(f"Cannot read the input size from the image processor (size={size!r}); pass the size explicitly.")


def batch_inputs(
    processor: Any,
    pairs: Sequence[TrainingPair],
    *,
    max_text_tokens: int = 512,
    decoder_start_id: int | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Processor outputs plus ``labels`` (padding = -100) for a batch of pairs.

    With ``decoder_start_id`` (BLIP: ``[DEC]``, see :func:`resolve_decoder_start`) the tokenizer's first token (``[CLS]``)
    is replaced by it, so the model is trained on the prefix its ``generate`` starts from.
    """
    encoded = processor(
        images=[pair.image for pair in pairs],
        text=[pair.text for pair in pairs],
        padding="longest",
        return_tensors="pt",
    )
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    lengths = attention_mask.sum(dim=1)
    too_long = [(pair.image_id, int(n)) for pair, n in zip(pairs, lengths, strict=True) if n > max_text_tokens]
    if too_long:
        raise ValueError(
            f"{len(too_long)} target text(s) exceed max_text_tokens={max_text_tokens}, e.g. {too_long[:3]} "
            "(image id, tokens); raise max_text_tokens or shorten the descriptions (describer max_regions)."
        )
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    if decoder_start_id is not None:
        cls_id = processor.tokenizer.cls_token_id
        if not bool((input_ids[:, 0] == cls_id).all()):
            raise ValueError("decoder_start='blip' expects every tokenised text to start with the CLS token.")
        input_ids = input_ids.clone()
        input_ids[:, 0] = decoder_start_id
    return {
        "pixel_values": encoded["pixel_values"].to(device),
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "labels": labels.to(device),
    }


def train_lora(
    model: nn.Module,
    processor: Any,
    pairs: Sequence[TrainingPair],
    settings: TrainSettings | Mapping[str, Any] | None = None,
    on_step: StepCallback | None = None,
    decoder_start: str = "auto",
) -> TrainingReport:
    """Fine-tune the LoRA adapters of ``model`` (from :func:`add_lora`) on ``pairs``; returns the per-step losses.

    ``on_step(step, loss)`` is called after every optimiser step (1-based), e.g. to log to MLflow. Raises
    :class:`NonFiniteLossError` at the first NaN/inf loss or gradient, :class:`LossNotDecreasingError` when the loss
    check fails, :class:`TrainableParameterError` when anything but LoRA would train. The model is left in eval mode.
    """
    settings = TrainSettings.from_mapping(settings)
    if not pairs:
        raise ValueError("No training pairs: the explainer cannot be fine-tuned on nothing.")
    trainable, total = assert_only_lora_trainable(model)
    steps_per_epoch = math.ceil(len(pairs) / settings.batch_size)
    planned = settings.epochs * steps_per_epoch
    if planned < 2 * settings.loss_window:
        raise ValueError(
            f"{planned} steps ({len(pairs)} pairs, batch_size {settings.batch_size}, {settings.epochs} epochs) are "
            f"fewer than 2 × loss_window ({settings.loss_window}): the loss check could not judge the run. Train "
            "longer or lower loss_window."
        )
    device = resolve_device(settings.device)
    start_id = resolve_decoder_start(model, processor, decoder_start)
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    torch.manual_seed(settings.seed)
    order_rng = torch.Generator().manual_seed(settings.seed)
    losses: list[float] = []
    started = time.perf_counter()
    logger.info(
        "Training LoRA explainer on %s: %d pairs, %d epochs x %d steps, lr %s", device, len(pairs), settings.epochs,
        steps_per_epoch, settings.lr,
    )  # fmt: skip
    for epoch in range(settings.epochs):
        order = torch.randperm(len(pairs), generator=order_rng).tolist()
        for first in range(0, len(order), settings.batch_size):
            batch = [pairs[i] for i in order[first : first + settings.batch_size]]
            step = len(losses) + 1
            inputs = batch_inputs(
                processor, batch, max_text_tokens=settings.max_text_tokens, decoder_start_id=start_id, device=device
            )
            loss = model(**inputs).loss
            if loss is None:
                raise RuntimeError(f"{type(_base(model)).__name__} returned no loss although labels were given.")
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"Non-finite training loss {value} at step {step} (epoch {epoch + 1}); images "
                    f"{[p.image_id for p in batch]}. Training stopped; nothing was saved.",
                    step,
                    value,
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = settings.max_grad_norm if settings.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(
                    f"Non-finite gradient norm {grad_norm} at step {step} (loss {value:.4f}); images "
                    f"{[p.image_id for p in batch]}. Training stopped; nothing was saved.",
                    step,
                    grad_norm,
                )
            optimizer.step()
            losses.append(value)
            if on_step is not None:
                on_step(step, value)
            if step % settings.log_every == 0 or step == planned:
                logger.info("LoRA step %d/%d: loss %.4f (grad norm %.3f)", step, planned, value, grad_norm)
    model.eval()
    if len(losses) != planned:  # the guarantee the prototype lacked, stated as code
        raise RuntimeError(f"Only {len(losses)} of {planned} planned steps ran.")
    first_mean, last_mean = check_loss_trend(losses, settings.loss_window, settings.min_relative_drop)
    seconds = time.perf_counter() - started
    logger.info("LoRA training done in %.1f s: loss %.4f -> %.4f (window means)", seconds, first_mean, last_mean)
    return TrainingReport(
        steps=len(losses),
        epochs=settings.epochs,
        losses=losses,
        first_window_mean=first_mean,
        last_window_mean=last_mean,
        trainable_params=trainable,
        total_params=total,
        device=str(device),
        seconds=seconds,
    )


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    processor: Any,
    pairs: Sequence[TrainingPair],
    batch_size: int = 8,
    decoder_start: str = "auto",
    max_text_tokens: int = 512,
) -> float:
    """Mean teacher-forced loss over ``pairs`` (batch means weighted by batch size), in eval mode, no gradients."""
    if not pairs:
        raise ValueError("evaluate_loss needs at least one pair.")
    device = next(model.parameters()).device
    start_id = resolve_decoder_start(model, processor, decoder_start)
    was_training = model.training
    model.eval()
    total = 0.0
    for first in range(0, len(pairs), batch_size):
        batch = pairs[first : first + batch_size]
        inputs = batch_inputs(
            processor, batch, max_text_tokens=max_text_tokens, decoder_start_id=start_id, device=device
        )
        loss = model(**inputs).loss
        total += float(loss) * len(batch)
    model.train(was_training)
    return total / len(pairs)


@torch.no_grad()
def generate_descriptions(
    model: nn.Module,
    processor: Any,
    images: Sequence[np.ndarray],
    settings: GenerationSettings | Mapping[str, Any] | None = None,
) -> list[str]:
    """Greedy or beam-search descriptions for model-input images (the composites of
    :func:`~madfh_pipeline.explain.dataset.compose_input`), tidied with
    :func:`~madfh_pipeline.explain.describer.canonical_text` (lower case, word-piece spacing undone)."""
    settings = GenerationSettings.from_mapping(settings)
    base = _base(model)  # LoRA layers live inside it; its own generate() knows BLIP's [DEC] start
    device = next(base.parameters()).device
    was_training = base.training
    base.eval()
    texts: list[str] = []
    for first in range(0, len(images), settings.batch_size):
        chunk = list(images[first : first + settings.batch_size])
        pixel_values = processor(images=chunk, return_tensors="pt")["pixel_values"].to(device)
        ids = base.generate(
            pixel_values=pixel_values,
            max_new_tokens=settings.max_new_tokens,
            num_beams=settings.num_beams,
            do_sample=False,
        )
        texts.extend(canonical_text(t) for t in processor.batch_decode(ids, skip_special_tokens=True))
    base.train(was_training)
    return texts


# --------------------------------------------------------------------------------------------------------------------
# The explainer object the pipeline nodes use
# --------------------------------------------------------------------------------------------------------------------


class LoraExplainer:
    """A base vision-to-text model with LoRA adapters, its processor and the spec to rebuild it.

    Build with :meth:`from_base` (fresh adapters) or :meth:`load` (saved adapters); then :meth:`fit`, :meth:`explain`,
    :meth:`save`.
    """

    def __init__(self, model: nn.Module, processor: Any, spec: ExplainerSpec) -> None:
        self.model = model
        self.processor = processor
        self.spec = spec

    @classmethod
    def from_base(
        cls,
        base_model: str | Path = DEFAULT_BASE_MODEL,
        *,
        model_class: str = DEFAULT_MODEL_CLASS,
        processor_class: str = DEFAULT_PROCESSOR_CLASS,
        local_files_only: bool = True,
        lora: LoraSettings | Mapping[str, Any] | None = None,
        decoder_start: str = "auto",
        seed: int = 0,
        device: str = "auto",
    ) -> LoraExplainer:
        """Load the base model and processor (offline by default), add fresh LoRA adapters, move to ``device``."""
        lora_settings = LoraSettings.from_mapping(lora)
        processor = load_processor(base_model, processor_class, local_files_only)
        model = add_lora(load_base_model(base_model, model_class, local_files_only), lora_settings, seed=seed)
        model.to(resolve_device(device))
        spec = ExplainerSpec(
            base_model=str(base_model),
            model_class=model_class,
            processor_class=processor_class,
            decoder_start=decoder_start,
            lora=lora_settings.to_dict(),
        )
        return cls(model, processor, spec)

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the model's input images: build composites at this size."""
        return processor_input_size(self.processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fit(
        self,
        pairs: Sequence[TrainingPair],
        settings: TrainSettings | Mapping[str, Any] | None = None,
        on_step: StepCallback | None = None,
    ) -> TrainingReport:
        """Train the adapters (see :func:`train_lora`); the report is also kept in the spec's metadata."""
        report = train_lora(self.model, self.processor, pairs, settings, on_step, self.spec.decoder_start)
        summary = report.to_dict()
        summary.pop("losses")
        self.spec.metadata["training"] = summary
        return report

    def loss(self, pairs: Sequence[TrainingPair], batch_size: int = 8) -> float:
        """Mean teacher-forced loss on ``pairs`` (e.g. the held-out split), without training."""
        return evaluate_loss(self.model, self.processor, pairs, batch_size, self.spec.decoder_start)

    def explain(
        self, images: Sequence[np.ndarray], generation: GenerationSettings | Mapping[str, Any] | None = None
    ) -> list[str]:
        """One description per composite model input (see :func:`generate_descriptions`)."""
        return generate_descriptions(self.model, self.processor, images, generation)

    def save(self, directory: str | Path) -> Path:
        """Write adapters (``adapter_model.safetensors`` + ``adapter_config.json``), the processor and
        ``explainer.json``; the base model's weights are not copied (the spec names them)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(directory), safe_serialization=True)
        if not (directory / "adapter_model.safetensors").is_file():
            raise RuntimeError(f"PEFT did not write adapter_model.safetensors into '{directory}'.")
        self.processor.save_pretrained(str(directory / PROCESSOR_DIR))
        (directory / SPEC_FILE).write_text(json.dumps(asdict(self.spec), indent=2, sort_keys=True))
        logger.info("Saved LoRA explainer adapters to %s (base model %s)", directory, self.spec.base_model)
        return directory

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        base_model: str | Path | None = None,
        local_files_only: bool = True,
        device: str = "auto",
    ) -> LoraExplainer:
        """Rebuild a saved explainer: base model (``base_model`` overrides the saved id/path, e.g. another station's
        copy) + saved adapters (safetensors only) + saved processor; frozen, in eval mode, on ``device``."""
        from peft import PeftModel

        directory = Path(directory)
        spec_path = directory / SPEC_FILE
        if not spec_path.is_file():
            raise FileNotFoundError(f"'{spec_path}' not found: '{directory}' is not a saved LoRA explainer.")
        spec = ExplainerSpec(**json.loads(spec_path.read_text()))
        if spec.version != SPEC_VERSION:
            raise ValueError(f"Explainer spec version {spec.version} in '{spec_path}' is not {SPEC_VERSION}.")
        if not (directory / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(f"'{directory / 'adapter_model.safetensors'}' is missing (only safetensors load).")
        if base_model is not None:
            spec.base_model = str(base_model)
        base = load_base_model(spec.base_model, spec.model_class, local_files_only)
        model = PeftModel.from_pretrained(base, str(directory), is_trainable=False)
        model.requires_grad_(False)
        model.to(resolve_device(device)).eval()
        processor = _from_pretrained(
            resolve_class(spec.processor_class), directory / PROCESSOR_DIR, "saved processor", True
        )
        return cls(model, processor, spec)


def check_base_model_available(base_model: str | Path, local_files_only: bool = True) -> None:
    """Raise :class:`MissingBaseModelError` at once when the base model's config cannot be found (no weights read).

    Lets a pipeline stop before hours of other work, with the same message loading would give.
    """
    from huggingface_hub.errors import HFValidationError
    from transformers import PretrainedConfig

    try:
        PretrainedConfig.get_config_dict(str(base_model), local_files_only=local_files_only)
    except (OSError, HFValidationError) as exc:
        message = _missing_model_message(str(base_model), "config", local_files_only, exc)
        raise MissingBaseModelError(message) from None
