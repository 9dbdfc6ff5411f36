"""MiniCPM-V 4.6 as a zero-shot defect judge: image score = P("yes") from the next-token logits (plain torch).

Why logits and not generated text: parsing ``generate()`` output gives a hard yes/no (no ranking, so no AUROC or
threshold calibration), depends on sampling settings and breaks on "Yes, there is…" vs "yes." variations. Reading
the distribution of the *first answer token* after the chat-templated prompt gives a continuous, deterministic score
in one forward pass, with no decoding loop.

How the score is computed:

1. The prompt (configurable) and the image go through the model's own chat template (``add_generation_prompt``,
   ``enable_thinking=False``: MiniCPM-V 4.6 then emits an empty ``<think></think>`` block, so the next token is the
   answer) and processor (slicing as configured), batched; the processor pads on the left, so the last position of
   every row is the place where the answer starts.
2. Only the last position's hidden state goes through the LM head (the full ``(B, T, 248k)`` logits tensor would
   cost ~0.35 GB per image in bfloat16).
3. Tokenisers split "yes" differently with and without a leading space and by case ("yes", " yes", "Yes", " Yes",
   "YES" … are different ids in Qwen's byte-level BPE). For each answer word every case/space variant that is a
   *single* token is collected (multi-token variants are skipped: their first piece, e.g. "Y", is not an answer);
   their probabilities are summed: ``P(yes) = Σ p(yes variants) / (Σ p(yes variants) + Σ p(no variants))``,
   computed stably as ``sigmoid(logsumexp(yes logits) − logsumexp(no logits))``.
4. ``answer_mass`` = the probability of any yes/no variant under the full vocabulary: when it is low the model was
   about to say something else and P(yes) is not trustworthy; it is returned and a low value is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from madfh_pipeline.models.vlm import MiniCPMV, check_images, iter_batches

logger = logging.getLogger(__name__)

DEFAULT_JUDGE_PROMPT = "Is there a defect or anomaly in this image? Answer yes or no."
#: Below this answer mass a warning is logged (the model was not answering yes/no).
DEFAULT_MIN_ANSWER_MASS = 0.5


@dataclass(frozen=True)
class JudgeOutput:
    """Per-image results of one batch, float32 on CPU."""

    p_yes: torch.Tensor  # (B,) P("yes") among the yes/no answers: the anomaly score
    answer_mass: torch.Tensor  # (B,) probability of any yes/no variant among all next tokens


def answer_token_ids(tokenizer: Any, words: Sequence[str]) -> dict[str, int]:
    """Single-token case/space variants of ``words`` → token id (e.g. {"yes": 9693, " yes": 9834, "Yes": …}).

    Variants tried per word: as given, lower, Capitalised, UPPER, each with and without a leading space.
    """
    variants: dict[str, int] = {}
    for word in words:
        for base in dict.fromkeys((word, word.lower(), word.capitalize(), word.upper())):
            for variant in (base, " " + base):
                ids = tokenizer.encode(variant, add_special_tokens=False)
                if len(ids) == 1:
                    variants[variant] = int(ids[0])
                else:
                    logger.debug("Answer variant %r is %d tokens; not used", variant, len(ids))
    return variants


class MiniCPMVJudge:
    """Ask MiniCPM-V whether each image shows a defect; ``score(images)`` is P("yes") per image, shape ``(B,)``.

    Args:
        vlm: the loaded model (:func:`~madfh_pipeline.models.vlm.load_minicpmv`), shared with the backbone.
        prompt: the question; it should ask for a yes/no answer.
        yes_words / no_words: the answer words whose variants are summed (see the module docstring).
        slice_mode / max_slice_nums / scale_resolution: the processor's slicing of large images (None: the
            processor's defaults, for 4.6 up to 9 slices of about 448², i.e. ~64 tokens each).
        enable_thinking: must stay False — with thinking on, the next token starts the reasoning, not the answer.
        min_answer_mass: log a warning when a batch's yes/no probability mass falls below it.
    """

    def __init__(
        self,
        vlm: MiniCPMV,
        *,
        prompt: str = DEFAULT_JUDGE_PROMPT,
        yes_words: Sequence[str] = ("yes",),
        no_words: Sequence[str] = ("no",),
        slice_mode: bool | None = None,
        max_slice_nums: int | None = None,
        scale_resolution: int | None = None,
        enable_thinking: bool = False,
        min_answer_mass: float = DEFAULT_MIN_ANSWER_MASS,
    ) -> None:
        if not prompt.strip():
            raise ValueError("The judge prompt is empty.")
        self.vlm = vlm
        self.prompt = prompt
        self.name = f"{vlm.label}-judge"
        self.min_answer_mass = float(min_answer_mass)
        processor = vlm.processor
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        self.chat_text: str = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, enable_thinking=enable_thinking
        )
        if self.chat_text.rstrip().endswith("<think>"):
            raise ValueError(
                "The chat template opened a <think> block, so the next token would start the model's reasoning, not "
                "its yes/no answer. Use enable_thinking=False and the non-thinking MiniCPM-V-4.6 (not -Thinking)."
            )
        self.yes_variants = answer_token_ids(processor.tokenizer, yes_words)
        self.no_variants = answer_token_ids(processor.tokenizer, no_words)
        for label, variants, words in (("yes", self.yes_variants, yes_words), ("no", self.no_variants, no_words)):
            if not variants:
                raise ValueError(f"None of the {label} words {list(words)} is a single token for this tokenizer.")
        shared = set(self.yes_variants.values()) & set(self.no_variants.values())
        if shared:
            raise ValueError(f"Token ids {sorted(shared)} count as both yes and no; check yes_words / no_words.")
        device = vlm.device
        self.yes_token_ids = torch.tensor(sorted(set(self.yes_variants.values())), dtype=torch.long, device=device)
        self.no_token_ids = torch.tensor(sorted(set(self.no_variants.values())), dtype=torch.long, device=device)
        self._image_kwargs: dict[str, Any] = {
            key: value
            for key, value in (
                ("slice_mode", slice_mode),
                ("max_slice_nums", max_slice_nums),
                ("scale_resolution", scale_resolution),
            )
            if value is not None
        }
        self._warned_low_mass = False
        logger.info(
            "MiniCPM-V judge: prompt %r, yes variants %s, no variants %s",
            prompt,
            sorted(self.yes_variants),
            sorted(self.no_variants),
        )

    def _inputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Processor inputs for a batch: uint8 RGB images (what the processor expects from decoded files)."""
        check_images(images)
        pixels = (images.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu()
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        batch = self.vlm.processor(
            images=list(pixels.unbind(0)),
            text=[self.chat_text] * pixels.shape[0],
            return_tensors="pt",
            **self._image_kwargs,
        )
        inputs = {key: value.to(self.vlm.device) for key, value in batch.items() if isinstance(value, torch.Tensor)}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.vlm.dtype)
        if not bool(inputs["attention_mask"][:, -1].all()):
            raise RuntimeError("The processor padded on the right; the last position would not be the answer slot.")
        return inputs

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> JudgeOutput:
        """P("yes") and the yes/no probability mass for a batch ``(B, C, H, W)`` in [0, 1], C = 1 or 3."""
        inputs = self._inputs(images)
        network = self.vlm.model
        hidden = network.model(**inputs, use_cache=False).last_hidden_state[:, -1]  # (B, hidden)
        log_probs = torch.log_softmax(network.lm_head(hidden).float(), dim=-1)  # (B, vocab)
        log_yes = torch.logsumexp(log_probs[:, self.yes_token_ids], dim=-1)
        log_no = torch.logsumexp(log_probs[:, self.no_token_ids], dim=-1)
        p_yes = torch.sigmoid(log_yes - log_no)
        answer_mass = torch.logaddexp(log_yes, log_no).exp()
        low = float(answer_mass.min())
        if low < self.min_answer_mass:
            log = logger.debug if self._warned_low_mass else logger.warning
            log(
                "MiniCPM-V judge: yes/no answers hold only %.3f of the next-token probability for some image; the "
                "model may not be answering the question (check the prompt).",
                low,
            )
            self._warned_low_mass = True
        return JudgeOutput(p_yes=p_yes.cpu(), answer_mass=answer_mass.cpu())

    def score(self, images: torch.Tensor) -> torch.Tensor:
        """P("yes") per image, shape ``(B,)``, float32 on CPU: the image anomaly score."""
        return self.predict(images).p_yes

    def score_all(self, images: Iterable[torch.Tensor], batch_size: int) -> torch.Tensor:
        """Scores ``(N,)`` for a stream of single images ``(C, H, W)``; memory bounded by ``batch_size``."""
        scores = [self.score(batch) for batch in iter_batches(images, batch_size)]
        return torch.cat(scores) if scores else torch.empty(0)
