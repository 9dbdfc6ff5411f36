"""Several writers, killed writers and simultaneous reviewers, with real processes on a real file or server.

Child processes come from a forkserver that has imported the knowledge-base code once (a fork of the pytest process
itself could inherit torch's thread pools; a spawn per child would re-import everything each time). Each child opens
its own KnowledgeBase and acknowledges a record only after the call that wrote it returned.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import kb_support
import pytest
from kb_support import CATEGORY, MODEL, image_id

from madfh_pipeline.feedback import KnowledgeBase, head_revision

TIMEOUT_S = 120


@pytest.fixture(scope="module")
def ctx() -> mp.context.BaseContext:
    context = mp.get_context("forkserver")
    # The installed package, not kb_support: Python 3.11's forkserver ignores the parent's sys.path while preloading
    # (and skips a module it cannot import without a word). Only matters if no test started the forkserver yet.
    context.set_forkserver_preload(["madfh_pipeline.feedback"])
    return context


def start(ctx: mp.context.BaseContext, target: Callable[..., None], *args: Any) -> tuple[Any, Connection]:
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=target, args=(*args, sender), daemon=True)
    process.start()
    sender.close()  # the child holds the only writing end: EOF when it exits
    return process, receiver


def receive_all(receiver: Connection) -> list[Any]:
    """Every message until the child closes the pipe (exits or is killed)."""
    messages = []
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if receiver.poll(0.5):
            try:
                messages.append(receiver.recv())
            except EOFError:
                return messages
    raise TimeoutError(f"child did not finish within {TIMEOUT_S} s")


def test_two_processes_writing_at_once_lose_nothing(kb: KnowledgeBase, ctx: mp.context.BaseContext) -> None:
    images, count = list(range(100, 110)), 40
    barrier = ctx.Barrier(2)
    children = [start(ctx, kb_support.write_feedback, kb.url, op, images, count, barrier) for op in ("a", "b")]
    messages = [receive_all(receiver) for _, receiver in children]
    for process, _ in children:
        process.join(TIMEOUT_S)
        assert process.exitcode == 0

    # Both recorded the same ten inspections concurrently: one record per image, both saw the same ids.
    seen = [dict(m[1]) for per_child in messages for m in per_child if m[0] == "inspections"]
    assert len(seen) == 2 and seen[0] == seen[1]
    assert len(set(seen[0].values())) == len(images)
    acked = {m[1] for per_child in messages for m in per_child if m[0] == "feedback"}
    assert len(acked) == 2 * count
    snapshot = kb.snapshot()
    assert set(snapshot.feedback["id"]) == acked
    assert len(snapshot.inspections) == len(images)
    assert snapshot.feedback.groupby("operator").size().to_dict() == {"a": count, "b": count}
    assert kb.check_integrity() == []


def test_threads_sharing_one_knowledge_base(kb: KnowledgeBase, add_inspection: Callable[..., int]) -> None:
    """The review app shares one KnowledgeBase between its sessions' threads."""
    inspection = add_inspection(12)
    errors: list[BaseException] = []

    def review(operator: str) -> None:
        try:
            for i in range(15):
                kb.record_feedback(inspection, verdict="NG", operator=operator, confidence=1 + i % 5)
                kb.review_queue(CATEGORY)
        except BaseException as exc:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=review, args=(f"op{t}",)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    assert errors == []
    assert len(kb.feedback_for(inspection)) == 60
    assert kb.case(inspection).resolution.n_operators == 4


