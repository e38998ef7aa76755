"""Alerts on denials and failed authentications: a JSON WARNING log line, a Prometheus counter and,
when configured, a webhook POST in the background that never blocks or fails a request."""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
from collections.abc import Sequence
from typing import Any

import httpx

from app.db.models import AuditEvent
from app.db.repositories.data_path import EventRow
from app.metrics import ALARMS, ALERTS_DROPPED, ALERTS_FAILED, DENIALS

log = logging.getLogger("piivault.alerts")
# Errors that mean someone may be tampering, not just an outage.
ALARMING_ERRORS = frozenset({"record_integrity"})

_FIELDS = (
    "event_id", "time", "request_id", "principal_id", "principal_name", "api_key_id", "action",
    "outcome", "reason", "token", "customer_id", "data_type", "grant_id", "target_id",
    "access_reason", "source_ip", "user_agent", "kms_request_id", "repeat_count", "chain_seq",
)  # fmt: skip


def event_fields(event: AuditEvent | EventRow) -> dict[str, Any]:
    """An event as plain JSON-able fields. Events carry identifiers only, never a value."""
    out: dict[str, Any] = {}
    for name in _FIELDS:
        value: Any = getattr(event, name, None)  # an event not yet sealed has no chain_seq
        out[name] = (
            value.isoformat()
            if hasattr(value, "isoformat")
            else (str(value) if value is not None and not isinstance(value, int | str) else value)
        )
    return out


class Webhook:
    """Delivers alerts to a URL from one background thread, with retries and a bounded queue."""

    def __init__(
        self,
        url: str,
        *,
        attempts: int = 4,
        backoff_s: float = 0.5,
        timeout_s: float = 3.0,
        capacity: int = 10000,
    ) -> None:
        self._url = url
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=capacity)
        self._client = httpx.Client(timeout=timeout_s, follow_redirects=False)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alert-webhook", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return "Webhook(<url hidden>)"

    def submit(self, payload: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(payload)
        except queue.Full:
            ALERTS_DROPPED.inc()

    def _run(self) -> None:
        while (payload := self._queue.get()) is not None:
            self._deliver(payload)

    def _deliver(self, payload: dict[str, Any]) -> None:
        for attempt in range(self._attempts):
            try:
                response = self._client.post(self._url, json=payload)
                if response.status_code < 500 and response.status_code != 429:
                    return
            except httpx.HTTPError:
                pass
            if self._stopping.wait(self._backoff_s * 2**attempt):
                return  # shutting down

        ALERTS_FAILED.inc()
        log.warning(json.dumps({"alert_webhook": "undelivered", "event_id": payload.get("event_id")}))

    def close(self, wait_s: float = 2.0) -> None:
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout=wait_s)
        if not self._thread.is_alive():
            self._client.close()
        if not self._queue.empty():
            log.warning(
                json.dumps({"alert_webhook": "undelivered at shutdown", "pending": self._queue.qsize()})
            )


class Alerter:
    def __init__(self, webhook: Webhook | None = None) -> None:
        self._webhook = webhook

    def denied(self, events: Sequence[EventRow]) -> None:
        """Raise the alarm for refusals, and for records that failed their integrity check."""
        for event in events:
            if event.outcome != "denied" and event.reason not in ALARMING_ERRORS:
                continue
            DENIALS.labels(event.action, event.reason or "unknown").inc()
            fields = event_fields(event)
            kind = "denied" if event.outcome == "denied" else "integrity"
            log.warning(json.dumps({"alert": kind, **fields}, sort_keys=True))
            if self._webhook is not None:
                self._webhook.submit({"alert": kind, **fields})

    def alarm(self, kind: str, events: Sequence[EventRow]) -> None:
        """An alarm of `kind` (e.g. break_glass) for each event, whatever its outcome."""
        for event in events:
            ALARMS.labels(kind, event.action).inc()
            fields = event_fields(event)
            log.warning(json.dumps({"alert": kind, **fields}, sort_keys=True))
            if self._webhook is not None:
                self._webhook.submit({"alert": kind, **fields})

    def close(self) -> None:
        if self._webhook is not None:
            self._webhook.close()
