"""Retention: expires_at on tokenize, the per-type cap behind RetentionCaps, expired records refused
at once, and the sweeper (one at a time, by an advisory lock) erasing them, audited as Expire."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from fastapi.testclient import TestClient

from app.container import Vault
from app.db.repositories.erasure import RETENTION_SWEEP_LOCK
from app.services.context import RequestContext
from tests.conftest import Actors, assert_error, bearer, build_seed, tokenize
from tests.test_erasure import UNKNOWN, events, grant_to, record_row, without_request_id

FUTURE = datetime.now(UTC) + timedelta(days=365)


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def licence(customer_id: str = "12345", **extra: Any) -> dict[str, Any]:
    return {"customer_id": customer_id, "data_type": "DriverLicense", "value": "D1234-56789", **extra}


def expire_now(db: psycopg.Connection[Any], *tokens: str) -> None:
    """Move records' expiry into the past (rather than wait for it)."""
    db.execute(
        "UPDATE records SET expires_at = now() - interval '1 second' WHERE token = ANY(%s)", (list(tokens),)
    )


def sweep(client: TestClient, vault: Vault) -> int | None:
    """One sweep on the app's own event loop (the data path's pool belongs to it)."""
    assert client.portal is not None  # the client is entered
    result: int | None = client.portal.call(vault.retention.sweep, RequestContext("test-sweep"))
    return result


