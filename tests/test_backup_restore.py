"""Backup and restore, as the README tells an operator to do it: `piivault audit verify` gives an
anchor, `pg_dump` takes the database, `pg_restore` puts it into a fresh one, and there
`piivault audit verify --anchor SEQ:MAC` passes and the records read back through the API with the
same KMS key. A restore that lost the newest audit events (the head rolled back with them) still
verifies on its own, and the anchor is what catches it."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from app import cli
from app.container import build_vault
from app.main import create_app
from app.migrate import upgrade
from tests import test_database_roles
from tests.conftest import (
    Actors,
    bearer,
    build_seed,
    create_admin,
    create_kms_key,
    make_settings,
    migrated_database,
    tokenize,
)

PG_DUMP = shutil.which("pg_dump")
PG_RESTORE = shutil.which("pg_restore")

pytestmark = pytest.mark.skipif(
    PG_DUMP is None or PG_RESTORE is None,
    reason="pg_dump / pg_restore not installed (Debian: apt-get install postgresql-client)",
)


# A fresh database with deploy/postgres/roles.sql applied, under role names of the test's own.
roles = test_database_roles.roles


@dataclass(frozen=True)
class Backup:
    """What the operator keeps together: the dump, the anchor taken with it, and (outside any
    file here) the KMS key; plus what the test wrote, to read it back."""

    dump: Path
    anchor: str
    head_seq: int
    actors: Actors
    values: dict[str, str]  # token -> value
    server: str
    kms_key_id: str


def audit_verify(url: str, kms_key_id: str, *args: str, **settings: Any) -> tuple[int, dict[str, Any]]:
    """`piivault audit verify ARGS` against the database at `url`, with this KMS key (and settings)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "_vault_for_cli", lambda: build_vault(make_settings(url, kms_key_id, **settings)))
        result = CliRunner().invoke(cli.cli, ["audit", "verify", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    report: dict[str, Any] = json.loads(result.stdout)
    return result.exit_code, report


@contextmanager
def empty_database(server: str, prefix: str) -> Iterator[str]:
    """A new, empty database (no migrations: the dump brings the schema); dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(server, autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def run_tool(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "version mismatch" in done.stderr:
        pytest.skip(f"{command[0]} is older than the test server: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr


def restore(backup: Backup, url: str) -> None:
    # --no-owner: the test's databases have no piivault roles; a real restore keeps owners and
    # grants, with the roles created first (deploy/postgres/roles.sql), see the README.
    assert PG_RESTORE is not None
    run_tool(PG_RESTORE, "--no-owner", "--exit-on-error", "--dbname", url, str(backup.dump))


@pytest.fixture(scope="module")
def backup(
    database_url: str, shared_kms_key_id: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backup]:
    """A vault with records and an audit trail (allowed and refused reads), its anchor from
    `piivault audit verify`, and a pg_dump of it in custom format."""
    server = make_url(database_url).set(database="postgres").render_as_string(hide_password=False)
    with migrated_database(server, "piivault_backup") as source:
        vault = build_vault(make_settings(source, shared_kms_key_id))
        try:
            with TestClient(create_app(vault), raise_server_exceptions=False) as client:
                actors = build_seed(client, vault)
                values = {}
                for n in range(5):
                    value = f"D{n:04d}-56789-01234"
                    item = {"customer_id": f"c{n}", "data_type": "DriverLicense", "value": value}
                    values[tokenize(client, actors.onboarding, item)] = value
                for token in values:
                    assert client.get(f"/v1/tokens/{token}", headers=bearer(actors.kyc)).status_code == 200
                    refused = client.get(f"/v1/tokens/{token}", headers=bearer(actors.onboarding))
                    assert refused.status_code == 403
        finally:
            vault.close()
        status, report = audit_verify(source, shared_kms_key_id)
        assert status == 0 and report["ok"] is True, report
        assert report["head_seq"] > 20  # the seed, five tokenizes, ten reads
        dump = tmp_path_factory.mktemp("backup") / "piivault.dump"
        assert PG_DUMP is not None
        run_tool(PG_DUMP, "--format=custom", "--file", str(dump), "--dbname", source)
        yield Backup(
            dump,
            f"{report['head_seq']}:{report['head_mac']}",
            report["head_seq"],
            actors,
            values,
            server,
            shared_kms_key_id,
        )


def test_a_restored_database_verifies_against_its_anchor_and_serves_its_records(backup: Backup) -> None:
    with empty_database(backup.server, "piivault_restored") as restored:
        restore(backup, restored)

        status, report = audit_verify(restored, backup.kms_key_id, "--anchor", backup.anchor)
        assert status == 0, report
        assert report["ok"] is True and report["head_seq"] == backup.head_seq
        assert f"{report['head_seq']}:{report['head_mac']}" == backup.anchor

        # The same KMS key reads every record back, under the same grants and API keys.
        vault = build_vault(make_settings(restored, backup.kms_key_id))
        try:
            with TestClient(create_app(vault), raise_server_exceptions=False) as client:
                for token, value in backup.values.items():
                    read = client.get(f"/v1/tokens/{token}", headers=bearer(backup.actors.kyc))
                    assert read.status_code == 200, read.text
                    assert read.json()["value"] == value
                # The restored grants still refuse the app that may only tokenize.
                some_token = next(iter(backup.values))
                denied = client.get(f"/v1/tokens/{some_token}", headers=bearer(backup.actors.onboarding))
                assert denied.status_code == 403
        finally:
            vault.close()

        # The trail goes on from where the backup left it: the old anchor still holds.
        status, report = audit_verify(restored, backup.kms_key_id, "--anchor", backup.anchor)
        assert status == 0, report
        assert report["head_seq"] > backup.head_seq


def test_a_restore_missing_the_newest_audit_events_is_caught_by_the_anchor(backup: Backup) -> None:
    with empty_database(backup.server, "piivault_truncated") as restored:
        restore(backup, restored)
        # The newest three events and their links gone, the head rolled back to the link before:
        # a consistent, shorter chain (an older dump, or one edited before it was restored).
        kept = backup.head_seq - 3
        with psycopg.connect(restored, autocommit=True) as connection:
            row = connection.execute("SELECT mac FROM audit_chain WHERE seq = %s", (kept,)).fetchone()
            assert row is not None
            connection.execute(
                "DELETE FROM audit_events WHERE id IN (SELECT event_row_id FROM audit_chain WHERE seq > %s)",
                (kept,),
            )
            connection.execute("DELETE FROM audit_chain WHERE seq > %s", (kept,))
            connection.execute("UPDATE audit_chain_head SET seq = %s, mac = %s", (kept, row[0]))

        # On its own the chain verifies: that is why the anchor must be kept outside the database.
        status, report = audit_verify(restored, backup.kms_key_id)
        assert status == 0 and report["ok"] is True and report["head_seq"] == kept

        status, report = audit_verify(restored, backup.kms_key_id, "--anchor", backup.anchor)
        assert status == 1
        assert report["ok"] is False
        assert "newest events were deleted" in report["first_bad_event"]["problem"]


def test_a_restore_needs_its_kms_key_on_the_allow_list(backup: Backup) -> None:
    """The dump alone is not a backup: a vault on another key reads no record and cannot check the
    trail, until the backup's key is back on its allow-list (PIIVAULT_KMS_DECRYPT_KEY_IDS)."""
    other_key = create_kms_key("piivault test: not the key the backup was written under")
    with empty_database(backup.server, "piivault_other_key") as restored:
        restore(backup, restored)
        token, value = next(iter(backup.values.items()))

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cli, "_vault_for_cli", lambda: build_vault(make_settings(restored, other_key)))
            refused = CliRunner().invoke(cli.cli, ["audit", "verify", "--anchor", backup.anchor])
        # Not a tampering verdict (1) and no traceback: a configuration to fix (2), said in a line.
        assert refused.exit_code == 2, refused.output
        assert "PIIVAULT_KMS_DECRYPT_KEY_IDS" in refused.stderr
        assert refused.stdout == "" and "Traceback" not in refused.output

        for allowed, status in (((), 503), ((backup.kms_key_id,), 200)):
            settings = make_settings(restored, other_key, kms_decrypt_key_ids=",".join(allowed))
            vault = build_vault(settings)
            try:
                with TestClient(create_app(vault), raise_server_exceptions=False) as client:
                    read = client.get(f"/v1/tokens/{token}", headers=bearer(backup.actors.kyc))
            finally:
                vault.close()
            assert read.status_code == status, read.text
            if status == 200:
                assert read.json()["value"] == value
            else:
                assert read.json()["error"]["code"] == "key_not_allowed"
                assert value not in read.text

        # With the backup's key allowed, the trail verifies against its anchor too.
        status, report = audit_verify(
            restored, other_key, "--anchor", backup.anchor, kms_decrypt_key_ids=backup.kms_key_id
        )
        assert status == 0 and report["ok"] is True, report


def test_a_restore_by_the_superuser_keeps_the_roles_grants_and_the_append_only_trail(
    roles: test_database_roles.Roles, kms_key_id: str, tmp_path: Path
) -> None:
    """The README's procedure with the two roles: the migration role takes the dump (it owns every
    table), the roles exist on the target, a superuser restores; the serving role then serves the
    restored database and still cannot rewrite the trail."""
    upgrade(roles.migrator_url)
    vault = build_vault(make_settings(roles.app_url, kms_key_id))
    try:
        create_admin(vault)
        assert vault.auditor.seal() >= 1
    finally:
        vault.close()
    dump = tmp_path / "roles.dump"
    assert PG_DUMP is not None and PG_RESTORE is not None
    run_tool(PG_DUMP, "--format=custom", "--file", str(dump), "--dbname", roles.migrator_url)

    server = make_url(roles.superuser_url).set(database="postgres").render_as_string(hide_password=False)
    with empty_database(server, "piivault_roles_restored") as restored:
        run_tool(PG_RESTORE, "--exit-on-error", "--dbname", restored, str(dump))
        name = make_url(restored).database
        migrator, app_role = make_url(roles.migrator_url).username, make_url(roles.app_url).username
        with psycopg.connect(restored, autocommit=True) as connection:
            # Database-level privileges are not in a dump of the database's contents.
            for role in (migrator, app_role):
                connection.execute(
                    sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                        sql.Identifier(str(name)), sql.Identifier(str(role))
                    )
                )
        app_url = make_url(roles.app_url).set(database=name).render_as_string(hide_password=False)

        vault = build_vault(make_settings(app_url, kms_key_id))
        try:
            create_admin(vault, "after-restore")
            assert vault.auditor.seal() >= 1
            assert vault.auditor.verify(None, None, None).ok
        finally:
            vault.close()
        with psycopg.connect(app_url, autocommit=True) as connection:
            connection.execute("UPDATE principals SET name = name")
            for statement in ("UPDATE audit_events SET reason = 'x'", "DELETE FROM audit_chain"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    connection.execute(statement)
