"""The vault runs under a database role that may only add to the audit trail: with UPDATE and
DELETE withheld on audit_events and audit_chain, every data-path and admin operation, the sealer
and verify still work, and the role cannot rewrite an event or a link."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql
from sqlalchemy.engine import make_url

from app.container import build_vault
from app.main import create_app
from tests.conftest import bearer, create_admin, create_grant, create_principal, make_settings, tokenize

LICENCE = {"customer_id": "12345", "data_type": "DriverLicense", "value": "D1234-56789-01234"}
APPEND_ONLY = ("audit_events", "audit_chain")


@pytest.fixture
def app_role(database_url: str, db: psycopg.Connection[Any]) -> Iterator[str]:
    """A login role with what README's production section grants the vault; yields its URL."""
    role = f"piivault_app_{uuid.uuid4().hex[:8]}"
    name = make_url(database_url).database or ""
    ident = sql.Identifier(role)
    db.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
    db.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(name), ident))
    db.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(ident))
    everything = "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {}"
    db.execute(sql.SQL(everything).format(ident))
    db.execute(sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {}").format(ident))
    db.execute(
        sql.SQL("REVOKE UPDATE, DELETE ON {} FROM {}").format(
            sql.SQL(", ").join(map(sql.Identifier, APPEND_ONLY)), ident
        )
    )
    try:
        yield make_url(database_url).set(username=role).render_as_string(hide_password=False)
    finally:
        db.execute(sql.SQL("DROP OWNED BY {}").format(ident))
        db.execute(sql.SQL("DROP ROLE {}").format(ident))


def test_the_vault_needs_no_right_to_rewrite_its_audit_trail(app_role: str, kms_key_id: str) -> None:
    vault = build_vault(make_settings(app_role, kms_key_id))
    try:
        with TestClient(create_app(vault), raise_server_exceptions=False) as client:
            admin = create_admin(vault)
            app = create_principal(client, admin, "onboarding-app")
            grant = create_grant(client, admin, grantee="onboarding-app", operations=["Encrypt", "Decrypt"])
            token = tokenize(client, app["api_key"], LICENCE)
            revealed = client.get(f"/v1/tokens/{token}", headers=bearer(app["api_key"]))
            assert revealed.status_code == 200 and revealed.json()["value"] == LICENCE["value"]
            assert client.delete(f"/v1/grants/{grant['id']}", headers=bearer(admin)).status_code == 200
            refused = client.get(f"/v1/tokens/{token}", headers=bearer(app["api_key"]))
            assert refused.status_code == 403
            assert vault.auditor.seal() > 0
            report = client.get("/v1/audit/verify", headers=bearer(admin)).json()
            assert report["ok"] is True and report["events_checked"] >= 6
    finally:
        vault.close()
    with psycopg.connect(app_role, autocommit=True) as connection:
        for statement in (
            "UPDATE audit_events SET reason = 'x'",
            "DELETE FROM audit_events",
            "UPDATE audit_chain SET mac = mac",
            "DELETE FROM audit_chain",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                connection.execute(statement)
