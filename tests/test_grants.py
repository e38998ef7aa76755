"""Grants: their shape, their KMS mirrors, and what a failed mirror leaves behind (nothing)."""

from __future__ import annotations

from typing import Any

import boto3
import psycopg
import pytest
from botocore.awsrequest import AWSResponse, HTTPHeaders
from fastapi.testclient import TestClient

from app.container import Vault
from app.services.context import RequestContext
from tests.conftest import GRANTEE_ARN, Actors, audit_inserts_refused, bearer, create_admin, create_principal

# These tests count the grants on the vault's key: each has a key of its own.
pytestmark = pytest.mark.fresh_kms_key


def kms_grants(key_id: str) -> list[dict[str, Any]]:
    grants = boto3.client("kms").list_grants(KeyId=key_id)["Grants"]
    return [dict(grant) for grant in grants]


def test_grant_is_mirrored_with_the_same_constraints_and_unmirrored_on_revoke(
    client: TestClient, vault: Vault, kms_key_id: str
) -> None:
    admin = create_admin(vault)
    create_principal(client, admin, "kyc-app")
    response = client.post(
        "/v1/grants",
        json={
            "grantee": "kyc-app",
            "operations": ["Decrypt"],
            "constraints": {"encryption_context_equals": {"customerID": "12345", "dataType": "SSN"}},
            "name": "kyc reads one SSN",
        },
        headers=bearer(admin),
    )
    assert response.status_code == 201, response.text
    grant = response.json()
    assert grant["constraints"] == {"encryption_context_equals": {"customerID": "12345", "dataType": "SSN"}}
    assert grant["operations"] == ["Decrypt"] and grant["active"] is True
    (mirror,) = kms_grants(kms_key_id)
    assert mirror["GrantId"] == grant["kms_grant_id"]
    assert mirror["GranteePrincipal"] == GRANTEE_ARN
    assert mirror["Operations"] == ["Decrypt"]
    assert mirror["Constraints"] == {"EncryptionContextEquals": {"customerID": "12345", "dataType": "SSN"}}

    encrypt = client.post(
        "/v1/grants",
        json={
            "grantee": "kyc-app",
            "operations": ["Encrypt"],
            "constraints": {"encryption_context_subset": {"dataType": "SSN"}},
        },
        headers=bearer(admin),
    ).json()
    by_id = {g["GrantId"]: g for g in kms_grants(kms_key_id)}
    assert by_id[encrypt["kms_grant_id"]]["Operations"] == ["GenerateDataKey"]
    assert by_id[encrypt["kms_grant_id"]]["Constraints"] == {"EncryptionContextSubset": {"dataType": "SSN"}}

    assert client.delete(f"/v1/grants/{grant['id']}", headers=bearer(admin)).status_code == 200
    assert [g["GrantId"] for g in kms_grants(kms_key_id)] == [encrypt["kms_grant_id"]]


def test_failed_mirror_fails_the_grant_and_leaves_nothing(
    client: TestClient, vault: Vault, kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    admin = create_admin(vault)
    create_principal(client, admin, "kyc-app")

    vault.keys.client.meta.events.register(  # type: ignore[attr-defined]
        "before-call.kms.CreateGrant", kms_error(400, "AccessDeniedException")
    )
    response = client.post(
        "/v1/grants", json={"grantee": "kyc-app", "operations": ["Decrypt"]}, headers=bearer(admin)
    )
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "key_access_denied"
    assert db.execute("SELECT count(*) FROM grants").fetchone() == (0,)
    assert kms_grants(kms_key_id) == []


def test_mirror_made_before_a_failed_commit_is_revoked(
    client: TestClient, vault: Vault, kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    admin = create_admin(vault)
    create_principal(client, admin, "kyc-app")
    # The audit insert fails after CreateGrant succeeded: the transaction rolls back, the mirror goes.
    with audit_inserts_refused(db):
        response = client.post(
            "/v1/grants", json={"grantee": "kyc-app", "operations": ["Decrypt"]}, headers=bearer(admin)
        )
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert db.execute("SELECT count(*) FROM grants").fetchone() == (0,)
    assert kms_grants(kms_key_id) == []


def test_sweep_revokes_mirrors_of_expired_grants(
    client: TestClient, vault: Vault, kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    admin = create_admin(vault)
    create_principal(client, admin, "kyc-app")
    grant = client.post(
        "/v1/grants",
        json={"grantee": "kyc-app", "operations": ["Decrypt"], "expires_at": "2099-01-01T00:00:00Z"},
        headers=bearer(admin),
    ).json()
    assert len(kms_grants(kms_key_id)) == 1
    assert vault.grants.sweep(RequestContext("sweep")) == 0  # not expired yet
    db.execute("UPDATE grants SET expires_at = now() - interval '1 minute' WHERE id = %s", (grant["id"],))
    assert vault.grants.sweep(RequestContext("sweep")) == 1
    assert kms_grants(kms_key_id) == []
    assert vault.grants.sweep(RequestContext("sweep")) == 0  # done once


def test_revoke_succeeds_when_kms_is_down_and_the_sweep_finishes_it(
    client: TestClient, vault: Vault, kms_key_id: str, actors: Actors
) -> None:
    grants = client.get("/v1/grants", params={"grantee": "kyc-app"}, headers=bearer(actors.admin)).json()[
        "grants"
    ]
    grant = grants[0]
    calls: list[str] = []
    unavailable = kms_error(500, "KMSInternalException", calls)
    events = vault.keys.client.meta.events  # type: ignore[attr-defined]
    events.register("before-call.kms.RevokeGrant", unavailable)
    response = client.delete(f"/v1/grants/{grant['id']}", headers=bearer(actors.admin))
    assert response.status_code == 200 and response.json()["active"] is False
    assert calls
    assert grant["kms_grant_id"] in [g["GrantId"] for g in kms_grants(kms_key_id)]
    events.unregister("before-call.kms.RevokeGrant", unavailable)
    assert vault.grants.sweep(RequestContext("sweep")) == 1
    assert grant["kms_grant_id"] not in [g["GrantId"] for g in kms_grants(kms_key_id)]


def test_list_and_get_grants_with_filters(client: TestClient, actors: Actors) -> None:
    admin = bearer(actors.admin)
    all_grants = client.get("/v1/grants", headers=admin).json()["grants"]
    assert len(all_grants) == 2
    kyc = client.get("/v1/grants", params={"grantee": actors.kyc_id}, headers=admin).json()["grants"]
    assert [g["operations"] for g in kyc] == [["Decrypt"]]
    assert client.get(f"/v1/grants/{kyc[0]['id']}", headers=admin).json()["id"] == kyc[0]["id"]
    client.delete(f"/v1/grants/{kyc[0]['id']}", headers=admin)
    active = client.get("/v1/grants", params={"active": "true"}, headers=admin).json()["grants"]
    inactive = client.get("/v1/grants", params={"active": "false"}, headers=admin).json()["grants"]
    assert [g["grantee"] for g in active] == [actors.onboarding_id]
    assert [g["id"] for g in inactive] == [kyc[0]["id"]]
    missing = client.get("/v1/grants/00000000-0000-0000-0000-000000000000", headers=admin)
    assert missing.status_code == 404


def kms_error(status: int, code: str, calls: list[str] | None = None) -> Any:
    """A before-call handler answering as KMS would with an error, without the call reaching moto."""

    def handler(model: Any, **_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        if calls is not None:
            calls.append(model.name)
        http = AWSResponse("https://kms.invalid", status, HTTPHeaders(), None)
        parsed = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return http, parsed

    return handler
