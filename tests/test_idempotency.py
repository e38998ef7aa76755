"""Idempotency-Key on POST /v1/tokens, /v1/tokens/batch, /v1/grants and /v1/principals, through
HTTP on the real PostgreSQL with moto's KMS."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from app.api.schemas import TokenizeRequest
from app.container import Vault
from app.crypto.keys import DataKey, EncryptionContext
from app.db.repositories.idempotency import IdempotencyRepository
from app.db.session import Database
from app.errors import IdempotencyInFlight, KeyServiceUnavailable
from app.metrics import IDEMPOTENCY_REPLAYS
from app.services.idempotency import Answer, IdempotentRequest
from tests.conftest import Actors, LoopThread, assert_error, bearer, create_principal

LICENCE = {"customer_id": "12345", "data_type": "DriverLicense", "value": "D1234-56789-01234"}


def keyed(key: str, api_key: str) -> dict[str, str]:
    return {**bearer(api_key), "Idempotency-Key": key}


def count(db: psycopg.Connection[Any], query: str, *args: Any) -> int:
    row = db.execute(query, args).fetchone()
    assert row is not None
    return int(row[0])


def records(db: psycopg.Connection[Any]) -> int:
    return count(db, "SELECT count(*) FROM records")


def tokenize_events(db: psycopg.Connection[Any]) -> int:
    return count(db, "SELECT count(*) FROM audit_events WHERE action = 'Tokenize' AND outcome = 'allowed'")


@pytest.fixture
def kms_calls(vault: Vault, monkeypatch: pytest.MonkeyPatch) -> list[EncryptionContext]:
    """Every GenerateDataKey the vault asks for."""
    calls: list[EncryptionContext] = []
    inner = vault.keys.generate_data_key

    async def counted(context: EncryptionContext) -> DataKey:
        calls.append(context)
        return await inner(context)

    monkeypatch.setattr(vault.keys, "generate_data_key", counted)
    return calls


def test_a_retried_tokenize_gets_the_first_answer_and_stores_nothing_twice(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], kms_calls: list[EncryptionContext]
) -> None:
    replays_before = IDEMPOTENCY_REPLAYS.labels("/v1/tokens")._value.get()
    first = client.post("/v1/tokens", json=LICENCE, headers=keyed("order-1", actors.onboarding))
    assert first.status_code == 201, first.text
    assert "Idempotent-Replayed" not in first.headers
    # The same body with its keys in another order and other spacing is the same body.
    reordered = json.dumps(dict(reversed(list(LICENCE.items()))), indent=2)
    headers = {**keyed("order-1", actors.onboarding), "Content-Type": "application/json"}
    again = client.post("/v1/tokens", content=reordered, headers=headers)
    assert again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert again.headers["X-Request-ID"] != first.headers["X-Request-ID"]
    assert records(db) == 1 and tokenize_events(db) == 1
    assert len(kms_calls) == 1
    assert IDEMPOTENCY_REPLAYS.labels("/v1/tokens")._value.get() == replays_before + 1
    # Without a key, nothing is kept and every request stores.
    plain = client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding))
    assert plain.status_code == 201 and plain.json()["token"] != first.json()["token"]
    assert records(db) == 2
    assert count(db, "SELECT count(*) FROM idempotency_keys") == 1


def test_the_same_key_with_another_body_is_refused(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    assert client.post("/v1/tokens", json=LICENCE, headers=keyed("k", actors.onboarding)).status_code == 201
    other = {**LICENCE, "value": "D9999-00000-00000"}
    refused = client.post("/v1/tokens", json=other, headers=keyed("k", actors.onboarding))
    assert_error(refused, 422, "idempotency_key_reused", field="Idempotency-Key")
    assert "D9999" not in refused.text
    assert records(db) == 1


def test_keys_are_scoped_to_the_principal_method_and_path(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], vault: Vault
) -> None:
    admin = actors.admin
    second = create_principal(client, admin, "second-onboarding")
    grant = {"grantee": "second-onboarding", "operations": ["Encrypt"]}
    assert client.post("/v1/grants", json=grant, headers=bearer(admin)).status_code == 201
    mine = client.post("/v1/tokens", json=LICENCE, headers=keyed("shared", actors.onboarding))
    theirs = client.post("/v1/tokens", json=LICENCE, headers=keyed("shared", second["api_key"]))
    assert mine.status_code == theirs.status_code == 201
    assert "Idempotent-Replayed" not in theirs.headers
    assert mine.json()["token"] != theirs.json()["token"]
    batch = client.post(
        "/v1/tokens/batch", json={"items": [LICENCE]}, headers=keyed("shared", actors.onboarding)
    )
    assert batch.status_code == 200 and "Idempotent-Replayed" not in batch.headers
    assert records(db) == 3


@pytest.mark.parametrize(
    "value",
    ["", "k" * 256, "tab\there", "caf\xe9"],
    ids=["empty", "256 characters", "control character", "not ASCII"],
)
def test_a_malformed_key_is_422_naming_the_header(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], value: str
) -> None:
    headers: dict[str, Any] = {**bearer(actors.onboarding), "Idempotency-Key": value.encode("latin-1")}
    for path, body in (("/v1/tokens", LICENCE), ("/v1/tokens/batch", {"items": [LICENCE]})):
        assert_error(
            client.post(path, json=body, headers=headers), 422, "invalid_input", field="Idempotency-Key"
        )
    principal = client.post("/v1/principals", json={"name": "x", "role": "service"}, headers={
        **bearer(actors.admin), "Idempotency-Key": value.encode("latin-1")})  # fmt: skip
    assert_error(principal, 422, "invalid_input", field="Idempotency-Key")
    assert records(db) == 0
    # 255 printable characters (spaces and punctuation included) are a key.
    longest = "~ !" + "k" * 252
    assert (
        client.post("/v1/tokens", json=LICENCE, headers=keyed(longest, actors.onboarding)).status_code == 201
    )


def _request(key: str, path: str, body: dict[str, Any]) -> IdempotentRequest:
    return IdempotentRequest(key, "POST", path, TokenizeRequest.model_validate(body).model_dump(mode="json"))


def test_a_key_in_flight_is_409_until_its_lease_expires_then_taken_over(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], vault: Vault
) -> None:
    onboarding = uuid.UUID(actors.onboarding_id)
    # Another request holds the key (claimed, no answer yet).
    held = vault.idempotency.claim_sync(onboarding, _request("slow", "/v1/tokens", LICENCE))
    busy = client.post("/v1/tokens", json=LICENCE, headers=keyed("slow", actors.onboarding))
    assert_error(busy, 409, "idempotency_in_flight", field="Idempotency-Key")
    assert busy.headers["Retry-After"]
    # A different body is still a reused key, in flight or not.
    other = {**LICENCE, "value": "D0000-00000-00000"}
    assert_error(
        client.post("/v1/tokens", json=other, headers=keyed("slow", actors.onboarding)),
        422,
        "idempotency_key_reused",
    )
    assert records(db) == 0
    # The holder crashed: once its lease has run out, the next request with the key runs.
    db.execute("UPDATE idempotency_keys SET lease_expires_at = now() - interval '1 second'")
    taken = client.post("/v1/tokens", json=LICENCE, headers=keyed("slow", actors.onboarding))
    assert taken.status_code == 201 and "Idempotent-Replayed" not in taken.headers
    # The first holder, if it was only slow, can no longer store an answer (nor its records).
    with pytest.raises(IdempotencyInFlight), vault.database.transaction() as session:
        vault.idempotency.complete_in(session, held, Answer(201, b"{}"))
    replay = client.post("/v1/tokens", json=LICENCE, headers=keyed("slow", actors.onboarding))
    assert replay.headers["Idempotent-Replayed"] == "true" and replay.json() == taken.json()
    assert records(db) == 1


def test_a_5xx_is_not_stored_and_the_key_runs_afresh(
    client: TestClient,
    actors: Actors,
    db: psycopg.Connection[Any],
    vault: Vault,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def down(context: EncryptionContext) -> DataKey:
        raise KeyServiceUnavailable()

    with monkeypatch.context() as patched:
        patched.setattr(vault.keys, "generate_data_key", down)
        failed = client.post("/v1/tokens", json=LICENCE, headers=keyed("retry-me", actors.onboarding))
        assert_error(failed, 503, "key_service_unavailable")
        batch = client.post(
            "/v1/tokens/batch", json={"items": [LICENCE] * 2}, headers=keyed("b", actors.onboarding)
        )
        assert_error(batch, 503, "key_service_unavailable")
    assert count(db, "SELECT count(*) FROM idempotency_keys") == 0
    retried = client.post("/v1/tokens", json=LICENCE, headers=keyed("retry-me", actors.onboarding))
    assert retried.status_code == 201 and "Idempotent-Replayed" not in retried.headers
    assert records(db) == 1


def test_a_refusal_is_stored_and_replayed(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    ssn = {"customer_id": "12345", "data_type": "SSN", "value": "078-05-1120"}
    refused = client.post("/v1/tokens", json=ssn, headers=keyed("ssn", actors.onboarding))
    assert_error(refused, 403, "grant_required")
    again = client.post("/v1/tokens", json=ssn, headers=keyed("ssn", actors.onboarding))
    assert again.status_code == 403 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == refused.json()
    denied = count(db, "SELECT count(*) FROM audit_events WHERE action = 'Tokenize' AND outcome = 'denied'")
    assert denied == 1


def test_a_batch_is_replayed_whole(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], kms_calls: list[EncryptionContext]
) -> None:
    body = {"items": [LICENCE, {**LICENCE, "customer_id": "bad id!"}, {**LICENCE, "customer_id": "777"}]}
    first = client.post("/v1/tokens/batch", json=body, headers=keyed("batch-1", actors.onboarding))
    assert first.status_code == 200
    assert [("token" in r, "error" in r) for r in first.json()["results"]] == [
        (True, False),
        (False, True),
        (True, False),
    ]
    again = client.post("/v1/tokens/batch", json=body, headers=keyed("batch-1", actors.onboarding))
    assert again.headers["Idempotent-Replayed"] == "true" and again.json() == first.json()
    assert records(db) == 2 and len(kms_calls) == 2
    tokens = db.execute("SELECT tokens FROM idempotency_keys").fetchone()
    assert tokens is not None
    assert sorted(tokens[0]) == sorted(r["token"] for r in first.json()["results"] if "token" in r)


def test_a_replayed_principal_has_no_api_key_and_none_is_stored(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    body = {"name": "reporting", "role": "service"}
    first = client.post("/v1/principals", json=body, headers=keyed("p-1", actors.admin))
    assert first.status_code == 201 and first.json()["api_key"].startswith("pv_")
    again = client.post("/v1/principals", json=body, headers=keyed("p-1", actors.admin))
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == {**first.json(), "api_key": None}
    assert count(db, "SELECT count(*) FROM principals WHERE name = 'reporting'") == 1
    stored = db.execute("SELECT response_body FROM idempotency_keys").fetchone()
    assert stored is not None and b"pv_" not in bytes(stored[0])
    secret = first.json()["api_key"].rsplit("_", 1)[1]
    assert secret.encode() not in bytes(stored[0])
    # A name already taken under another key: 409, stored and replayed as such.
    taken = client.post("/v1/principals", json=body, headers=keyed("p-2", actors.admin))
    assert_error(taken, 409, "conflict", field="name")
    assert (
        client.post("/v1/principals", json=body, headers=keyed("p-2", actors.admin)).headers[
            "Idempotent-Replayed"
        ]
        == "true"
    )
    reused = client.post(
        "/v1/principals", json={"name": "other", "role": "service"}, headers=keyed("p-1", actors.admin)
    )
    assert_error(reused, 422, "idempotency_key_reused")


def test_a_replayed_grant_makes_no_second_grant(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    before = count(db, "SELECT count(*) FROM grants")
    body = {
        "grantee": "kyc-app",
        "operations": ["Decrypt"],
        "constraints": {"encryption_context_equals": {"customerID": "1", "dataType": "SSN"}},
    }
    first = client.post("/v1/grants", json=body, headers=keyed("g-1", actors.admin))
    assert first.status_code == 201, first.text
    again = client.post("/v1/grants", json=body, headers=keyed("g-1", actors.admin))
    assert again.headers["Idempotent-Replayed"] == "true" and again.json() == first.json()
    assert count(db, "SELECT count(*) FROM grants") == before + 1
    assert count(db, "SELECT count(*) FROM audit_events WHERE action = 'CreateGrant'") == (
        count(db, "SELECT count(*) FROM grants")
    )


def test_stored_entries_hold_no_plaintext_and_no_unkeyed_hash(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    response = client.post("/v1/tokens", json=LICENCE, headers=keyed("secretive", actors.onboarding))
    assert response.status_code == 201
    row = db.execute("SELECT body_mac, response_body FROM idempotency_keys").fetchone()
    assert row is not None
    mac, stored = bytes(row[0]), bytes(row[1])
    assert LICENCE["value"].encode() not in stored and b"D1234" not in mac
    canonical = json.dumps(LICENCE, sort_keys=True, separators=(",", ":")).encode()
    for guess in (canonical, LICENCE["value"].encode(), json.dumps(LICENCE).encode()):
        assert mac not in (hashlib.sha256(guess).digest(), hashlib.sha512(guess).digest()[:32])
    assert json.loads(stored) == response.json()


def test_old_keys_expire_and_the_sweep_deletes_them(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], vault: Vault
) -> None:
    first = client.post("/v1/tokens", json=LICENCE, headers=keyed("day-old", actors.onboarding))
    recent = client.post("/v1/tokens", json=LICENCE, headers=keyed("recent", actors.onboarding))
    assert first.status_code == recent.status_code == 201
    db.execute("UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = 'day-old'")
    # An expired key is a new key: the request runs again.
    fresh = client.post("/v1/tokens", json=LICENCE, headers=keyed("day-old", actors.onboarding))
    assert fresh.status_code == 201 and "Idempotent-Replayed" not in fresh.headers
    assert fresh.json()["token"] != first.json()["token"]
    db.execute("UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = 'day-old'")
    assert vault.idempotency.sweep(limit=1) == 1
    assert [row[0] for row in db.execute("SELECT key FROM idempotency_keys").fetchall()] == ["recent"]


def test_erasure_can_purge_the_entries_naming_a_token(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], vault: Vault
) -> None:
    one = client.post("/v1/tokens", json=LICENCE, headers=keyed("a", actors.onboarding)).json()["token"]
    batch = client.post(
        "/v1/tokens/batch", json={"items": [LICENCE, LICENCE]}, headers=keyed("b", actors.onboarding)
    )
    kept = client.post("/v1/tokens", json=LICENCE, headers=keyed("c", actors.onboarding)).json()["token"]
    erased_from_batch = batch.json()["results"][1]["token"]
    with vault.database.transaction() as session:
        assert vault.idempotency.purge_for_tokens(session, [one, erased_from_batch]) == 2
    rows = db.execute("SELECT key, tokens FROM idempotency_keys").fetchall()
    assert [(row[0], row[1]) for row in rows] == [("c", [kept])]


def test_a_key_costs_one_round_trip_and_none_without_it(
    client: TestClient, actors: Actors, vault: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim is the one extra statement; the answer rides in the statement that writes the
    records and their events. Without the header, nothing is added."""
    client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding))  # warm: audit key loaded
    taken: list[int] = []
    inner = vault.database.data_connection

    def counted() -> Any:
        taken.append(1)
        return inner()

    monkeypatch.setattr(vault.database, "data_connection", counted)
    for path, body in (("/v1/tokens", LICENCE), ("/v1/tokens/batch", {"items": [LICENCE, LICENCE]})):
        taken.clear()
        assert client.post(path, json=body, headers=bearer(actors.onboarding)).status_code in (200, 201)
        plain = len(taken)
        taken.clear()
        keyed_response = client.post(path, json=body, headers=keyed(f"cost{path}", actors.onboarding))
        assert keyed_response.status_code in (200, 201)
        assert len(taken) == plain + 1, (path, plain, len(taken))


def test_purge_for_tokens_on_the_data_path(
    client: TestClient,
    actors: Actors,
    db: psycopg.Connection[Any],
    database_url: str,
    loop_thread: LoopThread,
) -> None:
    token = client.post("/v1/tokens", json=LICENCE, headers=keyed("async", actors.onboarding)).json()["token"]
    client.post("/v1/tokens", json=LICENCE, headers=keyed("kept", actors.onboarding))
    database = Database(database_url)
    try:
        repository = IdempotencyRepository(database)
        assert loop_thread.run(repository.purge_for_tokens_async([token])) == 1
        assert loop_thread.run(repository.purge_for_tokens_async([])) == 0
        loop_thread.run(database.close_data_path())
    finally:
        database.dispose()
    assert [row[0] for row in db.execute("SELECT key FROM idempotency_keys").fetchall()] == ["kept"]
