"""Failure behaviour: KMS down or refusing, database down, request ids, and no leak of a value or a key.

Each dependency failure must give the one error shape, a 503 with Retry-After, and leave no
partial state; the sentinel test follows one distinctive value through every path and then looks
for it in every response, every log record and every table.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from botocore.awsrequest import AWSResponse
from botocore.compat import HTTPHeaders
from botocore.exceptions import EndpointConnectionError
from fastapi.testclient import TestClient
from psycopg import sql

from app.container import Vault
from app.crypto.kms import KmsKeyProvider
from app.main import create_app
from tests.conftest import (
    TABLES,
    Actors,
    ClientFactory,
    assert_error,
    bearer,
    make_settings,
)

LICENCE = {"customer_id": "12345", "data_type": "DriverLicense", "value": "D1234-56789-01234"}
CLOSED_PORT = "127.0.0.1:9"  # the discard port: nothing listens there on a test machine
WELL_FORMED_UNKNOWN_KEY = "pv_0123456789abcdef_" + "A" * 43
SENTINEL = "SENTINEL-7c1f9e-PII"


def assert_retry_after(response: Any) -> None:
    retry_after = response.headers.get("Retry-After")
    assert retry_after is not None, dict(response.headers)
    assert retry_after.isdigit() and int(retry_after) >= 1


def assert_not_retryable(response: Any) -> None:
    """A permanent misconfiguration: no invitation to retry."""
    assert "Retry-After" not in response.headers, dict(response.headers)


def record_count(db: psycopg.Connection[Any]) -> int:
    row = db.execute("SELECT count(*) FROM records").fetchone()
    assert row is not None
    return int(row[0])


def unreachable_kms(make_client: ClientFactory) -> tuple[Vault, TestClient]:
    return make_client(
        "alias/piivault-unreachable",
        kms_endpoint_url=f"http://{CLOSED_PORT}",
        kms_connect_timeout_s=0.5,
        kms_read_timeout_s=0.5,
        kms_max_attempts=1,
        kms_mirror_grants=False,
    )


def kms_events(vault: Vault) -> Any:
    """The event hooks of the vault's own KMS client (moto answers it unless a hook answers first)."""
    assert isinstance(vault.keys, KmsKeyProvider)
    return vault.keys.client.meta.events


class _RawBody:
    """Just enough of a urllib3 response for botocore to read an injected body."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.payload


def kms_error_response(code: str, message: str) -> AWSResponse:
    """What KMS answers with a 400 JSON error `code` (the body shape of the AWS JSON 1.1 protocol)."""
    headers = HTTPHeaders()
    headers["content-type"] = "application/x-amz-json-1.1"
    headers["x-amzn-requestid"] = "injected-request-id"
    payload = json.dumps({"__type": code, "message": message}).encode()
    return AWSResponse("https://kms.us-east-1.amazonaws.com/", 400, headers, _RawBody(payload))


def kms_error_injector(
    vault: Vault, operation: str, code: str, message: str = "injected"
) -> list[dict[str, Any]]:
    """Make every KMS `operation` call answer `code`; returns the list of requests it answered."""
    calls: list[dict[str, Any]] = []

    def handler(**kwargs: Any) -> AWSResponse:
        calls.append(kwargs)
        return kms_error_response(code, message)

    kms_events(vault).register(f"before-send.kms.{operation}", handler)
    return calls


def kms_connection_refused(vault: Vault, operation: str) -> list[dict[str, Any]]:
    """Make every KMS `operation` call fail as a refused connection does (botocore's own error)."""
    calls: list[dict[str, Any]] = []

    def handler(**kwargs: Any) -> None:
        calls.append(kwargs)
        raise EndpointConnectionError(endpoint_url=f"http://{CLOSED_PORT}/")

    kms_events(vault).register(f"before-send.kms.{operation}", handler)
    return calls


# KMS unreachable


def test_kms_unreachable_tokenize_is_503_and_writes_nothing(
    client: TestClient, vault: Vault, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    """KMS goes away while the vault runs: bounded retries, then 503, and nothing written."""
    calls = kms_connection_refused(vault, "GenerateDataKey")

    response = client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding))

    assert_error(response, 503, "key_service_unavailable")
    assert_retry_after(response)
    assert LICENCE["value"] not in response.text
    assert 1 <= len(calls) <= vault.settings.kms_max_attempts
    assert record_count(db) == 0


