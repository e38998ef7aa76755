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
RATE_LIMITED = Counter("piivault_rate_limited_total", "Requests refused with 429", ["kind"])
RATE_LIMIT_FALLBACK = Counter(
    "piivault_rate_limit_storage_fallback_total",
    "Rate-limit checks made per process because the shared storage (Redis) failed",
)
AUTH_FAILURES_AGGREGATED = Counter(
    "piivault_auth_failures_aggregated_total",
    "Failed authentications counted into an aggregate audit event instead of a row of their own",
)
