"""Revocation reaches work in flight: a detokenize that started before a grant was revoked,
retired or expired releases no value after that committed.

KMS is slowed by a stand-in on the vault's own client (a `before-send` hook, as the failure tests
inject faults) that holds Decrypt calls until the test opens the gate. The vault uses boto3's
transport here, whose calls run in threads: a held call then holds one thread, not the event
loop, and the revoke is served meanwhile. The re-check itself is the same on either transport.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

from app.container import Vault
from app.crypto.kms import KmsKeyProvider
from app.db.repositories import DataPathRepository, EventRow
from app.db.repositories.grants import GRANT_LOCK_NAMESPACE
from app.db.session import Database
from app.services.audit.events import Subject, build_event
from app.services.context import RequestContext, utcnow
from app.settings import Settings
from tests.conftest import Actors, LoopThread, assert_error, bearer, create_grant, make_settings, tokenize

LICENCE = {"customer_id": "12345", "data_type": "DriverLicense", "value": "D1234-56789-01234"}
BATCH = 12


@pytest.fixture
def settings(database_url: str, kms_key_id: str) -> Settings:
    # boto3's transport (calls in threads, see above); a deadline far beyond the test's hold, so
    # a held call is never cut off by it on a slow machine.
    return make_settings(
        database_url, kms_key_id, kms_transport="boto3", kms_call_deadline_s=60, kms_mirror_grants=False
    )


class KmsStandIn:
    """Lets the first `let_through` Decrypt calls reach KMS (moto), holds every later one until
    `gate` is set; `held` is set once a call is held."""

    def __init__(self, let_through: int) -> None:
        self.let_through = let_through
        self.calls = 0
        self.held = threading.Event()
        self.gate = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, **_: Any) -> None:
        with self._lock:
            self.calls += 1
            hold = self.calls > self.let_through
        if hold:
            self.held.set()
            self.gate.wait(30)


def slow_kms(vault: Vault, let_through: int) -> KmsStandIn:
    assert isinstance(vault.keys, KmsKeyProvider)
    stand_in = KmsStandIn(let_through)
    vault.keys.client.meta.events.register("before-send.kms.Decrypt", stand_in)
    return stand_in


def licences(client: TestClient, actors: Actors, count: int) -> dict[str, str]:
    """`count` records, token -> value."""
    made: dict[str, str] = {}
    for n in range(count):
        value = f"D{n:04d}-56789"
        made[tokenize(client, actors.onboarding, {**LICENCE, "customer_id": f"c-{n}", "value": value})] = (
            value
        )
    return made


def decrypt_grant_of(db: psycopg.Connection[Any], grantee_id: str) -> uuid.UUID:
    row = db.execute(
        "SELECT id FROM grants WHERE grantee_id = %s AND 'Decrypt' = ANY(operations) AND revoked_at IS NULL",
        (grantee_id,),
    ).fetchone()
    assert row is not None
    grant_id: uuid.UUID = row[0]
    return grant_id


def while_held(
    stand_in: KmsStandIn, request: Callable[[], httpx.Response], meanwhile: Callable[[], None]
) -> httpx.Response:
    """Send `request` in a thread; once KMS holds one of its calls, run `meanwhile`, then let
    KMS answer, and return the request's response."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        sent = pool.submit(request)
        try:
            assert stand_in.held.wait(30), "no KMS call was held"
            meanwhile()
        finally:
            stand_in.gate.set()
        return sent.result(timeout=60)


def detokenize_events(db: psycopg.Connection[Any]) -> list[tuple[str, str | None, str, uuid.UUID | None]]:
    rows = db.execute(
        "SELECT outcome, reason, token, grant_id FROM audit_events WHERE action = 'Detokenize' ORDER BY id"
    ).fetchall()
    return [(row[0], row[1], row[2], row[3]) for row in rows]


def revoke(client: TestClient, actors: Actors, grant_id: uuid.UUID) -> None:
    response = client.delete(f"/v1/grants/{grant_id}", headers=bearer(actors.admin))
    assert response.status_code == 200, response.text


def retire(client: TestClient, actors: Actors, grant_id: uuid.UUID) -> None:
    response = client.post(f"/v1/grants/{grant_id}/retire", headers=bearer(actors.kyc))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("end", "reason"), [(revoke, "grant_revoked"), (retire, "grant_retired")])
