"""Requests generated from /openapi.json (schemathesis), valid and invalid, with an admin key and
with a service key that holds grants; and every field of every operation given each of a list of
hostile values (NUL bytes, control characters, huge numbers, times at the ends of the calendar,
wrong types): none may get a 5xx.

On a database of its own and a KMS key of its own, so that whatever the generated calls create,
revoke or disable cannot disturb the other tests. Bounded (a few examples per operation and key)
and derandomized, so the run is short and the same each time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, reject, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.core import NotSet
from schemathesis.core.result import Ok
from sqlalchemy.engine import make_url

from app.container import build_vault
from app.main import create_app
from tests.conftest import (
    bearer,
    create_admin,
    create_grant,
    create_kms_key,
    create_principal,
    make_settings,
    migrated_database,
    tokenize,
)

EXAMPLES = 5  # per operation, mode and key: the hostile sweep below is the thorough part


@dataclass
class Target:
    app: FastAPI
    client: TestClient
    keys: dict[str, str]
    # A real value for each path parameter, so that a request reaches its handler.
    path_values: dict[str, str]


@pytest.fixture(scope="module")
def target(database_url: str, aws_session: None) -> Iterator[Target]:
    server = make_url(database_url).set(database="postgres").render_as_string(hide_password=False)
    with migrated_database(server, "piivault_fuzz") as url:
        vault = build_vault(make_settings(url, create_kms_key("piivault fuzz key")))
        app = create_app(vault)
        try:
            with TestClient(app, raise_server_exceptions=False) as client:
                admin = create_admin(vault, "fuzz-admin")
                service = create_principal(client, admin, "kyc-app")
                grant = create_grant(client, admin, grantee="kyc-app", operations=["Encrypt", "Decrypt"])
                token = tokenize(
                    client,
                    service["api_key"],
                    {"customer_id": "1", "data_type": "SSN", "value": "078-05-1120"},
                )
                keys = {"admin": admin, "service": service["api_key"]}
                path_values = {
                    "principal_id": service["id"],
                    "key_id": service["key_id"],
                    "grant_id": grant["id"],
                    "token": token,
                    "name": "FuzzType",
                }
                yield Target(app, client, keys, path_values)
        finally:
            vault.close()


def _request(client: TestClient, case: Any, key: str) -> httpx.Request:
    headers = {str(k): str(v) for k, v in (case.headers or {}).items()}
    body: dict[str, Any] = {}
    if isinstance(case.body, bytes):
        body["content"] = case.body
    elif not isinstance(case.body, NotSet):
        body["json"] = case.body
    try:
        request: httpx.Request = client.build_request(
            case.method,
            case.formatted_path,
            params=case.query or None,
            headers={**headers, **bearer(key)},
            **body,
        )
    except (ValueError, TypeError, UnicodeError, httpx.InvalidURL):
        reject()  # not a request HTTP can carry (a newline in a header, say)
    return request


def _fuzz(target: Target, operation: Any, mode: schemathesis.GenerationMode, key: str) -> list[str]:
    """The 5xx answers to this operation's generated requests in this mode (the shrunk one last)."""
    failures: list[str] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(mode))
    def run(case: Any) -> None:
        response = target.client.send(_request(target.client, case, key))
        if response.status_code >= 500:
            failures.append(
                f"{mode.value} {case.method} {case.formatted_path} query={case.query} "
                f"headers={case.headers} body={case.body!r:.300} -> {response.status_code}"
            )
        assert response.status_code < 500

    try:
        run()
    except AssertionError:
        pass  # recorded above
    except Unsatisfiable:
        pass  # no invalid request exists for it (GET /healthz), or none HTTP can carry
    return failures


@pytest.mark.parametrize("role", ["admin", "service"])
def test_no_generated_request_gets_a_5xx(target: Target, role: str) -> None:
    # From the app's document itself: loading it through schemathesis's own ASGI client would run
    # the app's lifespan a second time, on another event loop.
    schema = schemathesis.openapi.from_dict(target.client.get("/openapi.json").json())
    failures: list[str] = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            failures += _fuzz(target, result.ok(), mode, target.keys[role])
    assert not failures, "\n".join(failures)


HOSTILE: list[Any] = [
    "\x00",
    "kyc\x00app",
    "\x1b[2J\r\nforged line\x7f",
    "9" * 32,
    "-9223372036854775809",
    "\u00b2",  # a digit to str.isdigit, not to int()
    "\ud800",  # a lone surrogate: no UTF-8 for it
    "%00",
    "9999-12-31T23:59:59-14:00",
    "0001-01-01T00:00:00+14:00",
    "",
    "x" * 5000,
    10**40,
    -1,
    1e308,
    True,
    None,
    [],
    {},
]
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/tokens"): {"customer_id": "1", "data_type": "SSN", "value": "078-05-1120"},
    ("POST", "/v1/tokens/batch"): {
        "items": [{"customer_id": "1", "data_type": "SSN", "value": "078-05-1120"}]
    },
    ("PUT", "/v1/data-types/{name}"): {
        "pattern": "[a-z]+",
        "normalize": "none",
        "mask": "last4",
        "lookup": False,
        "max_retention_days": 30,
    },
    ("POST", "/v1/tokens/detokenize"): {"tokens": ["tok_" + "A" * 32]},
    ("POST", "/v1/principals"): {"name": "app", "role": "service"},
    ("POST", "/v1/grants"): {
        "grantee": "kyc-app",
        "operations": ["Decrypt"],
        "constraints": {"encryption_context_subset": {"dataType": "SSN"}},
        "expires_at": "2999-01-01T00:00:00Z",
        "name": "n",
    },
}


def _leaves(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """Every place in a body a hostile value can go: each field, each container, each item."""
    if path:
        yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, (*path, index))


def _replaced(value: Any, path: tuple[str | int, ...], new: Any) -> Any:
    if not path:
        return new
    copy: Any = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replaced(value[path[0]], path[1:], new)
    return copy


def test_hostile_values_in_every_field_get_no_5xx(target: Target) -> None:
    document = target.client.get("/openapi.json").json()
    failures: list[str] = []
    sent = 0
    for template, operations in document["paths"].items():
        for method, operation in operations.items():
            method = method.upper()
            key = target.keys["service" if template.startswith("/v1/tokens") else "admin"]
            path = template.format(**target.path_values)
            body = BODIES.get((method, template))
            places: list[tuple[str, Any]] = [
                (parameter["in"], parameter["name"]) for parameter in operation.get("parameters", [])
            ]
            places += [("body", leaf) for leaf in _leaves(body)] if body is not None else []
            for where, name in places:
                for hostile in HOSTILE:
                    request: dict[str, Any] = {"headers": bearer(key), "json": body}
                    url = path
                    if where == "path":
                        url = template.format(**{**target.path_values, name: str(hostile)})
                    elif where == "query":
                        request["params"] = {name: str(hostile)}
                    elif where == "header":
                        request["headers"] = {**bearer(key), name: str(hostile)}
                    else:
                        request["json"] = _replaced(body, name, hostile)
                    try:
                        response = target.client.request(method, url, **request)
                    except (ValueError, UnicodeError, httpx.InvalidURL):
                        continue  # not something HTTP can carry
                    sent += 1
                    if response.status_code >= 500:
                        failures.append(
                            f"{method} {template} {where} {name}={hostile!r:.40} -> {response.status_code}"
                        )
    assert sent > 500
    assert not failures, "\n".join(failures)
