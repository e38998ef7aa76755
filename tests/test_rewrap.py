"""Key rotation: `piivault keys rewrap` moves every wrapped data key (records and the audit key) to
another KMS key with ReEncrypt, a batch at a time, resumably and idempotently; GET /v1/keys
counts what each key wraps."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pytest
from botocore.exceptions import ClientError
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app import cli
from app.container import Vault, build_vault
from app.errors import AuditUnavailable, KeyNotAllowed, KeyServiceUnavailable
from app.main import create_app
from app.services.audit import AUDIT_KEY_CONTEXT
from app.services.context import RequestContext
from app.services.keys import RewrapReport
from app.services.vault_keys import FINGERPRINT, vault_key_context
from tests.conftest import (
    ClientFactory,
    assert_error,
    audit_inserts_refused,
    bearer,
    create_principal,
    make_settings,
)
from tests.processes import free_port, running, wait_for_http
from tests.test_e2e_processes import BIN, PIIVAULT, base_env, kms_client
from tests.test_failures import kms_error_response, kms_events
from tests.test_key_boundary import new_key, seed


def fill(client: TestClient, key: str, count: int, prefix: str = "D") -> dict[str, str]:
    """`count` records over a few customers, by one batch tokenize; token -> value."""
    items = [
        {"customer_id": f"cust-{index % 7}", "data_type": "DriverLicense", "value": f"{prefix}{index:04d}-X"}
        for index in range(count)
    ]
    response = client.post("/v1/tokens/batch", json={"items": items}, headers=bearer(key))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    return {result["token"]: item["value"] for result, item in zip(results, items, strict=True)}


def assert_readable(client: TestClient, key: str, values: dict[str, str]) -> None:
    response = client.post("/v1/tokens/detokenize", json={"tokens": list(values)}, headers=bearer(key))
    assert response.status_code == 200, response.text
    assert {r["token"]: r.get("value") for r in response.json()["results"]} == values


def rewrap(vault: Vault, to: str, *, from_key: str | None = None, batch: int = 8) -> RewrapReport:
    ctx = RequestContext("test-rewrap", user_agent="pytest")
    to_arn = vault.rotation.target(to, ctx)
    from_arn = vault.rotation.target(from_key, ctx) if from_key else None
    return vault.rotation.run(to_arn, from_key=from_arn, batch=batch, ctx=ctx)


def key_of_records(db: psycopg.Connection[Any]) -> dict[str, int]:
    return dict(db.execute("SELECT kms_key_id, count(*) FROM records GROUP BY kms_key_id").fetchall())


def key_of_audit_keys(db: psycopg.Connection[Any]) -> list[str]:
    return [row[0] for row in db.execute("SELECT kms_key_id FROM audit_keys ORDER BY version").fetchall()]


def rewrap_events(db: psycopg.Connection[Any], outcome: str = "allowed") -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT principal_id, target_id, reason, token FROM audit_events"
        " WHERE action = 'RewrapKeys' AND outcome = %s ORDER BY id",
        (outcome,),
    ).fetchall()


def verified(client: TestClient, admin: str) -> bool:
    report = client.get("/v1/audit/verify", headers=bearer(admin)).json()
    return bool(report["ok"]) and report["events_checked"] > 0


def test_rewrap_moves_every_wrapped_key_so_the_old_key_can_leave_the_allow_list(
    serve: ClientFactory, db: psycopg.Connection[Any]
) -> None:
    key_a, arn_a = new_key()
    key_b, arn_b = new_key()
    vault, client = serve(key_a)
    actors = seed(client, vault)  # the audit key is wrapped under A
    values = fill(client, actors.onboarding, 30)
    vault, client = serve(key_b, kms_decrypt_key_ids=key_a)
    values |= fill(client, actors.onboarding, 3, prefix="B")
    assert key_of_records(db) == {arn_a: 30, arn_b: 3}

    report = rewrap(vault, key_b, batch=8)

    # The audit key and the fingerprint key in a batch each, then 30 records in batches of 8.
    assert (report.total, report.rewrapped, report.skipped, report.failed) == (32, 32, 0, 0)
    assert report.batches == 1 + 1 + 4
    assert key_of_records(db) == {arn_b: 33}
    assert key_of_audit_keys(db) == [arn_b]
    events = rewrap_events(db)
    assert len(events) == report.batches  # one event per batch
    assert {event[1] for event in events} == {arn_b}
    assert [event[2] for event in events] == [
        "audit_keys rewrapped=1 skipped=0 failed=0",
        "vault_keys rewrapped=1 skipped=0 failed=0",
        *["records rewrapped=8 skipped=0 failed=0"] * 3,
        "records rewrapped=6 skipped=0 failed=0",
    ]
    # Each wrapped key opens under B in KMS itself, with its own record's context and no other.
    kms = boto3.client("kms")
    rows = db.execute("SELECT customer_id, data_type, wrapped_key FROM records").fetchall()
    for customer_id, data_type, wrapped in rows:
        context = {"customerID": customer_id, "dataType": data_type}
        opened = kms.decrypt(CiphertextBlob=wrapped, KeyId=key_b, EncryptionContext=context)
        assert opened["KeyId"] == arn_b and len(opened["Plaintext"]) == 32
    customer_id, data_type, wrapped = rows[0]
    with pytest.raises(ClientError):
        kms.decrypt(
            CiphertextBlob=wrapped, KeyId=key_b, EncryptionContext={"customerID": "x", "dataType": data_type}
        )
    ((audit_key,),) = db.execute("SELECT wrapped_key FROM audit_keys").fetchall()
    assert kms.decrypt(CiphertextBlob=audit_key, KeyId=key_b, EncryptionContext=AUDIT_KEY_CONTEXT)

    # A vault that may use B alone reads every record and verifies the whole audit chain.
    _, client = serve(key_b)
    assert_readable(client, actors.kyc, values)
    assert verified(client, actors.admin)

    # Run again: nothing to do, no batch, no event.
    again = rewrap(vault, key_b)
    assert (again.total, again.rewrapped, again.batches) == (0, 0, 0)
    assert len(rewrap_events(db)) == report.batches


def test_a_rewrap_stopped_part_way_loses_nothing_and_finishes_when_run_again(
    serve: ClientFactory, db: psycopg.Connection[Any]
) -> None:
    key_a, arn_a = new_key()
    key_b, arn_b = new_key()
    vault, client = serve(key_a)
    actors = seed(client, vault)
    values = fill(client, actors.onboarding, 24)
    vault, client = serve(key_b, kms_decrypt_key_ids=key_a, kms_max_attempts=1)
    # KMS fails every ReEncrypt after the 11th: the audit and fingerprint keys and 9 records get
    # through.
    calls: list[int] = []
    lock = threading.Lock()

    def outage(**_: Any) -> Any:
        with lock:
            calls.append(1)
            failing = len(calls) > 11
        return kms_error_response("KMSInternalException", "injected") if failing else None

    kms_events(vault).register("before-send.kms.ReEncrypt", outage)

    with pytest.raises(KeyServiceUnavailable):
        rewrap(vault, key_b, batch=8)

    # The batches before the outage, and the successes of the one it hit, are committed.
    assert key_of_records(db) == {arn_b: 9, arn_a: 15}
    assert key_of_audit_keys(db) == [arn_b]
    assert [event[2] for event in rewrap_events(db)] == [
        "audit_keys rewrapped=1 skipped=0 failed=0",
        "vault_keys rewrapped=1 skipped=0 failed=0",
        "records rewrapped=8 skipped=0 failed=0",
        "records rewrapped=1 skipped=0 failed=7",
    ]
    errors = rewrap_events(db, "error")
    assert len(errors) == 7 and {e[2] for e in errors} == {"key_service_unavailable"}
    assert {e[3] for e in errors} <= set(values)
    assert_readable(client, actors.kyc, values)  # under A or B, every record reads

    # Killed between ReEncrypt and commit (here: the batch's audit event cannot be written):
    # the batch's transaction does not commit, so nothing moves.
    vault, client = serve(key_b, kms_decrypt_key_ids=key_a)
    with audit_inserts_refused(db), pytest.raises(AuditUnavailable):
        rewrap(vault, key_b, batch=8)
    assert key_of_records(db) == {arn_b: 9, arn_a: 15}
    assert_readable(client, actors.kyc, values)

    # Run again: it finds what is left and finishes.
    report = rewrap(vault, key_b, batch=8)
    assert (report.total, report.rewrapped, report.failed) == (15, 15, 0)
    assert key_of_records(db) == {arn_b: 24}
    _, client = serve(key_b)
    assert_readable(client, actors.kyc, values)
    assert verified(client, actors.admin)


def test_a_row_changed_while_its_key_is_rewrapped_is_not_overwritten(
    serve: ClientFactory, db: psycopg.Connection[Any]
) -> None:
    key_a, arn_a = new_key()
    key_b, arn_b = new_key()
    vault, client = serve(key_a)
    actors = seed(client, vault)
    values = fill(client, actors.onboarding, 6)
    changed, erased = sorted(values)[:2]
    vault, client = serve(key_b, kms_decrypt_key_ids=key_a)
    calls: list[int] = []
    lock = threading.Lock()

    def meanwhile(**_: Any) -> None:
        # The first record's ReEncrypt (the audit and fingerprint keys' came first): the page is
        # read by now.
        with lock:
            calls.append(1)
            first_record = len(calls) == 3
        if first_record:
            db.execute("UPDATE records SET wrapped_key = %s WHERE token = %s", (b"elsewhere", changed))
            db.execute("DELETE FROM records WHERE token = %s", (erased,))

    kms_events(vault).register("before-send.kms.ReEncrypt", meanwhile)

    report = rewrap(vault, key_b, batch=50)

    assert (report.rewrapped, report.skipped, report.failed) == (1 + 1 + 4, 2, 0)
    row = db.execute("SELECT wrapped_key, kms_key_id FROM records WHERE token = %s", (changed,)).fetchone()
    assert row == (b"elsewhere", arn_a)
    assert db.execute("SELECT count(*) FROM records WHERE token = %s", (erased,)).fetchone() == (0,)
    assert key_of_records(db) == {arn_b: 4, arn_a: 1}
    assert rewrap_events(db)[-1][2] == "records rewrapped=4 skipped=2 failed=0"


def test_rewrap_from_one_key_moves_only_what_that_key_wraps(
    serve: ClientFactory, db: psycopg.Connection[Any]
) -> None:
    key_a, arn_a = new_key()
    key_b, arn_b = new_key()
    key_c, _ = new_key()
    vault, client = serve(key_a)
    actors = seed(client, vault)
    values = fill(client, actors.onboarding, 4)
    vault, client = serve(key_c, kms_decrypt_key_ids=key_a)
    values |= fill(client, actors.onboarding, 5, prefix="C")
    vault, client = serve(key_b, kms_decrypt_key_ids=f"{key_a},{key_c}")

    report = rewrap(vault, key_b, from_key=key_c)

    assert (report.total, report.rewrapped) == (5, 5)
    assert key_of_records(db) == {arn_a: 4, arn_b: 5}
    assert key_of_audit_keys(db) == [arn_a]  # under A, not C: not moved
    assert_readable(client, actors.kyc, values)


def test_a_key_off_the_allow_list_is_refused_and_the_refusal_audited(
    serve: ClientFactory, db: psycopg.Connection[Any]
) -> None:
    key_a, arn_a = new_key()
    key_c, _ = new_key()
    vault, client = serve(key_a)
    actors = seed(client, vault)
    fill(client, actors.onboarding, 3)

    for to, from_key in ((key_c, None), ("alias/piivault-no-such-key", None), (key_a, key_c)):
        with pytest.raises(KeyNotAllowed):
            rewrap(vault, to, from_key=from_key)

    assert key_of_records(db) == {arn_a: 3}
    denied = db.execute(
        "SELECT target_id, reason FROM audit_events WHERE action = 'RewrapKeys' AND outcome = 'denied'"
        " ORDER BY id"
    ).fetchall()
    no_such = "alias/piivault-no-such-key"
    assert denied == [(key_c, "key_not_allowed"), (no_such, "key_not_allowed"), (key_c, "key_not_allowed")]
    assert rewrap_events(db) == []


def test_the_cli_prints_progress_and_a_final_count_and_refuses_a_key_off_the_list(
    serve: ClientFactory,
    db: psycopg.Connection[Any],
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key_a, _ = new_key()
    key_b, arn_b = new_key()
    key_c, _ = new_key()
    vault, client = serve(key_a)
    actors = seed(client, vault)
    fill(client, actors.onboarding, 12)
    settings = make_settings(database_url, key_b, kms_decrypt_key_ids=key_a)
    monkeypatch.setattr(cli, "_vault_for_cli", lambda: build_vault(settings))
    runner = CliRunner()

    moved = runner.invoke(cli.cli, ["keys", "rewrap", "--to", key_b, "--batch", "5"])

    assert moved.exit_code == 0, moved.output
    lines = moved.stdout.splitlines()
    # Not a terminal: plain lines, one per batch (the audit key, the fingerprint key, then
    # 5 + 5 + 2 records).
    progress = [line for line in lines if line.startswith("rewrap: ")]
    assert [line.split()[1] for line in progress] == ["1/14", "2/14", "7/14", "12/14", "14/14"]
    assert lines[-1] == f"rewrapped 14 data keys to {arn_b}; 0 left under other keys"
    assert key_of_records(db) == {arn_b: 12}

    again = runner.invoke(cli.cli, ["keys", "rewrap", "--to", key_b])
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines() == [f"rewrapped 0 data keys to {arn_b}; 0 left under other keys"]

    refused = runner.invoke(cli.cli, ["keys", "rewrap", "--to", key_c])
    assert refused.exit_code == 2
    assert "PIIVAULT_KMS_DECRYPT_KEY_IDS" in refused.output
    assert key_of_records(db) == {arn_b: 12}


def test_list_keys_counts_what_each_key_wraps_for_admins_and_auditors_only(
    serve: ClientFactory, db: psycopg.Connection[Any]
) -> None:
    key_a, arn_a = new_key()
    key_b, arn_b = new_key()
    vault, client = serve(key_a)
    actors = seed(client, vault)
    fill(client, actors.onboarding, 5)
    auditor = create_principal(client, actors.admin, "auditor-1", role="auditor")["api_key"]
    vault, client = serve(key_b, kms_decrypt_key_ids=key_a)
    fill(client, actors.onboarding, 2, prefix="B")

    listed = client.get("/v1/keys", headers=bearer(auditor))

    assert listed.status_code == 200, listed.text
    assert listed.json() == {
        "keys": [
            {
                "key_id": arn_b,
                "records": 2,
                "audit_keys": 0,
                "vault_keys": 0,
                "current": True,
                "decrypt_allowed": True,
            },
            {
                "key_id": arn_a,
                "records": 5,
                "audit_keys": 1,
                "vault_keys": 1,  # the fingerprint key, made by the first licence tokenized
                "current": False,
                "decrypt_allowed": True,
            },
        ]
    }
    assert client.get("/v1/keys", headers=bearer(actors.admin)).status_code == 200
    assert_error(client.get("/v1/keys", headers=bearer(actors.kyc)), 403, "forbidden")
    assert_error(client.get("/v1/keys"), 401, "unauthenticated")
    refused = db.execute(
        "SELECT principal_name, reason FROM audit_events WHERE action = 'ListKeys' AND outcome = 'denied'"
    ).fetchall()
    assert refused == [("kyc-app", "role_required")]

    # A key that still wraps records but is off the list shows so.
    _, only_b = serve(key_b)
    keys = only_b.get("/v1/keys", headers=bearer(auditor)).json()["keys"]
    assert [(k["key_id"], k["records"], k["decrypt_allowed"]) for k in keys] == [
        (arn_b, 2, True),
        (arn_a, 5, False),
    ]

    # After the rewrap, the old key wraps nothing: it can leave the list.
    rewrap(vault, key_b)
    keys = client.get("/v1/keys", headers=bearer(auditor)).json()["keys"]
    assert keys == [
        {
            "key_id": arn_b,
            "records": 7,
            "audit_keys": 1,
            "vault_keys": 1,
            "current": True,
            "decrypt_allowed": True,
        },
        {
            "key_id": arn_a,
            "records": 0,
            "audit_keys": 0,
            "vault_keys": 0,
            "current": False,
            "decrypt_allowed": True,
        },
    ]


def test_on_a_terminal_the_progress_is_a_bar_with_count_rate_and_eta(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    progress = cli._RewrapProgress()
    report = RewrapReport(to_key="arn:aws:kms:us-east-1:123456789012:key/k", total=10)
    progress(report)
    report.rewrapped, report.batches = 5, 1
    progress(report)
    progress.stop()

    shown = capsys.readouterr().out
    assert "rewrap" in shown and "5/10" in shown and "50%" in shown and "/s" in shown
    assert "rewrap: " not in shown  # not the plain lines


@pytest.mark.skipif(importlib.util.find_spec("flask") is None, reason="moto's server needs moto[server]")
@pytest.mark.skipif(not PIIVAULT.exists(), reason=f"no piivault console script at {PIIVAULT}")
def test_a_rewrap_process_killed_with_sigkill_loses_nothing_and_finishes_when_run_again(
    database_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto_args = [str(BIN / "python"), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with running("moto", moto_args, env=base_env(), log_dir=tmp_path / "logs", cwd=tmp_path) as moto:
        wait_for_http(moto, f"{endpoint}/moto-api/", timeout_s=20)
        kms = kms_client(endpoint)
        made = [kms.create_key()["KeyMetadata"] for _ in range(2)]
        (key_a, arn_a), (key_b, arn_b) = ((meta["KeyId"], meta["Arn"]) for meta in made)

        def vault_on(key: str, decrypt: str = "") -> tuple[Vault, TestClient]:
            settings = make_settings(
                database_url,
                key,
                kms_endpoint_url=endpoint,
                kms_decrypt_key_ids=decrypt,
                kms_mirror_grants=False,
            )
            vault = build_vault(settings)
            client = TestClient(create_app(vault), raise_server_exceptions=False)
            client.__enter__()
            return vault, client

        vault, client = vault_on(key_a)
        try:
            actors = seed(client, vault)
            values = fill(client, actors.onboarding, 120)
        finally:
            client.__exit__(None, None, None)
            vault.close()
        env = base_env() | {
            "PIIVAULT_ENVIRONMENT": "development",
            "PIIVAULT_DATABASE_URL": database_url,
            "PIIVAULT_KMS_KEY_ID": key_b,
            "PIIVAULT_KMS_DECRYPT_KEY_IDS": key_a,
            "PIIVAULT_KMS_ENDPOINT_URL": endpoint,
            "PIIVAULT_KMS_MIRROR_GRANTS": "false",
        }
        args = [str(PIIVAULT), "keys", "rewrap", "--to", key_b, "--batch", "2"]

        # SIGKILL once a few batches have committed: wherever it is then, it gets no say.
        with running("rewrap", args, env=env, log_dir=tmp_path / "logs", cwd=tmp_path) as rewrapping:
            deadline = time.monotonic() + 60
            while rewrapping.stdout_path.read_text().count("rewrap: ") < 5:
                assert rewrapping.running(), rewrapping.output()
                assert time.monotonic() < deadline, rewrapping.output()
                time.sleep(0.005)
            rewrapping.popen.kill()
            rewrapping.popen.wait(timeout=10)
        moved = key_of_records(db).get(arn_b, 0)
        assert 0 < moved < 120, rewrapping.output()
        vault, client = vault_on(key_b, key_a)
        try:
            assert_readable(client, actors.kyc, values)
        finally:
            client.__exit__(None, None, None)
            vault.close()

        finished = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)

        assert finished.returncode == 0, finished.stderr
        assert finished.stdout.splitlines()[-1] == (
            f"rewrapped {120 - moved} data keys to {arn_b}; 0 left under other keys"
        )
        assert key_of_records(db) == {arn_b: 120} and key_of_audit_keys(db) == [arn_b]
        vault, client = vault_on(key_b)
        try:
            assert_readable(client, actors.kyc, values)
            assert verified(client, actors.admin)
        finally:
            client.__exit__(None, None, None)
            vault.close()
        assert arn_a not in {row[0] for row in db.execute("SELECT kms_key_id FROM records").fetchall()}


def test_the_local_development_key_rotates_with_new_local_then_rewrap(
    make_client: ClientFactory,
    db: psycopg.Connection[Any],
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    local: dict[str, Any] = {"key_provider": "local", "data_dir": tmp_path}
    vault, client = make_client(None, **local)
    actors = seed(client, vault)
    before = fill(client, actors.onboarding, 6)
    first = vault.keys.key_id
    settings = make_settings(database_url, None, **local)
    monkeypatch.setattr(cli, "_settings", lambda: settings)
    monkeypatch.setattr(cli, "_vault_for_cli", lambda: build_vault(settings))
    runner = CliRunner()

    created = runner.invoke(cli.cli, ["keys", "new-local"])

    assert created.exit_code == 0, created.output
    assert "created local:2 (local:" in created.stdout
    assert (tmp_path / "dev-master.2.key").stat().st_mode & 0o777 == 0o600
    # A restarted vault wraps new records under version 2 and still reads version 1's.
    vault, client = make_client(None, **local)
    second = vault.keys.key_id
    assert second != first and second in created.stdout
    after = fill(client, actors.onboarding, 3, prefix="N")
    assert key_of_records(db) == {first: 6, second: 3}
    assert_readable(client, actors.kyc, {**before, **after})

    moved = runner.invoke(cli.cli, ["keys", "rewrap", "--to", "local:2"])

    assert moved.exit_code == 0, moved.output
    assert moved.stdout.splitlines()[-1] == f"rewrapped 8 data keys to {second}; 0 left under other keys"
    assert key_of_records(db) == {second: 9}
    assert set(key_of_audit_keys(db)) == {second}
    # Version 1 wraps nothing now: its file can go, and everything still opens.
    (tmp_path / "dev-master.key").unlink()
    vault, client = make_client(None, **local)
    assert vault.keys.key_id == second
    assert_readable(client, actors.kyc, {**before, **after})
    refused = runner.invoke(cli.cli, ["keys", "rewrap", "--to", "local:1"])
    assert refused.exit_code == 2 and "local:N" in refused.output


def test_new_local_refuses_when_the_vault_uses_kms(
    database_url: str, kms_key_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(database_url, kms_key_id)
    monkeypatch.setattr(cli, "_settings", lambda: settings)

    refused = CliRunner().invoke(cli.cli, ["keys", "new-local"])

    assert refused.exit_code == 2
    assert "local development key only" in refused.output


def test_rewrap_moves_the_fingerprint_key_and_keeps_its_bytes(
    serve: ClientFactory, db: psycopg.Connection[Any]
) -> None:
    key_a, arn_a = new_key()
    key_b, arn_b = new_key()
    vault, client = serve(key_a)
    seed(client, vault)
    before = vault.fingerprint_key.key()  # made under A
    assert db.execute("SELECT kms_key_id FROM vault_keys").fetchall() == [(arn_a,)]
    vault, _ = serve(key_b, kms_decrypt_key_ids=key_a)

    report = rewrap(vault, key_b)

    assert (report.rewrapped, report.failed) == (2, 0)  # the audit key and the fingerprint key
    assert "vault_keys rewrapped=1 skipped=0 failed=0" in [event[2] for event in rewrap_events(db)]
    ((wrapped, kms_key_id),) = db.execute("SELECT wrapped_key, kms_key_id FROM vault_keys").fetchall()
    assert kms_key_id == arn_b
    context = vault_key_context(FINGERPRINT)
    opened = boto3.client("kms").decrypt(CiphertextBlob=wrapped, KeyId=key_b, EncryptionContext=context)
    # The same key under a new wrapping: fingerprints made before the rewrap still match.
    assert opened["Plaintext"] == before
    with pytest.raises(ClientError):
        boto3.client("kms").decrypt(CiphertextBlob=wrapped, KeyId=key_b, EncryptionContext=AUDIT_KEY_CONTEXT)
    vault, _ = serve(key_b)
    assert vault.fingerprint_key.key() == before
