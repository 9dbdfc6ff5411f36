"""A tiny, RANDOMLY initialised BLIP and its processor, saved to a folder: a testing utility, never a default.

Built in-process from small configs (no download): a 1-layer 32-d vision tower on 32² inputs and a 2-layer 32-d text
decoder. The tokenizer is a ``tokenizers`` WordLevel model over the describer's vocabulary, digits and punctuation,
wrapped in ``PreTrainedTokenizerFast`` with BERT's special tokens plus BLIP's ``[DEC]`` as BOS — ``BlipProcessor`` in
transformers 5 accepts it, saves it and loads it back. Saving to a folder lets tests (unit tests and Kedro runs) go
through the real ``from_pretrained(..., local_files_only=True)`` path the pipeline uses. Its outputs mean nothing;
the folder says so (``TINY_RANDOM_MODEL.txt``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from madfh_pipeline.explain.describer import PUNCTUATION, VOCABULARY

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
TINY_SIZE = 32


def tiny_vocab() -> dict[str, int]:
    tokens = [*SPECIALS, *sorted(VOCABULARY), *"0123456789", *PUNCTUATION]
    return {token: i for i, token in enumerate(tokens)}


def make_tiny_processor() -> Any:  # BlipProcessor (import kept local: transformers is slow to import)
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BlipImageProcessor, BlipProcessor, PreTrainedTokenizerFast

    vocab = tiny_vocab()
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="[DEC]",
    )
    image_processor = BlipImageProcessor(size={"height": TINY_SIZE, "width": TINY_SIZE})
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def make_tiny_blip(seed: int = 0) -> Any:  # BlipForConditionalGeneration
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration

    vocab = tiny_vocab()
    config = BlipConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "encoder_hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 256,
            "bos_token_id": vocab["[DEC]"],
            "pad_token_id": vocab["[PAD]"],
            "sep_token_id": vocab["[SEP]"],
            "eos_token_id": vocab["[SEP]"],
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            # BLIP's default 0.02 gives word embeddings of norm ~0.1: with the LayerNorm'ed hidden states the frozen,
            # tied output head could not produce a logit above ~0.6, so no adapter could lower the loss much.
            "initializer_range": 0.3,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": TINY_SIZE,
            "patch_size": 8,
            "projection_dim": 32,
            # BLIP's vision default is 1e-10: every image would embed alike and the decoder could not tell them apart.
            "initializer_range": 0.3,
        },
        projection_dim=32,
        image_text_hidden_size=32,
    )
    torch.manual_seed(seed)
    return BlipForConditionalGeneration(config).eval()


def save_tiny_random_blip(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny random BLIP + processor to ``path`` (for tests); returns the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    make_tiny_blip(seed).save_pretrained(str(path))
    make_tiny_processor().save_pretrained(str(path))
    (path / "TINY_RANDOM_MODEL.txt").write_text(
        "A tiny randomly initialised BLIP for tests; its outputs mean nothing.\n"
    )
    return path
