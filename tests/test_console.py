"""The console (/console) over HTTP: sign-in exchanges an API key for a server-side session, forms
need their CSRF token, markup renders as text, and the session cookie never authenticates /v1."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from app.api.console import CONSOLE_CSP, COOKIE, SIGN_IN_COOKIE
from tests.conftest import (
    GRANTEE_ARN,
    Actors,
    ClientFactory,
    bearer,
    create_admin,
    create_principal,
    tokenize,
)

TOKEN_FIELD = re.compile(r'name="(csrf_token|sign_in_token)" value="([^"]+)"')


def form_token(page: str) -> str:
    found = TOKEN_FIELD.search(page)
    assert found, "no token field on the page"
    return found.group(2)


def sign_in(client: TestClient, api_key: str) -> Any:
    form = client.get("/console/sign-in")
    assert form.status_code == 200
    return client.post(
        "/console/sign-in",
        data={"api_key": api_key, "sign_in_token": form_token(form.text)},
        follow_redirects=False,
    )


def signed_in(client: TestClient, api_key: str) -> str:
    """Signs in; returns the CSRF token of the session's forms."""
    response = sign_in(client, api_key)
    assert response.status_code == 303, response.text
    page = client.get("/console/audit")
    assert page.status_code == 200
    return form_token(page.text)


def events(db: psycopg.Connection[Any], action: str) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT outcome, reason, principal_name FROM audit_events WHERE action = %s ORDER BY id", (action,)
    ).fetchall()


def test_an_admin_signs_in_with_a_key_and_gets_a_session_cookie_not_the_key(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    assert client.get("/console/callers", follow_redirects=False).headers["location"] == "/console/sign-in"
    form = client.get("/console/sign-in")
    assert form.headers["content-security-policy"] == CONSOLE_CSP
    assert "unsafe-inline" not in CONSOLE_CSP and "frame-ancestors 'none'" in CONSOLE_CSP
    assert form.headers["x-frame-options"] == "DENY" and form.headers["cache-control"] == "no-store"
    assert '<label for="api_key">' in form.text

    response = sign_in(client, actors.admin)

    assert response.status_code == 303 and response.headers["location"] == "/console"
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith(f"{COOKIE}="))
    flags = [part.strip().lower() for part in cookie.split(";")]
    assert {"httponly", "samesite=strict", "path=/console"} <= set(flags)
    assert "secure" not in flags  # development serves plain http; production adds Secure
    secret = cookie.split(";")[0].split("=", 1)[1]
    assert secret and secret not in actors.admin and actors.admin not in cookie
    stored = db.execute("SELECT secret_hash, api_key_id FROM console_sessions").fetchall()
    assert len(stored) == 1 and secret.encode() not in stored[0][0]
    assert stored[0][1] in actors.admin  # bound to the key it was exchanged for
    assert events(db, "ConsoleSignIn") == [("allowed", None, "root-admin")]
    page = client.get("/console/callers")
    assert page.status_code == 200 and "onboarding-app" in page.text and actors.admin not in page.text


