"""Erasure (GDPR Art. 17): DELETE /v1/tokens/{token} and POST /v1/customers/{id}/erase under an
Erase grant; tombstones; 410 for covered callers and the unknown-token answer for everyone else;
idempotency; a 10,000-record customer erased in batches, with a database fault part-way and a
retry that finishes the job."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from app.container import Vault
from tests.conftest import (
    Actors,
    ClientFactory,
    assert_error,
    bearer,
    create_grant,
    create_principal,
    tokenize,
)

LICENCE = "D1234-56789-01234"
SSN_VALUE = "078-05-1120"
WHY = {"X-Access-Reason": "GDPR Art. 17 request 118"}


def grant_to(client: TestClient, actors: Actors, name: str, operations: list[str], **constraints: Any) -> str:
    """A new service principal holding one grant; returns its API key."""
    principal = create_principal(client, actors.admin, name)
    body: dict[str, Any] = {"grantee": name, "operations": operations}
    if constraints:
        body["constraints"] = constraints
    create_grant(client, actors.admin, **body)
    key: str = principal["api_key"]
    return key


def eraser(client: TestClient, actors: Actors, **constraints: Any) -> str:
    return grant_to(client, actors, "eraser-app", ["Erase"], **constraints)


def writer(client: TestClient, actors: Actors) -> str:
    """May tokenize anything (the seed's onboarding app may only tokenize licences)."""
    return grant_to(client, actors, "writer-app", ["Encrypt"])


def record_row(db: psycopg.Connection[Any], token: str) -> dict[str, Any]:
    cursor = db.execute(
        "SELECT token, customer_id, data_type, format_version, ciphertext, wrapped_key, kms_key_id,"
        " created_at, expires_at, erased_at, erasure_reason FROM records WHERE token = %s",
        (token,),
    )
    row = cursor.fetchone()
    assert row is not None
    assert cursor.description is not None
    return dict(zip([column.name for column in cursor.description], row, strict=True))


def events(db: psycopg.Connection[Any], action: str) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT outcome, reason, token, customer_id, data_type, access_reason, grant_id FROM audit_events"
        " WHERE action = %s ORDER BY id",
        (action,),
    ).fetchall()


def without_request_id(response: Any) -> tuple[int, Any]:
    body = response.json()
    if isinstance(body, dict) and "error" in body:
        body["error"].pop("request_id", None)
    return response.status_code, body


UNKNOWN = "tok_" + "A" * 32