def test_kms_unreachable_from_the_start_is_503_and_writes_nothing(
    client: TestClient, actors: Actors, make_client: ClientFactory, db: psycopg.Connection[Any]
) -> None:
    """A second replica whose KMS endpoint is a closed port, on the same database: a real refused
    connection. It cannot even unwrap the audit key, so the code may be either dependency's."""
    created = client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding))
    assert created.status_code == 201, created.text
    _, down = unreachable_kms(make_client)

    for response in (
        down.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding)),
        down.post("/v1/tokens/batch", json={"items": [LICENCE]}, headers=bearer(actors.onboarding)),
        down.get(f"/v1/tokens/{created.json()['token']}", headers=bearer(actors.kyc)),
    ):
        assert response.status_code in (200, 503), response.text
        assert LICENCE["value"] not in response.text
        if response.status_code == 200:  # a batch answers per item
            (result,) = response.json()["results"]
            assert result["error"]["code"] in ("key_service_unavailable", "audit_unavailable")
            continue
        error = assert_error(response, 503, response.json()["error"]["code"])
        assert error["code"] in ("key_service_unavailable", "audit_unavailable")
        assert_retry_after(response)
    assert record_count(db) == 1


def test_kms_unreachable_batch_writes_nothing_and_reports_each_item(
    client: TestClient, vault: Vault, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    kms_connection_refused(vault, "GenerateDataKey")
    items = [{**LICENCE, "customer_id": f"c-{n}"} for n in range(3)]

    response = client.post("/v1/tokens/batch", json={"items": items}, headers=bearer(actors.onboarding))

    assert response.status_code in (200, 503), response.text
    if response.status_code == 503:
        assert_error(response, 503, "key_service_unavailable")
        assert_retry_after(response)
    else:
        results = response.json()["results"]
        assert len(results) == 3
        assert all(r["error"]["code"] == "key_service_unavailable" and not r.get("token") for r in results)
    assert record_count(db) == 0


def test_readyz_is_503_when_kms_is_unreachable(make_client: ClientFactory) -> None:
    _, client = unreachable_kms(make_client)
    response = client.get("/readyz")
    assert_error(response, 503, "key_service_unavailable")
    assert_retry_after(response)


# KMS throttling and refusals (moto, with errors injected on the vault's own client)


def test_kms_throttling_is_retried_then_503_and_writes_nothing(
    client: TestClient, vault: Vault, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    calls = kms_error_injector(vault, "GenerateDataKey", "ThrottlingException", "Rate exceeded")

    response = client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding))

    assert_error(response, 503, "key_service_unavailable")
    assert_retry_after(response)
    assert vault.settings.kms_max_attempts >= 2
    assert len(calls) == vault.settings.kms_max_attempts  # retried, within the configured bound
    assert record_count(db) == 0


def test_kms_throttling_recovers_when_kms_answers_again(
    client: TestClient, vault: Vault, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    """One throttled attempt then a real answer: the retry succeeds and exactly one record is written."""
    throttled: list[int] = []

    def throttle_once(**_: Any) -> AWSResponse | None:
        if throttled:
            return None
        throttled.append(1)
        return kms_error_response("ThrottlingException", "Rate exceeded")

    kms_events(vault).register("before-send.kms.GenerateDataKey", throttle_once)

    response = client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding))

    assert response.status_code == 201, response.text
    assert throttled == [1]
    assert record_count(db) == 1


