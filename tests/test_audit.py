"""The audit trail: one event per decision with the right fields, fail closed, tamper evident."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from app.container import Vault
from app.services.context import RequestContext
from tests.conftest import Actors, audit_inserts_refused, bearer, create_principal, tokenize

LICENCE = {"customer_id": "12345", "data_type": "DriverLicense", "value": "D1234-56789-01234"}


def events(db: psycopg.Connection[Any], **where: Any) -> list[dict[str, Any]]:
    clause = " AND ".join(f"{column} = %({column})s" for column in where) or "true"
    cursor = db.cursor(row_factory=psycopg.rows.dict_row)
    return cursor.execute(f"SELECT * FROM audit_events WHERE {clause} ORDER BY id", where).fetchall()  # noqa: S608


def grant_id_of(client: TestClient, actors: Actors, grantee: str) -> str:
    grants = client.get("/v1/grants", params={"grantee": grantee}, headers=bearer(actors.admin)).json()
    grant_id: str = grants["grants"][0]["id"]
    return grant_id


def test_tokenize_and_detokenize_each_write_one_event_with_every_field(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    response = client.post(
        "/v1/tokens",
        json=LICENCE,
        headers={**bearer(actors.onboarding), "X-Request-ID": "req-tok-1", "User-Agent": "onboarding/1.0"},
    )
    token = response.json()["token"]
    (event,) = events(db, action="Tokenize")
    assert event["outcome"] == "allowed"
    assert event["request_id"] == "req-tok-1" == response.headers["X-Request-ID"]
    assert str(event["principal_id"]) == actors.onboarding_id
    assert event["principal_name"] == "onboarding-app"
    assert (event["token"], event["customer_id"], event["data_type"]) == (token, "12345", "DriverLicense")
    assert str(event["grant_id"]) == grant_id_of(client, actors, "onboarding-app")
    assert event["kms_request_id"]
    assert event["source_ip"] and event["user_agent"] == "onboarding/1.0"

    client.get(f"/v1/tokens/{token}", headers={**bearer(actors.kyc), "X-Access-Reason": "loan 991"})
    (read,) = events(db, action="Detokenize")
    assert read["outcome"] == "allowed" and read["access_reason"] == "loan 991"
    assert str(read["grant_id"]) == grant_id_of(client, actors, "kyc-app")
    assert read["kms_request_id"] and read["kms_request_id"] != event["kms_request_id"]
    assert (read["token"], read["customer_id"], read["data_type"]) == (token, "12345", "DriverLicense")


def test_each_batch_item_is_its_own_event(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    items = [
        {**LICENCE, "customer_id": "c1"},
        {**LICENCE, "data_type": "SSN"},
        {**LICENCE, "customer_id": "c3"},
    ]
    results = client.post("/v1/tokens/batch", json={"items": items}, headers=bearer(actors.onboarding)).json()
    tokenized = events(db, action="Tokenize")
    assert [(e["outcome"], e["customer_id"], e["data_type"]) for e in tokenized] == [
        ("denied", "12345", "SSN"),  # denials are written first, on their own
        ("allowed", "c1", "DriverLicense"),
        ("allowed", "c3", "DriverLicense"),
    ]
    tokens = [r["token"] for r in results["results"] if "token" in r]
    client.post("/v1/tokens/detokenize", json={"tokens": tokens}, headers=bearer(actors.kyc))
    assert sorted(e["token"] for e in events(db, action="Detokenize", outcome="allowed")) == sorted(tokens)


@pytest.mark.parametrize(
    "setup,reason",
    [
        ("none", "no_grant"),
        ("context", "context_mismatch"),
        ("expired", "grant_expired"),
        ("revoked", "grant_revoked"),
    ],
)
def test_each_denial_is_one_event_with_its_reason(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], setup: str, reason: str
) -> None:
    token = tokenize(client, actors.onboarding, LICENCE)
    reader = create_principal(client, actors.admin, "reader")
    constraints = {
        "encryption_context_subset": {"dataType": "SSN" if setup == "context" else "DriverLicense"}
    }
    if setup != "none":
        grant = client.post(
            "/v1/grants",
            json={"grantee": "reader", "operations": ["Decrypt"], "constraints": constraints},
            headers=bearer(actors.admin),
        ).json()
        if setup == "expired":
            db.execute("UPDATE grants SET expires_at = now() - interval '1 s' WHERE id = %s", (grant["id"],))
        if setup == "revoked":
            client.delete(f"/v1/grants/{grant['id']}", headers=bearer(actors.admin))
    assert client.get(f"/v1/tokens/{token}", headers=bearer(reader["api_key"])).status_code == 403
    (event,) = events(db, action="Detokenize")
    assert (event["outcome"], event["reason"]) == ("denied", reason)
    assert event["principal_name"] == "reader"
    # The caller learns nothing, but the auditor sees whose record was asked for.
    assert (event["token"], event["customer_id"], event["data_type"]) == (token, "12345", "DriverLicense")
    assert event["grant_id"] is None


def test_unknown_token_is_audited_as_not_found(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    unknown = "tok_" + "Q" * 32
    assert client.get(f"/v1/tokens/{unknown}", headers=bearer(actors.kyc)).status_code == 404
    (event,) = events(db, action="Detokenize")
    assert (event["outcome"], event["reason"], event["token"]) == ("denied", "not_found", unknown)


def test_admin_activity_is_audited(
    client: TestClient, actors: Actors, vault: Vault, db: psycopg.Connection[Any]
) -> None:
    admin = bearer(actors.admin)
    app = create_principal(client, actors.admin, "short-lived")
    key = client.post(f"/v1/principals/{app['id']}/keys", headers=admin).json()
    client.delete(f"/v1/principals/{app['id']}/keys/{key['key_id']}", headers=admin)
    grant = client.post(
        "/v1/grants", json={"grantee": "short-lived", "operations": ["Decrypt"]}, headers=admin
    ).json()
    client.delete(f"/v1/grants/{grant['id']}", headers=admin)
    retiring = client.post(
        "/v1/grants", json={"grantee": "kyc-app", "operations": ["Encrypt"]}, headers=admin
    ).json()
    client.post(f"/v1/grants/{retiring['id']}/retire", headers=bearer(actors.kyc))
    expiring = client.post(
        "/v1/grants",
        json={"grantee": "kyc-app", "operations": ["Encrypt"], "expires_at": "2099-01-01T00:00:00Z"},
        headers=admin,
    ).json()
    db.execute("UPDATE grants SET expires_at = now() - interval '1 s' WHERE id = %s", (expiring["id"],))
    vault.grants.sweep(RequestContext("sweep"))
    vault.grants.sweep(RequestContext("sweep"))  # an expiry is recorded once
    client.delete(f"/v1/principals/{app['id']}", headers=admin)

    def one(action: str, **fields: Any) -> dict[str, Any]:
        (event,) = events(db, action=action, **fields)
        assert event["outcome"] == "allowed"
        return event

    assert one("CreatePrincipal", target_id=app["id"])["principal_name"] == "root-admin"
    assert one("CreateApiKey", target_id=key["key_id"])["principal_name"] == "root-admin"
    assert one("RevokeApiKey", target_id=key["key_id"])
    assert one("DisablePrincipal", target_id=app["id"])
    assert one("CreateGrant", grant_id=grant["id"])["target_id"] == app["id"]
    assert one("RevokeGrant", grant_id=grant["id"])
    assert one("RetireGrant", grant_id=retiring["id"])["principal_name"] == "kyc-app"
    assert one("ExpireGrant", grant_id=expiring["id"])["principal_id"] is None


def test_failed_authentication_records_the_key_id_never_the_secret(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    forged = actors.kyc[:-4] + "AAAA"
    client.get("/v1/principals", headers=bearer(forged))
    client.get("/v1/principals", headers=bearer("garbage"))
    client.get("/v1/principals")
    failed = events(db, action="Authenticate")
    assert [(e["outcome"], e["reason"]) for e in failed] == [
        ("denied", "unknown_key"),
        ("denied", "malformed_key"),
        ("denied", "no_key"),
    ]
    assert failed[0]["target_id"] == actors.kyc.split("_")[1]
    assert failed[0]["principal_id"] is None  # a wrong secret proves nothing about who sent it
    everything = str(events(db))
    secret = actors.kyc.split("_", 2)[2]
    assert secret not in everything and forged not in everything and actors.admin not in everything


def test_role_refusals_are_audited(client: TestClient, actors: Actors, db: psycopg.Connection[Any]) -> None:
    assert client.get("/v1/audit/events", headers=bearer(actors.kyc)).status_code == 403
    (event,) = events(db, action="ListAuditEvents")
    assert (event["outcome"], event["reason"], event["principal_name"]) == (
        "denied",
        "role_required",
        "kyc-app",
    )


def test_audit_write_failure_fails_the_operation_closed(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    token = tokenize(client, actors.onboarding, LICENCE)
    with audit_inserts_refused(db):
        refused = client.post(
            "/v1/tokens", json={**LICENCE, "value": "NEVER-STORED"}, headers=bearer(actors.onboarding)
        )
        read = client.get(f"/v1/tokens/{token}", headers=bearer(actors.kyc))
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    assert refused.json()["error"]["code"] == "audit_unavailable"
    assert db.execute("SELECT count(*) FROM records").fetchone() == (1,)
    # A read whose event cannot be written does not reveal the value.
    assert read.status_code == 503 and "D1234" not in read.text


def test_query_filters_paginates_newest_first_and_refuses_services(
    client: TestClient, actors: Actors, vault: Vault
) -> None:
    tokens = [tokenize(client, actors.onboarding, {**LICENCE, "customer_id": f"c{n}"}) for n in range(5)]
    client.get(f"/v1/tokens/{tokens[0]}", headers=bearer(actors.onboarding))  # denied
    auditor = create_principal(client, actors.admin, "auditor-1", role="auditor")
    headers = bearer(auditor["api_key"])

    page = client.get("/v1/audit/events", params={"action": "Tokenize", "limit": 2}, headers=headers).json()
    seen = [e["customer_id"] for e in page["events"]]
    while page["next_cursor"]:
        page = client.get(
            "/v1/audit/events",
            params={"action": "Tokenize", "limit": 2, "cursor": page["next_cursor"]},
            headers=headers,
        ).json()
        seen += [e["customer_id"] for e in page["events"]]
    assert seen == ["c4", "c3", "c2", "c1", "c0"]

    denied = client.get(
        "/v1/audit/events", params={"outcome": "denied", "principal": "onboarding-app"}, headers=headers
    )
    assert [(e["action"], e["reason"]) for e in denied.json()["events"]] == [("Detokenize", "no_grant")]
    by_customer = client.get("/v1/audit/events", params={"customer_id": "c2"}, headers=headers).json()[
        "events"
    ]
    assert [e["token"] for e in by_customer] == [tokens[2]]
    by_token = client.get("/v1/audit/events", params={"token": tokens[0]}, headers=headers).json()["events"]
    assert {e["action"] for e in by_token} == {"Tokenize", "Detokenize"}
    by_id = client.get("/v1/audit/events", params={"principal": actors.onboarding_id}, headers=headers).json()
    assert len(by_id["events"]) == 6
    first_time = by_token[-1]["time"]
    since = client.get(
        "/v1/audit/events", params={"since": first_time, "action": "Tokenize"}, headers=headers
    )
    assert len(since.json()["events"]) == 5
    assert client.get("/v1/audit/events", headers=bearer(actors.admin)).status_code == 200
    assert client.get("/v1/audit/events", headers=bearer(actors.onboarding)).status_code == 403
    assert client.get("/v1/audit/verify", headers=bearer(actors.kyc)).status_code == 403
    assert client.get("/v1/audit/events", params={"cursor": "x"}, headers=headers).status_code == 422


def test_denials_are_counted_in_metrics(client: TestClient, actors: Actors) -> None:
    def count() -> float:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith('piivault_denials_total{action="Tokenize",reason="no_grant"}'):
                return float(line.split()[-1])
        return 0.0

    before = count()
    client.post("/v1/tokens", json={**LICENCE, "data_type": "Passport"}, headers=bearer(actors.kyc))
    assert count() == before + 1
    assert "piivault_request_duration_seconds_bucket" in client.get("/metrics").text


def test_denials_are_logged_as_json_warnings_without_values(
    client: TestClient, actors: Actors, caplog: pytest.LogCaptureFixture
) -> None:
    import json

    with caplog.at_level("WARNING", logger="piivault.alerts"):
        client.post(
            "/v1/tokens",
            json={**LICENCE, "data_type": "SSN", "value": "SENTINEL-SSN"},
            headers=bearer(actors.onboarding),
        )
    (record,) = [r for r in caplog.records if r.name == "piivault.alerts"]
    fields = json.loads(record.getMessage())
    assert (
        fields["alert"] == "denied"
        and fields["action"] == "Tokenize"
        and fields["reason"] == "context_mismatch"
    )
    assert fields["customer_id"] == "12345" and fields["principal_name"] == "onboarding-app"
    assert "SENTINEL-SSN" not in caplog.text
    uuid.UUID(fields["event_id"])


def test_malformed_tokens_in_a_batch_fail_alone_and_denials_are_still_audited(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    token = tokenize(client, actors.onboarding, LICENCE)
    tokens = ["tok_" + "a" * 70, "a\u0000b", token]
    response = client.post(
        "/v1/tokens/detokenize", json={"tokens": tokens}, headers=bearer(actors.onboarding)
    )
    assert response.status_code == 200, response.text
    first, second, third = response.json()["results"]
    assert first["error"]["code"] == second["error"]["code"] == "invalid_input"
    assert first["error"]["field"] == "tokens[0]"
    assert third["error"]["code"] == "grant_required"
    (event,) = events(db, action="Detokenize")
    assert (event["outcome"], event["reason"], event["token"]) == ("denied", "no_grant", token)


def test_a_burst_of_denials_cannot_exhaust_the_connection_pool(
    database_url: str, kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from app.container import build_vault
    from app.main import create_app
    from tests.conftest import make_settings

    vault = build_vault(make_settings(database_url, kms_key_id, db_pool_size=2, db_max_overflow=0))
    try:
        with TestClient(create_app(vault)) as burst:
            bad = bearer("pv_0123456789abcdef_" + "z" * 43)
            with ThreadPoolExecutor(max_workers=12) as pool:
                statuses = list(
                    pool.map(lambda _: burst.get("/v1/principals", headers=bad).status_code, range(48))
                )
    finally:
        vault.close()
    assert statuses == [401] * 48
    # Each failure is on record: the first as itself, its repeats counted into one more event.
    counted = "SELECT sum(coalesce(repeat_count, 1)) FROM audit_events WHERE reason = 'unknown_key'"
    assert db.execute(counted).fetchone() == (48,)


def test_concurrent_creates_of_one_name_conflict_instead_of_failing(
    client: TestClient, actors: Actors
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def create(_: int) -> int:
        body = {"name": "twin", "role": "service"}
        status: int = client.post("/v1/principals", json=body, headers=bearer(actors.admin)).status_code
        return status

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = sorted(pool.map(create, range(8)))
    assert statuses == [201] + [409] * 7


def test_missing_access_reason_and_foreign_retire_are_audited(
    database_url: str, kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    from app.container import build_vault
    from app.main import create_app
    from tests.conftest import create_admin, create_grant, make_settings

    vault = build_vault(make_settings(database_url, kms_key_id, require_access_reason=True))
    try:
        with TestClient(create_app(vault)) as strict:
            admin = create_admin(vault)
            reader = create_principal(strict, admin, "reader")
            other = create_principal(strict, admin, "other")
            grant = create_grant(strict, admin, grantee="reader", operations=["Decrypt"])
            token = "tok_" + "r" * 32
            assert strict.get(f"/v1/tokens/{token}", headers=bearer(reader["api_key"])).status_code == 400
            assert (
                strict.post(f"/v1/grants/{grant['id']}/retire", headers=bearer(other["api_key"])).status_code
                == 404
            )
    finally:
        vault.close()
    denied = events(db, outcome="denied")
    assert [(e["action"], e["reason"]) for e in denied] == [
        ("Detokenize", "access_reason_required"),
        ("RetireGrant", "not_grantee"),
    ]


def test_request_models_never_show_values_or_keys_in_repr() -> None:
    from app.api.schemas import PrincipalCreated, RevealedOut, TokenizeRequest

    item = TokenizeRequest(customer_id="1", data_type="SSN", value="SENTINEL-REPR")
    revealed = RevealedOut(token="t", customer_id="1", data_type="SSN", value="SENTINEL-REPR")
    assert "SENTINEL-REPR" not in repr(item) + repr(revealed) + str(item)
    created = PrincipalCreated(
        id=uuid.uuid4(), name="n", role="service", created_at="2026-01-01T00:00:00Z",
        key_id="k", api_key="pv_secret_material",
    )  # fmt: skip
    assert "pv_secret_material" not in repr(created)
