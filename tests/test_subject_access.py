"""The subject-access report (GDPR Art. 15): GET /v1/customers/{id}/report and
`piivault customer report`: every record of the customer and every access to them, never a value."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app import cli
from app.container import Vault, build_vault
from tests.conftest import Actors, assert_error, bearer, create_principal, tokenize
from tests.test_erasure import eraser, grant_to

LICENCE = "D9876-54321-SECRET"
OTHER_LICENCE = "D5555-44444-HIDDEN"


def scenario(client: TestClient, actors: Actors) -> tuple[str, str]:
    """Two licences of customer 12345 (one read, then erased), and one of another customer."""
    read = tokenize(
        client, actors.onboarding, {"customer_id": "12345", "data_type": "DriverLicense", "value": LICENCE}
    )
    erased = tokenize(
        client,
        actors.onboarding,
        {"customer_id": "12345", "data_type": "DriverLicense", "value": OTHER_LICENCE},
    )
    tokenize(
        client, actors.onboarding, {"customer_id": "99999", "data_type": "DriverLicense", "value": "D0000"}
    )
    revealed = client.get(f"/v1/tokens/{read}", headers={**bearer(actors.kyc), "X-Access-Reason": "loan 991"})
    assert revealed.json()["value"] == LICENCE
    # Someone without a grant tries it: an access attempt, on record, naming only the token.
    stranger = create_principal(client, actors.admin, "stranger")["api_key"]
    assert client.get(f"/v1/tokens/{read}", headers=bearer(stranger)).status_code == 403
    key = eraser(client, actors)
    assert (
        client.delete(
            f"/v1/tokens/{erased}", headers={**bearer(key), "X-Access-Reason": "Art. 17"}
        ).status_code
        == 204
    )
    return read, erased


def test_the_report_lists_records_and_accesses_and_never_a_value(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    read, erased = scenario(client, actors)
    auditor = create_principal(client, actors.admin, "dpo", role="auditor")["api_key"]

    response = client.get("/v1/customers/12345/report", headers=bearer(auditor))

    assert response.status_code == 200, response.text
    for secret in (LICENCE, OTHER_LICENCE, "D0000"):
        assert secret not in response.text
    report = response.json()
    assert report["customer_id"] == "12345"
    records = {r["token"]: r for r in report["records"]}
    assert set(records) == {read, erased}
    assert records[read]["erased_at"] is None and records[read]["data_type"] == "DriverLicense"
    assert records[erased]["erased_at"] is not None and records[erased]["erasure_reason"] == "Art. 17"
    assert set(records[read]) == {
        "token",
        "data_type",
        "created_at",
        "expires_at",
        "erased_at",
        "erasure_reason",
    }
    seen = [
        (a["action"], a["outcome"], a["token"], a["principal_name"], a["access_reason"])
        for a in report["accesses"]
    ]
    assert ("Tokenize", "allowed", read, "onboarding-app", None) in seen
    assert ("Detokenize", "allowed", read, "kyc-app", "loan 991") in seen
    assert ("Detokenize", "denied", read, "stranger", None) in seen  # named only by its token
    assert ("Erase", "allowed", erased, "eraser-app", "Art. 17") in seen
    # Nothing about the other customer.
    assert all(a["token"] in (read, erased, None) for a in report["accesses"])
    times = [a["time"] for a in report["accesses"]]
    assert times == sorted(times)
    # The report is itself on record.
    reported = db.execute(
        "SELECT principal_name, customer_id FROM audit_events WHERE action = 'CustomerReport'"
    ).fetchall()
    assert reported == [("dpo", "12345")]


def test_only_admins_and_auditors_read_reports(client: TestClient, actors: Actors) -> None:
    scenario(client, actors)
    assert client.get("/v1/customers/12345/report", headers=bearer(actors.admin)).status_code == 200
    for key in (actors.kyc, actors.onboarding, grant_to(client, actors, "x-app", ["Erase", "Decrypt"])):
        assert_error(client.get("/v1/customers/12345/report", headers=bearer(key)), 403, "forbidden")
    assert_error(client.get("/v1/customers/12345/report"), 401, "unauthenticated")
    unknown = client.get("/v1/customers/nobody/report", headers=bearer(actors.admin))
    assert unknown.status_code == 200 and unknown.json()["records"] == []


def test_the_cli_writes_the_same_report(
    client: TestClient,
    vault: Vault,
    actors: Actors,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    scenario(client, actors)
    monkeypatch.setattr(cli, "_vault_for_cli", lambda: build_vault(vault.settings))
    out = tmp_path / "report.json"

    written = CliRunner().invoke(cli.cli, ["customer", "report", "12345", "--output", str(out)])
    printed = CliRunner().invoke(cli.cli, ["customer", "report", "12345"])

    assert written.exit_code == 0, written.output
    assert printed.exit_code == 0, printed.output
    from_file = json.loads(out.read_text())
    from_stdout = json.loads(printed.stdout)
    api = client.get("/v1/customers/12345/report", headers=bearer(actors.admin)).json()
    for document in (from_file, from_stdout):
        assert document["records"] == api["records"]
        assert LICENCE not in json.dumps(document)
    # The same accesses, up to the reports that came after it (each report is itself an access).
    assert from_stdout["accesses"] == api["accesses"][: len(from_stdout["accesses"])]
    assert out.stat().st_mode & 0o077 == 0
    assert CliRunner().invoke(cli.cli, ["customer", "report", "bad id"]).exit_code == 2


def test_a_report_over_a_large_trail_uses_the_indexes(db: psycopg.Connection[Any]) -> None:
    """The report's query can be answered from ix_audit_events_customer_id and ix_audit_events_token
    (with sequential scans off, the planner would otherwise have to scan the table)."""
    from sqlalchemy.dialects import postgresql

    from app.db.repositories.audit import customer_events_query

    query = customer_events_query("12345")
    compiled = query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})  # type: ignore[no-untyped-call]
    with db.transaction():
        db.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(row[0] for row in db.execute(f"EXPLAIN {compiled}").fetchall())
    assert "Seq Scan on audit_events" not in plan, plan
    assert "ix_audit_events_customer_id" in plan and "ix_audit_events_token" in plan, plan
