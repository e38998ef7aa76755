"""Prometheus metrics. Labels are routes, actions and reasons: never a value, a token or a customer."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter("piivault_requests_total", "HTTP requests served", ["method", "route", "status"])
LATENCY = Histogram(
    "piivault_request_duration_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
DENIALS = Counter(
    "piivault_denials_total", "Refused operations and failed authentications", ["action", "reason"]
)
AUDIT_EVENTS = Counter("piivault_audit_events_total", "Audit events committed", ["action", "outcome"])
ALERTS_DROPPED = Counter("piivault_alert_webhook_dropped_total", "Alerts the webhook could not take")
ALERTS_FAILED = Counter("piivault_alert_webhook_failed_total", "Alerts not delivered after every retry")
# Answers sent again for a repeated Idempotency-Key, by route (a fixed set of paths).
IDEMPOTENT_REPLAYS = Counter(
    "piivault_idempotent_replays_total", "Stored answers replayed for a repeated Idempotency-Key", ["path"]
)