def test_disabled_key_on_tokenize_is_503_key_access_denied(
    client: TestClient, vault: Vault, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    calls = kms_error_injector(vault, "GenerateDataKey", "DisabledException", "key is disabled")

    response = client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding))

    assert_error(response, 503, "key_access_denied")
    assert_not_retryable(response)
    assert calls
    assert record_count(db) == 0


def test_disabled_key_on_detokenize_is_503_and_never_the_value(
    client: TestClient, vault: Vault, actors: Actors
) -> None:
    created = client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding))
    assert created.status_code == 201, created.text
    token = created.json()["token"]
    calls = kms_error_injector(vault, "Decrypt", "DisabledException", "key is disabled")

    response = client.get(f"/v1/tokens/{token}", headers=bearer(actors.kyc))

    assert_error(response, 503, "key_access_denied")
    assert_not_retryable(response)
    assert LICENCE["value"] not in response.text
    assert calls

    batch = client.post("/v1/tokens/detokenize", json={"tokens": [token]}, headers=bearer(actors.kyc))
    assert LICENCE["value"] not in batch.text
    assert batch.status_code in (200, 503), batch.text
    if batch.status_code == 200:
        (result,) = batch.json()["results"]
        assert result["error"]["code"] == "key_access_denied"
        assert not result.get("value")


def test_kms_throttling_on_detokenize_is_503(client: TestClient, vault: Vault, actors: Actors) -> None:
    created = client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding))
    assert created.status_code == 201, created.text
    kms_error_injector(vault, "Decrypt", "ThrottlingException", "Rate exceeded")

    response = client.get(f"/v1/tokens/{created.json()['token']}", headers=bearer(actors.kyc))

    assert_error(response, 503, "key_service_unavailable")
    assert_retry_after(response)
    assert LICENCE["value"] not in response.text


# Database unreachable


def test_database_unreachable_is_503_never_a_500(make_client: ClientFactory, kms_key_id: str) -> None:
    _, client = make_client(kms_key_id, url=f"postgresql://postgres@{CLOSED_PORT}/x", kms_mirror_grants=False)

    for response in (
        client.post("/v1/tokens", json=LICENCE, headers=bearer(WELL_FORMED_UNKNOWN_KEY)),
        client.get("/v1/principals", headers=bearer(WELL_FORMED_UNKNOWN_KEY)),
        client.get("/readyz"),
    ):
        assert_error(response, 503, "database_unavailable")
        assert_retry_after(response)
        assert LICENCE["value"] not in response.text

    assert client.get("/healthz").status_code == 200


def test_database_unreachable_with_a_malformed_key_is_still_503(
    make_client: ClientFactory, kms_key_id: str
) -> None:
    """A refusal that cannot be audited is not answered 401: the vault is down, say so."""
    _, client = make_client(kms_key_id, url=f"postgresql://postgres@{CLOSED_PORT}/x", kms_mirror_grants=False)
    response = client.post("/v1/tokens", json=LICENCE, headers=bearer("not-a-key"))
    assert response.status_code == 503, response.text
    assert_retry_after(response)
    assert response.json()["error"]["code"] in ("database_unavailable", "audit_unavailable")


# Health and readiness


def test_healthz_is_always_200(client: TestClient, make_client: ClientFactory) -> None:
    assert client.get("/healthz").status_code == 200
    _, down = unreachable_kms(make_client)
    assert down.get("/healthz").status_code == 200
    _, no_db = make_client("alias/x", url=f"postgresql://postgres@{CLOSED_PORT}/x", kms_mirror_grants=False)
    assert no_db.get("/healthz").status_code == 200


