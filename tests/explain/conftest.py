"""A tiny, randomly initialised BLIP with a word-level tokenizer over the describer's vocabulary, saved to disk.

Built in-process from small configs (no download): a 1-layer 32-d vision tower on 32² inputs and a 2-layer 32-d text
decoder. The tokenizer is a ``tokenizers`` WordLevel model over :data:`VOCABULARY`, digits and punctuation, wrapped
in ``PreTrainedTokenizerFast`` with BERT's special tokens plus BLIP's ``[DEC]`` as BOS — ``BlipProcessor`` in
transformers 5 accepts it, saves it and loads it back. Saving the model and processor to a folder lets the tests go
through the real ``from_pretrained(..., local_files_only=True)`` path the pipeline uses.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from madfh_pipeline.explain.dataset import TrainingPair, build_training_pair
from madfh_pipeline.explain.describer import describe
from madfh_pipeline.explain.tiny import TINY_SIZE, make_tiny_blip, make_tiny_processor, tiny_vocab  # noqa: F401


@pytest.fixture(scope="session")
def tiny_blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with a tiny random BLIP and its processor, as ``save_pretrained`` writes them."""
    path = tmp_path_factory.mktemp("tiny_blip")
    make_tiny_blip().save_pretrained(str(path))
    make_tiny_processor().save_pretrained(str(path))
    return path


def _scene(kind: int, size: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
    """Four visually distinct scenes: normal, dark blob upper left, bright bar lower right, two regions."""
    rng = np.random.default_rng(kind)
    image = rng.integers(110, 130, (size, size), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    if kind == 1:
        mask[6:16, 6:16] = 1
        image[mask > 0] = 30
    elif kind == 2:
        mask[50:54, 30:60] = 1
        image[mask > 0] = 230
    elif kind == 3:
        mask[28:36, 28:36] = 1
        mask[4:8, 50:62] = 1
        image[mask > 0] = 20
    return image, (mask if mask.any() else None)


@pytest.fixture(scope="session")
def make_pairs() -> Callable[[int], list[TrainingPair]]:
    """``make_pairs(n)``: ``n`` grounded pairs cycling through four distinct scenes, at the tiny model's input size."""

    def make(n: int = 4) -> list[TrainingPair]:
        pairs = []
        for i in range(n):
            image, mask = _scene(i % 4)
            text = describe(mask, image).text
            pairs.append(build_training_pair(f"img_{i:03d}", image, mask, text, size=TINY_SIZE))
        return pairs

    return make