def test_delete_erases_one_record_and_leaves_a_tombstone(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    token = tokenize(
        client, actors.onboarding, {"customer_id": "12345", "data_type": "DriverLicense", "value": LICENCE}
    )
    other = tokenize(
        client, actors.onboarding, {"customer_id": "12345", "data_type": "DriverLicense", "value": "X9"}
    )
    key = eraser(client, actors)

    response = client.delete(f"/v1/tokens/{token}", headers={**bearer(key), **WHY})

    assert response.status_code == 204, response.text
    assert response.content == b""
    row = record_row(db, token)
    # Nothing secret is left in the row: no ciphertext, no wrapped data key, no key id.
    assert row["ciphertext"] is None and row["wrapped_key"] is None and row["kms_key_id"] is None
    assert row["format_version"] is None
    assert row["customer_id"] == "12345" and row["data_type"] == "DriverLicense"
    assert row["erased_at"] is not None and row["erasure_reason"] == WHY["X-Access-Reason"]
    # The other record is untouched and still readable.
    assert record_row(db, other)["ciphertext"] is not None
    assert client.get(f"/v1/tokens/{other}", headers=bearer(actors.kyc)).json()["value"] == "X9"
    # The tombstone has no way back: the database refuses a tombstone that keeps a secret column.
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("UPDATE records SET ciphertext = '\\x00' WHERE token = %s", (token,))
    (event,) = events(db, "Erase")
    assert event[:6] == ("allowed", None, token, "12345", "DriverLicense", WHY["X-Access-Reason"])
    assert event[6] is not None  # the Erase grant it was allowed under


def test_an_erased_token_is_gone_for_covered_callers_and_unknown_for_everyone_else(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    token = tokenize(
        client, actors.onboarding, {"customer_id": "12345", "data_type": "DriverLicense", "value": LICENCE}
    )
    key = eraser(client, actors)
    ssn_reader = grant_to(
        client, actors, "ssn-reader", ["Decrypt"], encryption_context_subset={"dataType": "SSN"}
    )
    nothing = create_principal(client, actors.admin, "no-grants")["api_key"]
    assert client.delete(f"/v1/tokens/{token}", headers=bearer(key)).status_code == 204

    # Covered: the KYC app's Decrypt grant, and the eraser's Erase grant.
    for covered in (actors.kyc, key):
        assert_error(client.get(f"/v1/tokens/{token}", headers=bearer(covered)), 410, "erased")
    # Not covered: exactly what a token that never existed answers (status and body).
    for stranger in (ssn_reader, nothing, actors.onboarding, actors.admin):
        gone = client.get(f"/v1/tokens/{token}", headers=bearer(stranger))
        unknown = client.get(f"/v1/tokens/{UNKNOWN}", headers=bearer(stranger))
        assert gone.status_code in (403, 404)
        assert without_request_id(gone) == without_request_id(unknown)
        assert "erased" not in gone.text
    # Batch detokenize: the same rule per item.
    for caller, expected in ((actors.kyc, "erased"), (ssn_reader, None)):
        response = client.post(
            "/v1/tokens/detokenize", json={"tokens": [token, UNKNOWN]}, headers=bearer(caller)
        )
        assert response.status_code == 200, response.text
        gone, unknown = response.json()["results"]
        if expected:
            assert gone["error"]["code"] == expected and gone["error"]["retryable"] is False
        else:
            assert gone["error"] == unknown["error"]
            assert "customer_id" not in gone
    # Erasing an unknown token answers as detokenize's unknown token does, for the eraser too.
    assert_error(client.delete(f"/v1/tokens/{UNKNOWN}", headers=bearer(key)), 404, "not_found")
    assert_error(client.delete(f"/v1/tokens/{token}", headers=bearer(nothing)), 403, "grant_required")


def test_erasure_is_idempotent(client: TestClient, actors: Actors, db: psycopg.Connection[Any]) -> None:
    tokens = [
        tokenize(
            client, actors.onboarding, {"customer_id": "c-7", "data_type": "DriverLicense", "value": f"L{n}"}
        )
        for n in range(3)
    ]
    key = eraser(client, actors)

    assert client.delete(f"/v1/tokens/{tokens[0]}", headers=bearer(key)).status_code == 204
    assert client.delete(f"/v1/tokens/{tokens[0]}", headers=bearer(key)).status_code == 204
    first = client.post("/v1/customers/c-7/erase", json={"reason": "request 9"}, headers=bearer(key))
    again = client.post("/v1/customers/c-7/erase", json={"reason": "request 9"}, headers=bearer(key))

    assert first.status_code == 200, first.text
    assert first.json() == {"erased": 2, "tokens": sorted(tokens[1:])}
    assert again.json() == {"erased": 0, "tokens": []}
    reasons = [(outcome, reason, token) for outcome, reason, token, *_ in events(db, "Erase")]
    assert reasons[:2] == [("allowed", None, tokens[0]), ("allowed", "already_erased", tokens[0])]
    assert sorted(reasons[2:]) == sorted(("allowed", None, t) for t in tokens[1:])
    # The first tombstone keeps its first reason and time.
    assert record_row(db, tokens[0])["erasure_reason"] is None
    # Each customer erasure is on record with its count, whatever it found.
    summaries = [(e[0], e[1], e[3], e[5]) for e in events(db, "EraseCustomer")]
    assert summaries == [
        ("allowed", "erased:2", "c-7", "request 9"),
        ("allowed", "erased:0", "c-7", "request 9"),
    ]


def test_a_customer_erasure_waits_for_a_row_another_transaction_holds(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], database_url: str
) -> None:
    """A row locked by a concurrent writer (a rewrap, say) is waited for and erased, never skipped
    while the answer says done."""
    tokens = [
        tokenize(
            client, actors.onboarding, {"customer_id": "c-8", "data_type": "DriverLicense", "value": f"L{n}"}
        )
        for n in range(3)
    ]
    key = eraser(client, actors)
    answers: list[Any] = []
    with psycopg.connect(database_url) as other:
        other.execute("SELECT 1 FROM records WHERE token = %s FOR UPDATE", (sorted(tokens)[1],))
        worker = threading.Thread(
            target=lambda: answers.append(
                client.post("/v1/customers/c-8/erase", json={"reason": "r"}, headers=bearer(key))
            )
        )
        worker.start()
        worker.join(timeout=1)  # it waits on the lock (or, wrongly, has already answered)
        other.commit()
    worker.join(timeout=30)
    assert answers and answers[0].status_code == 200, answers
    assert answers[0].json()["erased"] == 3
    assert db.execute(
        "SELECT count(*) FROM records WHERE customer_id = 'c-8' AND erased_at IS NULL"
    ).fetchone() == (0,)


def test_customer_erasure_takes_only_what_the_grant_covers(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    encrypt_all = writer(client, actors)
    licences = [
        tokenize(client, encrypt_all, {"customer_id": "c-1", "data_type": "DriverLicense", "value": f"L{n}"})
        for n in range(2)
    ]
    ssn = tokenize(client, encrypt_all, {"customer_id": "c-1", "data_type": "SSN", "value": SSN_VALUE})
    other_customer = tokenize(
        client, encrypt_all, {"customer_id": "c-2", "data_type": "DriverLicense", "value": "L"}
    )
    key = eraser(client, actors, encryption_context_subset={"dataType": "DriverLicense"})

    response = client.post("/v1/customers/c-1/erase", json={"reason": "request 1"}, headers=bearer(key))

    assert response.status_code == 200, response.text
    assert response.json() == {"erased": 2, "tokens": sorted(licences)}
    assert all(record_row(db, t)["erased_at"] is not None for t in licences)
    # The SSN is out of the grant's reach, and so is another customer's licence.
    assert record_row(db, ssn)["ciphertext"] is not None
    assert record_row(db, other_customer)["ciphertext"] is not None
    # A single SSN erase is refused as a detokenize would be.
    assert_error(client.delete(f"/v1/tokens/{ssn}", headers=bearer(key)), 403, "grant_required")
    assert record_row(db, ssn)["erased_at"] is None
    # Asking for the SSN type explicitly erases nothing.
    only_ssn = client.post(
        "/v1/customers/c-1/erase", json={"reason": "r", "data_types": ["SSN"]}, headers=bearer(key)
    )
    assert only_ssn.json() == {"erased": 0, "tokens": []}
    assert ("denied", "context_mismatch", None, "c-1", "SSN") in [e[:5] for e in events(db, "EraseCustomer")]


def test_an_erase_grant_for_one_customer_cannot_erase_another(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    mine = tokenize(
        client, actors.onboarding, {"customer_id": "A-1", "data_type": "DriverLicense", "value": "L1"}
    )
    theirs = tokenize(
        client, actors.onboarding, {"customer_id": "B-2", "data_type": "DriverLicense", "value": "L2"}
    )
    key = eraser(client, actors, encryption_context_equals={"customerID": "A-1", "dataType": "DriverLicense"})

    assert_error(client.delete(f"/v1/tokens/{theirs}", headers=bearer(key)), 403, "grant_required")
    refused = client.post("/v1/customers/B-2/erase", json={"reason": "r"}, headers=bearer(key))
    assert refused.json() == {"erased": 0, "tokens": []}
    assert record_row(db, theirs)["ciphertext"] is not None
    assert client.get(f"/v1/tokens/{theirs}", headers=bearer(actors.kyc)).json()["value"] == "L2"
    assert client.delete(f"/v1/tokens/{mine}", headers=bearer(key)).status_code == 204


def test_without_an_erase_grant_nobody_erases(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    token = tokenize(
        client, actors.onboarding, {"customer_id": "12345", "data_type": "DriverLicense", "value": LICENCE}
    )
    # The admin (no data access of its own), the KYC app (Decrypt only), the onboarding app.
    for key in (actors.admin, actors.kyc, actors.onboarding):
        assert_error(client.delete(f"/v1/tokens/{token}", headers=bearer(key)), 403, "grant_required")
        refused = client.post("/v1/customers/12345/erase", json={"reason": "r"}, headers=bearer(key))
        assert_error(refused, 403, "grant_required")
    assert_error(client.delete(f"/v1/tokens/{token}"), 401, "unauthenticated")
    assert record_row(db, token)["erased_at"] is None
    assert {e[1] for e in events(db, "Erase")} == {"no_grant"}
    # An Erase grant adds no KMS grant (erasure makes no KMS call).
    principal = create_principal(client, actors.admin, "eraser-2")
    grant = create_grant(client, actors.admin, grantee=principal["id"], operations=["Erase"])
    assert grant["kms_grant_id"] is None and grant["operations"] == ["Erase"]


def test_erase_requests_are_validated(client: TestClient, actors: Actors) -> None:
    key = eraser(client, actors)
    assert_error(client.delete("/v1/tokens/not-a-token", headers=bearer(key)), 422, "invalid_input", "token")
    assert_error(
        client.post("/v1/customers/c-1/erase", json={}, headers=bearer(key)), 422, "invalid_input", "reason"
    )
    bad_type = client.post(
        "/v1/customers/c-1/erase", json={"reason": "r", "data_types": ["1x"]}, headers=bearer(key)
    )
    assert_error(bad_type, 422, "invalid_input", "data_types[0]")
    assert_error(
        client.post("/v1/customers/bad%20id/erase", json={"reason": "r"}, headers=bearer(key)),
        422,
        "invalid_input",
        "path.customer_id",
    )


# A 10,000-record customer, loaded with COPY (pre-wrapped rows, not 10,000 KMS calls).
BULK = 10_000


def bulk_tokens(count: int) -> list[str]:
    # Digits sort the same in every collation: the batches' order (ORDER BY token) is known.
    return [f"tok_{n:032d}" for n in range(count)]


def copy_records(db: psycopg.Connection[Any], customer_id: str, tokens: list[str], data_type: str) -> None:
    created = datetime.now(UTC)
    creator = uuid.uuid4()
    with db.cursor().copy(
        "COPY records (token, customer_id, data_type, format_version, ciphertext, wrapped_key,"
        " kms_key_id, created_by, created_at) FROM STDIN"
    ) as copy:
        for token in tokens:
            copy.write_row(
                (
                    token,
                    customer_id,
                    data_type,
                    1,
                    b"\x01" * 48,
                    b"\x02" * 184,
                    "arn:aws:kms:test",
                    creator,
                    created,
                )
            )


def test_a_10k_customer_erasure_runs_in_batches_survives_a_fault_and_a_retry_finishes(
    make_client: ClientFactory, kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    vault, client = make_client(kms_key_id, erasure_batch_size=500)
    actors = seed_actors(client, vault)
    key = eraser(client, actors)
    tokens = bulk_tokens(BULK)
    copy_records(db, "bulk-1", tokens, "DriverLicense")
    # A fault in the 11th batch (the row at 5,250 in token order): a deadlock, as the database
    # would report it, so the vault sees a transient database failure.
    db.execute(
        "CREATE FUNCTION fail_erase() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " RAISE EXCEPTION 'injected' USING ERRCODE = '40P01'; END $$"
    )
    db.execute(
        "CREATE TRIGGER fail_erase BEFORE UPDATE ON records FOR EACH ROW"
        f" WHEN (OLD.token = '{tokens[5250]}') EXECUTE FUNCTION fail_erase()"
    )
    try:
        failed = client.post("/v1/customers/bulk-1/erase", json={"reason": "bulk"}, headers=bearer(key))
    finally:
        db.execute("DROP TRIGGER fail_erase ON records")
        db.execute("DROP FUNCTION fail_erase()")

    assert_error(failed, 503, "database_unavailable")
    assert failed.headers["Retry-After"]
    # Each batch is all or nothing with its events: ten whole batches, each tombstone with its event.
    erased_first = db.execute("SELECT count(*) FROM records WHERE erased_at IS NOT NULL").fetchone()
    assert erased_first == (5000,)
    assert len(events(db, "Erase")) == 5000
    assert db.execute(
        "SELECT count(*) FROM records WHERE token >= %s AND erased_at IS NULL", (tokens[5000],)
    ).fetchone() == (5000,)

    retried = client.post("/v1/customers/bulk-1/erase", json={"reason": "bulk"}, headers=bearer(key))

    assert retried.status_code == 200, retried.text
    assert retried.json()["erased"] == 5000
    assert sorted(retried.json()["tokens"]) == tokens[5000:]
    left = db.execute(
        "SELECT count(*) FROM records WHERE customer_id = 'bulk-1'"
        " AND (erased_at IS NULL OR ciphertext IS NOT NULL OR wrapped_key IS NOT NULL)"
    ).fetchone()
    assert left == (0,)
    assert len(events(db, "Erase")) == BULK
    assert client.post("/v1/customers/bulk-1/erase", json={"reason": "bulk"}, headers=bearer(key)).json() == {
        "erased": 0,
        "tokens": [],
    }


def seed_actors(client: TestClient, vault: Vault) -> Actors:
    from tests.conftest import build_seed

    return build_seed(client, vault)


def test_erased_records_no_longer_count_under_their_key(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    token = tokenize(
        client, actors.onboarding, {"customer_id": "k-1", "data_type": "DriverLicense", "value": "L"}
    )
    before = {
        k["key_id"]: k["records"] for k in client.get("/v1/keys", headers=bearer(actors.admin)).json()["keys"]
    }
    assert client.delete(f"/v1/tokens/{token}", headers=bearer(eraser(client, actors))).status_code == 204
    after = {
        k["key_id"]: k["records"] for k in client.get("/v1/keys", headers=bearer(actors.admin)).json()["keys"]
    }
    assert sum(before.values()) - sum(after.values()) == 1


def test_erasure_leaves_the_audit_trail_verifying(client: TestClient, actors: Actors) -> None:
    token = tokenize(
        client, actors.onboarding, {"customer_id": "v-1", "data_type": "DriverLicense", "value": "L"}
    )
    key = eraser(client, actors)
    assert client.delete(f"/v1/tokens/{token}", headers=bearer(key)).status_code == 204
    assert (
        client.post("/v1/customers/v-1/erase", json={"reason": "r"}, headers=bearer(key)).status_code == 200
    )
    verified = client.get("/v1/audit/verify", headers=bearer(actors.admin)).json()
    assert verified["ok"] is True, verified


def test_a_rewrap_leaves_tombstones_alone_and_every_live_record_readable(
    serve: ClientFactory, db: psycopg.Connection[Any]
) -> None:
    from tests.test_key_boundary import new_key, seed
    from tests.test_rewrap import assert_readable, fill, key_of_records, rewrap

    key_a, _ = new_key()
    key_b, arn_b = new_key()
    vault_a, client_a = serve(key_a)
    actors = seed(client_a, vault_a)
    values = fill(client_a, actors.onboarding, 4)
    gone = sorted(values)[0]
    key = eraser(client_a, actors)
    assert client_a.delete(f"/v1/tokens/{gone}", headers=bearer(key)).status_code == 204
    del values[gone]
    vault_b, client_b = serve(key_b, kms_decrypt_key_ids=key_a)

    report = rewrap(vault_b, key_b)

    # The live records, the audit key and the fingerprint key; never the tombstone.
    assert report.rewrapped == 3 + 1 + 1
    assert key_of_records(db) == {arn_b: 3, None: 1}
    row = record_row(db, gone)
    assert row["wrapped_key"] is None and row["kms_key_id"] is None and row["ciphertext"] is None
    assert_readable(client_b, actors.kyc, values)
    assert_error(client_b.get(f"/v1/tokens/{gone}", headers=bearer(actors.kyc)), 410, "erased")
    counted = client_b.get("/v1/keys", headers=bearer(actors.admin)).json()["keys"]
    assert sum(k["records"] for k in counted) == 3


def test_erasure_purges_the_records_idempotency_entries(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    erasing = eraser(client, actors)
    body = {"customer_id": "12345", "data_type": "DriverLicense", "value": LICENCE}
    keyed = {**bearer(actors.onboarding), "Idempotency-Key": "onboarding-7"}
    token = client.post("/v1/tokens", json=body, headers=keyed).json()["token"]
    other = client.post(
        "/v1/tokens", json={**body, "customer_id": "67890"}, headers={**keyed, "Idempotency-Key": "o-8"}
    ).json()["token"]
    assert db.execute("SELECT count(*) FROM idempotency_keys").fetchone() == (2,)

    assert client.delete(f"/v1/tokens/{token}", headers=bearer(erasing)).status_code == 204

    # The erased record's stored answer is gone (it named the token, customer and data type);
    # the other record's stays, and its key still replays.
    assert db.execute("SELECT tokens FROM idempotency_keys").fetchall() == [([other],)]
    replay = client.post(
        "/v1/tokens", json={**body, "customer_id": "67890"}, headers={**keyed, "Idempotency-Key": "o-8"}
    )
    assert replay.headers["Idempotent-Replayed"] == "true" and replay.json()["token"] == other
