"""Webhook notifications against a real local HTTP server (http.server in a thread), no mocks."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from madfh_pipeline.feedback import InspectionRecord
from madfh_pipeline.notify import WebhookNotifier, ng_message, notifier_from_credentials


@dataclass
class Hook:
    """A webhook endpoint: answers ``statuses`` in turn (then 200), after ``delay_s``; records what it got."""

    statuses: list[int] = field(default_factory=list)
    delay_s: float = 0.0
    requests: list[tuple[int, dict, dict]] = field(default_factory=list)  # (answered status, headers, body)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def delivered(self) -> list[dict]:
        return [body for status, _, body in self.requests if status == 200]


@pytest.fixture
def hook() -> Iterator[Hook]:
    state = Hook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(state.delay_s)
            with state.lock:
                status = state.statuses.pop(0) if state.statuses else 200
                state.requests.append((status, dict(self.headers), body))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/ng?token=secret"
    yield state
    server.shutdown()
    server.server_close()


def _record(n: int, decision: str = "NG") -> InspectionRecord:
    return InspectionRecord(
        image_id=f"{n:064x}",
        image_path=f"data/wallplugs/{n:03d}.png",
        category="wallplugs",
        model_version="3",
        decision=decision,
        score=34.2,
        threshold=31.0,
        inspected_at=datetime(2026, 3, 2, 8, 0, tzinfo=UTC),
        explanation="a scratch",
    )


def test_failing_twice_then_succeeding_delivers_once_with_retries_logged(
    hook: Hook, caplog: pytest.LogCaptureFixture
) -> None:
    hook.statuses = [500, 500]
    hook.delay_s = 0.2  # every answer is slow: notify() must not wait for any of them
    caplog.set_level(logging.INFO, logger="madfh_pipeline.notify")
    notifier = WebhookNotifier(hook.url, backoff_s=0.05, max_attempts=5)

    started = time.perf_counter()
    queued = notifier.notify_ng([_record(1), _record(2, decision="OK")])
    returned_after = time.perf_counter() - started
    assert queued == 1  # only the NG decision
    assert returned_after < 0.05, f"notify blocked for {returned_after:.3f} s"

    stats = notifier.close(timeout_s=10)
    assert [status for status, _, _ in hook.requests] == [500, 500, 200]
    assert hook.delivered() == [ng_message(_record(1))]
    assert hook.requests[-1][1]["Idempotency-Key"] == f"{1:064x}:3"
    assert (stats.sent, stats.failed, stats.dropped, stats.retries) == (1, 0, 0, 2)
    retries = [r for r in caplog.records if r.levelno == logging.WARNING and "retrying" in r.getMessage()]
    assert len(retries) == 2
    assert "HTTP 500" in retries[0].getMessage()
    assert "secret" not in caplog.text  # the token in the URL's query never reaches the log


def test_dead_endpoint_gives_up_logged_and_close_keeps_its_budget(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="madfh_pipeline.notify")
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as probe:
        port = probe.server_address[1]  # a port that nothing listens on once the probe closes
    notifier = WebhookNotifier(f"http://127.0.0.1:{port}/hook", backoff_s=0.01, max_attempts=3, timeout_s=1)
    assert notifier.notify(ng_message(_record(7)))
    stats = notifier.close(timeout_s=5)
    assert (stats.sent, stats.failed, stats.retries) == (0, 1, 2)
    assert "after 3 attempts" in caplog.text


def test_close_budget_abandons_a_message_still_backing_off(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    hook.statuses = [503] * 10
    notifier = WebhookNotifier(hook.url, backoff_s=30, max_attempts=5)
    notifier.notify(ng_message(_record(3)))
    time.sleep(0.2)  # the first attempt has failed; the worker now waits 30 s
    started = time.perf_counter()
    stats = notifier.close(timeout_s=0.5)
    assert time.perf_counter() - started < 3
    assert stats.sent == 0 and stats.dropped == 1
    assert "abandoned" in caplog.text


def test_client_error_is_not_retried(hook: Hook) -> None:
    hook.statuses = [400]
    notifier = WebhookNotifier(hook.url, backoff_s=0.01)
    notifier.notify(ng_message(_record(4)))
    stats = notifier.close(timeout_s=5)
    assert len(hook.requests) == 1 and (stats.failed, stats.retries) == (1, 0)


def test_full_queue_drops_and_logs_instead_of_blocking(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    hook.delay_s = 0.3
    notifier = WebhookNotifier(hook.url, queue_size=1)
    results = [notifier.notify(ng_message(_record(n))) for n in range(5)]
    assert results.count(False) >= 3  # one in flight, one queued, the rest dropped
    assert "queue is full" in caplog.text
    notifier.close(timeout_s=5)


def test_credentials_switch_it_on_or_off(hook: Hook) -> None:
    assert notifier_from_credentials({}) is None
    assert notifier_from_credentials({"notifications": {"webhook_url": ""}}) is None
    notifier = notifier_from_credentials({"notifications": {"webhook_url": hook.url}})
    assert notifier is not None
    notifier.close(timeout_s=1)
    with pytest.raises(ValueError, match="http"):
        WebhookNotifier("file:///etc/passwd")
