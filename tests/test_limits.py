"""Rate limits: per principal (in process, and shared through Redis), and failed authentications
per source, with their audit bounded. Through HTTP on the real PostgreSQL with moto."""

from __future__ import annotations

import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from limits.strategies import MovingWindowRateLimiter

from app.metrics import RATE_LIMIT_FALLBACK
from app.services.limits import MemoryCounts, principal_item
from tests.conftest import (
    ClientFactory,
    assert_error,
    bearer,
    build_seed,
    create_admin,
    make_settings,
)
from tests.processes import free_port

REDIS_URL = "redis://127.0.0.1:6379/0"
LICENCE = {"customer_id": "12345", "data_type": "DriverLicense", "value": "D1234-56789-01234"}
BAD_KEY = "pv_0123456789abcdef_" + "z" * 43


def redis_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def set_limit(client: TestClient, admin: str, principal_id: str, limit: dict[str, int] | None) -> Any:
    return client.put(
        f"/v1/principals/{principal_id}/rate-limit", json={"rate_limit": limit}, headers=bearer(admin)
    )


def tokenize_status(client: TestClient, key: str) -> int:
    status: int = client.post("/v1/tokens", json=LICENCE, headers=bearer(key)).status_code
    return status


# Per principal, in this process


def test_in_process_counting_starts_no_thread_per_hit_and_still_expires_old_entries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """limits' own MemoryStorage starts a timer thread 10 ms after the last one ended, on the
    request path; MemoryCounts at most once per expiry_interval_s. Old entries still go, with
    the next expiry run that activity schedules (as in limits' own)."""
    started: list[threading.Thread] = []
    start = threading.Thread.start

    def counted(thread: threading.Thread) -> None:
        started.append(thread)
        start(thread)

    storage = MemoryCounts()
    storage.expiry_interval_s = 0.2
    limiter = MovingWindowRateLimiter(storage)
    item = principal_item(50, 50)  # 50 in any 1 s
    monkeypatch.setattr(threading.Thread, "start", counted)
    for _ in range(50):  # 50 hits over 100 ms or more: limits' own storage starts ten threads
        assert limiter.hit(item, "principal", "p")
        time.sleep(0.002)
    assert len(started) <= 1
    assert not limiter.hit(item, "principal", "p")  # the 51st within the window: refused
    time.sleep(1.1)  # the entries' window (1 s) has passed
    assert limiter.hit(item, "principal", "another")  # activity schedules an expiry run (0.2 s)
    time.sleep(0.5)
    assert storage.events.get(item.key_for("principal", "p")) in (None, [])


def test_a_principal_over_its_default_rate_gets_429_with_retry_after(
    make_client: ClientFactory, kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    # 10 requests in any window of 10 s: the eleventh at once is refused.
    vault, client = make_client(kms_key_id, rate_limit_rps=1, rate_limit_burst=10)
    admin = create_admin(vault)
    statuses = [client.get("/v1/principals", headers=bearer(admin)).status_code for _ in range(10)]
    assert statuses == [200] * 10
    events_before = db.execute("SELECT count(*) FROM audit_events").fetchone()
    refused = client.get("/v1/principals", headers=bearer(admin))
    assert_error(refused, 429, "rate_limited")
    assert 1 <= int(refused.headers["Retry-After"]) <= 10
    # Refusals for rate are counted in a metric, not written one by one (that is the flood).
    assert db.execute("SELECT count(*) FROM audit_events").fetchone() == events_before


def test_an_admin_sets_a_principals_own_limit_which_binds_the_data_path_at_once(
    make_client: ClientFactory, kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    vault, client = make_client(kms_key_id)
    actors = build_seed(client, vault)
    answer = set_limit(client, actors.admin, actors.onboarding_id, {"rps": 1, "burst": 5})
    assert answer.status_code == 200, answer.text
    assert answer.json()["rate_limit"] == {"rps": 1, "burst": 5}
    shown = client.get(f"/v1/principals/{actors.onboarding_id}", headers=bearer(actors.admin))
    assert shown.json()["rate_limit"] == {"rps": 1, "burst": 5}

    assert [tokenize_status(client, actors.onboarding) for _ in range(5)] == [201] * 5
    refused = client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding))
    assert_error(refused, 429, "rate_limited")
    assert int(refused.headers["Retry-After"]) >= 1
    # Another principal is not limited by it.
    kyc = client.get("/v1/principals", headers=bearer(actors.admin))
    assert kyc.status_code == 200
    # The setting is audited: who set a limit, for whom.
    row = db.execute(
        "SELECT principal_id::text, target_id, outcome FROM audit_events WHERE action = 'SetRateLimit'"
    ).fetchone()
    assert row is not None and row[1] == actors.onboarding_id and row[2] == "allowed"

    # Back to the vault's defaults (high in tests): served again.
    assert set_limit(client, actors.admin, actors.onboarding_id, None).json()["rate_limit"] is None
    assert tokenize_status(client, actors.onboarding) == 201


