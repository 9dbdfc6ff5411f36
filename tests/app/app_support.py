"""Builders of the review-app tests: a tiny data root with generated images and anomaly maps, and a real
knowledge base file whose inspections point at them.

A plain module (not a conftest) so that the browser test's helper process and the AppTest tests share it;
``conftest.py`` puts this folder on ``sys.path``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np

from madfh_pipeline.feedback import InspectionRecord, KnowledgeBase, image_content_id, sqlite_url

MAIN = Path(__file__).resolve().parents[2] / "src" / "madfh_pipeline" / "app" / "main.py"
CATEGORY = "wallplugs"
T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)  # a Monday
IMAGE_SIZE = (160, 120)  # (width, height) of the generated photos
MAP_SIZE = (64, 64)  # the "canvas" size of the maps: not the image size, so the app must resize
EMBEDDING_SPACE = "test/avgpool"

#: (name, decision, score, threshold, model version, days after T0, embedding angle, explanation)
ITEMS: tuple[tuple[str, str, float, float, str, int, float, str], ...] = (
    ("003_regular", "NG", 10.2, 10.0, "v1", 0, 0.10, "a bright spot near the upper left corner"),
    ("001_regular", "REVIEW", 10.9, 10.0, "v1", 1, 0.05, "an unclear mark near the upper left corner"),
    ("004_regular", "OK", 9.0, 10.0, "v1", 2, 1.20, "no visible anomaly"),
    ("006_regular", "NG", 15.0, 10.0, "v1", 3, 0.30, "a long scratch across the surface"),
    ("005_regular", "OK", 3.0, 10.0, "v1", 4, 1.40, "clean surface"),
    ("007_regular", "NG", 12.0, 11.0, "v2", 9, 0.20, "a dark dent in the middle"),
)
#: Already reviewed: a confirmed defect close (in embedding space) to the queue's first items.
REVIEWED = ("002_regular", "NG", 14.0, 10.0, "v1", 0, 0.0, "a scratch near the upper left corner")


@dataclass
class ReviewData:
    """What the builders made: the data root, the knowledge base's URL and the inspection ids by image name."""

    root: Path
    data_root: Path
    kb_url: str
    ids: dict[str, int] = field(default_factory=dict)

    def kb(self) -> KnowledgeBase:
        return KnowledgeBase(self.kb_url)


def _photo(rng: np.random.Generator, defect: bool) -> np.ndarray:
    width, height = IMAGE_SIZE
    yy, xx = np.mgrid[0:height, 0:width]
    image = 70 + 80 * xx / width + 30 * yy / height + rng.normal(0, 6, (height, width))
    if defect:
        image += 90 * np.exp(-(((xx - 0.3 * width) ** 2 + (yy - 0.3 * height) ** 2) / (2 * 8.0**2)))
    gray = np.clip(image, 0, 255).astype(np.uint8)
    return np.stack([gray, gray, (gray * 0.9).astype(np.uint8)], axis=-1)


def _map(score: float, threshold: float) -> np.ndarray:
    width, height = MAP_SIZE
    yy, xx = np.mgrid[0:height, 0:width]
    base = 0.4 * threshold
    blob = np.exp(-(((xx - 0.3 * width) ** 2 + (yy - 0.3 * height) ** 2) / (2 * 4.0**2)))
    return (base + (score - base) * blob).astype(np.float32)


def _vector(angle: float) -> np.ndarray:
    vector = np.zeros(8, dtype=np.float32)
    vector[0], vector[1] = np.cos(angle), np.sin(angle)
    return vector


def build_review_data(root: Path, *, png_map_for: str | None = "004_regular") -> ReviewData:
    """A data root under ``root/data`` and a knowledge base with the inspections of :data:`ITEMS` (unreviewed) and
    :data:`REVIEWED` (confirmed defect by ``bob``, type ``scratch``). Maps are ``.npy`` float maps at
    :data:`MAP_SIZE`, except ``png_map_for``'s, a PNG."""
    rng = np.random.default_rng(0)
    data_root = root / "data"
    kb_path = data_root / "09_knowledge_base" / "knowledge_base.sqlite"
    kb_path.parent.mkdir(parents=True)
    data = ReviewData(root=root, data_root=data_root, kb_url=sqlite_url(kb_path).render_as_string())
    records = []
    for name, decision, score, threshold, version, days, angle, explanation in (*ITEMS, REVIEWED):
        split = "bad" if decision == "NG" or name == REVIEWED[0] else "good"
        image_path = data_root / "01_raw" / CATEGORY / "test_public" / split / f"{name}.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(image_path), cv2.cvtColor(_photo(rng, split == "bad"), cv2.COLOR_RGB2BGR))
        map_dir = data_root / "07_model_output" / CATEGORY / "maps" / version
        map_dir.mkdir(parents=True, exist_ok=True)
        values = _map(score, threshold)
        if name == png_map_for:
            map_path = map_dir / f"{name}.png"
            assert cv2.imwrite(str(map_path), (values / values.max() * 255).astype(np.uint8))
        else:
            map_path = map_dir / f"{name}.npy"
            np.save(map_path, values)
        records.append(
            InspectionRecord(
                image_id=image_content_id(image_path),
                image_path=str(image_path.relative_to(root)),  # relative, as a pipeline run in the project writes
                category=CATEGORY,
                model_version=version,
                decision=decision,
                score=score,
                threshold=threshold,
                map_path=str(map_path),
                explanation=explanation,
                processing_time_s=0.2,
                inspected_at=T0 + timedelta(days=days),
                embedding=_vector(angle),
                embedding_space=EMBEDDING_SPACE,
                attributes={"data_source": "test"},
            )
        )
    with KnowledgeBase(data.kb_url) as kb:
        kb.register_model_version(CATEGORY, "v1", detector="patchcore", created_at=T0 - timedelta(days=10))
        kb.register_model_version(CATEGORY, "v2", detector="patchcore", parent="v1", created_at=T0 + timedelta(days=8))
        kb.add_defect_type(CATEGORY, "scratch", "a line scratched into the surface")
        kb.add_defect_type(CATEGORY, "crack")
        recorded = kb.record_inspections(records)
        data.ids = {Path(r.image_path).stem: rec.id for r, rec in zip(records, recorded, strict=True)}
        kb.record_feedback(
            data.ids[REVIEWED[0]],
            action="confirm_defect",
            operator="bob",
            confidence=5,
            defect_type="scratch",
            description="scratch near the corner",
            created_at=T0 + timedelta(hours=2),
        )
    return data
