"""Webhook notifications: a JSON message for each NG decision, sent without ever holding up inspection.

Optional: the URL comes from credentials (``notifications: {webhook_url: https://...}`` in
``conf/local/credentials.yml``); without it :func:`notifier_from_credentials` returns None and nothing is sent.

Why a background thread with a bounded queue (and not "send everything after the batch"): an NG message is most
useful while the part is still near the station, so it goes out as soon as the decision is made; retries with
exponential back-off (an endpoint that is restarting, a proxy hiccup) run beside the inspection instead of inside
it; :meth:`WebhookNotifier.notify` only puts the message in a queue and returns at once. The queue is bounded, so an
endpoint that is down for hours cannot grow memory: overflow is dropped and logged as an error. At the end of a
batch :meth:`WebhookNotifier.close` waits for the queue to drain for at most a time budget, then gives up on what
is left (logged with a count), so a dead endpoint delays a batch by that budget at most, never indefinitely.

Each message carries ``id`` = ``<image_id>:<model_version>`` (also sent as the ``Idempotency-Key`` header): a
receiver that sees a retried message twice (the first answer was lost) can drop the duplicate.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

#: HTTP statuses worth retrying: server errors, "too many requests" and "request timeout".
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_STOP = object()


@dataclass
class NotifierStats:
    """What a notifier did: messages delivered, given up after all attempts or refused, dropped, and retries."""

    sent: int = 0
    failed: int = 0
    dropped: int = 0
    retries: int = 0


def ng_message(record: Any) -> dict[str, Any]:
    """The JSON message of one NG decision, from an ``InspectionRecord``/``InspectionInfo`` or a mapping."""
    fields = asdict(record) if is_dataclass(record) and not isinstance(record, type) else dict(record)
    inspected_at = fields.get("inspected_at")
    return {
        "event": "inspection.ng",
        "id": f"{fields['image_id']}:{fields['model_version']}",
        "category": fields["category"],
        "model_version": fields["model_version"],
        "decision": fields["decision"],
        "score": fields.get("score"),
        "threshold": fields.get("threshold"),
        "image_id": fields["image_id"],
        "image_path": fields.get("image_path"),
        "map_path": fields.get("map_path"),
        "explanation": fields.get("explanation"),
        "inspected_at": inspected_at.isoformat() if isinstance(inspected_at, datetime) else inspected_at,
        "attributes": fields.get("attributes"),
    }


class WebhookNotifier:
    """Posts JSON messages to one webhook URL from a background thread, with retries and exponential back-off.

    ``notify`` never blocks; ``close(timeout_s)`` (or leaving the ``with`` block) drains the queue within that
    budget. Attempt ``n`` that fails waits ``backoff_s * 2**(n-1)`` seconds (at most ``max_backoff_s``, at least a
    ``Retry-After`` the server asked for) before the next; after ``max_attempts`` the message is logged as failed.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 5.0,
        max_attempts: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        queue_size: int = 1000,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"A webhook URL must be http(s)://host/..., got {url!r}.")
        if max_attempts < 1 or timeout_s <= 0 or backoff_s < 0 or queue_size < 1:
            raise ValueError("max_attempts and queue_size must be >= 1, timeout_s > 0 and backoff_s >= 0.")
        self.url = url
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.headers = {"Content-Type": "application/json", "User-Agent": "madfh-notify/1", **(headers or {})}
        self.stats = NotifierStats()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._abort = threading.Event()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="webhook-notifier", daemon=True)
        self._thread.start()

    @property
    def _target(self) -> str:
        """The URL without query or credentials, for logs (a webhook token often sits in the query)."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}{parts.path}"

    def notify(self, message: Mapping[str, Any]) -> bool:
        """Queue a message and return at once; False (and an error in the log) if the queue is full or closed."""
        if self._closed:
            logger.error("Webhook notifier is closed; message %s not sent.", message.get("id"))
            return False
        try:
            self._queue.put_nowait(dict(message))
        except queue.Full:
            with self._lock:
                self.stats.dropped += 1
            logger.error(
                "Webhook queue is full (%d messages waiting for %s): message %s dropped.",
                self._queue.maxsize,
                self._target,
                message.get("id"),
            )
            return False
        return True

    def notify_ng(self, records: Iterable[Any]) -> int:
        """Queue a message for each record decided NG; returns how many were queued."""
        return sum(self.notify(ng_message(r)) for r in records if _field(r, "decision") == "NG")

    def close(self, timeout_s: float = 30.0) -> NotifierStats:
        """Send what is queued within ``timeout_s``, then stop; what is still unsent is logged and counted."""
        if self._closed:
            return self.stats
        self._closed = True
        deadline = time.monotonic() + timeout_s
        while True:  # the stop marker must get in even when the queue is full
            try:
                self._queue.put(_STOP, timeout=max(0.0, min(0.1, deadline - time.monotonic())))
                break
            except queue.Full:
                if time.monotonic() >= deadline:
                    break
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._abort.set()
            self._thread.join(self.timeout_s + 1.0)
        left = 0
        while True:
            try:
                if self._queue.get_nowait() is not _STOP:
                    left += 1
            except queue.Empty:
                break
        if left:
            with self._lock:
                self.stats.dropped += left
            logger.error(
                "Webhook notifier closed after %.1f s with %d message(s) unsent to %s.", timeout_s, left, self._target
            )
        logger.info("Webhook notifier closed: %s.", self.stats)
        return self.stats

    def __enter__(self) -> WebhookNotifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ worker thread

    def _work(self) -> None:
        while True:
            message = self._queue.get()
            if message is _STOP:
                return
            if self._abort.is_set():
                with self._lock:
                    self.stats.dropped += 1
                continue
            self._deliver(message)

    def _deliver(self, message: dict[str, Any]) -> None:
        body = json.dumps(message, default=str).encode("utf-8")
        headers = {**self.headers, "Idempotency-Key": str(message.get("id", ""))}
        for attempt in range(1, self.max_attempts + 1):
            retry_after = 0.0
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    response.read()
                with self._lock:
                    self.stats.sent += 1
                logger.debug("Webhook message %s delivered (attempt %d).", message.get("id"), attempt)
                return
            except urllib.error.HTTPError as exc:
                if exc.code not in RETRY_STATUSES:
                    with self._lock:
                        self.stats.failed += 1
                    logger.error(
                        "Webhook %s refused message %s: HTTP %d (not retried).",
                        self._target,
                        message.get("id"),
                        exc.code,
                    )
                    return
                reason = f"HTTP {exc.code}"
                retry_after = _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                reason = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            if attempt == self.max_attempts:
                break
            delay = min(self.max_backoff_s, max(self.backoff_s * 2 ** (attempt - 1), retry_after))
            with self._lock:
                self.stats.retries += 1
            logger.warning(
                "Webhook %s failed for message %s (%s, attempt %d of %d); retrying in %.2f s.",
                self._target,
                message.get("id"),
                reason,
                attempt,
                self.max_attempts,
                delay,
            )
            if self._abort.wait(delay):
                with self._lock:
                    self.stats.dropped += 1
                logger.error("Webhook message %s abandoned: the notifier was closed while retrying.", message.get("id"))
                return
        with self._lock:
            self.stats.failed += 1
        logger.error(
            "Webhook %s failed for message %s after %d attempts (%s); giving up.",
            self._target,
            message.get("id"),
            self.max_attempts,
            reason,
        )


def _field(record: Any, name: str) -> Any:
    return record.get(name) if isinstance(record, Mapping) else getattr(record, name, None)


def _retry_after(value: str | None) -> float:
    """Seconds of a ``Retry-After`` header (the HTTP-date form is ignored: back-off applies then)."""
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


def notifier_from_credentials(credentials: Mapping[str, Any] | None, **options: Any) -> WebhookNotifier | None:
    """A notifier for ``credentials['notifications']['webhook_url']``, or None (logged) when none is configured."""
    section = (credentials or {}).get("notifications") or {}
    url = section.get("webhook_url") if isinstance(section, Mapping) else None
    if not url:
        logger.info("No notifications.webhook_url in the credentials: NG webhook notifications are off.")
        return None
    return WebhookNotifier(str(url), **options)
