"""``build_explainer_pairs`` on its own: grounded pairs from the masks, the split by part, and operators' words.

A processed store as preprocessing leaves it (``make_processed_store``: 32² gray images, defective ones with an 8×8
blob and its mask) and, for operators' descriptions, the real chain the feedback loop uses: inspections and verdicts in
a SQLite knowledge base, read back by the feedback pipeline's ``operator_descriptions`` node.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from madfh_pipeline.explain.dataset import mvtec_group_key
from madfh_pipeline.feedback import InspectionRecord, KnowledgeBase, image_content_id
from madfh_pipeline.pipelines.explainer.nodes import build_explainer_pairs
from madfh_pipeline.pipelines.feedback.nodes import operator_descriptions

EXPLAINER: dict[str, Any] = {
    "describer": {},
    "composite": {"context": 1.0, "min_zoom_fraction": 0.1},
    "split": {"eval_fraction": 0.3, "salt": "explainer"},
    "learned": {"input_size": 32},
}


def _operator_records(tmp_path: Path, store: Any, manifest: pd.DataFrame, confidence: int = 4) -> list[dict[str, Any]]:
    """An operator confirms every defective test image with a description, through the knowledge base; the feedback
    pipeline's node turns the snapshot into the explainer's records (image = the path the inspection recorded)."""
    kb = KnowledgeBase.embedded(tmp_path / "kb.sqlite")
    try:
        kb.register_model_version("widget", "v1", detector="patchcore")
        bad = manifest[(manifest["split"] == "test_public") & (manifest["label"] == "bad")]
        for relpath in bad["relpath"]:
            path = store.root / relpath
            recorded = kb.record_inspection(
                **vars(
                    InspectionRecord(
                        image_id=image_content_id(path),
                        image_path=str(path),
                        category="widget",
                        model_version="v1",
                        decision="NG",
                        score=40.0,
                        threshold=30.0,
                    )
                )
            )
            kb.record_feedback(
                recorded.id,
                action="confirm_defect",
                operator="anna",
                confidence=confidence,
                description="bright square blob",
            )
        return operator_descriptions(kb.snapshot("widget"))
    finally:
        kb.close()


def test_grounded_pairs_come_from_the_masks_and_validation_goods_split_by_part(
    tmp_path: Path, make_processed_store: Callable[..., tuple[pd.DataFrame, Any]]
) -> None:
    manifest, store = make_processed_store(tmp_path / "store", counts={"test_public_bad": 8, "validation": 4})
    train, evaluation, counts = build_explainer_pairs(manifest, store, EXPLAINER, [])
    expected = manifest[
        ((manifest["split"] == "test_public") & (manifest["label"] == "bad"))
        | ((manifest["split"] == "validation") & (manifest["label"] == "good"))
    ]
    pairs = train + evaluation
    assert sorted(p.image_id for p in pairs) == sorted(expected["relpath"])
    assert counts == {"n_train_pairs": len(train), "n_eval_pairs": len(evaluation), "n_pairs": len(pairs)}
    assert train and evaluation
    assert not {p.group for p in train} & {p.group for p in evaluation}
    for pair in pairs:
        assert pair.group == mvtec_group_key(pair.image_id) and pair.source == "grounded"
        assert pair.image.shape == (32, 32, 3) and pair.image.dtype.name == "uint8"
        if pair.image_id.startswith("validation/"):
            assert "normal" in pair.text.lower(), pair.text
        else:
            assert "region" in pair.text.lower() and "brighter" in pair.text.lower(), pair.text


def test_operator_descriptions_join_the_training_set(
    tmp_path: Path, make_processed_store: Callable[..., tuple[pd.DataFrame, Any]]
) -> None:
    manifest, store = make_processed_store(tmp_path / "store", counts={"test_public_bad": 8})
    plain_train, plain_eval, _ = build_explainer_pairs(manifest, store, EXPLAINER, [])
    records = _operator_records(tmp_path, store, manifest)
    assert len(records) == 8 and {r["description"] for r in records} == {"bright square blob"}
    train, evaluation, counts = build_explainer_pairs(manifest, store, EXPLAINER, records)
    operator = [p for p in train if p.source == "operator"]
    assert operator and all(p.text == "bright square blob" for p in operator)
    assert [p.image_id for p in evaluation] == [p.image_id for p in plain_eval]  # operators never add to eval
    assert counts["n_train_pairs"] == len(plain_train) + len(operator)


def test_unsure_operator_descriptions_are_left_out(
    tmp_path: Path, make_processed_store: Callable[..., tuple[pd.DataFrame, Any]]
) -> None:
    manifest, store = make_processed_store(tmp_path / "store", counts={"test_public_bad": 4})
    records = _operator_records(tmp_path, store, manifest, confidence=2)
    train, _, _ = build_explainer_pairs(manifest, store, EXPLAINER, records)
    assert not [p for p in train if p.source == "operator"]


def test_operator_descriptions_of_evaluation_images_never_train_the_explainer(
    tmp_path: Path, make_processed_store: Callable[..., tuple[pd.DataFrame, Any]]
) -> None:
    """The split is by part, so that the images that evaluate the explainer never train it — operators' words
    included. 40 defective parts: about 12 evaluate the explainer, and each of their descriptions must stay out of
    the training set (were the side of an operator description drawn independently of its part's, at least one of
    the ~12 would land in training with probability 1 − 0.3¹² ≈ 1)."""
    manifest, store = make_processed_store(tmp_path / "store", counts={"test_public_bad": 40})
    _, evaluation, _ = build_explainer_pairs(manifest, store, EXPLAINER, [])
    evaluated = {p.image_id for p in evaluation}
    assert len([i for i in evaluated if i.startswith("test_public/bad/")]) >= 8
    records = _operator_records(tmp_path, store, manifest)
    train, _, _ = build_explainer_pairs(manifest, store, EXPLAINER, records)
    leaked = sorted(
        Path(p.image_id).relative_to(store.root).as_posix()
        for p in train
        if p.source == "operator" and Path(p.image_id).relative_to(store.root).as_posix() in evaluated
    )
    assert not leaked, f"operator descriptions of {len(leaked)} evaluation images train the explainer: {leaked[:3]}"
