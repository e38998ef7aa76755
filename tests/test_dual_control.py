"""Dual control (four eyes): no single admin can make a data grant active, or add, disable or
de-key an admin, by any sequence of API calls; two admins with a key handover can. Through HTTP,
on the real PostgreSQL, with moto's KMS."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import boto3
import psycopg
import pytest
from fastapi.testclient import TestClient

from app.access import KeyIssuers, approval_refusal, grant_status
from app.container import Vault
from app.services.context import RequestContext
from app.settings import Settings
from tests.conftest import ClientFactory, assert_error, bearer, create_admin, create_principal, tokenize

LICENCE = {"customer_id": "12345", "data_type": "DriverLicense", "value": "D1234-56789-01234"}
DECRYPT = {
    "operations": ["Decrypt"],
    "constraints": {"encryption_context_subset": {"dataType": "DriverLicense"}},
}


def four_eyes(make_client: ClientFactory, kms_key_id: str, **overrides: Any) -> tuple[Vault, TestClient]:
    return make_client(kms_key_id, dual_control=True, **overrides)


def key_id_of(api_key: str) -> str:
    return api_key.split("_")[1]


def mirrors_of(key_id: str, grant_id: str) -> list[dict[str, Any]]:
    """The KMS grants on the key that mirror this vault grant."""
    grants = boto3.client("kms").list_grants(KeyId=key_id)["Grants"]
    return [dict(g) for g in grants if g.get("Name") == f"piivault-{grant_id}"]


def request_grant(client: TestClient, admin: str, grantee: str) -> dict[str, Any]:
    response = client.post("/v1/grants", json={"grantee": grantee, **DECRYPT}, headers=bearer(admin))
    assert response.status_code == 201, response.text
    grant: dict[str, Any] = response.json()
    return grant


def take_over_own_key(client: TestClient, principal: dict[str, Any], given_key: str) -> str:
    """The key handover: the principal mints its own key with the one it was given, then revokes
    the given one. Returns its own key."""
    me = client.get("/v1/principals/me", headers=bearer(given_key))
    assert me.status_code == 200, me.text
    assert me.json()["id"] == principal["id"]
    minted = client.post(f"/v1/principals/{principal['id']}/keys", headers=bearer(given_key))
    assert minted.status_code == 201, minted.text
    own: str = minted.json()["api_key"]
    revoked = client.delete(
        f"/v1/principals/{principal['id']}/keys/{key_id_of(given_key)}", headers=bearer(own)
    )
    assert revoked.status_code == 200, revoked.text
    keys = {k["key_id"]: k for k in client.get("/v1/principals/me", headers=bearer(own)).json()["keys"]}
    assert keys[key_id_of(own)]["issued_by"] == principal["id"]
    assert keys[key_id_of(given_key)]["revoked_at"] is not None
    return own


def with_record(client: TestClient, admin: str) -> str:
    """A licence tokenized by an onboarding app whose Encrypt grant needed no approval."""
    onboarding = create_principal(client, admin, f"onboarding-{uuid.uuid4().hex[:6]}")
    grant = client.post(
        "/v1/grants",
        json={"grantee": onboarding["id"], "operations": ["Encrypt"]},
        headers=bearer(admin),
    ).json()
    assert grant["status"] == "active" and grant["approval_id"] is None
    return tokenize(client, onboarding["api_key"], LICENCE)


def denied_reasons(db: psycopg.Connection[Any], action: str) -> list[str]:
    rows = db.execute(
        "SELECT reason FROM audit_events WHERE action = %s AND outcome = 'denied' ORDER BY id", (action,)
    ).fetchall()
    return [row[0] for row in rows]


def test_one_admin_alone_cannot_make_a_decrypt_grant_active(
    make_client: ClientFactory, kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    vault, client = four_eyes(make_client, kms_key_id)
    alone = create_admin(vault, "alice")
    me = bearer(alone)
    token = with_record(client, alone)
    service = create_principal(client, alone, "kyc-app")
    grant = request_grant(client, alone, "kyc-app")
    assert grant["status"] == "pending" and grant["active"] is False and grant["kms_grant_id"] is None

    def still_unusable(key: str) -> None:
        assert_error(client.get(f"/v1/tokens/{token}", headers=bearer(key)), 403, "grant_required")
        assert client.get(f"/v1/grants/{grant['id']}", headers=me).json()["status"] == "pending"

    still_unusable(service["api_key"])
    # Approving her own request, by either route.
    assert_error(client.post(f"/v1/grants/{grant['id']}/approve", headers=me), 403, "second_admin_required")
    approval = f"/v1/approvals/{grant['approval_id']}/approve"
    assert_error(client.post(approval, headers=me), 403, "second_admin_required")
    # Minting another key for the grantee: refused while its grant is pending.
    assert_error(client.post(f"/v1/principals/{service['id']}/keys", headers=me), 403, "grantee_holds_grants")
    # Handing the key over to herself (she holds the first key, so she can mint the "own" one).
    own = take_over_own_key(client, service, service["api_key"])
    assert_error(client.post(approval, headers=me), 403, "second_admin_required")
    still_unusable(own)
    # A second admin through the API: it waits for a second admin, so it never exists.
    requested = client.post("/v1/principals", json={"name": "mallory", "role": "admin"}, headers=me)
    assert requested.status_code == 202, requested.text
    assert requested.json()["kind"] == "create_admin" and "api_key" not in requested.json()
    assert_error(
        client.post(f"/v1/approvals/{requested.json()['id']}/approve", headers=me),
        403,
        "second_admin_required",
    )
    names = [p["name"] for p in client.get("/v1/principals", headers=me).json()["principals"]]
    assert "mallory" not in names
    # A key minted for a fresh service, granted afterwards: still needs a second admin.
    fresh = create_principal(client, alone, "fresh-app")
    second_key = client.post(f"/v1/principals/{fresh['id']}/keys", headers=me).json()["api_key"]
    fresh_grant = request_grant(client, alone, "fresh-app")
    assert_error(
        client.post(f"/v1/grants/{fresh_grant['id']}/approve", headers=me), 403, "second_admin_required"
    )
    still_unusable(second_key)
    # Re-using a rejected request, or one withdrawn by revoking its grant.
    assert client.post(f"/v1/grants/{grant['id']}/reject", headers=me).json()["status"] == "rejected"
    assert_error(client.post(approval, headers=me), 409, "not_pending")
    assert_error(client.post(f"/v1/grants/{grant['id']}/approve", headers=me), 409, "not_pending")
    assert client.delete(f"/v1/grants/{fresh_grant['id']}", headers=me).json()["status"] == "revoked"
    assert_error(client.post(f"/v1/grants/{fresh_grant['id']}/approve", headers=me), 409, "not_pending")
    assert (
        client.get(f"/v1/approvals/{fresh_grant['approval_id']}", headers=me).json()["status"] == "withdrawn"
    )
    assert_error(client.get(f"/v1/tokens/{token}", headers=bearer(own)), 403, "grant_required")
    assert_error(client.get(f"/v1/tokens/{token}", headers=bearer(second_key)), 403, "grant_required")

    # Nothing she did made any data grant active, and every refusal is in the trail.
    active = db.execute(
        "SELECT count(*) FROM grants WHERE 'Decrypt' = ANY(operations) AND NOT awaiting_approval"
    ).fetchone()
    assert active == (0,)
    assert set(denied_reasons(db, "ApproveRequest")) == {"second_admin_required", "not_pending"}
    detokenizes = db.execute(
        "SELECT DISTINCT outcome, reason FROM audit_events WHERE action = 'Detokenize'"
    ).fetchall()
    assert set(detokenizes) == {("denied", "grant_pending"), ("denied", "grant_revoked")}


def test_two_admins_with_a_key_handover_can_and_the_mirror_comes_at_approval(
    make_client: ClientFactory, fresh_kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    vault, client = four_eyes(make_client, fresh_kms_key_id)
    alice, bob = create_admin(vault, "alice"), create_admin(vault, "bob")
    token = with_record(client, alice)
    service = create_principal(client, alice, "kyc-app")
    grant = request_grant(client, alice, "kyc-app")
    assert mirrors_of(fresh_kms_key_id, grant["id"]) == []
    queue = client.get("/v1/approvals", params={"status": "pending"}, headers=bearer(bob)).json()["approvals"]
    (request,) = queue
    assert request["kind"] == "grant" and request["target"] == grant["id"]
    assert request["details"]["grantee"] == service["id"] and request["details"]["operations"] == ["Decrypt"]

    # The service still holds the key Alice was shown: Bob may not approve yet.
    approve = f"/v1/grants/{grant['id']}/approve"
    assert_error(client.post(approve, headers=bearer(bob)), 403, "key_issuer_conflict")
    # Nor if Bob mints it a key himself.
    assert_error(
        client.post(f"/v1/principals/{service['id']}/keys", headers=bearer(bob)), 403, "grantee_holds_grants"
    )
    own = take_over_own_key(client, service, service["api_key"])
    approved = client.post(approve, headers=bearer(bob))
    assert approved.status_code == 200, approved.text
    body = approved.json()
    assert body["status"] == "active" and body["active"] is True
    bob_row = db.execute("SELECT id FROM principals WHERE name = 'bob'").fetchone()
    assert bob_row is not None and body["approved_by"] == str(bob_row[0])
    (mirror,) = mirrors_of(fresh_kms_key_id, grant["id"])
    assert mirror["GrantId"] == body["kms_grant_id"] and mirror["Operations"] == ["Decrypt"]

    read = client.get(f"/v1/tokens/{token}", headers=bearer(own))
    assert read.status_code == 200, read.text
    assert read.json()["value"] == LICENCE["value"]
    # Decided: approving or rejecting again is a conflict, and the queue is empty.
    assert_error(client.post(approve, headers=bearer(bob)), 409, "not_pending")
    assert_error(
        client.post(f"/v1/approvals/{grant['approval_id']}/reject", headers=bearer(alice)), 409, "not_pending"
    )
    assert client.get("/v1/approvals?status=pending", headers=bearer(bob)).json()["approvals"] == []
    decided = client.get(f"/v1/approvals/{grant['approval_id']}", headers=bearer(alice)).json()
    assert decided["status"] == "approved" and decided["decided_by"] == body["approved_by"]
    actions = [
        row[0]
        for row in db.execute(
            "SELECT action FROM audit_events WHERE grant_id = %s AND outcome = 'allowed' ORDER BY id",
            (grant["id"],),
        )
    ]
    assert actions == ["RequestApproval", "CreateGrant", "ApproveRequest", "Detokenize"]


def test_an_admin_made_through_the_api_must_rotate_its_key_before_approving_its_approvers_requests(
    make_client: ClientFactory, kms_key_id: str
) -> None:
    vault, client = four_eyes(make_client, kms_key_id)
    alice, bob = create_admin(vault, "alice"), create_admin(vault, "bob")
    requested = client.post("/v1/principals", json={"name": "carol", "role": "admin"}, headers=bearer(alice))
    assert requested.status_code == 202, requested.text
    approved = client.post(f"/v1/approvals/{requested.json()['id']}/approve", headers=bearer(bob))
    assert approved.status_code == 200, approved.text
    carol_key = approved.json()["api_key"]
    carol = {"id": approved.json()["target"]}
    assert client.get("/v1/principals/me", headers=bearer(carol_key)).json()["name"] == "carol"

    # Bob was shown Carol's key: Carol may not approve Bob's request while that key is valid.
    service = create_principal(client, bob, "kyc-app")
    take_over_own_key(client, service, service["api_key"])
    grant = request_grant(client, bob, "kyc-app")
    assert_error(
        client.post(f"/v1/grants/{grant['id']}/approve", headers=bearer(carol_key)),
        403,
        "key_issuer_conflict",
    )
    carol_own = take_over_own_key(client, carol, carol_key)
    approve = client.post(f"/v1/grants/{grant['id']}/approve", headers=bearer(carol_own))
    assert approve.status_code == 200 and approve.json()["status"] == "active"
    # The one-time key is shown once: never in the request afterwards.
    assert "api_key" not in client.get(f"/v1/approvals/{requested.json()['id']}", headers=bearer(bob)).json()


def test_disabling_an_admin_and_revoking_its_key_wait_for_a_second_admin(
    make_client: ClientFactory, kms_key_id: str
) -> None:
    vault, client = four_eyes(make_client, kms_key_id)
    alice, bob, carol = (create_admin(vault, name) for name in ("alice", "bob", "carol"))
    ids = {
        p["name"]: p["id"] for p in client.get("/v1/principals", headers=bearer(alice)).json()["principals"]
    }

    disable = client.delete(f"/v1/principals/{ids['carol']}", headers=bearer(alice))
    assert disable.status_code == 202 and disable.json()["kind"] == "disable_admin"
    revoke = client.delete(f"/v1/principals/{ids['bob']}/keys/{key_id_of(bob)}", headers=bearer(alice))
    assert revoke.status_code == 202 and revoke.json()["kind"] == "revoke_admin_key"
    assert client.get("/v1/principals/me", headers=bearer(carol)).status_code == 200
    assert client.get("/v1/principals/me", headers=bearer(bob)).status_code == 200
    for pending in (disable.json(), revoke.json()):
        assert_error(
            client.post(f"/v1/approvals/{pending['id']}/approve", headers=bearer(alice)),
            403,
            "second_admin_required",
        )

    assert (
        client.post(f"/v1/approvals/{disable.json()['id']}/approve", headers=bearer(bob)).status_code == 200
    )
    assert client.get("/v1/principals/me", headers=bearer(carol)).status_code == 401
    rejected = client.post(f"/v1/approvals/{revoke.json()['id']}/reject", headers=bearer(bob))
    assert rejected.status_code == 200 and rejected.json()["status"] == "rejected"
    assert client.get("/v1/principals/me", headers=bearer(bob)).status_code == 200
    # An admin revokes its own key at once; a service's key too.
    own = client.delete(f"/v1/principals/{ids['bob']}/keys/{key_id_of(bob)}", headers=bearer(bob))
    assert own.status_code == 200 and own.json()["revoked_at"] is not None


def test_a_pending_request_expires_after_the_ttl_and_the_sweep_audits_it(
    make_client: ClientFactory, kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    vault, client = four_eyes(make_client, kms_key_id, approval_ttl_s=0.5)
    alice, bob = create_admin(vault, "alice"), create_admin(vault, "bob")
    service = create_principal(client, alice, "kyc-app")
    take_over_own_key(client, service, service["api_key"])
    grant = request_grant(client, alice, "kyc-app")
    time.sleep(0.6)  # past the deadline (not a timing assertion: nothing is asserted about speed)
    # Expired on read, before any sweep.
    assert client.get(f"/v1/grants/{grant['id']}", headers=bearer(bob)).json()["status"] == "expired"
    assert client.get("/v1/approvals?status=pending", headers=bearer(bob)).json()["approvals"] == []
    (lapsed,) = client.get("/v1/approvals?status=expired", headers=bearer(bob)).json()["approvals"]
    assert lapsed["id"] == grant["approval_id"] and lapsed["status"] == "expired"
    assert_error(client.post(f"/v1/grants/{grant['id']}/approve", headers=bearer(bob)), 409, "not_pending")
    # Admins may mint keys for it again: its only grant can no longer become active.
    assert client.post(f"/v1/principals/{service['id']}/keys", headers=bearer(bob)).status_code == 201

    ctx = RequestContext("sweep")
    assert vault.approvals.sweep(ctx) == 1
    assert vault.approvals.sweep(ctx) == 0
    expiries = db.execute(
        "SELECT grant_id, target_id FROM audit_events WHERE action = 'ExpireRequest' AND outcome = 'allowed'"
    ).fetchall()
    assert [(str(g), t) for g, t in expiries] == [(grant["id"], grant["approval_id"])]
    vault.sweep(ctx)  # the background sweep runs both, and records nothing twice
    assert db.execute("SELECT count(*) FROM audit_events WHERE action = 'ExpireRequest'").fetchone() == (1,)


def test_the_queue_pages_filters_and_refuses_unknown_parameters(
    make_client: ClientFactory, kms_key_id: str
) -> None:
    vault, client = four_eyes(make_client, kms_key_id)
    alice = create_admin(vault, "alice")
    for name in ("svc-a", "svc-b", "svc-c"):
        create_principal(client, alice, name)
        request_grant(client, alice, name)
    client.post("/v1/principals", json={"name": "dave", "role": "admin"}, headers=bearer(alice))
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"status": "pending", "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/approvals", params=params, headers=bearer(alice)).json()
        seen += [a["kind"] for a in page["approvals"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ["grant", "grant", "grant", "create_admin"]
    kinds = client.get("/v1/approvals?kind=create_admin", headers=bearer(alice)).json()["approvals"]
    assert [a["details"]["name"] for a in kinds] == ["dave"]
    assert_error(
        client.get("/v1/approvals?state=pending", headers=bearer(alice)), 422, "invalid_input", "state"
    )
    assert_error(client.get("/v1/approvals?status=maybe", headers=bearer(alice)), 422, "invalid_input")
    service = create_principal(client, alice, "svc-d")
    assert_error(client.get("/v1/approvals", headers=bearer(service["api_key"])), 403, "forbidden")
    assert_error(client.get(f"/v1/approvals/{uuid.uuid4()}", headers=bearer(alice)), 404, "not_found")


def test_encrypt_only_grants_need_no_approval(make_client: ClientFactory, kms_key_id: str) -> None:
    vault, client = four_eyes(make_client, kms_key_id)
    alice = create_admin(vault, "alice")
    service = create_principal(client, alice, "onboarding")
    grant = client.post(
        "/v1/grants", json={"grantee": "onboarding", "operations": ["Encrypt"]}, headers=bearer(alice)
    ).json()
    assert grant["status"] == "active" and grant["kms_grant_id"] is not None and grant["approval_id"] is None
    tokenize(client, service["api_key"], LICENCE)
    # A grant holding Encrypt and Decrypt waits, as a whole.
    both = client.post(
        "/v1/grants",
        json={"grantee": "onboarding", "operations": ["Encrypt", "Decrypt"]},
        headers=bearer(alice),
    ).json()
    assert both["status"] == "pending"
    assert_error(client.post(f"/v1/grants/{grant['id']}/approve", headers=bearer(alice)), 409, "not_pending")


def test_without_dual_control_one_admin_does_it_all(client: TestClient, vault: Vault) -> None:
    """Development's default: today's one-person behaviour."""
    assert vault.settings.environment == "development" and not vault.settings.dual_control_on
    admin = create_admin(vault)
    grant = request_grant(client, admin, create_principal(client, admin, "kyc-app")["id"])
    assert grant["status"] == "active" and grant["approval_id"] is None
    created = client.post("/v1/principals", json={"name": "second", "role": "admin"}, headers=bearer(admin))
    assert created.status_code == 201 and created.json()["api_key"]


def test_dual_control_is_on_by_default_in_production(database_url: str) -> None:
    base: dict[str, Any] = {"database_url": database_url, "kms_key_id": "k", "kms_mirror_grants": False}
    assert Settings(environment="production", **base).dual_control_on
    assert not Settings(environment="development", **base).dual_control_on
    assert Settings(environment="development", dual_control=True, **base).dual_control_on
    assert not Settings(environment="production", dual_control=False, **base).dual_control_on
    assert Settings(environment="production", **base).approval_ttl_s == 72 * 3600


def test_the_cli_admin_is_break_glass_audited_and_alerting(
    vault: Vault, db: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="piivault.alerts"):
        vault.principals.create_break_glass_admin("break-glass", RequestContext("cli"))
    (alarm,) = [r.getMessage() for r in caplog.records if '"alert": "break_glass"' in r.getMessage()]
    audited = db.execute("SELECT event_id FROM audit_events WHERE action = 'CreatePrincipal'").fetchall()
    assert len(audited) == 1 and str(audited[0][0]) in alarm
    issued = db.execute(
        "SELECT k.issued_by = p.id FROM api_keys k JOIN principals p ON p.id = k.principal_id"
    )
    assert issued.fetchall() == [(True,)]


A, B, G = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()


@pytest.mark.parametrize(
    ("approver", "issuers", "expected"),
    [
        (A, KeyIssuers(requester={A}, approver={A}), "second_admin_required"),
        (B, KeyIssuers(requester={A}, approver={B}, grantee={G}), None),
        (B, KeyIssuers(requester={A}, approver={B}, grantee={A}), "key_issuer_conflict"),
        (B, KeyIssuers(requester={A}, approver={B}, grantee={G, B}), "key_issuer_conflict"),
        (B, KeyIssuers(requester={A}, approver={B}, grantee={None}), "key_issuer_conflict"),
        (B, KeyIssuers(requester={A}, approver={A}), "key_issuer_conflict"),
        (B, KeyIssuers(requester={B}, approver={B}), "key_issuer_conflict"),
        (B, KeyIssuers(requester={None}, approver={B}), "key_issuer_conflict"),
        (B, KeyIssuers(requester={A}, approver={B}, grantee=()), None),
    ],
)
def test_approval_refusal(approver: uuid.UUID, issuers: KeyIssuers, expected: str | None) -> None:
    assert approval_refusal(approver, A, issuers) == expected


def test_grant_status_of_each_state() -> None:
    from datetime import UTC, datetime, timedelta
    from types import SimpleNamespace

    now = datetime(2030, 1, 1, tzinfo=UTC)
    past = now - timedelta(seconds=1)

    def grant(**fields: Any) -> Any:
        base = {"expires_at": None, "revoked_at": None, "retired_at": None, "awaiting_approval": False}
        return SimpleNamespace(**(base | fields))

    assert grant_status(grant(), None, now) == "active"
    assert grant_status(grant(expires_at=past), None, now) == "expired"
    assert grant_status(grant(revoked_at=past), None, now) == "revoked"
    assert grant_status(grant(retired_at=past), None, now) == "retired"
    assert grant_status(grant(awaiting_approval=True), "pending", now) == "pending"
    assert grant_status(grant(awaiting_approval=True), "rejected", now) == "rejected"
    assert grant_status(grant(awaiting_approval=True), "expired", now) == "expired"
    assert grant_status(grant(awaiting_approval=True, expires_at=past), "pending", now) == "expired"
    assert grant_status(grant(awaiting_approval=True, revoked_at=past), "withdrawn", now) == "revoked"


def test_no_approval_for_a_service_whose_key_the_approver_issued_or_whose_key_has_no_known_issuer(
    make_client: ClientFactory, kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    vault, client = four_eyes(make_client, kms_key_id)
    alice, bob = create_admin(vault, "alice"), create_admin(vault, "bob")
    # Bob made the service and was shown its key; Alice asks, Bob approves: refused.
    by_bob = create_principal(client, bob, "made-by-bob")
    grant = request_grant(client, alice, "made-by-bob")
    assert_error(
        client.post(f"/v1/grants/{grant['id']}/approve", headers=bearer(bob)), 403, "key_issuer_conflict"
    )
    # A key from before issuers were recorded counts as issued by anyone.
    own = take_over_own_key(client, by_bob, by_bob["api_key"])
    db.execute("UPDATE api_keys SET issued_by = NULL WHERE id = %s", (key_id_of(own),))
    assert_error(
        client.post(f"/v1/grants/{grant['id']}/approve", headers=bearer(bob)), 403, "key_issuer_conflict"
    )
    take_over_own_key(client, by_bob, own)
    assert client.post(f"/v1/grants/{grant['id']}/approve", headers=bearer(bob)).json()["status"] == "active"
    assert denied_reasons(db, "ApproveRequest") == ["key_issuer_conflict", "key_issuer_conflict"]


def test_approving_and_revoking_one_grant_at_once_never_deadlocks_or_leaves_it_active(
    make_client: ClientFactory, kms_key_id: str
) -> None:
    """The grant's row is locked before its request's on both paths."""
    from concurrent.futures import ThreadPoolExecutor

    vault, client = four_eyes(make_client, kms_key_id)
    alice, bob = create_admin(vault, "alice"), create_admin(vault, "bob")
    service = create_principal(client, alice, "kyc-app")
    take_over_own_key(client, service, service["api_key"])
    with ThreadPoolExecutor(max_workers=2) as pool:
        for _ in range(5):
            grant = request_grant(client, alice, "kyc-app")
            approving = pool.submit(client.post, f"/v1/grants/{grant['id']}/approve", headers=bearer(bob))
            revoking = pool.submit(client.delete, f"/v1/grants/{grant['id']}", headers=bearer(alice))
            assert approving.result().status_code in (200, 409), approving.result().text
            assert revoking.result().status_code == 200, revoking.result().text
            final = client.get(f"/v1/grants/{grant['id']}", headers=bearer(bob)).json()
            assert final["status"] == "revoked" and final["active"] is False
