"""Tamper evidence: the audit chain verifies untouched and names the first bad event after plain-SQL
tampering; concurrent writers from two vault processes still leave a chain that verifies."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from app.container import Vault, build_vault
from app.db.repositories.data_path import EventRow
from app.main import create_app
from app.services.audit import build_event, chain_mac, event_mac, new_event_id
from app.services.context import RequestContext
from app.settings import Settings
from tests.conftest import Actors, bearer, create_admin, create_grant, create_principal, make_settings
from tests.processes import free_port, running, wait_for_http

LICENCE = {"customer_id": "12345", "data_type": "DriverLicense", "value": "D1234-56789-01234"}
PIIVAULT = Path(sys.executable).parent / "piivault"


@pytest.fixture
def trail(client: TestClient, actors: Actors, vault: Vault, db: psycopg.Connection[Any]) -> list[int]:
    """A sealed trail of a few dozen events of every kind; returns their chain positions."""
    for n in range(4):
        token = client.post(
            "/v1/tokens", json={**LICENCE, "customer_id": f"c{n}"}, headers=bearer(actors.onboarding)
        )
        client.get(f"/v1/tokens/{token.json()['token']}", headers=bearer(actors.kyc))
        client.get(f"/v1/tokens/{token.json()['token']}", headers=bearer(actors.onboarding))
    # Tampering comes later than the sealer (which runs every half second in a served vault).
    assert vault.auditor.seal() > 0
    return chain_seqs(db)


def chain_seqs(db: psycopg.Connection[Any]) -> list[int]:
    return [row[0] for row in db.execute("SELECT seq FROM audit_chain ORDER BY seq")]


# The row id of the event at a place in the chain, for tampering with plain SQL.
AT_SEQ = "(SELECT event_row_id FROM audit_chain WHERE seq = %s)"


def verify(client: TestClient, actors: Actors, **params: str) -> dict[str, Any]:
    response = client.get("/v1/audit/verify", params=params, headers=bearer(actors.admin))
    assert response.status_code == 200, response.text
    report: dict[str, Any] = response.json()
    return report


def event_id_at(db: psycopg.Connection[Any], seq: int) -> str:
    row = db.execute(f"SELECT event_id FROM audit_events WHERE id = {AT_SEQ}", (seq,)).fetchone()  # noqa: S608
    assert row is not None
    return str(row[0])


def test_events_are_written_with_their_mac_and_sealed_in_order(
    client: TestClient, actors: Actors, vault: Vault, db: psycopg.Connection[Any]
) -> None:
    client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding))
    rows = db.execute("SELECT event_mac FROM audit_events ORDER BY id").fetchall()
    assert rows and all(mac is not None for (mac,) in rows)
    assert chain_seqs(db) == []
    assert vault.auditor.seal() == len(rows)
    sealed = [row[0] for row in db.execute("SELECT seq FROM audit_chain ORDER BY event_row_id")]
    assert sealed == list(range(1, len(rows) + 1))
    assert vault.auditor.seal() == 0
    # Sealed events are never looked at again: the sealer's horizon has passed their writers.
    horizon = db.execute("SELECT sealed_below FROM audit_chain_head").fetchone()
    newest = db.execute("SELECT max(written_xid) FROM audit_events").fetchone()
    assert horizon is not None and newest is not None and horizon[0] > newest[0]


def test_an_event_committed_after_newer_ones_were_sealed_is_still_sealed(
    client: TestClient, actors: Actors, vault: Vault, db: psycopg.Connection[Any]
) -> None:
    # Row ids are handed out at insert, not at commit: a slow transaction's event has a lower id
    # than events sealed before it commits. The sealer must neither skip it nor wait for it.
    late = [build_event("GrantCreated", "allowed", RequestContext(request_id="slow"), None) for _ in range(3)]
    with vault.database.transaction() as session:
        vault.auditor.record(session, late)
        (open_xid,) = session.execute(text("SELECT (pg_current_xact_id()::text)::bigint")).one()
        client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding))
        assert vault.auditor.seal() > 0
        head = db.execute("SELECT sealed_below, pending_xids FROM audit_chain_head").fetchone()
        newest = db.execute("SELECT max(written_xid) FROM audit_events WHERE request_id <> 'slow'").fetchone()
        assert head is not None and newest is not None
        # The open transaction is remembered as pending; it does not hold the sealer's window back.
        assert open_xid in head[1] and head[0] > newest[0]
    unsealed_then = db.execute("SELECT count(*) FROM audit_events WHERE request_id = 'slow'").fetchone()
    assert unsealed_then == (3,)
    assert vault.auditor.seal(batch=2) == 3  # the open transaction's events, a page at a time
    late_rows = db.execute(
        "SELECT c.seq FROM audit_chain c JOIN audit_events e ON e.id = c.event_row_id"
        " WHERE e.request_id = 'slow' ORDER BY c.seq"
    ).fetchall()
    top = max(chain_seqs(db))
    assert [row[0] for row in late_rows] == [top - 2, top - 1, top]
    report = verify(client, actors)
    assert report["ok"] is True, report


def test_a_pass_of_many_small_batches_seals_everything_once_in_order(
    client: TestClient, actors: Actors, vault: Vault, db: psycopg.Connection[Any]
) -> None:
    for n in range(5):
        client.post("/v1/tokens", json={**LICENCE, "customer_id": f"c{n}"}, headers=bearer(actors.onboarding))
    written = db.execute("SELECT count(*) FROM audit_events").fetchone()
    assert written is not None
    assert vault.auditor.seal(batch=1) == written[0]
    order = [row[0] for row in db.execute("SELECT event_row_id FROM audit_chain ORDER BY seq")]
    assert order == sorted(order) and len(order) == written[0]
    assert vault.auditor.seal(batch=1) == 0
    assert verify(client, actors)["ok"] is True


def test_sealing_carries_on_when_transaction_ids_go_back(
    client: TestClient, actors: Actors, vault: Vault, db: psycopg.Connection[Any]
) -> None:
    # A restore into another cluster: the head remembers ids far ahead of the new ones.
    vault.auditor.seal()
    db.execute("UPDATE audit_chain_head SET sealed_below = 9000000000000, pending_xids = '{}'")
    client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding))
    assert vault.auditor.seal(batch=1) == 1  # pages of one through every event already linked
    head = db.execute("SELECT sealed_below FROM audit_chain_head").fetchone()
    assert head is not None and head[0] < 9000000000000
    assert verify(client, actors)["ok"] is True


def test_an_event_changed_before_sealing_is_never_chained(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding))
    db.execute("UPDATE audit_events SET customer_id = '67890' WHERE action = 'Tokenize'")
    report = verify(client, actors)
    assert report["ok"] is False
    assert "fails its MAC" in report["first_bad_event"]["problem"]
    linked = "SELECT count(*) FROM audit_chain c JOIN audit_events e ON e.id = c.event_row_id"
    assert db.execute(linked + " WHERE e.action = 'Tokenize'").fetchone() == (0,)


def event_id_of_action(db: psycopg.Connection[Any], action: str) -> str:
    row = db.execute("SELECT event_id FROM audit_events WHERE action = %s", (action,)).fetchone()
    assert row is not None
    return str(row[0])


def test_untouched_trail_verifies(client: TestClient, actors: Actors, trail: list[int]) -> None:
    assert trail == list(range(1, len(trail) + 1))
    report = verify(client, actors)
    assert report["ok"] is True
    # verify's own listing of the admin call comes after the report, so the count is the trail's.
    assert report["events_checked"] == report["head_seq"] >= len(trail)


@pytest.mark.parametrize(
    "column,value",
    [
        ("customer_id", "'67890'"),
        ("outcome", "'allowed'"),
        ("principal_name", "'someone-else'"),
        ("time", "time - interval '1 hour'"),
        ("access_reason", "'audit'"),
    ],
)
def test_an_updated_field_is_found(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], trail: list[int], column: str, value: str
) -> None:
    target = trail[len(trail) // 2]
    db.execute(f"UPDATE audit_events SET {column} = {value} WHERE id = {AT_SEQ}", (target,))  # noqa: S608
    report = verify(client, actors)
    assert report["ok"] is False
    assert report["first_bad_event"]["event_id"] == event_id_at(db, target)
    assert "modified" in report["first_bad_event"]["problem"]


def test_a_deleted_event_is_found(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], trail: list[int]
) -> None:
    target = trail[5]
    db.execute(f"DELETE FROM audit_events WHERE id = {AT_SEQ}", (target,))  # noqa: S608
    report = verify(client, actors)
    assert report["ok"] is False
    assert report["first_bad_event"]["chain_seq"] == target
    assert "deleted" in report["first_bad_event"]["problem"]


def test_a_deleted_event_with_its_link_is_found(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], trail: list[int]
) -> None:
    target = trail[5]
    db.execute(f"DELETE FROM audit_events WHERE id = {AT_SEQ}", (target,))  # noqa: S608
    db.execute("DELETE FROM audit_chain WHERE seq = %s", (target,))
    report = verify(client, actors)
    assert report["ok"] is False
    assert report["first_bad_event"]["chain_seq"] == target + 1
    assert "deleted" in report["first_bad_event"]["problem"]


def test_a_deleted_link_is_found(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], trail: list[int]
) -> None:
    target = trail[5]
    db.execute("DELETE FROM audit_chain WHERE seq = %s", (target,))
    report = verify(client, actors)
    assert report["ok"] is False
    # The event outlives its link: it is named as out of the chain though the sealer passed it.
    assert "link was deleted" in report["first_bad_event"]["problem"]


def test_a_deleted_newest_link_is_found_though_the_head_was_rolled_back(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], trail: list[int]
) -> None:
    # The event stays; its link goes, and the head is moved back to the link before it.
    newest = trail[-1]
    before = db.execute("SELECT mac FROM audit_chain WHERE seq = %s", (newest - 1,)).fetchone()
    assert before is not None
    db.execute("DELETE FROM audit_chain WHERE seq = %s", (newest,))
    db.execute("UPDATE audit_chain_head SET seq = %s, mac = %s", (newest - 1, before[0]))
    report = verify(client, actors)
    assert report["ok"] is False
    assert "link was deleted" in report["first_bad_event"]["problem"]


def test_a_link_planted_past_the_head_is_reported_not_raised(
    client: TestClient, actors: Actors, vault: Vault, db: psycopg.Connection[Any], trail: list[int]
) -> None:
    client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding))  # waits to be sealed
    db.execute(
        "INSERT INTO audit_chain (seq, event_row_id, prev_mac, mac)"
        " SELECT seq + 1, 999999, mac, mac FROM audit_chain ORDER BY seq DESC LIMIT 1"
    )
    report = verify(client, actors)
    assert report["ok"] is False
    assert report["first_bad_event"]["chain_seq"] == trail[-1] + 1


def test_deleting_the_newest_events_is_found(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], trail: list[int]
) -> None:
    db.execute(
        "DELETE FROM audit_events WHERE id IN (SELECT event_row_id FROM audit_chain WHERE seq >= %s)",
        (trail[-3],),
    )
    db.execute("DELETE FROM audit_chain WHERE seq >= %s", (trail[-3],))
    report = verify(client, actors)
    assert report["ok"] is False


def test_a_forged_event_is_found(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], trail: list[int]
) -> None:
    # A forger with the database copies a real event's row and link and changes what it says.
    forged_id = db.execute(
        """INSERT INTO audit_events (event_id, time, action, outcome, principal_name, customer_id,
                                     key_version, event_mac)
           SELECT gen_random_uuid(), time, 'Detokenize', 'allowed', 'kyc-app', '99999', key_version, event_mac
           FROM audit_events WHERE id = (SELECT event_row_id FROM audit_chain ORDER BY seq DESC LIMIT 1)
           RETURNING id"""
    ).fetchone()
    assert forged_id is not None
    db.execute(
        """INSERT INTO audit_chain (seq, event_row_id, prev_mac, mac)
           SELECT seq + 1, %s, mac, mac FROM audit_chain ORDER BY seq DESC LIMIT 1""",
        forged_id,
    )
    report = verify(client, actors)
    assert report["ok"] is False
    forged = db.execute("SELECT event_id FROM audit_events WHERE customer_id = '99999'").fetchone()
    assert forged is not None
    assert report["first_bad_event"]["event_id"] == str(forged[0])


def test_an_event_inserted_outside_the_chain_is_found(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], trail: list[int]
) -> None:
    db.execute(
        "INSERT INTO audit_events (event_id, time, action, outcome)"
        " VALUES (gen_random_uuid(), now(), 'X', 'allowed')"
    )
    report = verify(client, actors)
    assert report["ok"] is False
    assert "not in the chain" in report["first_bad_event"]["problem"]
    assert report["first_bad_event"]["event_id"] == event_id_of_action(db, "X")


def test_swapped_events_are_found(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], trail: list[int]
) -> None:
    first, second = trail[3], trail[4]
    (a,), (b,) = db.execute(
        "SELECT event_row_id FROM audit_chain WHERE seq IN (%s, %s) ORDER BY seq", (first, second)
    ).fetchall()
    db.execute("UPDATE audit_chain SET event_row_id = -1 WHERE seq = %s", (first,))
    db.execute("UPDATE audit_chain SET event_row_id = %s WHERE seq = %s", (a, second))
    db.execute("UPDATE audit_chain SET event_row_id = %s WHERE seq = %s", (b, first))
    report = verify(client, actors)
    assert report["ok"] is False
    assert report["first_bad_event"]["chain_seq"] == first


def test_a_time_range_verifies_on_its_own(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], trail: list[int]
) -> None:
    middle = db.execute(f"SELECT time FROM audit_events WHERE id = {AT_SEQ}", (trail[6],)).fetchone()  # noqa: S608
    assert middle is not None
    since = middle[0].isoformat()
    ranged = verify(client, actors, since=since)
    assert ranged["ok"] is True and 0 < ranged["events_checked"] < ranged["head_seq"]
    db.execute(f"UPDATE audit_events SET reason = 'x' WHERE id = {AT_SEQ}", (trail[1],))  # noqa: S608
    assert verify(client, actors, since=since)["ok"] is True  # the damage is before the range
    assert verify(client, actors)["ok"] is False


def test_cli_verifies_and_exports(
    client: TestClient,
    actors: Actors,
    db: psycopg.Connection[Any],
    trail: list[int],
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from app import cli

    monkeypatch.setattr(cli, "_vault_for_cli", lambda: build_vault(settings))
    runner = CliRunner()
    verified = runner.invoke(cli.cli, ["audit", "verify"])
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.stdout)["ok"] is True
    out = tmp_path / "events.jsonl"
    exported = runner.invoke(
        cli.cli, ["audit", "export", "--since", "2000-01-01T00:00:00Z", "--output", str(out)]
    )
    assert exported.exit_code == 0, exported.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["chain_seq"] for line in lines] == sorted(line["chain_seq"] for line in lines)
    assert len(lines) >= len(trail)
    assert "D1234" not in out.read_text()
    db.execute(f"DELETE FROM audit_events WHERE id = {AT_SEQ}", (trail[2],))  # noqa: S608
    broken = runner.invoke(cli.cli, ["audit", "verify"])
    assert broken.exit_code == 1
    assert json.loads(broken.stdout)["ok"] is False


def test_two_vault_processes_writing_at_once_leave_a_chain_that_verifies(
    database_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "PIIVAULT_ENVIRONMENT": "development",
        "PIIVAULT_DATABASE_URL": database_url,
        "PIIVAULT_DATA_DIR": str(tmp_path / "data"),  # one local master key for both processes
    }
    ports = [free_port(), free_port()]
    with (
        # json_logs: once stopped, every line each wrote is JSON holding none of their secrets.
        running(
            "vault-a",
            [str(PIIVAULT), "serve", "--port", str(ports[0])],
            env=env,
            log_dir=tmp_path,
            json_logs=True,
        ) as a,
        running(
            "vault-b",
            [str(PIIVAULT), "serve", "--port", str(ports[1])],
            env=env,
            log_dir=tmp_path,
            json_logs=True,
        ) as b,
    ):
        wait_for_http(a, f"http://127.0.0.1:{ports[0]}/readyz")
        wait_for_http(b, f"http://127.0.0.1:{ports[1]}/readyz")
        admin = subprocess.run(
            [str(PIIVAULT), "admin", "create", "ops"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.splitlines()[-1]
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        with httpx.Client(base_url=urls[0]) as http:
            app_key = http.post(
                "/v1/principals", json={"name": "app", "role": "service"}, headers=bearer(admin)
            ).json()["api_key"]
            http.post(
                "/v1/grants",
                json={
                    "grantee": "app",
                    "operations": ["Encrypt"],
                    "constraints": {"encryption_context_subset": {"dataType": "DriverLicense"}},
                },
                headers=bearer(admin),
            ).raise_for_status()
        for vault in (a, b):
            vault.secrets |= {admin, app_key, LICENCE["value"]}

        def hammer(n: int) -> int:
            with httpx.Client(base_url=urls[n % 2], timeout=30) as http:
                item = {
                    **LICENCE,
                    "customer_id": f"c{n}",
                    "data_type": "SSN" if n % 5 == 0 else "DriverLicense",
                }
                return http.post("/v1/tokens", json=item, headers=bearer(app_key)).status_code

        with ThreadPoolExecutor(max_workers=16) as pool:
            statuses = list(pool.map(hammer, range(200)))
        assert statuses.count(201) == 160 and statuses.count(403) == 40
        assert a.running() and b.running()
        report = httpx.get(f"{urls[1]}/v1/audit/verify", headers=bearer(admin)).json()
    assert report["ok"] is True, report
    assert report["events_checked"] >= 200 + 4
    seqs = chain_seqs(db)
    assert seqs == list(range(1, len(seqs) + 1))
    unlinked = (
        "SELECT count(*) FROM audit_events e"
        " WHERE NOT EXISTS (SELECT 1 FROM audit_chain c WHERE c.event_row_id = e.id)"
    )
    assert db.execute(unlinked).fetchone() == (0,)


class _Receiver(BaseHTTPRequestHandler):
    bodies: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self.bodies.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        return None


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    bodies: list[dict[str, Any]] = []
    handler = type("Receiver", (_Receiver,), {"bodies": bodies})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/alerts", bodies
    finally:
        server.shutdown()
        server.server_close()


def webhook_vault(database_url: str, kms_key_id: str, url: str) -> Vault:
    return build_vault(make_settings(database_url, kms_key_id, alert_webhook_url=url))


def test_webhook_receives_denials_without_values(
    database_url: str,
    kms_key_id: str,
    db: psycopg.Connection[Any],
    receiver: tuple[str, list[dict[str, Any]]],
) -> None:
    url, bodies = receiver
    vault = webhook_vault(database_url, kms_key_id, url)
    try:
        with TestClient(create_app(vault)) as client:
            admin = create_admin(vault)
            app = create_principal(client, admin, "app")
            response = client.post(
                "/v1/tokens", json={**LICENCE, "value": "SENTINEL-WEBHOOK"}, headers=bearer(app["api_key"])
            )
            assert response.status_code == 403
            client.get("/v1/principals", headers=bearer("pv_0123456789abcdef_" + "x" * 43))
            deadline = time.monotonic() + 10
            while len(bodies) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        vault.close()
    assert [(b["action"], b["reason"]) for b in bodies] == [
        ("Tokenize", "no_grant"),
        ("Authenticate", "unknown_key"),
    ]
    assert bodies[0]["principal_name"] == "app" and bodies[0]["customer_id"] == "12345"
    assert "SENTINEL-WEBHOOK" not in json.dumps(bodies)


def test_a_dead_webhook_neither_slows_nor_fails_requests(
    database_url: str, kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/alerts"
    vault = webhook_vault(database_url, kms_key_id, dead)
    try:
        with TestClient(create_app(vault)) as client:
            admin = create_admin(vault)
            create_principal(client, admin, "app")
            key = create_principal(client, admin, "other")["api_key"]
            create_grant(client, admin, grantee="other", operations=["Encrypt"])
            started = time.perf_counter()
            # Twenty key ids: each failure is an event (and an alert) of its own, not a repeat.
            for index in range(20):
                assert (
                    client.post(
                        "/v1/tokens", json=LICENCE, headers=bearer(f"pv_{index:016x}_" + "y" * 43)
                    ).status_code
                    == 401
                )
            denied_elapsed = time.perf_counter() - started
            assert client.post("/v1/tokens", json=LICENCE, headers=bearer(key)).status_code == 201
    finally:
        vault.close()
    # Twenty denials with retries against a dead receiver (4 attempts, backoff from 0.5 s) would take
    # tens of seconds if delivery were inline; printed, not asserted as a timing.
    print(f"20 denials with a dead webhook took {denied_elapsed:.3f} s")
    assert db.execute("SELECT count(*) FROM audit_events WHERE reason = 'unknown_key'").fetchone() == (20,)


def test_an_event_numbered_below_the_chain_is_found(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], trail: list[int]
) -> None:
    # The schema refuses such a link; a forger who owns the database drops the check first.
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("UPDATE audit_chain SET seq = 0 WHERE seq = %s", (trail[-1],))
    db.execute("ALTER TABLE audit_chain DROP CONSTRAINT audit_chain_seq_positive")
    forged_id = db.execute(
        """INSERT INTO audit_events (event_id, time, action, outcome, customer_id, key_version, event_mac)
           SELECT gen_random_uuid(), time, 'Detokenize', 'allowed', '12345', key_version, event_mac
           FROM audit_events WHERE id = (SELECT event_row_id FROM audit_chain WHERE seq = 1)
           RETURNING id"""
    ).fetchone()
    assert forged_id is not None
    db.execute(
        "INSERT INTO audit_chain (seq, event_row_id, prev_mac, mac)"
        " SELECT 0, %s, mac, mac FROM audit_chain WHERE seq = 1",
        forged_id,
    )
    try:
        report = verify(client, actors)
    finally:
        db.execute("DELETE FROM audit_chain WHERE seq = 0")
        db.execute("ALTER TABLE audit_chain ADD CONSTRAINT audit_chain_seq_positive CHECK (seq >= 1)")
    assert report["ok"] is False
    assert report["first_bad_event"]["chain_seq"] == 0


def test_an_anchor_exposes_the_newest_events_deleted_with_the_head_rolled_back(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], trail: list[int]
) -> None:
    anchor = verify(client, actors)
    assert anchor["ok"] is True and anchor["head_mac"]
    kept = anchor["head_seq"] - 3
    row = db.execute("SELECT mac FROM audit_chain WHERE seq = %s", (kept,)).fetchone()
    assert row is not None
    db.execute(
        "DELETE FROM audit_events WHERE id IN (SELECT event_row_id FROM audit_chain WHERE seq > %s)", (kept,)
    )
    db.execute("DELETE FROM audit_chain WHERE seq > %s", (kept,))
    db.execute("UPDATE audit_chain_head SET seq = %s, mac = %s", (kept, row[0]))
    # Without an anchor the shortened chain is consistent: that is what anchors are for.
    assert verify(client, actors)["ok"] is True
    anchored = verify(client, actors, anchor_seq=str(anchor["head_seq"]), anchor_mac=anchor["head_mac"])
    assert anchored["ok"] is False
    assert "newest events were deleted" in anchored["first_bad_event"]["problem"]


def test_event_and_chain_macs_keep_their_v1_bytes() -> None:
    """Known answers: every MAC already written must keep verifying, so the v1 message layout
    (field order, None marker, UTC ISO times, length prefixes) can never drift."""
    event = EventRow(
        event_id=uuid.UUID("12345678-1234-5678-1234-567812345678"),
        time=dt.datetime(2026, 11, 28, 13, 0, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        request_id="req-1",
        principal_id=uuid.UUID("87654321-4321-8765-4321-876543218765"),
        principal_name="onboarding",
        api_key_id="0123456789abcdef",
        action="Tokenize",
        outcome="allowed",
        reason=None,
        token="tok_" + "A" * 32,
        customer_id="12345",
        data_type="DriverLicense",
        grant_id=uuid.UUID("11111111-2222-3333-4444-555555555555"),
        target_id=None,
        access_reason="KYC check ü",
        source_ip="10.0.0.1",
        user_agent="curl/8",
        kms_request_id="kms-req-1",
        key_version=1,
    )
    key = b"k" * 32
    assert event_mac(key, event).hex() == "bc13cc5b50465d520c048a6d17ad2f9bd7da1ec2144a144bb0d16506c457f4ab"
    assert chain_mac(key, 7, b"p" * 32, b"e" * 32).hex() == (
        "38693521e6b6304c87f7f158a36b11aa3aba2c8f29b9884164cc8964a0ed26f3"
    )
    event.customer_id = "12346"  # one field changed: another MAC
    assert event_mac(key, event).hex() != "bc13cc5b50465d520c048a6d17ad2f9bd7da1ec2144a144bb0d16506c457f4ab"


def test_event_ids_are_uuid7_ordered_by_time_and_unique() -> None:
    first = new_event_id()
    time.sleep(0.002)
    later = [new_event_id() for _ in range(10_000)]
    assert first.version == 7 and first.variant == uuid.RFC_4122
    assert all(first < event_id for event_id in later)
    assert len(set(later)) == len(later)
    # The first 48 bits are the creation time in Unix milliseconds.
    assert abs((first.int >> 80) - time.time() * 1000) < 5_000
