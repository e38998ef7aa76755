"""The OpenAPI document matches the server: every response to requests generated from it (with an
admin key and with a service key) conforms to it (status documented, content type, headers, body
schema), and none is a server error; every route has an operation id, the bearer scheme guards
exactly the routes that read a key, every error is the vault's one shape, every body has an
example; /docs loads only files the vault serves itself, and is off in production unless
PIIVAULT_DOCS_ENABLED turns it on.

The generated requests run on a database and a KMS key of their own, so that whatever they
create, revoke or disable cannot disturb the other tests; bounded and derandomized.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import jsonschema
import pytest
import referencing
import referencing.jsonschema
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, reject, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import checks
from schemathesis.core import NotSet
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from sqlalchemy.engine import make_url

from app.api.openapi import ERRORS, SECURITY_SCHEME, api_routes, documented
from app.container import build_vault
from app.main import create_app
from app.settings import Settings
from tests.conftest import (
    GRANTEE_ARN,
    bearer,
    create_admin,
    create_grant,
    create_kms_key,
    create_principal,
    make_settings,
    migrated_database,
    tokenize,
)

EXAMPLES = 4  # per operation, key and kind of request: enough to cover each documented status
PUBLIC = {"/healthz", "/readyz", "/metrics"}
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]


@dataclass
class Target:
    app: FastAPI
    client: TestClient
    keys: dict[str, str]
    # A real value for each path parameter, so that a generated request can reach its handler.
    path_values: dict[str, str]


@pytest.fixture(scope="module")
def target(database_url: str, aws_session: None) -> Iterator[Target]:
    server = make_url(database_url).set(database="postgres").render_as_string(hide_password=False)
    with migrated_database(server, "piivault_openapi") as url:
        vault = build_vault(make_settings(url, create_kms_key("piivault openapi key")))
        app = create_app(vault)
        try:
            with TestClient(app, raise_server_exceptions=False) as client:
                admin = create_admin(vault, "openapi-admin")
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


def _mismatches(
    target: Target, operation: Any, mode: schemathesis.GenerationMode, key: str, real_ids: bool
) -> list[str]:
    """What schemathesis's checks found wrong with the responses to this operation's requests."""
    found: list[str] = []
    path_parameters = (
        {name: target.path_values[name] for name in re.findall(r"{(\w+)}", operation.path)}
        if real_ids
        else None
    )

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(mode, path_parameters=path_parameters))
    def run(case: Any) -> None:
        response = target.client.send(_request(target.client, case, key))
        try:
            case.validate_response(response, checks=CHECKS)
        except (AssertionError, FailureGroup) as failure:
            found.append(
                f"{mode.value} {case.method} {case.formatted_path} -> {response.status_code} "
                f"{response.text[:300]}: {failure}"
            )

    # Unsatisfiable: no such request exists (an invalid one for GET /healthz), or none HTTP can carry.
    with contextlib.suppress(Unsatisfiable):
        run()
    return found


# First: the generated calls below may revoke, retire and disable what this one needs.
def test_a_real_session_conforms_to_the_document(target: Target) -> None:
    """Requests that succeed (which generated ones rarely do): each answer, batches with mixed
    results included, matches its operation's documented response."""
    schema = schemathesis.openapi.from_dict(target.client.get("/openapi.json").json())
    service, admin = target.keys["service"], target.keys["admin"]
    token = target.path_values["token"]
    calls: list[tuple[str, str, str, dict[str, Any]]] = [
        (
            service,
            "POST",
            "/v1/tokens",
            {"body": {"customer_id": "2", "data_type": "SSN", "value": "078-05-1120"}},
        ),
        (
            service,
            "POST",
            "/v1/tokens/batch",
            {
                "body": {
                    "items": [{"customer_id": "2", "data_type": "SSN", "value": "078-05-1120"}, {"value": 1}]
                }
            },
        ),
        (service, "POST", "/v1/tokens/detokenize", {"body": {"tokens": [token, "tok_" + "A" * 32]}}),
        (service, "GET", "/v1/tokens/{token}", {"path_parameters": {"token": token}}),
        (admin, "GET", "/v1/principals", {"query": {"limit": 1}}),
        (admin, "GET", "/v1/principals/{principal_id}", {"path_parameters": {"principal_id": ""}}),
        (admin, "GET", "/v1/grants", {}),
        (admin, "GET", "/v1/grants/{grant_id}", {"path_parameters": {"grant_id": ""}}),
        (admin, "GET", "/v1/audit/events", {"query": {"limit": 2}}),
        (admin, "GET", "/v1/audit/verify", {}),
        (admin, "GET", "/v1/keys", {}),
        (admin, "POST", "/v1/principals", {"body": {"name": "another-app", "role": "service"}}),
        (admin, "POST", "/v1/principals", {"body": {"name": "another-app", "role": "service"}}),  # 409
        (
            admin,
            "POST",
            "/v1/grants",
            {"body": {"grantee": "another-app", "operations": ["Decrypt"], "name": "g"}},
        ),
        (admin, "GET", "/healthz", {}),
        (admin, "GET", "/readyz", {}),
        (admin, "GET", "/metrics", {}),
    ]
    statuses = []
    for key, method, path, parts in calls:
        operation = schema[path][method]
        given_ids = parts.get("path_parameters")
        if given_ids is not None:
            parts["path_parameters"] = {
                name: value or target.path_values[name] for name, value in given_ids.items()
            }
        case = operation.Case(**parts)
        response = target.client.send(_request(target.client, case, key))
        statuses.append(response.status_code)
        case.validate_response(response, checks=CHECKS)
    assert set(statuses) == {200, 201, 409}, statuses


