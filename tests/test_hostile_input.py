"""A server that holds under hostile input: security headers on every response, values the database
cannot hold refused as 422s naming the field, no redirect built from the Host header, 405 with
Allow, a /readyz that cannot be used to multiply KMS calls, and control characters escaped in logs."""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from app.api.middleware import API_CSP
from app.container import Vault
from app.errors import InvalidInput
from app.logs import EscapedLogRecord
from tests.conftest import (
    Actors,
    ClientFactory,
    LoopThread,
    assert_error,
    bearer,
    tokenize,
)
from tests.test_failures import kms_error_injector

LICENCE = {"customer_id": "12345", "data_type": "DriverLicense", "value": "D1234-56789-01234"}
NO_STORE = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def assert_security_headers(response: Any, csp: str | None = API_CSP) -> None:
    for name, value in NO_STORE.items():
        assert response.headers.get_list(name) == [value], (name, response.status_code, response.headers)
    if csp is not None:
        assert response.headers.get_list("Content-Security-Policy") == [csp], response.headers


# Security headers


def test_every_response_is_no_store_with_the_security_headers(
    client: TestClient, vault: Vault, actors: Actors, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tokenize(client, actors.onboarding, LICENCE)
    admin = bearer(actors.admin)
    responses = {
        "health": client.get("/healthz"),
        "openapi": client.get("/openapi.json"),
        "tokenize": client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding)),
        "a value": client.get(f"/v1/tokens/{token}", headers=bearer(actors.kyc)),
        "values": client.post("/v1/tokens/detokenize", json={"tokens": [token]}, headers=bearer(actors.kyc)),
        "an API key": client.post(
            "/v1/principals", json={"name": "new-app", "role": "service"}, headers=admin
        ),
        "audit": client.get("/v1/audit/events", headers=admin),
        "401": client.get(f"/v1/tokens/{token}"),
        "403": client.get(f"/v1/tokens/{token}", headers=bearer(actors.onboarding)),
        "404": client.get("/no/such/route"),
        "405": client.delete("/healthz"),
        "413": client.post(
            "/v1/tokens", content=b"x" * (9 << 20), headers={"content-type": "application/json"}
        ),
        "422": client.post("/v1/tokens", content=b"{", headers={"content-type": "application/json"}),
    }
    # An unexpected error is answered outside the middleware: its 500 must carry them too.
    monkeypatch.setattr(vault.principals, "list", lambda session: 1 / 0)
    responses["500"] = client.get("/v1/principals", headers=admin)

    assert responses["a value"].json()["value"] == LICENCE["value"]
    assert responses["an API key"].json()["api_key"]
    assert responses["500"].status_code == 500
    for name, response in responses.items():
        assert response.status_code < 500 or name == "500", (name, response.text)
        assert_security_headers(response)


def test_the_docs_page_has_a_policy_that_allows_exactly_what_it_loads(client: TestClient) -> None:
    response = client.get("/docs")

    assert response.status_code == 200
    assert_security_headers(response, csp=None)
    (policy,) = response.headers.get_list("Content-Security-Policy")  # its own, not the API's too
    directives = {
        name: set(sources) for name, *sources in (part.split() for part in policy.split(";") if part.strip())
    }
    assert directives["default-src"] == {"'none'"}
    assert directives["frame-ancestors"] == {"'none'"}
    assert "'unsafe-inline'" not in directives["script-src"]
    assert not any("unsafe-eval" in source for sources in directives.values() for source in sources)
    page = response.text
    # Every script, stylesheet and icon the page names comes from an origin its directive allows.
    for directive, pattern in (
        ("script-src", r'<script src="([^"]+)"'),
        ("style-src", r'<link type="text/css" rel="stylesheet" href="([^"]+)"'),
        ("img-src", r'<link rel="shortcut icon" href="([^"]+)"'),
    ):
        urls = re.findall(pattern, page)
        assert urls, directive
        for url in urls:
            parts = urlsplit(url)
            # Served by the vault itself: a path on this origin, which 'self' allows.
            assert not parts.scheme and not parts.netloc and url.startswith("/"), (directive, url)
            assert "'self'" in directives[directive], (directive, url)
    # Its inline script (the one that starts Swagger UI) is allowed by its hash, and nothing else is.
    inline = re.findall(r"<script>(.*?)</script>", page, re.DOTALL)
    assert len(inline) == 1 and "SwaggerUIBundle" in inline[0]
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    assert {s for s in directives["script-src"] if s.startswith("'sha256-")} == {f"'sha256-{digest}'"}
    # It fetches the OpenAPI document from its own origin.
    assert "url: '/openapi.json'" in page
    assert directives["connect-src"] == {"'self'"}


