"""The migrations build exactly the schema the models describe."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from app.container import Vault, build_vault
from app.db.models import Base
from app.db.session import normalise_url
from app.main import create_app
from app.migrate import alembic_config, upgrade
from app.services.audit import build_event
from app.services.context import RequestContext
from tests.conftest import bearer, build_seed, make_settings, migrated_database, tokenize


def test_migrated_schema_matches_the_models(database_url: str) -> None:
    engine = create_engine(normalise_url(database_url))
    try:
        with engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        engine.dispose()
    assert differences == []


@pytest.fixture
def own_database(database_url: str) -> Iterator[str]:
    """A database of this test's own, migrated to head: the test moves it between revisions."""
    server = make_url(database_url).set(database="postgres").render_as_string(hide_password=False)
    with migrated_database(server, "piivault_migrations") as url:
        yield url


def _write_events(vault: Vault, count: int) -> None:
    events = [
        build_event("Tokenize", "allowed", RequestContext(request_id=f"r{n}"), None) for n in range(count)
    ]
    with vault.database.transaction() as session:
        vault.auditor.record(session, events)


def test_an_audit_chain_moves_to_its_own_table_and_back_and_still_verifies(
    own_database: str, kms_key_id: str
) -> None:
    settings = make_settings(own_database, kms_key_id)
    before = build_vault(settings)
    try:
        _write_events(before, 6)
        assert before.auditor.seal() == 6
        _write_events(before, 2)  # not sealed when the schema changes
    finally:
        before.close()
    command.downgrade(alembic_config(own_database), "0002")
    with psycopg.connect(own_database) as connection:
        counts = connection.execute("SELECT count(*), count(chain_seq) FROM audit_events").fetchone()
    assert counts == (8, 6)
    upgrade(own_database)
    after = build_vault(settings)
    try:
        report = after.auditor.verify()  # seals the two first
        assert report.ok, report
        assert report.events_checked == 8 and report.head_seq == 8
    finally:
        after.close()
    # A link blanked behind the vault's back in the old layout moves over broken, for verify to
    # name, instead of failing the upgrade.
    command.downgrade(alembic_config(own_database), "0002")
    with psycopg.connect(own_database) as connection:
        connection.execute("UPDATE audit_events SET mac = NULL, prev_mac = NULL WHERE chain_seq = 3")
    upgrade(own_database)
    tampered = build_vault(settings)
    try:
        report = tampered.auditor.verify()
        assert not report.ok and report.first_bad_event is not None
        assert report.first_bad_event["chain_seq"] == 3
    finally:
        tampered.close()


def test_existing_grant_mirrors_move_into_grant_mirrors_with_no_key_recorded(own_database: str) -> None:
    """0011: each grant's one mirror (grants.kms_grant_id) becomes a grant_mirrors row whose key
    is unknown (revocation looks for it on every allowed key), revoked if it was."""
    command.downgrade(alembic_config(own_database), "0010")
    with psycopg.connect(own_database) as connection:
        connection.execute(
            "INSERT INTO principals (id, name, role) VALUES (gen_random_uuid(), 'app', 'service')"
        )
        for name, mirror, revoked in (
            ("live", "kms-1", False),
            ("gone", "kms-2", True),
            ("bare", None, False),
        ):
            connection.execute(
                "INSERT INTO grants (id, name, grantee_id, operations, kms_grant_id, kms_revoked_at)"
                " SELECT gen_random_uuid(), %s, id, '{Decrypt}', %s, CASE WHEN %s THEN now() END"
                " FROM principals",
                (name, mirror, revoked),
            )
    upgrade(own_database)
    with psycopg.connect(own_database) as connection:
        rows = connection.execute(
            "SELECT g.name, m.kms_grant_id, m.kms_key_arn, m.revoked_at IS NOT NULL"
            " FROM grant_mirrors m JOIN grants g ON g.id = m.grant_id ORDER BY g.name"
        ).fetchall()
    assert rows == [("gone", "kms-2", None, True), ("live", "kms-1", None, False)]


def test_release_two_migrations_go_down_and_up_over_records_and_a_sealed_chain(
    own_database: str, kms_key_id: str
) -> None:
    """The head down to 0003 and back up, over live records (with fingerprints) and a sealed audit
    chain: nothing lost, every record reads back, the chain verifies."""
    settings = make_settings(own_database, kms_key_id)
    values = {"12345": "D1234-56789-01234", "67890": "D9999-00000-11111"}
    vault = build_vault(settings)
    try:
        with TestClient(create_app(vault), raise_server_exceptions=False) as client:
            actors = build_seed(client, vault)
            tokens = {
                tokenize(
                    client, actors.onboarding, {"customer_id": c, "data_type": "DriverLicense", "value": v}
                ): v
                for c, v in values.items()
            }
        assert vault.auditor.seal() > 0
    finally:
        vault.close()
    with psycopg.connect(own_database) as connection:
        fingerprints = connection.execute("SELECT count(fingerprint) FROM records").fetchone()
    assert fingerprints == (2,)

    command.downgrade(alembic_config(own_database), "0003")
    with psycopg.connect(own_database) as connection:
        assert connection.execute("SELECT count(*) FROM records").fetchone() == (2,)
    upgrade(own_database)

    vault = build_vault(settings)
    try:
        with TestClient(create_app(vault), raise_server_exceptions=False) as client:
            for token, value in tokens.items():
                response = client.get(
                    f"/v1/tokens/{token}", headers={**bearer(actors.kyc), "X-Access-Reason": "migration test"}
                )
                assert response.status_code == 200, response.text
                assert response.json()["value"] == value
        report = vault.auditor.verify()
        assert report.ok, report
    finally:
        vault.close()