# The service key first: the admin's generated calls may disable the service principal.
@pytest.mark.parametrize("role", ["service", "admin"])
def test_every_response_to_generated_requests_conforms_to_the_document(target: Target, role: str) -> None:
    schema = schemathesis.openapi.from_dict(target.client.get("/openapi.json").json())
    mismatches: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        operations += 1
        runs = [(schemathesis.GenerationMode.POSITIVE, False), (schemathesis.GenerationMode.NEGATIVE, False)]
        # With real ids as well, where the fixture has one for each of the path's parameters.
        names = re.findall(r"{(\w+)}", operation.path)
        if names and all(name in target.path_values for name in names):
            runs.append((schemathesis.GenerationMode.POSITIVE, True))
        for mode, real_ids in runs:
            mismatches += _mismatches(target, operation, mode, target.keys[role], real_ids)
    assert operations >= 21
    assert not mismatches, "\n".join(mismatches)


def test_every_route_has_an_operation_id_a_summary_and_a_tag(target: Target) -> None:
    document = target.client.get("/openapi.json").json()
    ids = []
    in_document = {(method, path) for path, operations in document["paths"].items() for method in operations}
    for path, route in api_routes(target.app):
        if not route.include_in_schema:
            continue
        for method in route.methods or ():
            assert (method.lower(), path) in in_document, (method, path)
            operation = document["paths"][path][method.lower()]
            assert re.fullmatch(r"[a-z][A-Za-z]+", operation.get("operationId", "")), (path, operation)
            assert operation.get("summary") and operation.get("tags"), (path, operation)
            ids.append(operation["operationId"])
    assert len(ids) == len(set(ids)) >= 21
    assert {"tokenize", "tokenizeBatch", "detokenize", "detokenizeBatch", "createGrant"} <= set(ids)