def test_a_batch_in_flight_releases_nothing_once_its_grant_is_revoked_or_retired(
    client: TestClient,
    vault: Vault,
    actors: Actors,
    db: psycopg.Connection[Any],
    end: Callable[[TestClient, Actors, uuid.UUID], None],
    reason: str,
) -> None:
    made = licences(client, actors, BATCH)
    grant_id = decrypt_grant_of(db, actors.kyc_id)
    stand_in = slow_kms(vault, let_through=3)  # a few values are decrypted before the revoke

    response = while_held(
        stand_in,
        lambda: client.post("/v1/tokens/detokenize", json={"tokens": list(made)}, headers=bearer(actors.kyc)),
        lambda: end(client, actors, grant_id),
    )

    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["token"] for r in results] == list(made)
    for result in results:
        assert "value" not in result, result
        assert result["error"]["code"] == "grant_required", result
        assert result["error"]["retryable"] is False
        assert reason not in response.text  # the reason is the audit trail's, not the caller's
    for value in made.values():
        assert value not in response.text
    assert stand_in.calls == BATCH  # every KMS call was made: the refusal came after them
    events = detokenize_events(db)
    assert sorted(token for _, _, token, _ in events) == sorted(made)
    assert {(outcome, why) for outcome, why, _, _ in events} == {("denied", reason)}
    ended = db.execute(
        "SELECT count(*) FROM audit_events WHERE action IN ('RevokeGrant', 'RetireGrant') AND grant_id = %s",
        (grant_id,),
    ).fetchone()
    assert ended is not None and ended[0] == 1


