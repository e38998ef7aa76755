"""Lookup by value: keyed fingerprints stored at tokenize, POST /v1/tokens/lookup under a Lookup
grant (only covered records, rate-limited, audited), and deduplicating tokenize."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import boto3
import psycopg
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app import cli
from app.container import Vault, build_vault
from app.crypto.fingerprint import fingerprint
from app.db.repositories.fingerprints import FingerprintRepository
from piivault.client import LookupNotEnabled, VaultClient
from tests.conftest import (
    Actors,
    ClientFactory,
    assert_error,
    bearer,
    create_admin,
    create_grant,
    create_principal,
    tokenize,
)

LICENCE = "D1234-56789-01234"
SPACED = "D1234 56789 01234"  # another way of writing it: the normaliser strips the separators
LICENCES = {"encryption_context_subset": {"dataType": "DriverLicense"}}


def service(client: TestClient, admin: str, name: str, *grants: dict[str, Any]) -> str:
    """A service holding these grants (each: operations and constraints); its API key."""
    key = str(create_principal(client, admin, name)["api_key"])
    for grant in grants:
        create_grant(client, admin, grantee=name, **grant)
    return key


def licence(customer_id: str, value: str = LICENCE, **extra: Any) -> dict[str, Any]:
    return {"customer_id": customer_id, "data_type": "DriverLicense", "value": value, **extra}


def lookup(client: TestClient, key: str, **body: Any) -> Any:
    return client.post("/v1/tokens/lookup", json={"data_type": "DriverLicense", **body}, headers=bearer(key))


def tokens_of(response: Any) -> list[str]:
    assert response.status_code == 200, response.text
    return [match["token"] for match in response.json()["matches"]]


def record_count(db: psycopg.Connection[Any]) -> int:
    row = db.execute("SELECT count(*) FROM records").fetchone()
    assert row is not None
    return int(row[0])


def test_fingerprints_are_stored_for_lookup_types_only_and_are_keyed(
    client: TestClient, actors: Actors, vault: Vault, db: psycopg.Connection[Any]
) -> None:
    writer = service(client, actors.admin, "writer", {"operations": ["Encrypt"]})
    with_lookup = tokenize(client, writer, licence("12345"))
    without = tokenize(
        client, writer, {"customer_id": "12345", "data_type": "DateOfBirth", "value": "1984-05-12"}
    )

    rows = dict(db.execute("SELECT token, fingerprint FROM records").fetchall())

    assert rows[without] is None
    stored = bytes(rows[with_lookup])
    assert len(stored) == 32
    # Not an unkeyed hash of the value, with or without its type, normalised or not.
    for text in ("D12345678901234", LICENCE, "DriverLicenseD12345678901234", "DriverLicense" + LICENCE):
        assert hashlib.sha256(text.encode()).digest() != stored
        hit = db.execute(
            "SELECT count(*) FROM records WHERE fingerprint = %s", (hashlib.sha256(text.encode()).digest(),)
        ).fetchone()
        assert hit == (0,)
    # The fingerprint key itself is what makes it: another key gives another fingerprint.
    assert fingerprint(vault.fingerprint_key.key(), "DriverLicense", "D12345678901234") == stored
    assert fingerprint(bytes(32), "DriverLicense", "D12345678901234") != stored


def test_lookup_normalises_and_returns_only_the_records_a_grant_covers(
    client: TestClient, actors: Actors
) -> None:
    mine = tokenize(client, actors.onboarding, licence("12345"))
    theirs = tokenize(client, actors.onboarding, licence("67890", "D1234 56789-01234"))
    tokenize(client, actors.onboarding, licence("12345", "D9999-00000"))  # another value
    everyone = service(
        client, actors.admin, "fraud-check", {"operations": ["Lookup"], "constraints": LICENCES}
    )
    one_customer = service(
        client,
        actors.admin,
        "branch-12345",
        {"operations": ["Lookup"], "constraints": {"encryption_context_subset": {"customerID": "12345"}}},
    )

    assert tokens_of(lookup(client, everyone, value=SPACED)) == [mine, theirs]
    assert tokens_of(lookup(client, everyone, value="D1234-56789-01234", customer_id="67890")) == [theirs]
    answer = lookup(client, one_customer, value=SPACED)
    assert tokens_of(answer) == [mine]
    (match,) = answer.json()["matches"]
    assert set(match) == {"token", "customer_id", "created_at"} and match["customer_id"] == "12345"
    assert LICENCE not in answer.text
    assert tokens_of(lookup(client, one_customer, value=SPACED, customer_id="67890")) == []
    assert tokens_of(lookup(client, everyone, value="D0000-00000")) == []


def test_lookup_needs_a_lookup_grant_and_a_lookup_grant_reads_nothing(
    client: TestClient, actors: Actors
) -> None:
    token = tokenize(client, actors.onboarding, licence("12345"))
    finder = service(client, actors.admin, "finder", {"operations": ["Lookup"], "constraints": LICENCES})

    # A Decrypt grant cannot look up; an Encrypt grant neither; nor an admin.
    for key in (actors.kyc, actors.onboarding, actors.admin):
        assert_error(lookup(client, key, value=LICENCE), 403, "grant_required")
    assert_error(lookup(client, "pv_nope_nope", value=LICENCE), 401, "unauthenticated")
    # A Lookup grant cannot read values.
    assert_error(client.get(f"/v1/tokens/{token}", headers=bearer(finder)), 403, "grant_required")
    detokenized = client.post("/v1/tokens/detokenize", json={"tokens": [token]}, headers=bearer(finder))
    assert detokenized.json()["results"][0]["error"]["code"] == "grant_required"
    assert tokens_of(lookup(client, finder, value=LICENCE)) == [token]


def test_lookup_refuses_unknown_types_types_without_lookup_and_bad_values(
    client: TestClient, actors: Actors
) -> None:
    finder = service(client, actors.admin, "finder", {"operations": ["Lookup"]})
    headers = bearer(finder)
    unknown = client.post("/v1/tokens/lookup", json={"data_type": "Shoe", "value": "42"}, headers=headers)
    assert_error(unknown, 422, "unknown_data_type", "data_type")
    off = client.post(
        "/v1/tokens/lookup", json={"data_type": "DateOfBirth", "value": "1984-05-12"}, headers=headers
    )
    assert_error(off, 422, "lookup_not_enabled", "data_type")
    bad = client.post("/v1/tokens/lookup", json={"data_type": "SSN", "value": "12-SECRET-9"}, headers=headers)
    assert_error(bad, 422, "invalid_value", "value")
    assert "SECRET" not in bad.text


def test_a_pending_lookup_grant_matches_nothing(make_client: ClientFactory, kms_key_id: str) -> None:
    vault, client = make_client(kms_key_id, dual_control=True)
    alice = create_admin(vault, "alice")
    writer = service(client, alice, "writer", {"operations": ["Encrypt"]})
    tokenize(client, writer, licence("12345"))
    finder = create_principal(client, alice, "finder")["api_key"]
    grant = create_grant(client, alice, grantee="finder", operations=["Lookup"], constraints=LICENCES)

    assert grant["status"] == "pending"
    assert_error(lookup(client, finder, value=LICENCE), 403, "grant_required")
    # No KMS mirror for Lookup, pending or not.
    assert grant.get("kms_grant_id") is None


def test_an_active_lookup_grant_has_no_kms_mirror(
    client: TestClient, actors: Actors, kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    create_principal(client, actors.admin, "finder")
    grant = create_grant(client, actors.admin, grantee="finder", operations=["Lookup"], constraints=LICENCES)
    row = db.execute("SELECT kms_grant_id FROM grants WHERE id = %s", (grant["id"],)).fetchone()
    assert row == (None,)
    names = [g.get("Name") for g in boto3.client("kms").list_grants(KeyId=kms_key_id)["Grants"]]
    assert f"piivault-{grant['id']}" not in names


def test_erased_records_never_match(client: TestClient, actors: Actors, db: psycopg.Connection[Any]) -> None:
    token = tokenize(client, actors.onboarding, licence("12345"))
    kept = tokenize(client, actors.onboarding, licence("67890"))
    finder = service(client, actors.admin, "finder", {"operations": ["Lookup"], "constraints": LICENCES})
    eraser = service(client, actors.admin, "eraser", {"operations": ["Erase"], "constraints": LICENCES})
    assert tokens_of(lookup(client, finder, value=LICENCE)) == [token, kept]

    erased = client.delete(f"/v1/tokens/{token}", headers={**bearer(eraser), "X-Access-Reason": "Art. 17"})
    assert erased.status_code == 204
    # Expired (not yet swept) does not match either.
    db.execute("UPDATE records SET expires_at = now() - interval '1 second' WHERE token = %s", (kept,))

    assert tokens_of(lookup(client, finder, value=LICENCE)) == []


def test_lookups_are_audited_and_show_in_the_customers_report(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    token = tokenize(client, actors.onboarding, licence("12345"))
    finder = service(client, actors.admin, "finder", {"operations": ["Lookup"], "constraints": LICENCES})
    stranger = service(client, actors.admin, "stranger")

    assert tokens_of(lookup(client, finder, value=LICENCE)) == [token]
    assert tokens_of(lookup(client, finder, value="D7777", customer_id="12345")) == []
    assert lookup(client, stranger, value=LICENCE).status_code == 403

    events = db.execute(
        "SELECT action, outcome, principal_name, token, customer_id, data_type, reason FROM audit_events"
        " WHERE action IN ('Lookup', 'LookupMatch') ORDER BY id"
    ).fetchall()
    assert events == [
        ("Lookup", "allowed", "finder", None, None, "DriverLicense", "matches=1"),
        ("LookupMatch", "allowed", "finder", token, "12345", "DriverLicense", None),
        ("Lookup", "allowed", "finder", None, "12345", "DriverLicense", "matches=0"),
        ("Lookup", "denied", "stranger", None, None, "DriverLicense", "no_grant"),
    ]
    trail = db.execute("SELECT * FROM audit_events").fetchall()
    assert all(LICENCE not in str(row) and "D7777" not in str(row) for row in trail)
    report = client.get("/v1/customers/12345/report", headers=bearer(actors.admin)).json()
    assert ("LookupMatch", token, "finder") in [
        (a["action"], a["token"], a["principal_name"]) for a in report["accesses"]
    ]


def test_lookups_are_rate_limited_per_principal(make_client: ClientFactory, kms_key_id: str) -> None:
    vault, client = make_client(kms_key_id, lookup_rate_per_s=2)
    admin = create_admin(vault)
    first = service(client, admin, "first", {"operations": ["Lookup"]})
    second = service(client, admin, "second", {"operations": ["Lookup"]})

    answers = [lookup(client, first, value=LICENCE).status_code for _ in range(3)]
    refused = lookup(client, first, value=LICENCE)

    assert answers[:2] == [200, 200]
    assert_error(refused, 429, "rate_limited")
    assert int(refused.headers["Retry-After"]) >= 1
    assert lookup(client, second, value=LICENCE).status_code == 200  # per principal


# Deduplicating tokenize.


def test_deduplicate_returns_the_customers_existing_token_and_stores_nothing(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    writer = service(
        client, actors.admin, "onboarding-2", {"operations": ["Encrypt", "Lookup"], "constraints": LICENCES}
    )
    first = client.post("/v1/tokens", json=licence("12345", deduplicate=True), headers=bearer(writer))
    assert first.status_code == 201 and first.json()["deduplicated"] is False
    token = first.json()["token"]
    before = record_count(db)

    again = client.post("/v1/tokens", json=licence("12345", SPACED, deduplicate=True), headers=bearer(writer))

    assert again.status_code == 200, again.text
    assert again.json()["token"] == token and again.json()["deduplicated"] is True
    assert record_count(db) == before
    # Another customer's record of the same value is not a duplicate.
    other = client.post("/v1/tokens", json=licence("67890", deduplicate=True), headers=bearer(writer))
    assert other.status_code == 201 and other.json()["token"] != token
    # Batch: per item.
    batch = client.post(
        "/v1/tokens/batch",
        json={"items": [licence("12345", deduplicate=True), licence("12345", "D4444", deduplicate=True)]},
        headers=bearer(writer),
    )
    results = batch.json()["results"]
    assert results[0]["token"] == token and results[0]["deduplicated"] is True
    assert "deduplicated" not in results[1] and results[1]["token"] != token
    assert record_count(db) == before + 2
    reasons = db.execute(
        "SELECT token, reason FROM audit_events WHERE action = 'Tokenize' AND reason = 'deduplicated'"
    ).fetchall()
    assert reasons == [(token, "deduplicated"), (token, "deduplicated")]
    # Without deduplicate, a second record as before.
    assert client.post("/v1/tokens", json=licence("12345"), headers=bearer(writer)).status_code == 201


def test_a_replayed_deduplicated_answer_is_the_200(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    writer = service(client, actors.admin, "onboarding-2", {"operations": ["Encrypt", "Lookup"]})
    token = tokenize(client, writer, licence("12345"))
    headers = {**bearer(writer), "Idempotency-Key": "dedupe-1"}
    before = record_count(db)

    first = client.post("/v1/tokens", json=licence("12345", deduplicate=True), headers=headers)
    replay = client.post("/v1/tokens", json=licence("12345", deduplicate=True), headers=headers)

    assert first.status_code == 200 and first.json()["token"] == token
    assert replay.status_code == 200 and replay.headers.get("Idempotent-Replayed") == "true"
    assert replay.json() == first.json()
    assert record_count(db) == before


def test_deduplicate_without_a_lookup_grant_is_refused_whether_or_not_a_duplicate_exists(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    tokenize(client, actors.onboarding, licence("12345"))
    # A Lookup grant for other customers does not cover this record either.
    create_grant(
        client,
        actors.admin,
        grantee="onboarding-app",
        operations=["Lookup"],
        constraints={"encryption_context_equals": {"customerID": "99999", "dataType": "DriverLicense"}},
    )
    before = record_count(db)
    headers = bearer(actors.onboarding)

    duplicate = client.post("/v1/tokens", json=licence("12345", deduplicate=True), headers=headers)
    fresh = client.post("/v1/tokens", json=licence("12345", "D5555", deduplicate=True), headers=headers)
    batch = client.post(
        "/v1/tokens/batch",
        json={"items": [licence("12345", deduplicate=True), licence("12345", "D5555", deduplicate=True)]},
        headers=headers,
    )

    # The same answer either way: no equality oracle.
    assert_error(duplicate, 403, "grant_required")
    assert_error(fresh, 403, "grant_required")
    assert [r["error"]["code"] for r in batch.json()["results"]] == ["grant_required", "grant_required"]
    assert record_count(db) == before
    reasons = db.execute(
        "SELECT reason FROM audit_events WHERE action = 'Tokenize' AND outcome = 'denied'"
    ).fetchall()
    assert reasons == [("deduplicate_needs_lookup",)] * 4
    # A type with lookup off cannot be deduplicated (and says so).
    dob = {"customer_id": "12345", "data_type": "DateOfBirth", "value": "1984-05-12", "deduplicate": True}
    writer = service(client, actors.admin, "writer", {"operations": ["Encrypt", "Lookup"]})
    assert_error(client.post("/v1/tokens", json=dob, headers=bearer(writer)), 422, "lookup_not_enabled")


# `piivault fingerprints backfill`.


def test_the_backfill_fills_old_records_resumably_audited_and_they_then_match(
    client: TestClient,
    actors: Actors,
    vault: Vault,
    db: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = service(client, actors.admin, "writer", {"operations": ["Encrypt"]})
    old = [tokenize(client, writer, licence(f"c{n}", f"D{n:04d}-OLD")) for n in range(7)]
    dob = tokenize(client, writer, {"customer_id": "c1", "data_type": "DateOfBirth", "value": "1984-05-12"})
    erased = tokenize(client, writer, licence("c9", "D9999-OLD"))
    eraser = service(client, actors.admin, "eraser", {"operations": ["Erase"]})
    assert (
        client.delete(f"/v1/tokens/{erased}", headers={**bearer(eraser), "X-Access-Reason": "x"}).status_code
        == 204
    )
    expected = dict(
        db.execute("SELECT token, fingerprint FROM records WHERE fingerprint IS NOT NULL").fetchall()
    )
    # As they were before lookup existed: no fingerprint.
    db.execute("UPDATE records SET fingerprint = NULL")
    finder = service(client, actors.admin, "finder", {"operations": ["Lookup"]})
    assert tokens_of(lookup(client, finder, value="D0003 OLD")) == []
    monkeypatch.setattr(cli, "_vault_for_cli", lambda: build_vault(vault.settings))
    runner = CliRunner()
    caplog.set_level(logging.DEBUG)

    filled = runner.invoke(cli.cli, ["fingerprints", "backfill", "--batch", "3"])

    assert filled.exit_code == 0, filled.output
    lines = filled.stdout.splitlines()
    progress = [line.split()[1] for line in lines if line.startswith("backfill: ")]
    assert progress == ["3/7", "6/7", "7/7"]
    assert lines[-1] == "filled 7 fingerprints; 0 left"
    now = dict(db.execute("SELECT token, fingerprint FROM records").fetchall())
    assert {token: now[token] for token in old} == {token: expected[token] for token in old}
    assert now[dob] is None and now[erased] is None
    assert tokens_of(lookup(client, finder, value="D0003 OLD")) == [old[3]]
    events = db.execute(
        "SELECT outcome, reason FROM audit_events WHERE action = 'BackfillFingerprints' ORDER BY id"
    ).fetchall()
    assert events == [
        ("allowed", "filled=3 skipped=0 failed=0"),
        ("allowed", "filled=3 skipped=0 failed=0"),
        ("allowed", "filled=1 skipped=0 failed=0"),
    ]
    # The values never left the process: not printed, not logged.
    for n in range(7):
        assert f"D{n:04d}" not in filled.output and f"D{n:04d}" not in caplog.text

    again = runner.invoke(cli.cli, ["fingerprints", "backfill"])

    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines() == ["filled 0 fingerprints; 0 left"]


def test_the_backfill_writes_nothing_over_a_record_changed_since_it_was_read(
    client: TestClient, actors: Actors, vault: Vault, db: psycopg.Connection[Any]
) -> None:
    token = tokenize(client, actors.onboarding, licence("12345"))
    db.execute("UPDATE records SET fingerprint = NULL")
    row = db.execute("SELECT wrapped_key FROM records WHERE token = %s", (token,)).fetchone()
    assert row is not None
    wrapped = row[0]
    with vault.database.transaction() as session:
        repository = FingerprintRepository(session)
        # Rewrapped meanwhile: the wrapped key read is no longer the row's.
        assert repository.fill([(token, bytes(wrapped) + b"x", b"f" * 32)]) == 0
        assert repository.fill([(token, bytes(wrapped), b"f" * 32)]) == 1
        # Filled already: not overwritten.
        assert repository.fill([(token, bytes(wrapped), b"g" * 32)]) == 0


def test_the_python_client_looks_up_and_deduplicates(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    writer = service(client, actors.admin, "onboarding-2", {"operations": ["Encrypt", "Lookup"]})
    with VaultClient("http://testserver", api_key=writer, http_client=client) as vault:
        first = vault.tokenize(customer_id="12345", data_type="DriverLicense", value=LICENCE)
        again = vault.tokenize(customer_id="12345", data_type="DriverLicense", value=SPACED, deduplicate=True)
        (match,) = vault.lookup(data_type="DriverLicense", value=SPACED)
        with pytest.raises(LookupNotEnabled):
            vault.lookup(data_type="DateOfBirth", value="1984-05-12")

    assert not first.deduplicated
    assert again.token == first.token and again.deduplicated
    assert (match.token, match.customer_id) == (first.token, "12345") and match.created_at is not None
    assert record_count(db) == 1
