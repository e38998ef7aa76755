"""Prometheus metrics. Labels are routes, operations, outcomes, error codes, pool and sweeper names:
bounded sets the code spells, never a value, a token, a key or a customer.

Gauges say how they add up over several workers (PROMETHEUS_MULTIPROC_DIR): pools sum over the
live workers; times and ages take the most recent worker's value.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import Counter, Gauge, Histogram

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

# KMS: operation is the API's (GenerateDataKey, Decrypt, ReEncrypt, DescribeKey, CreateGrant,
# RevokeGrant); outcome "ok" or the vault's error code for the failure (key_service_unavailable...).
KMS_CALLS = Counter("piivault_kms_calls_total", "Calls to the key service", ["operation", "outcome"])
KMS_LATENCY = Histogram(
    "piivault_kms_call_duration_seconds",
    "Key service call latency, retries included",
    ["operation"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

# Database pools: "orm" (admin routes, sealer), "side" (denials' audit), "data" (the data path).
DB_POOL_SIZE = Gauge(
    "piivault_db_pool_size", "Connections the pool may open", ["pool"], multiprocess_mode="livesum"
)
DB_POOL_IN_USE = Gauge(
    "piivault_db_pool_in_use", "Connections checked out now", ["pool"], multiprocess_mode="livesum"
)
DB_POOL_WAITING = Gauge(
    "piivault_db_pool_waiting",
    "Requests waiting for a connection (the data path's pool; 0 for the others, which do not say)",
    ["pool"],
    multiprocess_mode="livesum",
)

AUDIT_SEAL_LAG = Gauge(
    "piivault_audit_seal_lag_seconds",
    "Age of the oldest committed audit event not yet sealed into the chain (0: none waiting)",
    multiprocess_mode="mostrecent",
)
AUDIT_LAST_SEAL = Gauge(
    "piivault_audit_last_seal_timestamp_seconds",
    "When a sealer pass last completed (Unix time)",
    multiprocess_mode="mostrecent",
)
SWEEPER_LAST_RUN = Gauge(
    "piivault_sweeper_last_run_timestamp_seconds",
    "When a background sweeper last completed a run (Unix time), by sweeper",
    ["sweeper"],
    multiprocess_mode="mostrecent",
)

READY = Gauge(
    "piivault_ready",
    "1 if the last readiness check (database and key service) passed, 0 if not",
    multiprocess_mode="livemin",
)

# operation: tokenize or detokenize; outcome "ok" or the item's error code.
BATCH_ITEMS = Counter("piivault_batch_items_total", "Batch items by outcome", ["operation", "outcome"])
IDEMPOTENCY_REPLAYS = Counter(
    "piivault_idempotency_replays_total",
    "Requests answered from a stored response for a repeated Idempotency-Key, by route template",
    ["route"],
)


def observe_kms_call(operation: str, outcome: str, seconds: float) -> None:
    KMS_CALLS.labels(operation, outcome).inc()
    KMS_LATENCY.labels(operation).observe(seconds)


def sweeper_ran(sweeper: str, at: float | None = None) -> None:
    """A sweeper (grant, retention, ...) finished a run: call it after each successful run."""
    SWEEPER_LAST_RUN.labels(sweeper).set(time.time() if at is None else at)


def sealed(lag_s: float, at: float | None = None) -> None:
    """A sealer pass completed; lag_s: the oldest unsealed event's age afterwards."""
    AUDIT_LAST_SEAL.set(time.time() if at is None else at)
    AUDIT_SEAL_LAG.set(max(lag_s, 0.0))


def sealed_pass(at: float | None = None) -> None:
    """A sealer pass completed (the lag not measured this time)."""
    AUDIT_LAST_SEAL.set(time.time() if at is None else at)


def batch_items(operation: str, outcomes: Iterable[str]) -> None:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    for outcome, count in counts.items():
        BATCH_ITEMS.labels(operation, outcome).inc(count)


def idempotent_replay(route: str) -> None:
    """A repeated Idempotency-Key answered from the stored response; route: the route template."""
    IDEMPOTENCY_REPLAYS.labels(route).inc()


_pool_sources: list[Callable[[], dict[str, tuple[int, int, int]]]] = []


def watch_pools(source: Callable[[], dict[str, tuple[int, int, int]]]) -> Callable[[], None]:
    """Register a function answering {pool: (size, in use, waiting)}; returns its unregistration."""
    _pool_sources.append(source)
    return lambda: _pool_sources.remove(source) if source in _pool_sources else None


def refresh() -> None:
    """Read the gauges that are sampled rather than counted (pools): on each scrape, and on a timer."""
    for source in list(_pool_sources):
        try:
            stats = source()
        except Exception:  # noqa: S112 (a pool closing under a scrape: skip it this time)
            continue
        for pool, (size, in_use, waiting) in stats.items():
            DB_POOL_SIZE.labels(pool).set(size)
            DB_POOL_IN_USE.labels(pool).set(in_use)
            DB_POOL_WAITING.labels(pool).set(waiting)


ALARMS = Counter(
    "piivault_alarms_total", "Allowed actions that raise an alarm (a break-glass admin)", ["kind", "action"]
)
RATE_LIMITED = Counter("piivault_rate_limited_total", "Requests refused with 429", ["kind"])
RATE_LIMIT_FALLBACK = Counter(
    "piivault_rate_limit_storage_fallback_total",
    "Rate-limit checks made per process because the shared storage (Redis) failed",
)
AUTH_FAILURES_AGGREGATED = Counter(
    "piivault_auth_failures_aggregated_total",
    "Failed authentications counted into an aggregate audit event instead of a row of their own",
)
