"""Deny by default: who may tokenize and detokenize what, and who may not."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from app.container import Vault
from tests.conftest import Actors, bearer, create_admin, create_grant, create_principal, tokenize

LICENCE = {"customer_id": "12345", "data_type": "DriverLicense", "value": "D1234-56789-01234"}
SSN = {"customer_id": "12345", "data_type": "SSN", "value": "078-05-1120"}


def grant_encrypt(client: TestClient, admin: str, grantee: str, data_type: str) -> dict[str, Any]:
    return create_grant(
        client,
        admin,
        grantee=grantee,
        operations=["Encrypt"],
        constraints={"encryption_context_subset": {"dataType": data_type}},
    )


def assert_refused_without_leak(response: Any) -> None:
    assert response.status_code == 403, response.text
    body = response.json()
    assert body["error"]["code"] == "grant_required"
    text = response.text
    for secret in ("12345", "DriverLicense", "SSN", "D1234", "078-05"):
        assert secret not in text


def test_onboarding_cannot_detokenize(client: TestClient, actors: Actors) -> None:
    token = tokenize(client, actors.onboarding, LICENCE)
    assert_refused_without_leak(client.get(f"/v1/tokens/{token}", headers=bearer(actors.onboarding)))


def test_kyc_cannot_tokenize(client: TestClient, actors: Actors, db: psycopg.Connection[Any]) -> None:
    response = client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.kyc))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "grant_required"
    assert db.execute("SELECT count(*) FROM records").fetchone() == (0,)


def test_admin_without_grant_cannot_read_or_write(client: TestClient, actors: Actors) -> None:
    token = tokenize(client, actors.onboarding, LICENCE)
    assert_refused_without_leak(client.get(f"/v1/tokens/{token}", headers=bearer(actors.admin)))
    response = client.post("/v1/tokens/detokenize", json={"tokens": [token]}, headers=bearer(actors.admin))
    assert response.status_code == 200
    assert response.json()["results"][0]["error"]["code"] == "grant_required"
    assert "value" not in response.json()["results"][0] or response.json()["results"][0]["value"] is None
    assert client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.admin)).status_code == 403


def test_admins_and_auditors_cannot_be_granted_data_access(client: TestClient, actors: Actors) -> None:
    create_principal(client, actors.admin, "audit-team", role="auditor")
    for grantee in ("root-admin", "audit-team"):
        response = client.post(
            "/v1/grants", json={"grantee": grantee, "operations": ["Decrypt"]}, headers=bearer(actors.admin)
        )
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "grantee"


def test_decrypt_on_driver_licence_cannot_read_ssn(client: TestClient, actors: Actors) -> None:
    grant_encrypt(client, actors.admin, "onboarding-app", "SSN")
    token = tokenize(client, actors.onboarding, SSN)
    assert_refused_without_leak(client.get(f"/v1/tokens/{token}", headers=bearer(actors.kyc)))


def test_equals_grant_for_one_customer_cannot_read_another(client: TestClient, actors: Actors) -> None:
    narrow = create_principal(client, actors.admin, "branch-app")
    create_grant(
        client,
        actors.admin,
        grantee="branch-app",
        operations=["Decrypt"],
        constraints={"encryption_context_equals": {"customerID": "12345", "dataType": "DriverLicense"}},
    )
    mine = tokenize(client, actors.onboarding, LICENCE)
    theirs = tokenize(client, actors.onboarding, {**LICENCE, "customer_id": "67890", "value": "D9999"})
    assert client.get(f"/v1/tokens/{mine}", headers=bearer(narrow["api_key"])).status_code == 200
    response = client.get(f"/v1/tokens/{theirs}", headers=bearer(narrow["api_key"]))
    assert response.status_code == 403
    assert "67890" not in response.text and "D9999" not in response.text


def test_equals_constraint_needs_the_whole_context(client: TestClient, actors: Actors) -> None:
    # {"dataType": "DriverLicense"} alone never equals {"customerID": …, "dataType": …}.
    partial = create_principal(client, actors.admin, "partial-app")
    create_grant(
        client,
        actors.admin,
        grantee="partial-app",
        operations=["Decrypt"],
        constraints={"encryption_context_equals": {"dataType": "DriverLicense"}},
    )
    token = tokenize(client, actors.onboarding, LICENCE)
    assert client.get(f"/v1/tokens/{token}", headers=bearer(partial["api_key"])).status_code == 403


def test_unconstrained_grant_covers_any_record(client: TestClient, actors: Actors) -> None:
    wide = create_principal(client, actors.admin, "wide-app")
    create_grant(client, actors.admin, grantee="wide-app", operations=["Encrypt", "Decrypt"])
    token = tokenize(client, wide["api_key"], SSN)
    assert client.get(f"/v1/tokens/{token}", headers=bearer(wide["api_key"])).json()["value"] == SSN["value"]


def test_expired_grant_is_refused(client: TestClient, actors: Actors, db: psycopg.Connection[Any]) -> None:
    reader = create_principal(client, actors.admin, "temp-app")
    grant = create_grant(
        client,
        actors.admin,
        grantee="temp-app",
        operations=["Decrypt"],
        expires_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat(),
    )
    token = tokenize(client, actors.onboarding, LICENCE)
    assert client.get(f"/v1/tokens/{token}", headers=bearer(reader["api_key"])).status_code == 200
    # Move the expiry into the past, as time would.
    db.execute("UPDATE grants SET expires_at = now() - interval '1 second' WHERE id = %s", (grant["id"],))
    assert_refused_without_leak(client.get(f"/v1/tokens/{token}", headers=bearer(reader["api_key"])))
    listed = client.get("/v1/grants", params={"grantee": "temp-app"}, headers=bearer(actors.admin)).json()
    assert [g["active"] for g in listed["grants"]] == [False]


def test_revoked_grant_is_refused_at_once(client: TestClient, actors: Actors) -> None:
    token = tokenize(client, actors.onboarding, LICENCE)
    assert client.get(f"/v1/tokens/{token}", headers=bearer(actors.kyc)).status_code == 200
    grants = client.get("/v1/grants", params={"grantee": "kyc-app"}, headers=bearer(actors.admin)).json()
    (grant,) = grants["grants"]
    revoked = client.delete(f"/v1/grants/{grant['id']}", headers=bearer(actors.admin))
    assert revoked.status_code == 200
    assert revoked.json()["active"] is False
    assert_refused_without_leak(client.get(f"/v1/tokens/{token}", headers=bearer(actors.kyc)))
    assert client.delete(f"/v1/grants/{grant['id']}", headers=bearer(actors.admin)).status_code == 409


def test_grantee_retires_its_own_grant_and_nobody_elses(client: TestClient, actors: Actors) -> None:
    token = tokenize(client, actors.onboarding, LICENCE)
    grants = client.get("/v1/grants", params={"grantee": "kyc-app"}, headers=bearer(actors.admin)).json()
    grant_id = grants["grants"][0]["id"]
    # Neither another service nor an admin can retire it.
    assert client.post(f"/v1/grants/{grant_id}/retire", headers=bearer(actors.onboarding)).status_code == 404
    assert client.post(f"/v1/grants/{grant_id}/retire", headers=bearer(actors.admin)).status_code == 404
    retired = client.post(f"/v1/grants/{grant_id}/retire", headers=bearer(actors.kyc))
    assert retired.status_code == 200
    assert retired.json()["retired_at"] is not None
    assert client.get(f"/v1/tokens/{token}", headers=bearer(actors.kyc)).status_code == 403


def test_non_grantee_cannot_tell_unknown_tokens_from_refused_ones(client: TestClient, actors: Actors) -> None:
    token = tokenize(client, actors.onboarding, LICENCE)
    unknown = "tok_" + "A" * 32
    known = client.get(f"/v1/tokens/{token}", headers=bearer(actors.onboarding))
    missing = client.get(f"/v1/tokens/{unknown}", headers=bearer(actors.onboarding))
    assert known.status_code == missing.status_code == 403
    assert known.json()["error"]["code"] == missing.json()["error"]["code"]


@pytest.mark.parametrize(
    "path,method",
    [
        ("/v1/principals", "GET"),
        ("/v1/grants", "GET"),
        ("/v1/grants", "POST"),
        ("/v1/principals", "POST"),
    ],
)
def test_services_cannot_use_admin_endpoints(
    client: TestClient, actors: Actors, path: str, method: str
) -> None:
    body = (
        {"grantee": "kyc-app", "operations": ["Decrypt"]}
        if path == "/v1/grants"
        else {"name": "x", "role": "admin"}
    )
    response = client.request(
        method, path, headers=bearer(actors.kyc), json=body if method == "POST" else None
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"


def test_missing_or_bad_credentials_get_401(client: TestClient, actors: Actors) -> None:
    for headers in (
        {},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer not-a-key"},
        bearer(actors.kyc[:-1] + ("A" if actors.kyc[-1] != "A" else "B")),
    ):
        response = client.get("/v1/tokens/tok_" + "A" * 32, headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["code"] == "unauthenticated"


def test_revoked_key_and_disabled_principal_get_401(client: TestClient, vault: Vault, actors: Actors) -> None:
    kyc = client.get("/v1/principals", headers=bearer(actors.admin)).json()["principals"]
    kyc_id = next(p["id"] for p in kyc if p["name"] == "kyc-app")
    # The KYC app rotates its own key; the admin may not mint one for a principal holding grants.
    assert client.post(f"/v1/principals/{kyc_id}/keys", headers=bearer(actors.admin)).status_code == 403
    rotated = client.post(f"/v1/principals/{kyc_id}/keys", headers=bearer(actors.kyc))
    assert rotated.status_code == 201
    new_key = rotated.json()["api_key"]
    old_key_id = actors.kyc.split("_")[1]
    token = tokenize(client, actors.onboarding, LICENCE)
    # Both keys work during rotation.
    assert client.get(f"/v1/tokens/{token}", headers=bearer(actors.kyc)).status_code == 200
    assert client.get(f"/v1/tokens/{token}", headers=bearer(new_key)).status_code == 200
    assert (
        client.delete(f"/v1/principals/{kyc_id}/keys/{old_key_id}", headers=bearer(actors.admin)).status_code
        == 200
    )
    assert client.get(f"/v1/tokens/{token}", headers=bearer(actors.kyc)).status_code == 401
    assert client.get(f"/v1/tokens/{token}", headers=bearer(new_key)).status_code == 200
    disabled = client.delete(f"/v1/principals/{kyc_id}", headers=bearer(actors.admin))
    assert disabled.status_code == 200
    assert disabled.json()["disabled_at"] is not None
    assert client.get(f"/v1/tokens/{token}", headers=bearer(new_key)).status_code == 401


def test_admin_cannot_mint_keys_for_grantees_or_other_admins(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    admin = bearer(actors.admin)
    other = create_principal(client, actors.admin, "other-admin", role="admin")
    fresh = create_principal(client, actors.admin, "no-grants-yet")
    assert client.post(f"/v1/principals/{actors.kyc_id}/keys", headers=admin).status_code == 403
    assert client.post(f"/v1/principals/{other['id']}/keys", headers=admin).status_code == 403
    assert client.post(f"/v1/principals/{fresh['id']}/keys", headers=admin).status_code == 201
    # One service cannot mint or revoke keys for another.
    assert (
        client.post(f"/v1/principals/{actors.kyc_id}/keys", headers=bearer(actors.onboarding)).status_code
        == 403
    )
    kyc_key_id = actors.kyc.split("_")[1]
    revoke = client.delete(
        f"/v1/principals/{actors.kyc_id}/keys/{kyc_key_id}", headers=bearer(actors.onboarding)
    )
    assert revoke.status_code == 403
    reasons = [
        row[0] for row in db.execute("SELECT reason FROM audit_events WHERE outcome = 'denied' ORDER BY id")
    ]
    assert reasons == ["grantee_holds_grants", "other_admin", "role_required", "role_required"]


def test_second_admin_and_self_disable(client: TestClient, vault: Vault, actors: Actors) -> None:
    other = create_principal(client, actors.admin, "second-admin", role="admin")
    me = next(
        p
        for p in client.get("/v1/principals", headers=bearer(actors.admin)).json()["principals"]
        if p["name"] == "root-admin"
    )
    assert client.delete(f"/v1/principals/{me['id']}", headers=bearer(actors.admin)).status_code == 403
    assert client.get("/v1/principals", headers=bearer(other["api_key"])).status_code == 200
    assert create_admin(vault, "third-admin").startswith("pv_")
