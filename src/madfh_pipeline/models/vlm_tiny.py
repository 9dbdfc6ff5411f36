"""TESTING UTILITY: a tiny, RANDOMLY initialised MiniCPM-V 4.6 saved to a local folder. Never a default, never real.

Why it exists: the real weights (2.6 GB) cannot be downloaded on the CI/dev machines, yet the loader, the vision
backbone and the judge must run end to end through the *normal* path — a local folder read by
``MiniCPMV4_6ForConditionalGeneration.from_pretrained`` / ``AutoProcessor.from_pretrained`` with
``local_files_only=True``. :func:`save_tiny_random_minicpmv` writes such a folder in about a second: the same
architecture classes (SigLIP-like tower with the window merger, merger, Qwen3.5 text model with full and linear
attention layers), a byte-level BPE tokenizer trained in-process on a few sentences (so "yes", " yes", "Yes" … are
distinct single tokens, as in real tokenizers), the special tokens of the real processor and a Qwen-style chat
template with the same empty ``<think>`` block the 4.6 template emits when thinking is off.

It is obviously random: its ``config.json`` carries ``"madfh_tiny_random": true`` (so
:func:`~madfh_pipeline.models.vlm.load_minicpmv` refuses it unless ``allow_random_weights=True``, and names it
"tiny-random" in logs and backbone names) and the folder holds a ``TINY_RANDOM_MODEL.txt`` saying so. Its features
and answers are meaningless; tests prove plumbing, shapes and layout, never quality.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from madfh_pipeline.models.vlm import TINY_RANDOM_CONFIG_FLAG

logger = logging.getLogger(__name__)

#: Geometry of the tiny model: patch 4 px, native (slice) resolution 32² → an 8×8 patch grid, 4×4 after the merger.
TINY_PATCH_SIZE = 4
TINY_SCALE_RESOLUTION = 32
TINY_VISION_LAYERS = 3
TINY_INSERT_LAYER_ID = 1
TINY_VISION_WIDTH = 32
TINY_TEXT_WIDTH = 24

#: The special tokens of the real MiniCPM-V 4.6 tokenizer that the processor and chat template use.
_SPECIAL_TOKENS: dict[str, str] = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "image_start_token": "<image>",
    "image_end_token": "</image>",
    "slice_start_token": "<slice>",
    "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>",
    "image_id_end_token": "</image_id>",
}
_CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
#: Words that must become single tokens, with and without a leading space, so the judge's variant logic is exercised.
_SINGLE_TOKEN_WORDS = ("yes", "no", "Yes", "No")

#: Qwen-style template: images become the image token (the processor expands it), thinking off → empty think block.
_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' %}{{- '<|image_pad|>' }}"
    "{%- elif item['type'] == 'text' %}{{- item['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking %}{{- '<think>\\n' }}"
    "{%- else %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
_CORPUS = (
    "yes no Yes No yes. no. Yes. No. yes, no, Yes, No,",
    "Is there a defect or anomaly in this image? Answer yes or no.",
    "Does this part look normal? Answer with yes or no only.",
    "user assistant system",
)


def _build_tokenizer() -> object:
    """A byte-level BPE tokenizer (any text encodes) trained on a few sentences, with the real special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import TokenizersBackend

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[*_CONTROL_TOKENS, *_SPECIAL_TOKENS.values()],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(_CORPUS) * 8, trainer=trainer)
    tokenizer = TokenizersBackend(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=dict(_SPECIAL_TOKENS),
    )
    for word in _SINGLE_TOKEN_WORDS:
        for variant in (word, " " + word):
            if len(tokenizer.encode(variant, add_special_tokens=False)) != 1:
                raise RuntimeError(f"Tiny tokenizer: {variant!r} is not a single token; change the training corpus.")
    return tokenizer


def save_tiny_random_minicpmv(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a tiny RANDOM MiniCPM-V 4.6 (model + processor + tokenizer) to ``path``; returns the folder.

    FOR TESTS ONLY (a few hundred thousand random parameters). Load it with
    ``load_minicpmv(path, allow_random_weights=True)``; without that flag the loader refuses it.
    """
    from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration, MiniCPMV4_6Processor
    from transformers.models.minicpmv4_6.image_processing_minicpmv4_6 import MiniCPMV4_6ImageProcessor
    from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    processor = MiniCPMV4_6Processor(
        image_processor=MiniCPMV4_6ImageProcessor(
            patch_size=TINY_PATCH_SIZE, scale_resolution=TINY_SCALE_RESOLUTION, max_slice_nums=4
        ),
        video_processor=MiniCPMV4_6VideoProcessor(
            patch_size=TINY_PATCH_SIZE, scale_resolution=TINY_SCALE_RESOLUTION, max_slice_nums=1
        ),
        tokenizer=tokenizer,
        chat_template=_CHAT_TEMPLATE,
    )
    config = MiniCPMV4_6Config(
        text_config={
            "model_type": "qwen3_5_text",
            "vocab_size": len(tokenizer),
            "hidden_size": TINY_TEXT_WIDTH,
            "head_dim": 16,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "layer_types": ["full_attention", "linear_attention"],
            "linear_conv_kernel_dim": 2,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 2,
            "max_position_embeddings": 2048,
            # 10× the usual init std (also used for the vision tower): with 0.02 the random model answers almost
            # the same P(yes) for every image and prompt, which would make the tests' "it changes" checks weak.
            "initializer_range": 0.2,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": TINY_VISION_WIDTH,
            "intermediate_size": 64,
            "num_hidden_layers": TINY_VISION_LAYERS,
            "num_attention_heads": 2,
            "image_size": TINY_SCALE_RESOLUTION,  # 8×8 position table, like the real 70×70 one it is bucketised into
            "patch_size": TINY_PATCH_SIZE,
        },
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
        image_size=TINY_SCALE_RESOLUTION,
        insert_layer_id=TINY_INSERT_LAYER_ID,
        **{TINY_RANDOM_CONFIG_FLAG: True},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MiniCPMV4_6ForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "TINY_RANDOM_MODEL.txt").write_text(
        "This folder holds a tiny, RANDOMLY initialised MiniCPM-V 4.6 built by "
        "madfh_pipeline.models.vlm_tiny.save_tiny_random_minicpmv for tests. It is not MiniCPM-V: its features and "
        "answers are meaningless.\n",
        encoding="utf-8",
    )
    logger.info("Saved a tiny RANDOM MiniCPM-V test model to %s", folder)
    return folder