def _responses(document: dict[str, Any], operation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """An operation's responses with the shared ones ($ref) resolved."""
    out = {}
    for status, response in operation["responses"].items():
        if "$ref" in response:
            response = document["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
        out[status] = response
    return out


def test_the_bearer_scheme_guards_exactly_the_routes_that_read_a_key(target: Target) -> None:
    document = target.client.get("/openapi.json").json()
    assert document["components"]["securitySchemes"][SECURITY_SCHEME] == {
        "type": "http",
        "scheme": "bearer",
        "description": document["components"]["securitySchemes"][SECURITY_SCHEME]["description"],
    }
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = _responses(document, operation)
            if path in PUBLIC:
                assert "security" not in operation, path
                assert "401" not in responses, path
                continue
            assert operation["security"] == [{SECURITY_SCHEME: []}], (method, path)
            assert {"401", "403", "422", "503"} <= set(responses), (method, path)
            # Negative: the server refuses the operation without a key, as documented.
            # (With the document's own example body: a valid one, so the key is what is missing.)
            url = path.format_map(defaultdict(lambda: "unknown", target.path_values))
            body = None
            if "requestBody" in operation:
                ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                body = document["components"]["schemas"][ref.rsplit("/", 1)[1]]["examples"][0]
            response = target.client.request(method.upper(), url, json=body)
            assert response.status_code == 401, (method, path, response.text)


def test_every_error_is_documented_with_the_one_error_shape(target: Target) -> None:
    document = target.client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    # FastAPI's own 422 body ({"detail": [...]}) is never sent, so never documented.
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert {"code", "message", "request_id"} <= set(schemas["ErrorBody"]["required"])
    assert "problems" in schemas["ErrorBody"]["properties"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in _responses(document, operation).items():
                assert response["headers"]["X-Request-ID"]["required"] is True, (path, status)
                if int(status) < 400:
                    continue
                media = response["content"]["application/json"]
                assert media["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}, (path, status)
                assert media["examples"], (path, status)
                for example in media["examples"].values():
                    assert set(example["value"]) == {"error"}
                retry_after = response["headers"].get("Retry-After")
                if status in {"503", "429"}:
                    # Not required: a 503 from a misconfiguration has none.
                    assert retry_after is not None and not retry_after.get("required"), (path, status)
                else:
                    assert retry_after is None, (path, status)
            if "parameters" in operation or "requestBody" in operation:
                assert "422" in operation["responses"], (method, path)
    # The table is shared: each status the table describes is one component, referenced.
    assert {ERRORS[s].name for s in (401, 403, 404, 409, 413, 422, 503)} <= set(
        document["components"]["responses"]
    )


def _has_example(document: dict[str, Any], media: dict[str, Any]) -> bool:
    if "example" in media or media.get("examples"):
        return True
    schema = media.get("schema", {})
    if "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return bool(schema.get("examples"))


def test_every_request_and_response_body_has_an_example(target: Target) -> None:
    document = target.client.get("/openapi.json").json()
    missing = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            bodies = [("request", operation["requestBody"])] if "requestBody" in operation else []
            bodies += list(_responses(document, operation).items())
            for name, body in bodies:
                for media_type, media in body.get("content", {}).items():
                    if not _has_example(document, media):
                        missing.append(f"{method} {path} {name} {media_type}")
    assert not missing, missing
    # The batch results are a union of typed items, not one type with every field optional.
    items = document["components"]["schemas"]["BatchTokenizeResponse"]["properties"]["results"]["items"]
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in items["anyOf"]} == {
        "BatchTokenized",
        "BatchTokenizeFailed",
    }
    failed = document["components"]["schemas"]["BatchDetokenizeFailed"]
    assert set(failed["required"]) == {"token", "error"}
    assert failed["additionalProperties"] is False


# /docs


def test_docs_loads_only_assets_the_vault_serves_itself(target: Target) -> None:
    response = target.client.get("/docs")
    assert response.status_code == 200
    page = response.text
    assert "http://" not in page and "https://" not in page  # no CDN, no other origin
    referenced = re.findall(r'(?:src|href)="([^"]+)"', page) + re.findall(r"url: '([^']+)'", page)
    assert len(referenced) == 4, referenced  # the script, the stylesheet, the icon, the document
    types = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}
    for url in referenced:
        assert not urlsplit(url).netloc and url.startswith("/"), url
        asset = target.client.get(url)
        assert asset.status_code == 200, url
        suffix = url[url.rindex(".") :]
        assert types[suffix] in asset.headers["content-type"], (url, asset.headers["content-type"])
        assert len(asset.content) > 100, url
    # The licence travels with the vendored files (the directory is not listed, nor escaped).
    assert target.client.get("/docs/assets/LICENSE").status_code == 200
    assert target.client.get("/docs/assets/").status_code == 404
    assert target.client.get("/docs/assets/../../settings.py").status_code == 404


def _production(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": "production",
        "database_url": "postgresql://vault@db.invalid/vault",
        "kms_key_id": "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "kms_grantee_principal": GRANTEE_ARN,
    }
    return Settings(**{**values, **overrides})


@pytest.mark.parametrize(
    ("overrides", "served"),
    [
        ({}, False),
        ({"docs_enabled": True}, True),
        ({"docs_enabled": False}, False),
    ],
)
def test_docs_are_off_in_production_unless_enabled(overrides: dict[str, Any], served: bool) -> None:
    # Not started (no lifespan): the routes alone decide, and a 404 needs no database.
    client = TestClient(create_app(settings=_production(**overrides)), raise_server_exceptions=False)
    for path in ("/docs", "/openapi.json", "/docs/assets/swagger-ui-bundle.js"):
        assert (client.get(path).status_code == 200) is served, (path, overrides)
    assert create_app(settings=_production(**overrides)).openapi()["paths"]  # still buildable


def test_docs_can_be_turned_off_in_development(database_url: str) -> None:
    settings = make_settings(database_url, None, docs_enabled=False)
    client = TestClient(create_app(settings=settings), raise_server_exceptions=False)
    assert client.get("/docs").status_code == 404
    assert client.get("/openapi.json").status_code == 404


def test_piivault_docs_enabled_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIIVAULT_DOCS_ENABLED", "true")
    assert _production().serves_docs is True
    monkeypatch.setenv("PIIVAULT_DOCS_ENABLED", "false")
    assert _production().serves_docs is False
    monkeypatch.delenv("PIIVAULT_DOCS_ENABLED")
    assert _production().serves_docs is False
    assert Settings(environment="development").serves_docs is True


def test_documented_gives_a_new_route_its_id_errors_and_headers() -> None:
    """What a route added later passes to its decorator: its errors come from the one table."""
    replayed = {"description": "true when this is a stored answer", "schema": {"type": "string"}}
    arguments = documented(
        "lookupTokens",
        "Find tokens by value",
        errors=(401, 429, 409),
        descriptions={409: "the same key is in flight"},
        headers={"Idempotent-Replayed": replayed},
    )
    assert arguments["operation_id"] == "lookupTokens" and arguments["summary"] == "Find tokens by value"
    responses = arguments["responses"]
    assert list(responses) == [401, 409, 429, 200]
    assert responses[401]["description"] == ERRORS[401].description
    assert responses[409]["description"] == "the same key is in flight"
    assert "Retry-After" in responses[429]["headers"]
    assert responses[200] == {"headers": {"Idempotent-Replayed": replayed}}
    with pytest.raises(KeyError):
        documented("x", "y", errors=(418,))  # a status the table does not describe


def test_every_example_is_valid_against_its_schema(target: Target) -> None:
    """An example a client generator or a reader copies is one the server would accept or send
    (FastAPI's generator drops nulls, which broke examples with a required null field)."""
    document = target.client.get("/openapi.json").json()
    resource = referencing.Resource.from_contents(
        {"components": document["components"]}, default_specification=referencing.jsonschema.DRAFT202012
    )
    registry: referencing.Registry[Any] = referencing.Registry().with_resource("urn:document", resource)

    def validate(schema: dict[str, Any], example: Any, where: str) -> list[str]:
        # A schema's $refs point into the document: resolve them there.
        ref = json.loads(json.dumps(schema).replace('"#/components/', '"urn:document#/components/'))
        validator = jsonschema.Draft202012Validator(ref, registry=registry)
        return [f"{where}: {error.message}" for error in validator.iter_errors(example)]

    invalid: list[str] = []
    checked = 0
    for name, schema in document["components"]["schemas"].items():
        for example in schema.get("examples", []):
            invalid += validate({"$ref": f"#/components/schemas/{name}"}, example, name)
            checked += 1
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in _responses(document, operation).items():
                media = response.get("content", {}).get("application/json", {})
                values = [e["value"] for e in media.get("examples", {}).values()]
                values += [media["example"]] if "example" in media else []
                for value in values:
                    invalid += validate(media["schema"], value, f"{method} {path} {status}")
                    checked += 1
    assert checked > 30
    assert not invalid, invalid
