"""A grant's KMS mirrors across keys: `piivault keys rewrap --to KEY` mirrors every active mirrored
grant on KEY too (once, audited), and revoking, retiring or expiring the grant revokes its mirrors
on every key that holds one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import boto3
import psycopg
import pytest
from fastapi.testclient import TestClient

from app.container import Vault
from app.services.context import RequestContext
from app.services.grants import MIRROR_GRANT
from tests.conftest import GRANTEE_ARN, Actors, ClientFactory, bearer, create_grant, tokenize
from tests.test_grants import kms_error
from tests.test_key_boundary import new_key, seed
from tests.test_rewrap import rewrap

# moto answers every KMS call here.
pytestmark = pytest.mark.usefixtures("aws")

LICENCES = {"encryption_context_subset": {"dataType": "DriverLicense"}}


def kms_grants(key_id: str) -> dict[str, dict[str, Any]]:
    """The grants KMS holds on the key, by name."""
    return {g["Name"]: dict(g) for g in boto3.client("kms").list_grants(KeyId=key_id)["Grants"]}


def mirrors(db: psycopg.Connection[Any], grant_id: str) -> dict[str | None, tuple[str, bool]]:
    """The grant's recorded mirrors: key -> (KMS grant id, revoked)."""
    rows = db.execute(
        "SELECT kms_key_arn, kms_grant_id, revoked_at IS NOT NULL FROM grant_mirrors WHERE grant_id = %s",
        (grant_id,),
    ).fetchall()
    return {key: (kms_id, revoked) for key, kms_id, revoked in rows}


@dataclass
class TwoKeys:
    vault: Vault
    client: TestClient
    actors: Actors
    key_a: str
    arn_a: str
    key_b: str
    arn_b: str


def under_two_keys(make_client: ClientFactory) -> TwoKeys:
    """Records and grants under key A; then a vault whose current key is B (A decrypt-only)."""
    key_a, arn_a = new_key()
    key_b, arn_b = new_key()
    vault, client = make_client(key_a)
    actors = seed(client, vault)
    for index in range(3):
        value = f"D{index:04d}-X"
        item = {"customer_id": f"c-{index}", "data_type": "DriverLicense", "value": value}
        tokenize(client, actors.onboarding, item)
    vault, client = make_client(key_b, kms_decrypt_key_ids=key_a)
    return TwoKeys(vault, client, actors, key_a, arn_a, key_b, arn_b)


def test_rewrap_mirrors_active_grants_on_the_new_key_once_and_revoking_revokes_both(
    make_client: ClientFactory, db: psycopg.Connection[Any]
) -> None:
    keys = under_two_keys(make_client)
    vault, client, actors = keys.vault, keys.client, keys.actors
    key_a, arn_a, key_b, arn_b = keys.key_a, keys.arn_a, keys.key_b, keys.arn_b
    decrypt = create_grant(
        client, actors.admin, grantee="kyc-app", operations=["Decrypt"], constraints=LICENCES, name="licences"
    )
    # Made now (current key B): its mirror is on B already; the seed's two grants are on A only.
    seed_grants = dict(db.execute("SELECT operations[1], id::text FROM grants WHERE name IS NULL").fetchall())
    seed_decrypt, seed_encrypt = seed_grants["Decrypt"], seed_grants["Encrypt"]
    erase_only = create_grant(client, actors.admin, grantee="kyc-app", operations=["Erase"])
    revoked = create_grant(client, actors.admin, grantee="kyc-app", operations=["Decrypt"])
    assert client.delete(f"/v1/grants/{revoked['id']}", headers=bearer(actors.admin)).status_code == 200
    on_a_before = kms_grants(key_a)
    assert f"piivault-{seed_decrypt}" in on_a_before and f"piivault-{seed_decrypt}" not in kms_grants(key_b)

    report = rewrap(vault, key_b)

    # The seed's Encrypt and Decrypt grants, mirrored on B; the grant made on B is not doubled,
    # the Erase-only grant has nothing KMS checks, the revoked one is left revoked.
    assert report.mirrors == 2
    on_b = kms_grants(key_b)
    mirror = on_b[f"piivault-{seed_decrypt}"]
    original = on_a_before[f"piivault-{seed_decrypt}"]
    assert mirror["GranteePrincipal"] == GRANTEE_ARN == original["GranteePrincipal"]
    assert mirror["Operations"] == original["Operations"] == ["Decrypt"]
    assert mirror.get("Constraints") == original.get("Constraints")
    assert f"piivault-{decrypt['id']}" in on_b
    assert f"piivault-{erase_only['id']}" not in on_b and f"piivault-{revoked['id']}" not in on_b
    expected = {seed_decrypt, seed_encrypt, decrypt["id"]}
    assert {name for name in on_b if name.startswith("piivault-")} == {f"piivault-{g}" for g in expected}
    assert mirrors(db, seed_decrypt) == {
        arn_a: (original["GrantId"], False),
        arn_b: (mirror["GrantId"], False),
    }
    events = db.execute(
        "SELECT grant_id::text, target_id, principal_id FROM audit_events WHERE action = %s ORDER BY id",
        (MIRROR_GRANT,),
    ).fetchall()
    assert len(events) == 2 and seed_decrypt in {e[0] for e in events}
    assert {e[1] for e in events} == {arn_b} and {e[2] for e in events} == {None}

    # Run again: nothing new on B, no new event.
    again = rewrap(vault, key_b)
    assert again.mirrors == 0 and kms_grants(key_b).keys() == on_b.keys()
    assert len(db.execute("SELECT 1 FROM audit_events WHERE action = %s", (MIRROR_GRANT,)).fetchall()) == 2

    # Revoking the vault grant revokes its mirror on A and on B.
    assert client.delete(f"/v1/grants/{seed_decrypt}", headers=bearer(actors.admin)).status_code == 200
    assert f"piivault-{seed_decrypt}" not in kms_grants(key_a)
    assert f"piivault-{seed_decrypt}" not in kms_grants(key_b)
    assert {key: revoked for key, (_, revoked) in mirrors(db, seed_decrypt).items()} == {
        arn_a: True,
        arn_b: True,
    }
    assert db.execute(
        "SELECT kms_revoked_at IS NOT NULL FROM grants WHERE id = %s", (seed_decrypt,)
    ).fetchone() == (True,)
    # The other grant keeps both of its mirrors.
    assert f"piivault-{seed_encrypt}" in kms_grants(key_a) and f"piivault-{seed_encrypt}" in kms_grants(key_b)


