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
from tests.conftest import GRANTEE_ARN, Actors, ClientFactory, bearer, create_admin, create_principal

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