def test_redoc_and_the_oauth_redirect_page_are_not_served(client: TestClient) -> None:
    for path in ("/redoc", "/docs/oauth2-redirect"):
        assert_error(client.get(path), 404, "not_found")


# Values the database cannot hold: 422 naming the field, never 500


def test_values_the_database_cannot_hold_are_422_naming_the_field(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    admin = bearer(actors.admin)
    grants_before = db.execute("SELECT count(*) FROM grants").fetchone()
    nul = "kyc\x00app"
    body = {"grantee": "kyc-app", "operations": ["Decrypt"]}
    cases: list[tuple[str, Any, str]] = [
        ("grantee", client.post("/v1/grants", json={**body, "grantee": nul}, headers=admin), "grantee"),
        ("name", client.post("/v1/grants", json={**body, "name": nul}, headers=admin), "name"),
        (
            "constraint value",
            client.post(
                "/v1/grants",
                json={
                    **body,
                    "constraints": {"encryption_context_subset": {"dataType": "Driver\x00License"}},
                },
                headers=admin,
            ),
            "constraints.encryption_context_subset.dataType",
        ),
        (
            "expires_at past 9999 in UTC",
            client.post(
                "/v1/grants", json={**body, "expires_at": "9999-12-31T23:00:00-05:00"}, headers=admin
            ),
            "expires_at",
        ),
        ("grant filter", client.get("/v1/grants", params={"grantee": nul}, headers=admin), "query.grantee"),
        (
            "key id",
            client.delete(f"/v1/principals/{actors.kyc_id}/keys/ab%00cd", headers=admin),
            "path.key_id",
        ),
        ("32-digit cursor", client.get("/v1/audit/events?cursor=" + "9" * 32, headers=admin), "cursor"),
        ("a digit that is not ASCII", client.get("/v1/audit/events?cursor=%C2%B2", headers=admin), "cursor"),
        (
            "32-digit anchor",
            client.get(
                "/v1/audit/verify", params={"anchor_seq": "9" * 32, "anchor_mac": "0" * 64}, headers=admin
            ),
            "query.anchor_seq",
        ),
        (
            "since before year 1 in UTC",
            client.get("/v1/audit/events", params={"since": "0001-01-01T00:00:00+01:00"}, headers=admin),
            "query.since",
        ),
        (
            "until past 9999 in UTC",
            client.get("/v1/audit/verify", params={"until": "9999-12-31T23:59:59-01:00"}, headers=admin),
            "query.until",
        ),
        (
            "access reason",
            client.get(
                "/v1/tokens/tok_" + "A" * 32, headers={**bearer(actors.kyc), "X-Access-Reason": "loan\x00 1"}
            ),
            "header.X-Access-Reason",
        ),
    ]
    for name in ("principal", "action", "customer_id", "token"):
        cases.append(
            (
                f"audit filter {name}",
                client.get(f"/v1/audit/events?{name}=a%00b", headers=admin),
                f"query.{name}",
            )
        )

    failures = []
    for label, response, field in cases:
        try:
            error = assert_error(response, 422, "invalid_input", field)
            assert "\x00" not in response.text and "\\u0000" not in response.text, "the value is echoed"
            assert error["message"]
        except AssertionError as err:
            failures.append(f"{label}: {err}")
    assert not failures, "\n".join(failures)
    assert db.execute("SELECT count(*) FROM grants").fetchone() == grants_before


def test_edges_of_the_ranges_are_still_accepted(client: TestClient, actors: Actors) -> None:
    admin = bearer(actors.admin)
    late = {"grantee": "kyc-app", "operations": ["Decrypt"], "expires_at": "9999-12-31T22:00:00-01:00"}
    created = client.post("/v1/grants", json=late, headers=admin)
    assert created.status_code == 201, created.text
    assert created.json()["expires_at"].startswith("9999-12-31T23:00:00")
    cursor = str(2**63 - 1)
    page = client.get(
        "/v1/audit/events", params={"cursor": cursor, "since": "0001-01-01T00:00:00Z"}, headers=admin
    )
    assert page.status_code == 200, page.text
    # A time without an offset is taken as UTC.
    naive = client.get("/v1/audit/events", params={"until": "9999-12-31T23:59:59"}, headers=admin)
    assert naive.status_code == 200, naive.text
    assert naive.json()["events"]


def test_a_data_error_that_passes_the_api_checks_is_422_not_500(
    vault: Vault, db: psycopg.Connection[Any], loop_thread: LoopThread
) -> None:
    """The safety net behind the API's checks, on both kinds of connection: no value is echoed."""
    with pytest.raises(InvalidInput) as refused, vault.database.transaction() as session:
        session.execute(text("SELECT CAST(:v AS text)"), {"v": "SENTINEL\x00"})
    assert "SENTINEL" not in str(refused.value)

    async def out_of_range() -> None:
        async with vault.database.data_connection() as connection:
            await connection.execute("SELECT %s::int", (10**31,))

    with pytest.raises(InvalidInput):
        loop_thread.run(out_of_range())
    loop_thread.run(vault.database.close_data_path())


# No redirect from the Host header; 405 with Allow


def test_a_trailing_slash_is_404_never_a_redirect_to_the_callers_host(
    client: TestClient, actors: Actors
) -> None:
    evil = {"Host": "evil.example", **bearer(actors.admin)}
    for method, path in (
        ("GET", "/v1/grants/"),
        ("POST", "/v1/tokens/"),
        ("GET", "/docs/"),
        ("GET", "/healthz/"),
    ):
        response = client.request(method, path, headers=evil, follow_redirects=False)
        assert "location" not in response.headers, (path, response.headers)
        assert_error(response, 404, "not_found")


def test_undefined_methods_are_405_with_every_allowed_method(client: TestClient, actors: Actors) -> None:
    admin = bearer(actors.admin)
    for method, path, allowed in (
        ("TRACE", "/v1/tokens", {"POST"}),
        ("TRACE", "/healthz", {"GET"}),
        ("DELETE", "/v1/grants", {"GET", "POST"}),
        ("PUT", f"/v1/grants/{uuid.uuid4()}", {"GET", "DELETE"}),
        ("PATCH", f"/v1/principals/{actors.kyc_id}", {"GET", "DELETE"}),
        ("OPTIONS", "/v1/audit/events", {"GET"}),
        ("PROPFIND", "/readyz", {"GET"}),
    ):
        response = client.request(method, path, headers=admin)
        assert_error(response, 405, "method_not_allowed")
        assert set(response.headers["Allow"].split(", ")) == allowed, (method, path, response.headers)
        assert_security_headers(response)


# /readyz


def _count_describe_key(vault: Vault) -> list[int]:
    calls: list[int] = []
    vault.keys.client.meta.events.register(  # type: ignore[attr-defined]
        "provide-client-params.kms.DescribeKey", lambda **_: calls.append(1)
    )
    return calls


def test_readyz_checks_kms_at_most_once_per_cache_period(make_client: ClientFactory, kms_key_id: str) -> None:
    vault, client = make_client(kms_key_id, ready_cache_s=0.5)
    calls = _count_describe_key(vault)

    answers = [client.get("/readyz") for _ in range(20)]

    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    assert len(calls) == 1
    time.sleep(0.6)
    assert client.get("/readyz").status_code == 200
    assert len(calls) == 2


def test_readyz_remembers_a_failure_for_the_cache_period_too(
    make_client: ClientFactory, kms_key_id: str
) -> None:
    vault, client = make_client(kms_key_id, ready_cache_s=30)
    calls = _count_describe_key(vault)

    injected = kms_error_injector(vault, "DescribeKey", "DisabledException", "key is disabled")
    first, second = client.get("/readyz"), client.get("/readyz")

    assert_error(first, 503, "key_access_denied")
    assert_error(second, 503, "key_access_denied")
    assert len(calls) == 1 and len(injected) == 1
    assert first.json()["error"]["request_id"] != second.json()["error"]["request_id"]


def test_readyz_checks_every_time_when_the_cache_is_off(make_client: ClientFactory, kms_key_id: str) -> None:
    vault, client = make_client(kms_key_id, ready_cache_s=0)
    calls = _count_describe_key(vault)
    for _ in range(3):
        assert client.get("/readyz").status_code == 200
    assert len(calls) == 3


# Logs


def test_control_characters_are_escaped_in_log_lines(
    client: TestClient,
    vault: Vault,
    actors: Actors,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A path (or any value) with a newline or a terminal escape cannot forge a log line."""

    async def broken(**_: Any) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(vault.tokens, "detokenize_one", broken)
    forged = "tok_x%0A2026-01-01 00:00:00 INFO admin granted%1B[2J%00"
    with caplog.at_level(logging.ERROR, logger="app.api.errors"):
        response = client.get(f"/v1/tokens/{forged}", headers=bearer(actors.kyc))
    assert response.status_code == 500

    (record,) = [r for r in caplog.records if r.name == "app.api.errors"]
    line = logging.Formatter("%(levelname)s %(message)s").format(record)
    assert "\n" not in line and "\x1b" not in line and "\x00" not in line
    assert "admin granted\\x1b[2J\\x00" in line


def test_log_records_escape_their_arguments_for_formatters_that_read_them(client: TestClient) -> None:
    record = EscapedLogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, "%s %s", ("GET", "/a\r\nb\x7f"), None
    )
    assert record.args == ("GET", "/a\\x0d\\x0ab\\x7f")
    assert record.getMessage() == "GET /a\\x0d\\x0ab\\x7f"
    assert logging.getLogRecordFactory() is EscapedLogRecord  # what create_app installed