def test_readyz_is_200_when_database_and_kms_answer(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.headers["X-Request-ID"]


# Request ids


def test_every_response_carries_a_request_id(
    client: TestClient, actors: Actors, make_client: ClientFactory
) -> None:
    # 503: a replica whose database is down.
    _, down = make_client("alias/x", url=f"postgresql://postgres@{CLOSED_PORT}/x", kms_mirror_grants=False)

    responses = {
        "200": client.get("/healthz"),
        "201": client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding)),
        "401": client.post("/v1/tokens", json=LICENCE),
        "403": client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.kyc)),
        "404": client.get("/no/such/route"),
        "405": client.delete("/healthz"),
        "413": client.post(
            "/v1/tokens", content=b"x" * 9 * 1024 * 1024, headers={"content-type": "application/json"}
        ),
        "422": client.post("/v1/tokens", content=b"{", headers={"content-type": "application/json"}),
        "503": down.post("/v1/tokens", json=LICENCE, headers=bearer(WELL_FORMED_UNKNOWN_KEY)),
    }
    ids = set()
    for status, response in responses.items():
        assert str(response.status_code) == status, (status, response.text)
        request_id = response.headers.get("X-Request-ID")
        assert request_id, status
        ids.add(request_id)
        if response.status_code >= 400:
            assert response.json()["error"]["request_id"] == request_id
    assert len(ids) == len(responses)  # each request its own id


def test_a_safe_caller_request_id_is_echoed(client: TestClient, actors: Actors) -> None:
    mine = "req-2024.05.01:abc_DEF-123"
    ok = client.get("/healthz", headers={"X-Request-ID": mine})
    assert ok.headers["X-Request-ID"] == mine
    refused = client.post("/v1/tokens", json=LICENCE, headers={**bearer(actors.kyc), "X-Request-ID": mine})
    assert refused.status_code == 403
    assert refused.headers["X-Request-ID"] == mine
    assert refused.json()["error"]["request_id"] == mine


@pytest.mark.parametrize(
    "unsafe",
    ["a" * 300, "a" * 129, "<script>alert(1)</script>", "abc def", "id;drop", "a\tb", ""],
)
def test_an_unsafe_caller_request_id_is_replaced(client: TestClient, unsafe: str) -> None:
    response = client.get("/no/such/route", headers={"X-Request-ID": unsafe})
    assert response.status_code == 404
    request_id = response.headers["X-Request-ID"]
    assert request_id and request_id != unsafe.strip()
    assert len(request_id) <= 128
    assert "<" not in request_id and " " not in request_id
    assert response.json()["error"]["request_id"] == request_id


# Nothing of a value, a data key or an API key leaks


def dump_tables(db: psycopg.Connection[Any]) -> list[tuple[str, str, Any]]:
    """Every column of every row of every table (the known ones and any added since), as
    (table, column, value)."""
    names = {row[0] for row in db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert set(TABLES) <= names
    cells: list[tuple[str, str, Any]] = []
    for table in sorted(names):
        cursor = db.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table)))
        columns = [c.name for c in cursor.description or ()]
        for row in cursor.fetchall():
            cells += [(table, column, value) for column, value in zip(columns, row, strict=True)]
    return cells


def cells_containing(cells: list[tuple[str, str, Any]], needle: str) -> list[tuple[str, str]]:
    raw = needle.encode()
    hits: list[tuple[str, str]] = []
    for table, column, value in cells:
        if isinstance(value, bytes | bytearray | memoryview):
            found = raw in bytes(value)
        else:
            found = needle in str(value) or needle in json.dumps(value, default=str)
        if found:
            hits.append((table, column))
    return hits