def test_retiring_or_expiring_a_grant_revokes_its_mirrors_on_every_key(
    make_client: ClientFactory, db: psycopg.Connection[Any]
) -> None:
    keys = under_two_keys(make_client)
    vault, client, actors = keys.vault, keys.client, keys.actors
    key_a, arn_a, key_b, arn_b = keys.key_a, keys.arn_a, keys.key_b, keys.arn_b
    rewrap(vault, key_b)
    names = dict(db.execute("SELECT operations[1], id::text FROM grants").fetchall())
    reader, writer = names["Decrypt"], names["Encrypt"]
    assert set(mirrors(db, reader)) == set(mirrors(db, writer)) == {arn_a, arn_b}

    # The grantee retires its own grant.
    assert client.post(f"/v1/grants/{reader}/retire", headers=bearer(actors.kyc)).status_code == 200
    # The other expires; the sweep revokes what it mirrored.
    db.execute("UPDATE grants SET expires_at = now() - interval '1 second' WHERE id = %s", (writer,))
    vault.grants.sweep(RequestContext("test-sweep"))

    for grant_id in (reader, writer):
        assert all(revoked for _, revoked in mirrors(db, grant_id).values()), grant_id
        assert f"piivault-{grant_id}" not in kms_grants(key_a)
        assert f"piivault-{grant_id}" not in kms_grants(key_b)


def test_a_mirror_from_before_keys_were_recorded_is_still_found_and_revoked(
    make_client: ClientFactory, db: psycopg.Connection[Any]
) -> None:
    keys = under_two_keys(make_client)
    client, actors, key_a = keys.client, keys.actors, keys.key_a
    row = db.execute("SELECT id::text FROM grants WHERE operations = '{Decrypt}'").fetchone()
    assert row is not None
    reader = str(row[0])
    # As migration 0011 copies a mirror in: no key recorded (it was made on A, now decrypt-only).
    db.execute("UPDATE grant_mirrors SET kms_key_arn = NULL WHERE grant_id = %s", (reader,))
    assert f"piivault-{reader}" in kms_grants(key_a)

    assert client.delete(f"/v1/grants/{reader}", headers=bearer(actors.admin)).status_code == 200

    assert f"piivault-{reader}" not in kms_grants(key_a)
    assert mirrors(db, reader)[None][1] is True


def test_a_mirror_kms_cannot_revoke_now_is_revoked_by_the_sweep_and_the_others_at_once(
    make_client: ClientFactory, db: psycopg.Connection[Any]
) -> None:
    keys = under_two_keys(make_client)
    vault, client, actors = keys.vault, keys.client, keys.actors
    rewrap(vault, keys.key_b)
    row = db.execute("SELECT id::text FROM grants WHERE operations = '{Decrypt}'").fetchone()
    assert row is not None
    reader = str(row[0])
    unavailable = kms_error(503, "KMSInternalException")

    def on_b_only(model: Any, params: dict[str, Any], **rest: Any) -> Any:
        body = params.get("body")
        if isinstance(body, bytes) and keys.arn_b.encode() in body:
            return unavailable(model)
        return None

    events = vault.keys.client.meta.events  # type: ignore[attr-defined]
    events.register("before-call.kms.RevokeGrant", on_b_only)
    try:
        # The vault's revocation does not wait for KMS: effective now, A's mirror revoked.
        assert client.delete(f"/v1/grants/{reader}", headers=bearer(actors.admin)).status_code == 200
    finally:
        events.unregister("before-call.kms.RevokeGrant", on_b_only)
    assert mirrors(db, reader) == {
        keys.arn_a: (mirrors(db, reader)[keys.arn_a][0], True),
        keys.arn_b: (mirrors(db, reader)[keys.arn_b][0], False),
    }
    assert f"piivault-{reader}" in kms_grants(keys.key_b)
    assert db.execute("SELECT kms_revoked_at FROM grants WHERE id = %s", (reader,)).fetchone() == (None,)

    vault.grants.sweep(RequestContext("test-sweep"))

    assert f"piivault-{reader}" not in kms_grants(keys.key_b)
    assert all(revoked for _, revoked in mirrors(db, reader).values())
    assert db.execute(
        "SELECT kms_revoked_at IS NOT NULL FROM grants WHERE id = %s", (reader,)
    ).fetchone() == (True,)
