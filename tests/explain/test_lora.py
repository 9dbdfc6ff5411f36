"""LoRA explainer on a tiny random BLIP (see conftest): training, its failure modes, adapters' round trip, loading.

What these tests prove: the wiring (processor → BLIP → PEFT → AdamW → save/load → generate) works with the installed
transformers and peft, only LoRA weights train, the loss falls, and every failure the prototype hid is loud. What
they cannot prove: that the real BLIP base learns useful defect descriptions — that needs its weights and real data.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from madfh_pipeline.explain.dataset import TrainingPair
from madfh_pipeline.explain.lora import (
    DEFAULT_TARGET_MODULES,
    LoraExplainer,
    LossNotDecreasingError,
    MissingBaseModelError,
    NonFiniteLossError,
    TrainableParameterError,
    TrainingReport,
    TrainSettings,
    assert_only_lora_trainable,
    batch_inputs,
    check_loss_trend,
    load_base_model,
    lora_module_names,
    resolve_class,
    resolve_decoder_start,
)

LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
FIT = {"epochs": 20, "batch_size": 4, "lr": 1e-2, "loss_window": 5, "min_relative_drop": 0.2, "device": "cpu"}
GREEDY = {"max_new_tokens": 12, "num_beams": 1}

# peft calls a transformers method deprecated in transformers 5 (not our code, nothing to act on here).
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for this module (restored after): the tiny model's 32-wide matrices gain nothing from
    threads, and on a busy 2-core machine two spinning threads made 20 steps take 20 s instead of 1 s."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass
class Trained:
    explainer: LoraExplainer
    pairs: list[TrainingPair]
    report: TrainingReport
    calls: list[tuple[int, float]]
    loss_before: float


@pytest.fixture(scope="module")
def trained(tiny_blip_dir: Path, make_pairs: Callable[[int], list[TrainingPair]]) -> Trained:
    """One 20-step training run, shared by the tests that only read its result."""
    explainer = LoraExplainer.from_base(tiny_blip_dir, lora=LORA)
    pairs = make_pairs(4)
    loss_before = explainer.loss(pairs)
    calls: list[tuple[int, float]] = []
    report = explainer.fit(pairs, FIT, on_step=lambda step, loss: calls.append((step, loss)))
    return Trained(explainer, pairs, report, calls, loss_before)


def logits(explainer: LoraExplainer, pairs: list[TrainingPair]) -> torch.Tensor:
    start = resolve_decoder_start(explainer.model, explainer.processor)
    with torch.no_grad():
        return explainer.model(**batch_inputs(explainer.processor, pairs, decoder_start_id=start)).logits


def test_default_targets_are_the_text_decoders_attention_projections(tiny_blip_dir: Path) -> None:
    explainer = LoraExplainer.from_base(tiny_blip_dir, lora=LORA)
    names = lora_module_names(explainer.model)
    # 2 decoder layers x (self-attention, cross-attention) x (query, key, value); nothing in the vision tower.
    assert len(names) == 12
    assert all(re.search(DEFAULT_TARGET_MODULES + "$", name) for name in names)
    trainable, total = assert_only_lora_trainable(explainer.model)
    assert trainable == 12 * LORA["r"] * (32 + 32)  # A: r x 32 and B: 32 x r per projection
    assert trainable < total / 5

    next(p for n, p in explainer.model.named_parameters() if "vision_model" in n).requires_grad_(True)
    with pytest.raises(TrainableParameterError, match="vision_model"):
        assert_only_lora_trainable(explainer.model)
    with pytest.raises(TrainableParameterError, match="No LoRA parameter"):
        assert_only_lora_trainable(load_base_model(tiny_blip_dir))


def test_a_few_steps_lower_the_loss(trained: Trained) -> None:
    report = trained.report
    assert report.steps == 20 == len(report.losses)  # 20 epochs x 1 batch: no batch skipped
    assert trained.calls == list(enumerate(report.losses, start=1))  # the callback saw every step
    assert report.last_window_mean < 0.8 * report.first_window_mean
    assert trained.explainer.loss(trained.pairs) < 0.8 * trained.loss_before
    assert trained.explainer.spec.metadata["training"]["steps"] == 20
    assert not trained.explainer.model.training


def test_adapters_round_trip(trained: Trained, tiny_blip_dir: Path, tmp_path: Path) -> None:
    explainer = trained.explainer
    images = [pair.image for pair in trained.pairs]
    saved = explainer.save(tmp_path / "explainer")
    assert {p.name for p in saved.iterdir()} >= {
        "adapter_model.safetensors",
        "adapter_config.json",
        "explainer.json",
        "processor",
    }
    loaded = LoraExplainer.load(saved, device="cpu")
    assert loaded.spec.base_model == str(tiny_blip_dir)
    assert not any(p.requires_grad for p in loaded.model.parameters())
    torch.testing.assert_close(logits(loaded, trained.pairs), logits(explainer, trained.pairs), rtol=0, atol=1e-6)
    for generation in (GREEDY, {"max_new_tokens": 12, "num_beams": 2}):
        texts = loaded.explain(images, generation)
        assert texts == explainer.explain(images, generation)
        assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    # The adapters matter: the bare base model answers differently.
    bare = load_base_model(tiny_blip_dir)
    start = resolve_decoder_start(bare, explainer.processor)
    with torch.no_grad():
        bare_logits = bare(**batch_inputs(explainer.processor, trained.pairs, decoder_start_id=start)).logits
    assert (bare_logits - logits(loaded, trained.pairs)).abs().max() > 1e-2


def test_blip_is_trained_on_the_prefix_it_generates_from(trained: Trained) -> None:
    explainer = trained.explainer
    bos = explainer.model.get_base_model().config.text_config.bos_token_id
    tokenizer = explainer.processor.tokenizer
    inputs = batch_inputs(
        explainer.processor, trained.pairs, decoder_start_id=resolve_decoder_start(explainer.model, explainer.processor)
    )
    assert (inputs["input_ids"][:, 0] == bos).all()  # [CLS] replaced by [DEC] ...
    assert (inputs["labels"][:, 1:][inputs["attention_mask"][:, 1:] == 0] == -100).all()  # padding is not a target
    pixel_values = explainer.processor(images=[trained.pairs[0].image], return_tensors="pt")["pixel_values"]
    generated = explainer.model.get_base_model().generate(pixel_values=pixel_values, max_new_tokens=2)
    assert int(generated[0, 0]) == bos  # ... because generation starts from [DEC]
    plain = batch_inputs(
        explainer.processor,
        trained.pairs,
        decoder_start_id=resolve_decoder_start(explainer.model, explainer.processor, "none"),
    )
    assert (plain["input_ids"][:, 0] == tokenizer.cls_token_id).all()


def test_nan_loss_stops_training(tiny_blip_dir: Path, make_pairs: Callable[[int], list[TrainingPair]]) -> None:
    explainer = LoraExplainer.from_base(tiny_blip_dir, lora=LORA)
    with torch.no_grad():  # a poisoned adapter weight: every forward pass now yields NaN
        next(p for n, p in explainer.model.named_parameters() if "lora_A" in n).fill_(float("nan"))
    calls: list[tuple[int, float]] = []
    with pytest.raises(NonFiniteLossError, match="Non-finite training loss nan at step 1") as info:
        explainer.fit(make_pairs(4), FIT, on_step=lambda step, loss: calls.append((step, loss)))
    assert info.value.step == 1
    assert calls == []


def test_flat_loss_raises(tiny_blip_dir: Path, make_pairs: Callable[[int], list[TrainingPair]]) -> None:
    explainer = LoraExplainer.from_base(tiny_blip_dir, lora=LORA)
    settings = FIT | {"lr": 0.0, "epochs": 4, "loss_window": 2}
    with pytest.raises(LossNotDecreasingError, match="did not fall") as info:
        explainer.fit(make_pairs(4), settings)
    assert len(info.value.losses) == 4
    assert info.value.last_mean == pytest.approx(info.value.first_mean, rel=1e-5)


def test_loss_check_and_run_length_are_enforced(
    tiny_blip_dir: Path, make_pairs: Callable[[int], list[TrainingPair]]
) -> None:
    assert check_loss_trend([4.0, 4.0, 3.0, 3.0], window=2, min_relative_drop=0.2) == (4.0, 3.0)
    with pytest.raises(LossNotDecreasingError):
        check_loss_trend([4.0, 4.0, 3.5, 3.5], window=2, min_relative_drop=0.2)  # 12.5 % < 20 %
    explainer = LoraExplainer.from_base(tiny_blip_dir, lora=LORA)
    with pytest.raises(ValueError, match="fewer than 2 × loss_window"):
        explainer.fit(make_pairs(4), FIT | {"epochs": 3, "loss_window": 2})
    with pytest.raises(ValueError, match="img_00"):
        explainer.fit(make_pairs(4), FIT | {"max_text_tokens": 5})
    with pytest.raises(ValueError, match="No training pairs"):
        explainer.fit([], FIT)
    with pytest.raises(ValueError, match="learning_rate"):
        TrainSettings.from_mapping({"learning_rate": 1e-3})


def test_missing_base_model_gives_one_clear_error(tmp_path: Path, tiny_blip_dir: Path) -> None:
    missing = tmp_path / "no_blip_here"
    with pytest.raises(MissingBaseModelError) as info:
        LoraExplainer.from_base(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "'base_model'" in message
    assert "hf download Salesforce/blip-image-captioning-base --local-dir" in message

    with pytest.raises(MissingBaseModelError, match="hf download madfh-test/no-such-blip --local-dir"):
        LoraExplainer.from_base("madfh-test/no-such-blip", local_files_only=True)

    with pytest.raises(ValueError, match="Cannot import class 'transformers.NoSuchModel'"):
        LoraExplainer.from_base(tiny_blip_dir, model_class="transformers.NoSuchModel")


def test_loading_saved_adapters_without_their_base_names_the_base(trained: Trained, tmp_path: Path) -> None:
    saved = trained.explainer.save(tmp_path / "explainer")
    with pytest.raises(MissingBaseModelError, match="moved_away"):
        LoraExplainer.load(saved, base_model=tmp_path / "moved_away")
    with pytest.raises(FileNotFoundError, match="not a saved LoRA explainer"):
        LoraExplainer.load(tmp_path)


def test_model_and_processor_classes_are_parameters() -> None:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    assert resolve_class("transformers.BlipForConditionalGeneration") is BlipForConditionalGeneration
    assert resolve_class("BlipProcessor") is BlipProcessor


def test_default_targets_match_the_full_size_blip_architecture() -> None:
    """The regex was read off the tiny model; the full-size BLIP (built on the meta device: no memory, no weights)
    must give the same 12 layers x 2 attentions x 3 projections."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    from madfh_pipeline.explain.lora import add_lora

    with torch.device("meta"):
        model = BlipForConditionalGeneration(BlipConfig())
    peft_model = add_lora(model, {"r": 8})
    names = lora_module_names(peft_model)
    assert len(names) == 72
    assert all(".text_decoder.bert.encoder.layer." in name for name in names)
    trainable, total = assert_only_lora_trainable(peft_model)
    assert trainable == 72 * 8 * (768 + 768)
    assert trainable / total < 0.005


def test_pairs_train_explain_and_score(trained: Trained) -> None:
    """The chain the pipeline runs: generated texts of the trained model scored against the grounded references."""
    from madfh_pipeline.explain.text_metrics import score_explanations

    texts = trained.explainer.explain([pair.image for pair in trained.pairs], GREEDY)
    result = score_explanations(texts, [pair.text for pair in trained.pairs], ids=[p.image_id for p in trained.pairs])
    assert [row["id"] for row in result.per_item] == [p.image_id for p in trained.pairs]
    assert all(0.0 <= value <= 1.0 for key, value in result.corpus.items() if key != "n_items")
