"""Shared builders of the knowledge-base tests, and the functions their child processes run.

A plain module (not a conftest) so that test modules and the processes started by ``multiprocessing`` can import it;
``conftest.py`` puts this folder on ``sys.path``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from madfh_pipeline.feedback import image_content_id

CATEGORY = "wallplugs"
MODEL = "v1"
T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)  # a Monday


def image_id(n: int | str) -> str:
    """A stable fake image id (the SHA-256 of a short text)."""
    return image_content_id(f"image-{n}".encode())


def inspection_fields(n: int, **overrides: Any) -> dict[str, Any]:
    """Fields of ``record_inspection`` for image ``n``: score n, threshold 10, decision from the score."""
    score = overrides.pop("score", float(n))
    threshold = overrides.pop("threshold", 10.0)
    decision = "NG" if score is not None and score >= threshold else "OK"
    fields: dict[str, Any] = {
        "image_id": image_id(n),
        "image_path": f"/data/{CATEGORY}/test_public/{n:03d}_regular.png",
        "category": CATEGORY,
        "model_version": MODEL,
        "score": score,
        "threshold": threshold,
        "decision": decision,
        "inspected_at": T0 + timedelta(hours=n),
    }
    return fields | overrides


def unit_vector(dim: int, angle: float, axis: int = 0) -> np.ndarray:
    """A vector in the plane of axes ``axis`` and ``axis + 1`` at ``angle`` radians: cosine to axis 0 is cos(angle)."""
    vector = np.zeros(dim, dtype=np.float32)
    vector[axis] = np.cos(angle)
    vector[axis + 1] = np.sin(angle)
    return vector


# ----------------------------------------------------------------------------------- code run by child processes
# Each child opens its own KnowledgeBase (never one inherited from the parent) and reports every record it wrote,
# *after* the call returned (= committed), through its end of a Pipe: what the parent receives is acknowledged.


def write_feedback(url: str, operator: str, images: list[int], count: int, start: Any, pipe: Any) -> None:
    """Record the inspections of ``images`` (the other writer records the same ones) and ``count`` verdicts."""
    from madfh_pipeline.feedback import KnowledgeBase

    with KnowledgeBase(url) as kb:
        start.wait()
        ids = {n: kb.record_inspection(**inspection_fields(n)).id for n in images}
        pipe.send(("inspections", ids))
        for i in range(count):
            n = images[i % len(images)]
            feedback = kb.record_feedback(
                ids[n],
                verdict="NG" if i % 2 else "OK",
                operator=operator,
                confidence=1 + i % 5,
                description=f"{operator} #{i}",
            )
            pipe.send(("feedback", feedback.id))
    pipe.send(("done", None))
    pipe.close()


def write_until_killed(
    url: str, tag: str, batch_size: int, payload: int, pause_at_insert: int | None, pipe: Any
) -> None:
    """Write batches of inspections and one long verdict per batch, forever; the parent kills this process.

    ``pause_at_insert``: announce ``in_transaction`` and stall right after that many inspection rows were sent to
    the database, so the parent's SIGKILL lands inside an open write transaction (not between two). On SQLite the
    page cache is shrunk to a few pages so that the open transaction's pages really spill into the WAL file first:
    the torn transaction is on disk when the process dies, and recovery must ignore it.
    """
    import time

    from sqlalchemy import event

    from madfh_pipeline.feedback import InspectionRecord, KnowledgeBase

    kb = KnowledgeBase(url)
    if kb.backend == "sqlite":
        event.listen(kb.engine, "connect", lambda dbapi, _record: dbapi.execute("PRAGMA cache_size = 4"))
        kb.engine.dispose()  # connections made from now on get the small cache
    if pause_at_insert is not None:
        inserted = 0

        def stall(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            nonlocal inserted
            if statement.lstrip().upper().startswith("INSERT INTO INSPECTIONS"):
                inserted += 1
                if inserted == pause_at_insert:
                    pipe.send(("in_transaction", inserted))
                    time.sleep(60)

        event.listen(kb.engine, "after_cursor_execute", stall)
    batch = 0
    while True:
        records = [
            InspectionRecord(
                **inspection_fields(0, image_id=image_id(f"{tag}-{batch}-{j}"), explanation="x" * payload),
                attributes={"batch": f"{tag}-{batch}"},
            )
            for j in range(batch_size)
        ]
        ids = [r.id for r in kb.record_inspections(records)]
        pipe.send(("batch", f"{tag}-{batch}", ids))
        feedback = kb.record_feedback(ids[0], verdict="OK", operator=tag, confidence=3, description="y" * payload)
        pipe.send(("feedback", feedback.id))
        batch += 1


def review_at_once(url: str, operator: str, verdict: str, inspection_ids: list[int], barrier: Any, pipe: Any) -> None:
    """Give ``verdict`` on each item at the same moment as the other reviewer (a barrier before each item)."""
    from madfh_pipeline.feedback import KnowledgeBase

    with KnowledgeBase(url) as kb:
        for inspection_id in inspection_ids:
            barrier.wait()
            pipe.send(kb.record_feedback(inspection_id, verdict=verdict, operator=operator, confidence=3).id)
    pipe.send(None)
    pipe.close()


def open_at_once(url: str, barrier: Any, pipe: Any) -> None:
    """Open (and so migrate) a fresh database at the same moment as another process."""
    from madfh_pipeline.feedback import KnowledgeBase

    barrier.wait()
    with KnowledgeBase(url, migrate=True) as kb:
        pipe.send(kb.schema_revision)
    pipe.close()