def test_only_an_admin_sets_a_limit_and_burst_must_cover_rps(
    make_client: ClientFactory, kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    vault, client = make_client(kms_key_id)
    actors = build_seed(client, vault)
    # A service cannot lift its own limit.
    own = set_limit(client, actors.onboarding, actors.onboarding_id, {"rps": 1000, "burst": 1000})
    assert_error(own, 403, "forbidden")
    assert_error(
        set_limit(client, actors.admin, actors.onboarding_id, {"rps": 10, "burst": 5}), 422, "invalid_input"
    )
    assert_error(
        set_limit(client, actors.admin, actors.onboarding_id, {"rps": 0, "burst": 5}), 422, "invalid_input"
    )
    outcomes = db.execute("SELECT outcome, reason FROM audit_events WHERE action = 'SetRateLimit'").fetchall()
    assert outcomes == [("denied", "role_required")]  # the service's attempt; nothing was set


# Per principal, shared through Redis


@pytest.mark.skipif(not redis_answers(), reason="no Redis answers at 127.0.0.1:6379 (CI runs one)")
def test_replicas_share_a_principals_limit_through_redis(
    make_client: ClientFactory, kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    first, one = make_client(kms_key_id, redis_url=REDIS_URL)
    _, other = make_client(kms_key_id, redis_url=REDIS_URL)
    actors = build_seed(one, first)
    assert set_limit(one, actors.admin, actors.onboarding_id, {"rps": 1, "burst": 6}).status_code == 200
    # Three requests through each replica use up the burst of 6: the seventh is refused on either.
    statuses = [tokenize_status(client, actors.onboarding) for client in (one, other) * 3]
    assert statuses == [201] * 6
    assert_error(
        other.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding)), 429, "rate_limited"
    )
    assert_error(one.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding)), 429, "rate_limited")


