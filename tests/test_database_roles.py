"""deploy/postgres/roles.sql, as the compose stack runs it: in a fresh database, the migration role
applies every migration, and the serving role can run the vault and add audit events but can
neither update nor delete them (nor the chain's links)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from app.container import build_vault
from app.migrate import upgrade
from tests.conftest import create_admin, make_settings

ROLES_SQL = Path(__file__).resolve().parent.parent / "deploy" / "postgres" / "roles.sql"


@dataclass
class Roles:
    migrator_url: str
    app_url: str
    superuser_url: str


@pytest.fixture
def roles(database_url: str) -> Iterator[Roles]:
    """A fresh database with roles.sql applied by the superuser, under role names of this test's
    own (roles are cluster-wide); dropped afterwards."""
    suffix = uuid.uuid4().hex[:8]
    migrator, app_role, name = (
        f"piivault_migrator_{suffix}",
        f"piivault_app_{suffix}",
        f"piivault_roles_{suffix}",
    )
    server = make_url(database_url).set(database="postgres").render_as_string(hide_password=False)
    script = (
        ROLES_SQL.read_text()
        .replace("piivault_migrator", migrator)
        .replace("piivault_app", app_role)
        # psql variables, which psycopg does not expand: trust authentication here.
        .replace(":'migrator_password'", "'unused'")
        .replace(":'app_password'", "'unused'")
    )
    with psycopg.connect(server, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    superuser = make_url(server).set(database=name)
    try:
        with psycopg.connect(superuser.render_as_string(hide_password=False), autocommit=True) as connection:
            # A trusted file of many statements, run as one (as psql -f does).
            connection.execute(script.encode())
        yield Roles(
            superuser.set(username=migrator).render_as_string(hide_password=False),
            superuser.set(username=app_role).render_as_string(hide_password=False),
            superuser.render_as_string(hide_password=False),
        )
    finally:
        with psycopg.connect(server, autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            for role in (app_role, migrator):
                connection.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_the_migration_role_owns_the_schema_and_the_serving_role_only_appends_to_the_audit_trail(
    roles: Roles, kms_key_id: str
) -> None:
    upgrade(roles.migrator_url)

    # The serving role cannot change the schema.
    with psycopg.connect(roles.app_url, autocommit=True) as connection:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("CREATE TABLE intruder (id int)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("DROP TABLE audit_events")

    # It serves: an admin created (an audit event inserted), the chain sealed (links inserted).
    vault = build_vault(make_settings(roles.app_url, kms_key_id))
    try:
        create_admin(vault)
        assert vault.auditor.seal() >= 1
    finally:
        vault.close()

    with psycopg.connect(roles.app_url, autocommit=True) as connection:
        events = connection.execute("SELECT count(*) FROM audit_events").fetchone()
        assert events is not None and events[0] >= 1
        # Ordinary tables stay writable: a principal can be renamed and deleted.
        connection.execute("UPDATE principals SET name = name")
        for statement in (
            "UPDATE audit_events SET reason = 'x'",
            "DELETE FROM audit_events",
            "TRUNCATE audit_events",
            "UPDATE audit_chain SET mac = mac",
            "DELETE FROM audit_chain",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                connection.execute(statement)

    # The superuser can (so the refusals above are the grants', not something else's).
    with psycopg.connect(roles.superuser_url, autocommit=True) as connection:
        connection.execute("UPDATE audit_events SET reason = reason")