@pytest.mark.parametrize("moment", ["inside_a_transaction", "at_a_random_time"])
def test_a_writer_killed_mid_write_leaves_a_consistent_knowledge_base(
    kb: KnowledgeBase, ctx: mp.context.BaseContext, moment: str, backend: str
) -> None:
    """SIGKILL while a writer streams multi-row batches: every acknowledged record survives, no batch is partial.

    ``inside_a_transaction``: the writer stalls after the 3rd row of its 3rd batch (two batches and their verdicts
    committed and acknowledged) and is killed there. ``at_a_random_time``: killed 0–50 ms after its 4th
    acknowledgement, wherever it is.
    """
    batch_size, payload = 5, 20_000
    pause = 2 * batch_size + 3 if moment == "inside_a_transaction" else None
    process, receiver = start(ctx, kb_support.write_until_killed, kb.url, "killed", batch_size, payload, pause)
    messages: list[Any] = []
    while not messages or (messages[-1][0] != "in_transaction" if pause else len(messages) < 4):
        assert receiver.poll(TIMEOUT_S), "the writer stopped reporting"
        messages.append(receiver.recv())
    if pause is None:
        time.sleep(random.uniform(0.0, 0.05))
    elif backend == "sqlite":
        wal = Path(kb.url.database + "-wal")
        assert wal.stat().st_size > 0  # the open transaction's pages are in the log, uncommitted
    os.kill(process.pid, signal.SIGKILL)
    process.join(TIMEOUT_S)
    assert process.exitcode == -signal.SIGKILL
    messages += receive_all(receiver)  # acknowledgements already in the pipe

    with KnowledgeBase(kb.url) as reopened:  # a new process would do the same (SQLite: WAL recovery)
        assert reopened.check_integrity() == []
        snapshot = reopened.snapshot()
        inspections = snapshot.inspections
        batches = inspections["attributes"].map(lambda a: a["batch"]).value_counts()
        assert set(batches) <= {batch_size}, "a batch was written in part"
        acked_batches = {m[1]: m[2] for m in messages if m[0] == "batch"}
        for batch, ids in acked_batches.items():
            assert batches.get(batch) == batch_size
            assert set(ids) <= set(inspections["id"])
        if pause:
            assert sorted(batches.index) == ["killed-0", "killed-1"]  # the interrupted batch left nothing
        acked_feedback = {m[1] for m in messages if m[0] == "feedback"}
        assert acked_feedback <= set(snapshot.feedback["id"])
        assert (snapshot.feedback["description"].str.len() == payload).all(), "a text was written in part"
        # The knowledge base stays writable after the crash (no lock left behind).
        after = reopened.record_inspection(**kb_support.inspection_fields(7)).id
        reopened.record_feedback(after, verdict="OK", operator="after", confidence=1)


def test_snapshots_taken_while_a_writer_writes_are_consistent(kb: KnowledgeBase, ctx: mp.context.BaseContext) -> None:
    """Each snapshot is one point in time: no verdict without its inspection, no batch seen in part.

    The writer commits a batch of inspections, then a verdict on the batch's first one, over and over. A snapshot
    that read its tables at different moments would sooner or later hold a verdict whose inspection (committed just
    after the inspections were read) is missing.
    """
    batch_size = 5
    process, receiver = start(ctx, kb_support.write_until_killed, kb.url, "busy", batch_size, 5_000, None)
    try:
        assert receiver.poll(TIMEOUT_S) and receiver.recv()[0] == "batch"
        sizes = []
        for _ in range(8):
            snapshot = kb.snapshot(CATEGORY)
            inspections = set(snapshot.inspections["id"])
            assert set(snapshot.feedback["inspection_id"]) <= inspections
            batches = snapshot.inspections["attributes"].map(lambda a: a["batch"]).value_counts()
            assert set(batches) == {batch_size}
            assert len(snapshot.feedback) in (len(batches), len(batches) - 1)  # the newest batch may await its verdict
            sizes.append(len(inspections))
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.join(TIMEOUT_S)
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0], "the writer was not writing during the snapshots"


def test_two_operators_reviewing_the_same_items_at_once(
    kb: KnowledgeBase, ctx: mp.context.BaseContext, add_inspection: Callable[..., int]
) -> None:
    items = [add_inspection(n) for n in range(10, 16)]  # all NG
    barrier = ctx.Barrier(2)
    children = [
        start(ctx, kb_support.review_at_once, kb.url, operator, verdict, items, barrier)
        for operator, verdict in (("anna", "NG"), ("bob", "OK"))
    ]
    acked = [receive_all(receiver) for _, receiver in children]
    for process, _ in children:
        process.join(TIMEOUT_S)
        assert process.exitcode == 0
    for item in items:
        case = kb.case(item)
        assert sorted((f.operator, f.verdict) for f in case.feedback) == [("anna", "NG"), ("bob", "OK")]
        assert case.resolution.disputed  # one vote each, same confidence: nobody's verdict is dropped or guessed
        assert {f.id for f in case.feedback} <= {i for ids in acked for i in ids}
    disputed = kb.review_queue(CATEGORY, status="disputed", limit=100)
    assert sorted(item.inspection.id for item in disputed) == sorted(items)


@pytest.mark.parametrize("attempt", range(3))  # a race: several tries (this found the WAL switch refusing to wait)
def test_two_processes_opening_a_fresh_database_at_once(
    unmigrated_url: str, ctx: mp.context.BaseContext, attempt: int
) -> None:
    barrier = ctx.Barrier(2)
    children = [start(ctx, kb_support.open_at_once, unmigrated_url, barrier) for _ in range(2)]
    revisions = [receive_all(receiver) for _, receiver in children]
    for process, _ in children:
        process.join(TIMEOUT_S)
        assert process.exitcode == 0
    assert revisions == [[head_revision()], [head_revision()]]
    with KnowledgeBase(unmigrated_url) as kb:
        kb.register_model_version(CATEGORY, MODEL)
        assert kb.record_inspection(**kb_support.inspection_fields(1)).created
        assert kb.find_inspections(image_id(1))[0].category == CATEGORY