def test_redis_down_keeps_the_vault_serving_with_limits_per_process(
    make_client: ClientFactory, kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    # Nothing listens there: every Redis call fails, as with Redis down at run time.
    vault, client = make_client(
        kms_key_id, redis_url=f"redis://127.0.0.1:{free_port()}/0", rate_limit_rps=1, rate_limit_burst=10
    )
    fallbacks = RATE_LIMIT_FALLBACK._value.get()
    admin = create_admin(vault)
    statuses = [client.get("/v1/principals", headers=bearer(admin)).status_code for _ in range(11)]
    # Served (fail open), and still limited, by this process's own counters.
    assert statuses == [200] * 10 + [429]
    assert RATE_LIMIT_FALLBACK._value.get() > fallbacks


# Failed authentications


def _audit_rows(db: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT reason, target_id, source_ip, repeat_count FROM audit_events"
        " WHERE action = 'Authenticate' ORDER BY id"
    ).fetchall()


def test_a_flood_of_bad_keys_is_refused_per_source_and_its_audit_stays_bounded(
    make_client: ClientFactory, kms_key_id: str, db: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    vault, client = make_client(kms_key_id, auth_failure_limit=5, auth_failure_window_s=60)
    admin = create_admin(vault)
    bad_keys = [f"pv_{index:016x}_" + "z" * 43 for index in range(3)]

    def attempt(index: int) -> tuple[int, str | None]:
        path = "/v1/principals" if index % 2 else "/v1/tokens/tok_" + "a" * 32
        response = client.get(path, headers=bearer(bad_keys[index % 3]))
        return response.status_code, response.headers.get("Retry-After")

    caplog.set_level("WARNING", logger="piivault.alerts")
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(attempt, range(400)))
    statuses = [status for status, _ in answers]
    # The limit, the one that found it full, and those already past the check meanwhile.
    assert statuses.count(401) <= 5 + 1 + 16
    assert statuses.count(429) >= 400 - 22
    assert all(int(retry) >= 1 for status, retry in answers if status == 429 and retry is not None)
    assert all(retry is not None for status, retry in answers if status == 429)

    # Rows and alert lines: a few, not 400 (one per key id and reason, one for the refusals).
    rows = _audit_rows(db)
    assert len(rows) <= 3 + 1 + 16, rows
    alert_lines = [r for r in caplog.records if r.name == "piivault.alerts"]
    assert len(alert_lines) <= len(rows)

    # A valid key from another address is not blocked; from the flooding address it waits too.
    other = TestClient(client.app, client=("192.0.2.7", 40000))
    assert other.get("/v1/principals", headers=bearer(admin)).status_code == 200
    assert_error(client.get("/v1/principals", headers=bearer(admin)), 429, "rate_limited")

    # Every attempt is on record: the rows written at once plus the counts of the aggregates.
    assert vault.principals.flush_failed_authentications(everything=True) >= 1
    rows = _audit_rows(db)
    flood = [row for row in rows if row[2] == "testclient"]
    # (An event without a count stands for itself; an aggregate for its count.)
    assert sum(row[3] or 1 for row in flood) == 400 + 1  # and the admin's refused request
    aggregates = [row for row in flood if row[3]]
    assert aggregates and all(row[3] >= 1 for row in aggregates)
    assert {row[0] for row in flood} == {"unknown_key", "rate_limited"}


def test_the_aggregate_carries_its_count_in_the_trail_and_the_count_is_tamper_evident(
    make_client: ClientFactory, kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    vault, client = make_client(kms_key_id, auth_failure_limit=1000)
    admin = create_admin(vault, "auditor-admin")
    for _ in range(7):
        assert client.get("/v1/principals", headers=bearer(BAD_KEY)).status_code == 401
    assert vault.principals.flush_failed_authentications(everything=True) == 1
    events = client.get("/v1/audit/events", params={"action": "Authenticate"}, headers=bearer(admin)).json()[
        "events"
    ]
    assert sorted(event["repeat_count"] or 0 for event in events) == [0, 6]
    assert {event["target_id"] for event in events} == {"0123456789abcdef"}
    assert client.get("/v1/audit/verify", headers=bearer(admin)).json()["ok"] is True

    # Shrinking the count afterwards is found.
    db.execute("UPDATE audit_events SET repeat_count = 1 WHERE repeat_count = 6")
    report = client.get("/v1/audit/verify", headers=bearer(admin)).json()
    assert report["ok"] is False


def test_a_failure_after_its_window_is_written_again(
    make_client: ClientFactory, kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    vault, client = make_client(kms_key_id, auth_failure_window_s=1)
    clock = [1000.0]
    vault.principals._failures._clock = lambda: clock[0]
    for _ in range(3):
        client.get("/v1/principals", headers=bearer(BAD_KEY))
    clock[0] += 1.5  # the window has ended; no flush ran yet
    client.get("/v1/principals", headers=bearer(BAD_KEY))
    # The first window's two repeats, written by this flush or the background one.
    vault.principals.flush_failed_authentications()
    assert [row[3] for row in _audit_rows(db)] == [None, None, 2]


@pytest.mark.skipif(not redis_answers(), reason="no Redis answers at 127.0.0.1:6379 (CI runs one)")
def test_replicas_share_the_count_of_failed_authentications_through_redis(
    make_client: ClientFactory, kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    _, one = make_client(kms_key_id, redis_url=REDIS_URL, auth_failure_limit=3)
    _, other = make_client(kms_key_id, redis_url=REDIS_URL, auth_failure_limit=3)
    # An address of this test's own: the counts in Redis outlive a test run by their window.
    address = f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"
    one_from, other_from = (TestClient(c.app, client=(address, 40000)) for c in (one, other))
    for _ in range(3):
        assert one_from.get("/v1/principals", headers=bearer(BAD_KEY)).status_code == 401
    # The other replica's first failure from there is over the shared count: from then on it refuses.
    assert other_from.get("/v1/principals", headers=bearer(BAD_KEY)).status_code == 401
    assert_error(other_from.get("/v1/principals", headers=bearer(BAD_KEY)), 429, "rate_limited")


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"rate_limit_rps": 10, "rate_limit_burst": 5}, "PIIVAULT_RATE_LIMIT_BURST"),
        ({"redis_url": "http://127.0.0.1:6379"}, "PIIVAULT_REDIS_URL"),
    ],
)
def test_settings_refuse_a_burst_below_the_rate_and_a_redis_url_that_is_not_one(
    database_url: str, overrides: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        make_settings(database_url, None, **overrides)