def test_sentinel_value_leaks_nowhere(
    client: TestClient,
    vault: Vault,
    actors: Actors,
    db: psycopg.Connection[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    onboarding, kyc = bearer(actors.onboarding), bearer(actors.kyc)
    good = {"customer_id": "12345", "data_type": "DriverLicense", "value": SENTINEL}
    oversized = SENTINEL * (vault.settings.max_value_bytes // len(SENTINEL) + 1)
    json_headers = {**onboarding, "content-type": "application/json"}
    others: list[Any] = []  # every response that must not carry the value

    created = client.post("/v1/tokens", json=good, headers=onboarding)
    assert created.status_code == 201, created.text
    others.append(created)
    token = created.json()["token"]

    # Refused: no grant for SSN; KYC has no Encrypt at all; an admin has no data access.
    others.append(client.post("/v1/tokens", json={**good, "data_type": "SSN"}, headers=onboarding))
    others.append(client.post("/v1/tokens", json=good, headers=kyc))
    others.append(client.post("/v1/tokens", json=good, headers=bearer(actors.admin)))
    # Invalid in every way a value can travel with.
    others.append(client.post("/v1/tokens", json={**good, "customer_id": "bad id!"}, headers=onboarding))
    others.append(client.post("/v1/tokens", json={**good, "data_type": "9-bad"}, headers=onboarding))
    others.append(client.post("/v1/tokens", json={**good, "extra": SENTINEL}, headers=onboarding))
    others.append(client.post("/v1/tokens", json={"value": SENTINEL}, headers=onboarding))
    others.append(client.post("/v1/tokens", json={**good, "value": oversized}, headers=onboarding))
    others.append(client.post("/v1/tokens", json={**good, "value": [SENTINEL]}, headers=onboarding))
    others.append(
        client.post(
            "/v1/tokens", content=f'{{"customer_id": "1", "value": "{SENTINEL}'.encode(), headers=json_headers
        )
    )
    others.append(
        client.post("/v1/tokens", content=f'{{"value": "{SENTINEL}", }}'.encode(), headers=json_headers)
    )
    others.append(client.post("/v1/tokens", content=SENTINEL.encode(), headers=json_headers))
    others.append(client.post("/v1/tokens", data={"value": SENTINEL}, headers=onboarding))
    # A batch with good and bad items side by side.
    batch_items = [
        good,
        {**good, "data_type": "SSN"},
        {**good, "customer_id": "a/b"},
        {**good, "value": oversized},
        {**good, "extra": SENTINEL},
        {"value": SENTINEL},
        {**good, "value": 42, "note": SENTINEL},
    ]
    batch = client.post("/v1/tokens/batch", json={"items": batch_items}, headers=onboarding)
    assert batch.status_code == 200, batch.text
    others.append(batch)
    # Refused reads: onboarding has no Decrypt; the admin has no data access.
    others.append(client.get(f"/v1/tokens/{token}", headers=onboarding))
    others.append(client.get(f"/v1/tokens/{token}", headers=bearer(actors.admin)))
    others.append(client.post("/v1/tokens/detokenize", json={"tokens": [token]}, headers=onboarding))
    others.append(client.get(f"/v1/tokens/{token}"))

    # The one authorised read, by token and by batch.
    revealed = client.get(f"/v1/tokens/{token}", headers={**kyc, "X-Access-Reason": "loan 991"})
    assert revealed.status_code == 200, revealed.text
    assert revealed.json()["value"] == SENTINEL
    revealed_batch = client.post("/v1/tokens/detokenize", json={"tokens": [token]}, headers=kyc)
    assert revealed_batch.status_code == 200, revealed_batch.text
    assert revealed_batch.json()["results"][0]["value"] == SENTINEL

    # created; 3 refusals; 4 invalid; oversized; 5 malformed or invalid; batch; 2 refusals; batch; 401
    expected = [201, *[403] * 3, *[422] * 4, 413, *[422] * 5, 200, 403, 403, 200, 401]
    assert [r.status_code for r in others] == expected, [(r.status_code, r.text) for r in others]
    for response in others:
        assert SENTINEL not in response.text, (response.request.method, response.request.url, response.text)
        assert SENTINEL not in json.dumps(dict(response.headers))

    assert SENTINEL not in caplog.text
    for record in caplog.records:
        assert SENTINEL not in record.getMessage()
        assert SENTINEL not in repr(record.args)
        assert SENTINEL not in repr(getattr(record, "__dict__", {}))

    assert cells_containing(dump_tables(db), SENTINEL) == []
    # Nor under the simplest disguises.
    assert cells_containing(dump_tables(db), base64.b64encode(SENTINEL.encode()).decode()) == []
    assert cells_containing(dump_tables(db), SENTINEL.encode().hex()) == []


def test_api_keys_appear_only_in_their_creation_response(
    client: TestClient,
    vault: Vault,
    actors: Actors,
    db: psycopg.Connection[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    admin = bearer(actors.admin)
    created = client.post("/v1/principals", json={"name": "reporting-app", "role": "service"}, headers=admin)
    assert created.status_code == 201, created.text
    new_key: str = created.json()["api_key"]
    principal_id = created.json()["id"]

    others = [
        client.get("/v1/principals", headers=admin),
        client.get(f"/v1/principals/{principal_id}", headers=admin),
        client.post("/v1/tokens", json=LICENCE, headers=bearer(new_key)),  # 403: no grant
        client.get("/v1/grants", headers=bearer(new_key)),  # 403: not an admin
        client.post("/v1/tokens", json=LICENCE, headers=bearer(new_key + "x")),  # 401
        client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.admin[:-1] + "A")),  # 401
    ]
    rotated = client.post(f"/v1/principals/{principal_id}/keys", headers=admin)
    assert rotated.status_code == 201, rotated.text
    rotated_key: str = rotated.json()["api_key"]
    others.append(client.post("/v1/tokens", json=LICENCE, headers=bearer(rotated_key)))
    others.append(client.get(f"/v1/principals/{principal_id}", headers=admin))

    keys = {"admin": actors.admin, "new": new_key, "rotated": rotated_key, "onboarding": actors.onboarding}
    for name, key in keys.items():
        secret = key.split("_", 2)[2]  # pv_<key id>_<secret>; the secret may hold "_" itself
        assert key not in caplog.text, name
        assert secret not in caplog.text, name
        for response in others:
            assert key not in response.text, (name, response.request.url)
            assert secret not in response.text, (name, response.request.url)
        assert cells_containing(dump_tables(db), key) == [], name
        assert cells_containing(dump_tables(db), secret) == [], name


def test_data_keys_never_reach_the_logs(
    client: TestClient, vault: Vault, actors: Actors, caplog: pytest.LogCaptureFixture
) -> None:
    """Even with every logger at DEBUG (botocore logs response bodies there), no plaintext data key."""
    plaintexts: list[bytes] = []

    def capture(parsed: dict[str, Any] | None = None, **_: Any) -> None:
        if parsed and "Plaintext" in parsed:
            plaintexts.append(parsed["Plaintext"])

    events = kms_events(vault)
    events.register("after-call.kms.GenerateDataKey", capture)
    events.register("after-call.kms.Decrypt", capture)
    caplog.set_level(logging.DEBUG)

    created = client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding))
    assert created.status_code == 201, created.text
    revealed = client.get(f"/v1/tokens/{created.json()['token']}", headers=bearer(actors.kyc))
    assert revealed.status_code == 200, revealed.text

    assert len(plaintexts) == 2
    for key in plaintexts:
        for form in (base64.b64encode(key).decode(), key.hex(), repr(key)):
            assert form not in caplog.text


def test_uvicorn_logs_an_unexpected_exception_by_type_only(caplog: pytest.LogCaptureFixture) -> None:
    """uvicorn logs what Starlette re-raises after the 500 handler; the text could quote data."""
    create_app(settings=make_settings("postgresql://unused/unused", None))
    try:
        raise ValueError("DETAIL: Failing row contains (12345, SENTINEL-LICENCE)")
    except ValueError:
        with caplog.at_level("ERROR", logger="uvicorn.error"):
            logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    (record,) = [r for r in caplog.records if r.name == "uvicorn.error"]
    assert record.getMessage() == "Exception in ASGI application (ValueError)"
    assert "SENTINEL" not in caplog.text and "12345" not in caplog.text
    assert record.exc_info is None
