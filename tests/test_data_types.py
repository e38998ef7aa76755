"""The data-type registry over HTTP: reading it, registering and changing types, tokenize refusing
unknown types and values that are not of their type, grants naming only registered types, the
migration registering the types in use, and GET /v1/limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import psycopg
import pytest
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from app.container import Vault, build_vault
from app.migrate import alembic_config, upgrade
from app.settings import Settings
from tests.conftest import (
    Actors,
    ClientFactory,
    assert_error,
    bearer,
    create_grant,
    create_principal,
    make_settings,
    migrated_database,
    tokenize,
)

LICENCE = {"customer_id": "12345", "data_type": "DriverLicense", "value": "D1234-56789-01234"}
T = TypeVar("T")


def on_own_loop(settings: Settings, ask: Callable[[Vault], Awaitable[T]]) -> T:
    """Ask a vault of its own, whose data-path pool lives and dies on this one event loop."""
    vault = build_vault(settings)

    async def run() -> T:
        try:
            return await ask(vault)
        finally:
            await vault.database.close_data_path()

    try:
        return asyncio.run(run())
    finally:
        vault.close()


def put_type(client: TestClient, key: str, name: str, **body: Any) -> Any:
    return client.put(f"/v1/data-types/{name}", json=body, headers=bearer(key))


def events(client: TestClient, admin: str, action: str) -> list[dict[str, Any]]:
    response = client.get("/v1/audit/events", params={"action": action}, headers=bearer(admin))
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["events"]
    return found


def test_any_authenticated_caller_reads_the_registry_and_strangers_do_not(
    client: TestClient, actors: Actors
) -> None:
    for key in (actors.admin, actors.kyc):
        listed = client.get("/v1/data-types", headers=bearer(key))
        assert listed.status_code == 200, listed.text
        names = [t["name"] for t in listed.json()["data_types"]]
        assert {"SSN", "DriverLicense", "Passport", "Email", "Phone", "DateOfBirth"} <= set(names)
        assert {"AccountNumber", "CardNumber", "Name", "Address"} <= set(names)
    ssn = client.get("/v1/data-types/SSN", headers=bearer(actors.kyc)).json()
    assert ssn["builtin"] is True
    assert (ssn["normalize"], ssn["mask"], ssn["lookup"]) == ("strip_separators", "ssn", True)
    assert ssn["pattern"] and ssn["max_retention_days"] is None
    dob = client.get("/v1/data-types/DateOfBirth", headers=bearer(actors.kyc)).json()
    assert (dob["mask"], dob["lookup"]) == ("year", False)
    assert_error(client.get("/v1/data-types/Nope", headers=bearer(actors.kyc)), 404, "not_found")
    assert_error(client.get("/v1/data-types/not a name", headers=bearer(actors.kyc)), 422, "invalid_input")
    assert_error(client.get("/v1/data-types"), 401, "unauthenticated")
    assert_error(client.get("/v1/data-types/SSN", headers=bearer("nope")), 401, "unauthenticated")


def test_an_admin_registers_and_changes_a_custom_type_audited(client: TestClient, actors: Actors) -> None:
    created = put_type(client, actors.admin, "TaxId", pattern=r"\d{2}-\d{7}", lookup=True)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["name"] == "TaxId" and body["builtin"] is False
    assert (body["pattern"], body["normalize"], body["mask"], body["lookup"]) == (
        r"\d{2}-\d{7}",
        "none",
        "none",
        True,
    )
    # Fields left out keep their value; null clears the pattern.
    changed = put_type(client, actors.admin, "TaxId", mask="last4", max_retention_days=30)
    assert changed.status_code == 200, changed.text
    assert (changed.json()["pattern"], changed.json()["mask"], changed.json()["max_retention_days"]) == (
        r"\d{2}-\d{7}",
        "last4",
        30,
    )
    cleared = put_type(client, actors.admin, "TaxId", pattern=None)
    assert cleared.json()["pattern"] is None and cleared.json()["lookup"] is True
    assert client.get("/v1/data-types/TaxId", headers=bearer(actors.kyc)).json() == cleared.json()
    assert [
        (e["action"], e["outcome"], e["data_type"]) for e in events(client, actors.admin, "CreateDataType")
    ] == [("CreateDataType", "allowed", "TaxId")]
    assert len(events(client, actors.admin, "UpdateDataType")) == 2


def test_only_admins_change_the_registry_and_refusals_are_audited(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    auditor = create_principal(client, actors.admin, "auditor-1", role="auditor")["api_key"]
    for key in (actors.onboarding, auditor):
        assert_error(put_type(client, key, "TaxId"), 403, "forbidden")
        assert_error(put_type(client, key, "SSN", max_retention_days=1), 403, "forbidden")
    assert_error(put_type(client, "nope", "TaxId"), 401, "unauthenticated")
    assert db.execute("SELECT count(*) FROM data_types WHERE name = 'TaxId'").fetchone() == (0,)
    assert db.execute("SELECT max_retention_days FROM data_types WHERE name = 'SSN'").fetchone() == (None,)
    refused = db.execute(
        "SELECT count(*) FROM audit_events WHERE action = 'PutDataType' AND outcome = 'denied'"
    ).fetchone()
    assert refused == (4,)


def test_a_builtin_changes_only_in_retention(client: TestClient, actors: Actors) -> None:
    for change in (
        {"pattern": ".*"},
        {"pattern": None},
        {"normalize": "none"},
        {"mask": "none"},
        {"lookup": False},
    ):
        field = next(iter(change))
        assert_error(put_type(client, actors.admin, "SSN", **change), 409, "builtin_data_type", field)
    kept = put_type(client, actors.admin, "SSN", max_retention_days=3650)
    assert kept.status_code == 200, kept.text
    assert kept.json()["max_retention_days"] == 3650 and kept.json()["mask"] == "ssn"
    # Sending back what GET shows, with a new retention, is a retention change only.
    shown = client.get("/v1/data-types/SSN", headers=bearer(actors.admin)).json()
    body = {k: shown[k] for k in ("pattern", "normalize", "mask", "lookup")} | {"max_retention_days": None}
    again = put_type(client, actors.admin, "SSN", **body)
    assert again.status_code == 200, again.text
    assert again.json()["max_retention_days"] is None


def test_bad_put_bodies_are_refused_naming_the_field(client: TestClient, actors: Actors) -> None:
    assert_error(put_type(client, actors.admin, "TaxId", pattern=r"(a)\1"), 422, "invalid_input", "pattern")
    assert_error(put_type(client, actors.admin, "TaxId", pattern="(?=x)x"), 422, "invalid_input", "pattern")
    assert_error(
        put_type(client, actors.admin, "TaxId", normalize="upper"), 422, "invalid_input", "normalize"
    )
    assert_error(put_type(client, actors.admin, "TaxId", mask="first4"), 422, "invalid_input", "mask")
    assert_error(put_type(client, actors.admin, "TaxId", max_retention_days=0), 422, "invalid_input")
    assert_error(put_type(client, actors.admin, "TaxId", colour="red"), 422, "invalid_input")
    assert_error(put_type(client, actors.admin, "9Lives"), 422, "invalid_input")
    assert_error(put_type(client, actors.admin, "A" * 65), 422, "invalid_input")
    assert_error(put_type(client, actors.admin, "ssn"), 409, "conflict", "name")
    assert client.get("/v1/data-types/TaxId", headers=bearer(actors.admin)).status_code == 404


def test_tokenize_refuses_an_unregistered_type(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    create_grant(client, actors.admin, grantee="onboarding-app", operations=["Encrypt"])
    response = client.post(
        "/v1/tokens", json={**LICENCE, "data_type": "Licence"}, headers=bearer(actors.onboarding)
    )
    assert_error(response, 422, "unknown_data_type", "data_type")
    assert db.execute("SELECT count(*) FROM records").fetchone() == (0,)


def test_a_value_not_of_its_type_is_refused_without_being_echoed(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    create_grant(client, actors.admin, grantee="onboarding-app", operations=["Encrypt"])
    for data_type, value in (("SSN", "SSN 078-05-1120 x"), ("CardNumber", "4111 1111 1111 1112")):
        response = client.post(
            "/v1/tokens",
            json={"customer_id": "12345", "data_type": data_type, "value": value},
            headers=bearer(actors.onboarding),
        )
        error = assert_error(response, 422, "invalid_value", "value")
        assert data_type in error["message"]
        assert value not in response.text and "078-05" not in response.text and "1112" not in response.text
    assert db.execute("SELECT count(*) FROM records").fetchone() == (0,)


def test_a_caller_without_a_grant_learns_only_grant_required(client: TestClient, actors: Actors) -> None:
    for item in ({**LICENCE, "data_type": "Licence"}, {**LICENCE, "data_type": "SSN"}):
        response = client.post("/v1/tokens", json=item, headers=bearer(actors.kyc))
        assert_error(response, 403, "grant_required")


def test_batch_items_fail_alone_with_their_own_error(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    create_grant(client, actors.admin, grantee="onboarding-app", operations=["Encrypt"])
    items = [
        LICENCE,
        {**LICENCE, "data_type": "Licence"},
        {**LICENCE, "value": "D1234_bad"},
        {"customer_id": "1", "data_type": "Email", "value": "alice@example.com"},
    ]
    response = client.post("/v1/tokens/batch", json={"items": items}, headers=bearer(actors.onboarding))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert results[0]["token"].startswith("tok_") and results[3]["token"].startswith("tok_")
    assert results[1]["error"] == {
        "code": "unknown_data_type",
        "message": results[1]["error"]["message"],
        "field": "data_type",
        "retryable": False,
    }
    assert results[2]["error"]["code"] == "invalid_value"
    assert results[2]["error"]["field"] == "value" and not results[2]["error"]["retryable"]
    assert "DriverLicense" in results[2]["error"]["message"] and "D1234_bad" not in response.text
    assert db.execute("SELECT count(*) FROM records").fetchone() == (2,)


def test_a_custom_pattern_applies_at_once_and_a_catastrophic_one_is_harmless(
    client: TestClient, actors: Actors
) -> None:
    assert put_type(client, actors.admin, "Evil", pattern="(a+)+$").status_code == 201
    create_grant(client, actors.admin, grantee="onboarding-app", operations=["Encrypt"])
    item = {"customer_id": "1", "data_type": "Evil", "value": "a" * 4096}
    assert client.post("/v1/tokens", json=item, headers=bearer(actors.onboarding)).status_code == 201
    refused = client.post(
        "/v1/tokens", json={**item, "value": "a" * 4095 + "!"}, headers=bearer(actors.onboarding)
    )
    assert_error(refused, 422, "invalid_value", "value")
    # Tightened: this process's copy of the registry is dropped on commit.
    assert put_type(client, actors.admin, "Evil", pattern="b+").status_code == 200
    assert_error(
        client.post("/v1/tokens", json=item, headers=bearer(actors.onboarding)), 422, "invalid_value"
    )


def test_a_type_registered_on_another_replica_works_at_its_first_use(
    make_client: ClientFactory, kms_key_id: str, actors: Actors, client: TestClient
) -> None:
    _, other = make_client(kms_key_id, kms_mirror_grants=False)
    create_grant(client, actors.admin, grantee="onboarding-app", operations=["Encrypt"])
    item = {"customer_id": "1", "data_type": "Iban2", "value": "anything"}
    # The other replica has read the registry (a tokenize) before the type exists.
    assert_error(
        other.post("/v1/tokens", json=LICENCE | {"data_type": "Nope"}, headers=bearer(actors.onboarding)),
        422,
        "unknown_data_type",
    )
    assert put_type(client, actors.admin, "Iban2").status_code == 201
    time.sleep(0.6)  # MISS_RELOAD_S: a miss re-reads the registry at most this often
    assert other.post("/v1/tokens", json=item, headers=bearer(actors.onboarding)).status_code == 201


def test_normalize_is_fixed_once_records_of_the_type_exist(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    assert put_type(client, actors.admin, "MemberId", normalize="none").status_code == 201
    # No records yet: it may change.
    assert put_type(client, actors.admin, "MemberId", normalize="digits").status_code == 200
    create_grant(client, actors.admin, grantee="onboarding-app", operations=["Encrypt"])
    tokenize(client, actors.onboarding, {"customer_id": "1", "data_type": "MemberId", "value": "M-1"})
    assert_error(
        put_type(client, actors.admin, "MemberId", normalize="lowercase"),
        409,
        "data_type_in_use",
        "normalize",
    )
    # The same normaliser, or other fields, still change.
    assert put_type(client, actors.admin, "MemberId", normalize="digits", mask="last4").status_code == 200
    row = db.execute("SELECT normalize, mask FROM data_types WHERE name = 'MemberId'").fetchone()
    assert row == ("digits", "last4")


def test_a_new_grant_must_name_a_registered_type(client: TestClient, actors: Actors) -> None:
    for kind in ("encryption_context_subset", "encryption_context_equals"):
        response = client.post(
            "/v1/grants",
            json={
                "grantee": "kyc-app",
                "operations": ["Decrypt"],
                "constraints": {kind: {"dataType": "Licence"}},
            },
            headers=bearer(actors.admin),
        )
        assert_error(response, 422, "unknown_data_type", f"constraints.{kind}.dataType")
    assert put_type(client, actors.admin, "Licence").status_code == 201
    create_grant(
        client,
        actors.admin,
        grantee="kyc-app",
        operations=["Decrypt"],
        constraints={"encryption_context_subset": {"dataType": "Licence"}},
    )
    # A grant naming only a customer needs no type.
    create_grant(
        client,
        actors.admin,
        grantee="kyc-app",
        operations=["Decrypt"],
        constraints={"encryption_context_subset": {"customerID": "12345"}},
    )


def test_the_services_retention_and_normaliser_for_other_features(
    settings: Settings, client: TestClient, actors: Actors
) -> None:
    assert put_type(client, actors.admin, "SSN", max_retention_days=90).status_code == 200

    async def ask(vault: Vault) -> tuple[int | None, int | None, str, str]:
        types = vault.data_types
        return (
            await types.max_retention_days("SSN"),
            await types.max_retention_days("Email"),
            (await types.normaliser("SSN"))("078 05-1120"),
            (await types.normaliser("Email"))("Alice@Example.COM"),
        )

    assert on_own_loop(settings, ask) == (90, None, "078051120", "alice@example.com")


def test_limits_for_any_authenticated_caller(
    make_client: ClientFactory, kms_key_id: str, actors: Actors
) -> None:
    _, client = make_client(kms_key_id, max_batch_items=17, max_value_bytes=333, kms_mirror_grants=False)
    for key in (actors.admin, actors.kyc):
        response = client.get("/v1/limits", headers=bearer(key))
        assert response.status_code == 200, response.text
        assert response.json() == {"max_batch_items": 17, "max_value_bytes": 333}
    assert_error(client.get("/v1/limits"), 401, "unauthenticated")


@pytest.fixture
def own_database(database_url: str) -> Iterator[str]:
    server = make_url(database_url).set(database="postgres").render_as_string(hide_password=False)
    with migrated_database(server, "piivault_registry") as url:
        yield url


def test_the_migration_registers_the_types_in_use_and_they_keep_working(
    own_database: str, kms_key_id: str
) -> None:
    command.downgrade(alembic_config(own_database), "0003")
    settings = make_settings(own_database, kms_key_id, kms_mirror_grants=False)
    with psycopg.connect(own_database, autocommit=True) as connection:
        connection.execute(
            "INSERT INTO principals (id, name, role) VALUES"
            " ('00000000-0000-0000-0000-000000000001', 'svc', 'service')"
        )
        connection.execute(
            "INSERT INTO grants (id, grantee_id, operations, constraint_kind, constraint_context) VALUES"
            " (gen_random_uuid(), '00000000-0000-0000-0000-000000000001', '{Decrypt}',"
            "  'encryption_context_subset', '{\"dataType\": \"LegacyGranted\"}'),"
            " (gen_random_uuid(), '00000000-0000-0000-0000-000000000001', '{Decrypt}',"
            "  'encryption_context_subset', '{\"dataType\": \"not a type!\"}'),"
            " (gen_random_uuid(), '00000000-0000-0000-0000-000000000001', '{Decrypt}',"
            "  'encryption_context_subset', '{\"dataType\": \"SSN\"}')"
        )
        connection.execute(
            "INSERT INTO records (token, customer_id, data_type, format_version, ciphertext, wrapped_key,"
            " kms_key_id, created_by) VALUES ('tok_a', 'c', 'LegacyStored', 1, '', '', 'k',"
            " '00000000-0000-0000-0000-000000000001'),"
            " ('tok_b', 'c', 'SSN', 1, '', '', 'k', '00000000-0000-0000-0000-000000000001')"
        )
    upgrade(own_database)
    with psycopg.connect(own_database) as connection:
        rows = connection.execute(
            "SELECT name, builtin, pattern, normalize, mask, lookup, max_retention_days FROM data_types"
            " WHERE NOT builtin ORDER BY name"
        ).fetchall()
        reveal = connection.execute("SELECT DISTINCT reveal FROM grants").fetchall()
    assert rows == [
        ("LegacyGranted", False, None, "none", "none", False, None),
        ("LegacyStored", False, None, "none", "none", False, None),
    ]
    assert reveal == [("plain",)]

    async def ask(vault: Vault) -> bool:
        spec = await vault.data_types.spec("LegacyStored")
        return spec.accepts("any old value") and not spec.builtin

    assert on_own_loop(settings, ask)


def test_the_data_path_reads_the_registry_from_its_copy_not_per_request(
    client: TestClient, vault: Vault, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    # Long enough that this test never outlives the copy, however slow the machine.
    vault.data_types._ttl_s = 3600
    token = tokenize(client, actors.onboarding, LICENCE)  # reads the registry once
    db.execute("ALTER TABLE data_types RENAME TO data_types_away")
    try:
        for _ in range(5):
            tokenize(client, actors.onboarding, LICENCE)
        batch = client.post(
            "/v1/tokens/batch", json={"items": [LICENCE, LICENCE]}, headers=bearer(actors.onboarding)
        )
        assert [r.get("token", "")[:4] for r in batch.json()["results"]] == ["tok_", "tok_"]
        masked = client.get(f"/v1/tokens/{token}?reveal=masked", headers=bearer(actors.kyc))
        assert masked.json()["value_masked"] == "****1234"
    finally:
        db.execute("ALTER TABLE data_types_away RENAME TO data_types")