def test_a_batch_in_flight_without_a_revoke_releases_every_value(
    client: TestClient, vault: Vault, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    """The control: the same held batch, nothing revoked meanwhile."""
    made = licences(client, actors, BATCH)
    stand_in = slow_kms(vault, let_through=3)

    response = while_held(
        stand_in,
        lambda: client.post("/v1/tokens/detokenize", json={"tokens": list(made)}, headers=bearer(actors.kyc)),
        lambda: None,
    )

    assert response.status_code == 200, response.text
    assert {r["token"]: r["value"] for r in response.json()["results"]} == made
    grant_id = decrypt_grant_of(db, actors.kyc_id)
    assert {(o, why, g) for o, why, _, g in detokenize_events(db)} == {("allowed", None, grant_id)}


def test_a_single_detokenize_in_flight_is_refused_once_its_grant_is_revoked(
    client: TestClient, vault: Vault, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    token = tokenize(client, actors.onboarding, LICENCE)
    grant_id = decrypt_grant_of(db, actors.kyc_id)
    stand_in = slow_kms(vault, let_through=0)

    response = while_held(
        stand_in,
        lambda: client.get(f"/v1/tokens/{token}", headers=bearer(actors.kyc)),
        lambda: revoke(client, actors, grant_id),
    )

    assert_error(response, 403, "grant_required")
    assert LICENCE["value"] not in response.text
    assert [(o, why, t) for o, why, t, _ in detokenize_events(db)] == [("denied", "grant_revoked", token)]


def test_a_detokenize_in_flight_is_refused_once_its_grant_has_expired(
    client: TestClient, vault: Vault, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    token = tokenize(client, actors.onboarding, LICENCE)
    revoke(client, actors, decrypt_grant_of(db, actors.kyc_id))
    expires_at = datetime.now(UTC) + timedelta(seconds=2)
    create_grant(
        client, actors.admin, grantee="kyc-app", operations=["Decrypt"], expires_at=expires_at.isoformat()
    )
    stand_in = slow_kms(vault, let_through=0)

    def until_expired() -> None:
        while datetime.now(UTC) <= expires_at:
            time.sleep(0.05)

    response = while_held(
        stand_in, lambda: client.get(f"/v1/tokens/{token}", headers=bearer(actors.kyc)), until_expired
    )

    assert_error(response, 403, "grant_required")
    assert [(o, why) for o, why, _, _ in detokenize_events(db)] == [("denied", "grant_expired")]


def test_a_revoke_in_flight_leaves_values_another_active_grant_covers(
    client: TestClient, vault: Vault, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    """The re-check decides again on the grants as they stand: a second grant still covers."""
    made = licences(client, actors, 4)
    first = decrypt_grant_of(db, actors.kyc_id)
    second = create_grant(client, actors.admin, grantee="kyc-app", operations=["Decrypt"])
    stand_in = slow_kms(vault, let_through=1)

    response = while_held(
        stand_in,
        lambda: client.post("/v1/tokens/detokenize", json={"tokens": list(made)}, headers=bearer(actors.kyc)),
        lambda: revoke(client, actors, first),
    )

    assert response.status_code == 200, response.text
    assert {r["token"]: r["value"] for r in response.json()["results"]} == made
    assert {(o, str(g)) for o, _, _, g in detokenize_events(db)} == {("allowed", second["id"])}


def backend_waiting_on(db: psycopg.Connection[Any], wait_event: str) -> bool:
    """Whether a backend of this database waits for a lock of this kind ("advisory", or
    "transactionid": another transaction's row)."""
    row = db.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND wait_event = %s",
        (wait_event,),
    ).fetchone()
    return row is not None and row[0] > 0


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert condition(), what


@pytest.fixture
def releases(database_url: str, loop_thread: LoopThread) -> Iterator[DataPathRepository]:
    """The data path's repository on a Database of its own, driven on the test's event loop."""
    database = Database(database_url)
    try:
        yield DataPathRepository(database)
    finally:
        loop_thread.run(database.close_data_path())
        database.engine.dispose()
        database.side_engine.dispose()


def test_a_revoke_waits_for_a_release_that_has_already_re_checked_its_grant(
    client: TestClient,
    actors: Actors,
    db: psycopg.Connection[Any],
    releases: DataPathRepository,
    loop_thread: LoopThread,
) -> None:
    """The other order: a release has re-checked the grant (active) and not yet committed when
    the revoke comes. The revoke waits for it, so the release still comes before the revoke."""
    grant_id = decrypt_grant_of(db, actors.kyc_id)
    rechecked, finish = threading.Event(), threading.Event()

    async def release() -> list[datetime | None]:
        async with releases.release([grant_id]) as held:
            rechecked.set()
            while not finish.is_set():
                await asyncio.sleep(0.01)
            return [grant.revoked_at for grant in held.grants]

    try:
        releasing = asyncio.run_coroutine_threadsafe(release(), loop_thread.loop)
        assert rechecked.wait(10)
        with ThreadPoolExecutor(max_workers=1) as pool:
            revoking = pool.submit(client.delete, f"/v1/grants/{grant_id}", headers=bearer(actors.admin))
            wait_for(lambda: backend_waiting_on(db, "advisory"), "the revoke did not wait for the release")
            assert not revoking.done()
            finish.set()
            assert releasing.result(timeout=10) == [None]  # it saw the grant active
            assert revoking.result(timeout=10).status_code == 200
    finally:
        finish.set()


def an_allowed_event(grant_id: uuid.UUID) -> EventRow:
    subject = Subject(
        token="tok_" + "a" * 32, customer_id="12345", data_type="DriverLicense", grant_id=grant_id
    )
    return build_event("Detokenize", "allowed", RequestContext(request_id="release-test"), None, subject)


def events_with_id(db: psycopg.Connection[Any], event_id: uuid.UUID) -> int:
    row = db.execute("SELECT count(*) FROM audit_events WHERE event_id = %s", (event_id,)).fetchone()
    assert row is not None
    return int(row[0])


def test_a_one_statement_release_that_waited_for_a_revoke_sees_it_and_writes_nothing(
    actors: Actors,
    db: psycopg.Connection[Any],
    database_url: str,
    releases: DataPathRepository,
    loop_thread: LoopThread,
) -> None:
    """The usual release is one statement, whose own snapshot predates the revoke it waits for:
    the grants must be read in a snapshot taken once the lock is held, or this release would
    see the grant active and write its allowed event after the revoke committed."""
    grant_id = decrypt_grant_of(db, actors.kyc_id)
    event = an_allowed_event(grant_id)
    with psycopg.connect(database_url) as revoker:  # a revoke, as GrantRepository.get makes one
        revoker.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (GRANT_LOCK_NAMESPACE, str(grant_id))
        )
        revoker.execute("UPDATE grants SET revoked_at = now() WHERE id = %s", (grant_id,))
        releasing = asyncio.run_coroutine_threadsafe(
            releases.release_unless_changed([grant_id], [event], utcnow()), loop_thread.loop
        )
        wait_for(lambda: backend_waiting_on(db, "advisory"), "the release did not wait for the revoke")
        assert not releasing.done()
        revoker.commit()
    assert releasing.result(timeout=10) is False
    assert events_with_id(db, event.event_id) == 0


def test_a_revoke_waits_for_a_one_statement_release_that_has_checked_its_grant(
    client: TestClient,
    actors: Actors,
    db: psycopg.Connection[Any],
    database_url: str,
    releases: DataPathRepository,
    loop_thread: LoopThread,
) -> None:
    """The other order: the statement has checked the grant (active) and is still inserting its
    events when the revoke comes; the revoke waits until they have committed. The insert is held
    by an uncommitted row with the event's own id (a unique index), after the grants' locks."""
    grant_id = decrypt_grant_of(db, actors.kyc_id)
    event = an_allowed_event(grant_id)
    with psycopg.connect(database_url) as blocker, ThreadPoolExecutor(max_workers=1) as pool:
        blocker.execute(
            "INSERT INTO audit_events (event_id, time, action, outcome)"
            " VALUES (%s, now(), 'Hold', 'allowed')",
            (event.event_id,),
        )
        releasing = asyncio.run_coroutine_threadsafe(
            releases.release_unless_changed([grant_id], [event, an_allowed_event(grant_id)], utcnow()),
            loop_thread.loop,
        )
        wait_for(lambda: backend_waiting_on(db, "transactionid"), "the release's insert was not held")
        revoking = pool.submit(client.delete, f"/v1/grants/{grant_id}", headers=bearer(actors.admin))
        wait_for(lambda: backend_waiting_on(db, "advisory"), "the revoke did not wait for the release")
        assert not revoking.done()
        blocker.rollback()
        assert releasing.result(timeout=10) is True
        assert revoking.result(timeout=10).status_code == 200
    assert events_with_id(db, event.event_id) == 1
    row = db.execute(
        "SELECT (SELECT id FROM audit_events WHERE event_id = %s)"
        " < (SELECT id FROM audit_events WHERE action = 'RevokeGrant')",
        (event.event_id,),
    ).fetchone()
    assert row == (True,)  # the release's events come first in the trail