def test_expires_at_is_stored_and_echoed_single_and_batch(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    single = client.post(
        "/v1/tokens", json=licence(expires_at=iso(FUTURE)), headers=bearer(actors.onboarding)
    )
    assert single.status_code == 201, single.text
    assert datetime.fromisoformat(single.json()["expires_at"]) == FUTURE
    assert record_row(db, single.json()["token"])["expires_at"] == FUTURE
    plain = client.post("/v1/tokens", json=licence(), headers=bearer(actors.onboarding))
    assert plain.json()["expires_at"] is None

    batch = client.post(
        "/v1/tokens/batch",
        json={"items": [licence(expires_at=iso(FUTURE)), licence()]},
        headers=bearer(actors.onboarding),
    )
    assert batch.status_code == 200, batch.text
    first, second = batch.json()["results"]
    assert datetime.fromisoformat(first["expires_at"]) == FUTURE
    assert "expires_at" not in second
    assert record_row(db, first["token"])["expires_at"] == FUTURE


def test_an_expiry_in_the_past_or_unparseable_is_refused_naming_the_field(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    past = iso(datetime.now(UTC) - timedelta(minutes=1))
    for bad in (past, "next tuesday", "2030-01-01T00:00:00"):  # the last: no offset
        response = client.post("/v1/tokens", json=licence(expires_at=bad), headers=bearer(actors.onboarding))
        assert_error(response, 422, "invalid_input", "expires_at")
    batch = client.post(
        "/v1/tokens/batch",
        json={"items": [licence(expires_at=past), licence(expires_at="soon")]},
        headers=bearer(actors.onboarding),
    )
    assert batch.status_code == 200, batch.text
    first, second = batch.json()["results"]
    assert first["error"]["field"] == "expires_at"
    assert second["error"]["field"] == "items[1].expires_at"
    assert db.execute("SELECT count(*) FROM records").fetchone() == (0,)


def cap(client: TestClient, admin: str, days: int) -> None:
    """The registry's max_retention_days for DriverLicense, set as an admin sets it."""
    response = client.put(
        "/v1/data-types/DriverLicense", json={"max_retention_days": days}, headers=bearer(admin)
    )
    assert response.status_code == 200, response.text


def test_the_types_cap_bounds_expires_at_and_applies_when_it_is_absent(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    cap(client, actors.admin, 30)
    before = datetime.now(UTC)

    defaulted = client.post("/v1/tokens", json=licence(), headers=bearer(actors.onboarding))
    too_long = client.post(
        "/v1/tokens",
        json=licence(expires_at=iso(before + timedelta(days=31))),
        headers=bearer(actors.onboarding),
    )
    within = client.post(
        "/v1/tokens",
        json=licence(expires_at=iso(before + timedelta(days=29))),
        headers=bearer(actors.onboarding),
    )

    assert defaulted.status_code == 201, defaulted.text
    expiry = datetime.fromisoformat(defaulted.json()["expires_at"])
    assert before + timedelta(days=30) <= expiry <= datetime.now(UTC) + timedelta(days=30)
    assert_error(too_long, 422, "retention_exceeded", "expires_at")
    assert within.status_code == 201, within.text
    # A change of the cap applies to records written after it, never to those already stored.
    cap(client, actors.admin, 1)
    assert record_row(db, defaulted.json()["token"])["expires_at"] == expiry
    later = client.post("/v1/tokens", json=licence(), headers=bearer(actors.onboarding))
    assert later.status_code == 201, later.text
    assert datetime.fromisoformat(later.json()["expires_at"]) <= datetime.now(UTC) + timedelta(days=1)


def test_an_expired_record_is_refused_at_once_before_any_sweep(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    token = tokenize(client, actors.onboarding, licence(expires_at=iso(FUTURE)))
    ssn_reader = grant_to(
        client, actors, "ssn-reader", ["Decrypt"], encryption_context_subset={"dataType": "SSN"}
    )
    expire_now(db, token)

    assert_error(client.get(f"/v1/tokens/{token}", headers=bearer(actors.kyc)), 410, "expired")
    batch = client.post("/v1/tokens/detokenize", json={"tokens": [token]}, headers=bearer(actors.kyc))
    assert batch.json()["results"][0]["error"]["code"] == "expired"
    gone = client.get(f"/v1/tokens/{token}", headers=bearer(ssn_reader))
    unknown = client.get(f"/v1/tokens/{UNKNOWN}", headers=bearer(ssn_reader))
    assert without_request_id(gone) == without_request_id(unknown)
    # Still a full row: nothing has swept it yet; refused all the same.
    assert record_row(db, token)["ciphertext"] is not None
    assert ("denied", "expired", token) in [e[:3] for e in events(db, "Detokenize")]
    # Erasing it: an eraser not covering it gets the unknown-token answer; a covering one erases.
    ssn_eraser = grant_to(
        client, actors, "ssn-eraser", ["Erase"], encryption_context_subset={"dataType": "SSN"}
    )
    refused = client.delete(f"/v1/tokens/{token}", headers=bearer(ssn_eraser))
    unknown = client.delete(f"/v1/tokens/{UNKNOWN}", headers=bearer(ssn_eraser))
    assert refused.status_code == 404 and without_request_id(refused) == without_request_id(unknown)
    licence_eraser = grant_to(client, actors, "licence-eraser", ["Erase"])
    assert client.delete(f"/v1/tokens/{token}", headers=bearer(licence_eraser)).status_code == 204
    assert record_row(db, token)["ciphertext"] is None


def test_the_sweeper_erases_expired_records_and_audits_expire(
    client: TestClient, vault: Vault, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    expired = [
        tokenize(client, actors.onboarding, licence(f"c-{n}", expires_at=iso(FUTURE))) for n in range(3)
    ]
    kept = tokenize(client, actors.onboarding, licence("c-9", expires_at=iso(FUTURE)))
    forever = tokenize(client, actors.onboarding, licence("c-9"))
    expire_now(db, *expired)

    assert sweep(client, vault) == 3
    assert sweep(client, vault) == 0

    for token in expired:
        row = record_row(db, token)
        assert row["erased_at"] is not None and row["ciphertext"] is None and row["wrapped_key"] is None
        assert row["erasure_reason"] == "retention period ended"
    assert record_row(db, kept)["erased_at"] is None and record_row(db, forever)["erased_at"] is None
    audited = events(db, "Expire")
    assert sorted(e[2] for e in audited) == sorted(expired)
    assert {e[0] for e in audited} == {"allowed"}
    # After the sweep, an erased record: 410 erased to the covered caller.
    assert_error(client.get(f"/v1/tokens/{expired[0]}", headers=bearer(actors.kyc)), 410, "erased")
    assert client.get("/v1/audit/verify", headers=bearer(actors.admin)).json()["ok"] is True


def test_one_sweeper_at_a_time(
    client: TestClient, vault: Vault, actors: Actors, db: psycopg.Connection[Any], database_url: str
) -> None:
    token = tokenize(client, actors.onboarding, licence(expires_at=iso(FUTURE)))
    expire_now(db, token)
    # Another replica's sweep holds the lock (in its transaction).
    with psycopg.connect(database_url) as other, other.transaction():
        other.execute("SELECT pg_advisory_xact_lock(%s)", (RETENTION_SWEEP_LOCK,))
        assert sweep(client, vault) is None
        assert record_row(db, token)["erased_at"] is None
    assert sweep(client, vault) == 1
    assert record_row(db, token)["erased_at"] is not None


def test_the_sweeper_runs_in_the_background_when_configured(
    make_client: Any, kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    vault, client = make_client(kms_key_id, retention_sweep_interval_s=0.05)
    actors = build_seed(client, vault)
    token = tokenize(client, actors.onboarding, licence(expires_at=iso(FUTURE)))
    expire_now(db, token)
    # Wait for the background task (bounded; no timing asserted, only that it happens).
    for _ in range(200):
        if record_row(db, token)["erased_at"] is not None:
            break
        assert client.portal is not None
        client.portal.call(_pause)
    assert record_row(db, token)["erased_at"] is not None
    assert [e[2] for e in events(db, "Expire")] == [token]


async def _pause() -> None:
    import asyncio

    await asyncio.sleep(0.05)