def test_bad_keys_and_service_keys_cannot_sign_in_and_are_audited(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    bad = sign_in(client, "pv_nope_" + "x" * 40)
    assert bad.status_code == 401 and "sign in" in bad.text.lower()
    service = sign_in(client, actors.kyc)
    assert service.status_code == 403
    for response in (bad, service):
        assert not any(c.startswith(f"{COOKIE}=") for c in response.headers.get_list("set-cookie"))
    assert db.execute("SELECT count(*) FROM console_sessions").fetchone() == (0,)
    assert ("denied", "role_required", "kyc-app") in events(db, "ConsoleSignIn")
    assert any(outcome == "denied" for outcome, _, _ in events(db, "Authenticate"))


def test_the_sign_in_form_needs_its_own_token(client: TestClient, actors: Actors) -> None:
    client.get("/console/sign-in")
    forged = client.post(
        "/console/sign-in",
        data={"api_key": actors.admin, "sign_in_token": "guessed"},
        follow_redirects=False,
    )
    assert forged.status_code == 422 and "csrf_token" in forged.text
    client.cookies.delete(SIGN_IN_COOKIE, path="/console")
    assert client.get("/console/audit", follow_redirects=False).status_code == 303


def test_state_changing_forms_need_the_sessions_csrf_token(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    csrf = signed_in(client, actors.admin)
    for token in (None, "", "x" * 43, csrf[:-1]):
        data = {"name": "forged-app", "role": "service"} | (
            {"csrf_token": token} if token is not None else {}
        )
        refused = client.post("/console/callers", data=data)
        assert refused.status_code == 422 and "csrf_token" in refused.text
    assert db.execute("SELECT count(*) FROM principals WHERE name = 'forged-app'").fetchone() == (0,)

    created = client.post("/console/callers", data={"name": "new-app", "role": "service", "csrf_token": csrf})

    assert created.status_code == 200 and "Shown only this once" in created.text
    shown = re.search(r'id="new-api-key"[^>]*value="([^"]+)"', created.text)
    assert shown is not None
    # The key shown works against the API, once; the next page no longer shows it.
    assert client.get("/v1/tokens/tok_" + "A" * 32, headers=bearer(shown.group(1))).status_code != 401
    assert shown.group(1) not in client.get("/console/callers").text


def test_markup_in_names_renders_as_text(client: TestClient, actors: Actors) -> None:
    csrf = signed_in(client, actors.admin)
    markup = "<script>alert(1)</script>"
    made = client.post(
        "/console/grants",
        data={
            "grantee": "kyc-app",
            "operations": ["Encrypt"],
            "data_type": "Email",
            "name": markup,
            "csrf_token": csrf,
        },
        follow_redirects=False,
    )
    assert made.status_code == 303, made.text
    page = client.get("/console/grants")
    assert markup not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "Encrypt Email of any customer, with no expiry" in page.text
    refused = client.post("/console/callers", data={"name": markup, "role": "service", "csrf_token": csrf})
    assert refused.status_code == 422 and markup not in refused.text


def test_the_session_cookie_never_authenticates_the_api(client: TestClient, actors: Actors) -> None:
    signed_in(client, actors.admin)
    secret = client.cookies.get(COOKIE)
    assert secret
    for path in ("/v1/principals", "/v1/grants", "/v1/audit/events"):
        # Sent explicitly: the browser would not even send it (Path=/console).
        response = client.get(path, headers={"Cookie": f"{COOKIE}={secret}"})
        assert response.status_code == 401, path
        assert client.get(path, headers={"Authorization": f"Bearer {secret}"}).status_code == 401


def test_sign_out_ends_the_session_for_good(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    csrf = signed_in(client, actors.admin)
    secret = client.cookies.get(COOKIE)

    out = client.post("/console/sign-out", data={"csrf_token": csrf}, follow_redirects=False)

    assert out.status_code == 303 and out.headers["location"] == "/console/sign-in"
    assert events(db, "ConsoleSignOut") == [("allowed", None, "root-admin")]
    replay = client.get("/console/audit", headers={"Cookie": f"{COOKIE}={secret}"}, follow_redirects=False)
    assert replay.status_code == 303 and replay.headers["location"] == "/console/sign-in"


@pytest.mark.parametrize("ending", ["idle", "expired", "key_revoked", "disabled"])
def test_a_session_ends_when_it_idles_expires_or_loses_its_key(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], ending: str
) -> None:
    admin_b = create_principal(client, actors.admin, "admin-b", role="admin")
    signed_in(client, admin_b["api_key"])
    if ending == "idle":
        db.execute("UPDATE console_sessions SET last_seen_at = now() - interval '16 minutes'")
    elif ending == "expired":
        db.execute("UPDATE console_sessions SET expires_at = now() - interval '1 second'")
    elif ending == "key_revoked":
        key_id = admin_b["key_id"]
        revoked = client.delete(f"/v1/principals/{admin_b['id']}/keys/{key_id}", headers=bearer(actors.admin))
        assert revoked.status_code == 200
    else:
        assert (
            client.delete(f"/v1/principals/{admin_b['id']}", headers=bearer(actors.admin)).status_code == 200
        )
    assert client.get("/console/audit", follow_redirects=False).status_code == 303


def test_an_auditor_reads_the_trail_but_cannot_manage_callers(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    auditor = create_principal(client, actors.admin, "auditor-1", role="auditor")
    csrf = signed_in(client, auditor["api_key"])
    trail = client.get("/console/audit?action=CreatePrincipal")
    assert trail.status_code == 200 and "CreatePrincipal" in trail.text
    assert client.get("/console/callers").status_code == 403
    refused = client.post("/console/callers", data={"name": "x-app", "role": "service", "csrf_token": csrf})
    assert refused.status_code == 403
    assert ("denied", "role_required", "auditor-1") in events(db, "Console:CreatePrincipal")
    verified = client.post("/console/audit/verify", data={"csrf_token": csrf})
    assert verified.status_code == 200 and "Intact" in verified.text
    export = client.get("/console/audit/export")
    assert export.status_code == 200 and export.headers["content-type"].startswith("application/x-ndjson")
    assert all(line.startswith("{") for line in export.text.splitlines())


def test_no_console_route_reveals_a_value(client: TestClient) -> None:
    from app.api import console

    paths = [route.path for route in console.router.routes]  # type: ignore[attr-defined]
    assert paths and not any("token" in path for path in paths)
    source = Path(console.__file__).read_text(encoding="utf-8")
    assert "vault.tokens" not in source and ".detokenize" not in source


def test_outside_development_the_cookies_are_secure(
    make_client: ClientFactory, kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    vault, client = make_client(kms_key_id, environment="production", kms_grantee_principal=GRANTEE_ARN)
    admin = create_admin(vault)
    form = client.get("/console/sign-in")
    assert "secure" in [p.strip().lower() for p in form.headers["set-cookie"].split(";")]
    # A Secure cookie is not sent back over plain http: hand it over as a browser on https would.
    token = form_token(form.text)
    response = client.post(
        "/console/sign-in",
        data={"api_key": admin, "sign_in_token": token},
        headers={"Cookie": f"{SIGN_IN_COOKIE}={token}"},
        follow_redirects=False,
    )
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith(f"{COOKIE}="))
    assert "secure" in [part.strip().lower() for part in cookie.split(";")]


def test_the_data_types_page_lists_the_registry_and_admins_change_it_under_the_apis_rules(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    auditor = create_principal(client, actors.admin, "auditor-dt", role="auditor")
    csrf = signed_in(client, actors.admin)
    page = client.get("/console/data-types")
    assert page.status_code == 200
    assert "DriverLicense" in page.text and "strip_separators" in page.text and "last4" in page.text
    form = {"name": "LoyaltyNumber", "pattern": "[A-Z]{2}[0-9]{6}", "normalize": "none", "mask": "last4"}

    # No CSRF token, no change.
    assert client.post("/console/data-types", data=form).status_code == 422
    registered = client.post("/console/data-types", data=form | {"lookup": "on", "csrf_token": csrf})

    assert registered.status_code == 200 and "Registered LoyaltyNumber." in registered.text
    row = db.execute(
        "SELECT pattern, normalize, mask, lookup, max_retention_days FROM data_types WHERE name = %s",
        ("LoyaltyNumber",),
    ).fetchone()
    assert row == ("[A-Z]{2}[0-9]{6}", "none", "last4", True, None)
    assert ("allowed", None, "root-admin") in events(db, "CreateDataType")
    # Edit: the form comes filled with its rules; a built-in has no such form.
    editing = client.get("/console/data-types", params={"edit": "LoyaltyNumber"}).text
    assert "Change LoyaltyNumber" in editing and 'value="[A-Z]{2}[0-9]{6}"' in editing
    assert '<option value="last4" selected>' in editing and "checked" in editing
    assert (
        "Change DriverLicense" not in client.get("/console/data-types", params={"edit": "DriverLicense"}).text
    )
    # The API sees it: the same registry.
    api = client.get("/v1/data-types/LoyaltyNumber", headers=bearer(actors.admin)).json()
    assert api["mask"] == "last4" and api["lookup"] is True

    # A built-in changes in retention only: the API's message, and nothing written.
    builtin = client.post(
        "/console/data-types",
        data={"name": "DriverLicense", "normalize": "none", "csrf_token": csrf},
    )
    assert builtin.status_code == 409 and "only max_retention_days can change" in builtin.text
    retention = client.post(
        "/console/data-types",
        data={"name": "DriverLicense", "retention_only": "1", "max_retention_days": "30", "csrf_token": csrf},
    )
    assert retention.status_code == 200 and "Changed DriverLicense." in retention.text
    assert db.execute(
        "SELECT normalize, max_retention_days FROM data_types WHERE name = 'DriverLicense'"
    ).fetchone() == ("strip_separators", 30)

    # The body model's own rules: a retention of 0 days, a pattern RE2 refuses, a bad name.
    for data, field in (
        ({"name": "DriverLicense", "retention_only": "1", "max_retention_days": "0"}, "max_retention_days"),
        ({"name": "DriverLicense", "retention_only": "1", "max_retention_days": "ten"}, "max_retention_days"),
        (form | {"pattern": "(a"}, "pattern"),
        (form | {"mask": "rot13"}, "mask"),
        (form | {"name": "<b>x</b>"}, "name"),
    ):
        refused = client.post("/console/data-types", data=data | {"csrf_token": csrf})
        assert refused.status_code == 422 and f"field: {field}" in refused.text, (data, refused.text)
        assert "<b>x</b>" not in refused.text
    assert db.execute(
        "SELECT max_retention_days FROM data_types WHERE name = 'DriverLicense'"
    ).fetchone() == (30,)

    # An auditor reads the registry but has no form, and a post is refused and audited.
    client.cookies.clear()
    auditor_csrf = signed_in(client, auditor["api_key"])
    seen = client.get("/console/data-types")
    assert seen.status_code == 200 and "LoyaltyNumber" in seen.text and "Save data type" not in seen.text
    denied = client.post("/console/data-types", data=form | {"name": "Other", "csrf_token": auditor_csrf})
    assert denied.status_code == 403
    assert ("denied", "role_required", "auditor-dt") in events(db, "Console:PutDataType")
    assert db.execute("SELECT count(*) FROM data_types WHERE name = 'Other'").fetchone() == (0,)


def test_the_subject_access_report_shows_records_and_accesses_never_a_value(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    value = "D9876-54321-99999"
    token = tokenize(
        client, actors.onboarding, {"customer_id": "c-77", "data_type": "DriverLicense", "value": value}
    )
    read = client.get(
        f"/v1/tokens/{token}", headers=bearer(actors.kyc) | {"X-Access-Reason": "loan application 5"}
    )
    assert read.status_code == 200 and read.json()["value"] == value
    auditor = create_principal(client, actors.admin, "auditor-sar", role="auditor")
    signed_in(client, auditor["api_key"])

    found = client.get("/console/customers/report", params={"customer_id": " c-77 "}, follow_redirects=False)
    assert found.status_code == 303 and found.headers["location"] == "/console/customers/c-77/report"
    report = client.get("/console/customers/c-77/report")

    assert report.status_code == 200
    assert token in report.text and "DriverLicense" in report.text
    assert "kyc-app" in report.text and "loan application 5" in report.text and "Detokenize" in report.text
    assert value not in report.text and value.replace("-", "") not in report.text
    # Audited as the API audits it: a CustomerReport event about the customer, by the auditor.
    assert db.execute(
        "SELECT outcome, principal_name, customer_id FROM audit_events WHERE action = 'CustomerReport'"
    ).fetchall() == [("allowed", "auditor-sar", "c-77")]
    # The same report as the API's.
    api = client.get("/v1/customers/c-77/report", headers=bearer(auditor["api_key"])).json()
    assert [r["token"] for r in api["records"]] == [token]

    # A customer id the API would refuse is refused with its message; nothing is reported.
    bad = client.get("/console/customers/c%20%3Cb%3E/report")
    assert bad.status_code == 422 and "customer_id" in bad.text and "<b>" not in bad.text
    # The audit page carries the form.
    assert 'action="/console/customers/report"' in client.get("/console/audit").text


def test_the_report_is_for_admins_and_auditors_only(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    signed_in(client, actors.admin)
    assert client.get("/console/customers/c-1/report").status_code == 200
    client.cookies.clear()
    # A service cannot sign in, so cannot reach the page at all.
    assert sign_in(client, actors.kyc).status_code == 403
    assert client.get("/console/customers/c-1/report", follow_redirects=False).status_code == 303


def test_failed_sign_ins_block_the_source_like_api_authentication_and_are_audited_in_aggregate(
    make_client: ClientFactory, kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    vault, client = make_client(kms_key_id, auth_failure_limit=3, auth_failure_window_s=60)
    admin = create_admin(vault)
    bad_key = "pv_0123456789abcdef_" + "z" * 43
    answers = [sign_in(client, bad_key).status_code for _ in range(6)]
    # 401s until the failures pass the limit, then the source is refused before any lookup.
    assert answers == [401, 401, 401, 401, 429, 429]

    blocked = sign_in(client, admin)

    assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) >= 1
    assert "too many failed authentications" in blocked.text
    assert not any(c.startswith(f"{COOKIE}=") for c in blocked.headers.get_list("set-cookie"))
    assert db.execute("SELECT count(*) FROM console_sessions").fetchone() == (0,)
    # Blocked for the console and the API alike: the same screen.
    assert client.get("/v1/principals", headers=bearer(admin)).status_code == 429
    # Another source signs in.
    other = TestClient(client.app, client=("192.0.2.9", 40000))
    assert sign_in(other, admin).status_code == 303

    # Audited as the API does it: the first failure of each kind now, the repeats in one
    # aggregate event with their count once the window is flushed.
    vault.principals.flush_failed_authentications(everything=True)
    rows = db.execute(
        "SELECT reason, repeat_count FROM audit_events WHERE action = 'Authenticate' AND outcome = 'denied'"
        " AND source_ip = 'testclient' ORDER BY id"
    ).fetchall()
    assert sum(count or 1 for _, count in rows) == 6 + 2  # six sign-ins, the blocked one, the API call
    assert {reason for reason, _ in rows} == {"unknown_key", "rate_limited"}
    assert len(rows) < 8 and any(count for _, count in rows)
