"""The OpenAPI document: the error responses every route shares, what each route declares, and the
finishing of the document FastAPI generates (bearer security, shared responses, X-Request-ID).

A route declares its operation id, summary, success example and errors in one call:

    @router.post("", status_code=201, name="Tokenize",
                 **documented("tokenize", "Tokenize one value", errors=(*AUTHENTICATED, 413), status=201))

`errors` lists every status the route can answer besides its success (each must be in ERRORS: add
a status there once, not on a route); `descriptions={409: "..."}` says what one means for this
route. Request and response bodies carry their examples on the pydantic models
(`model_config = examples({...})` in schemas.py), or `documented(example=...)` gives the success
example; `headers=` documents the success response's headers. Security is not declared per route: an
operation that depends on the caller's API key (get_caller or get_data_call, directly or through
another dependency) is marked as needing the bearer scheme when the document is built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, routing
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from app.api import deps, schemas
from app.api.schemas import ErrorResponse

SECURITY_SCHEME = "bearerAuth"
_REQUEST_ID = "3f0c7c1e-6b1e-4c55-9d4e-1f6f2b0f7a11"
_RETRY_AFTER = {
    "description": "Seconds to wait before sending the same request again. Sent only when the "
    "failure is temporary (a dependency down for now); absent when an operator must act.",
    "schema": {"type": "integer", "minimum": 1},
    "example": 5,
}
_X_REQUEST_ID = {
    "description": "This request's id: the one sent in X-Request-ID if it was safe, else a new "
    "one. Quoted as request_id in an error body and in the audit trail.",
    "required": True,
    "schema": {"type": "string"},
}


def _error(code: str, message: str, **more: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **more, "request_id": _REQUEST_ID}}


@dataclass(frozen=True)
class ErrorDoc:
    """One status's error response: its name under components/responses, what it means, examples
    of the body (by error code) and whether it may carry Retry-After."""

    name: str
    description: str
    examples: Mapping[str, dict[str, Any]]
    retry_after: bool = False
    extra_headers: Mapping[str, dict[str, Any]] = field(default_factory=dict)

    def response(self, description: str | None = None) -> dict[str, Any]:
        headers = {**({"Retry-After": _RETRY_AFTER} if self.retry_after else {}), **self.extra_headers}
        return {
            "model": ErrorResponse,
            "description": description or self.description,
            **({"headers": headers} if headers else {}),
            "content": {
                "application/json": {
                    "examples": {
                        code: {"summary": code, "value": body} for code, body in self.examples.items()
                    }
                }
            },
        }


# Every error status the vault answers, once. The body is always {"error": {...}} (ErrorResponse).
ERRORS: dict[int, ErrorDoc] = {
    400: ErrorDoc(
        "AccessReasonRequired",
        "The vault requires X-Access-Reason on detokenize and none was sent.",
        {
            "access_reason_required": _error(
                "access_reason_required",
                "this vault requires an X-Access-Reason header on detokenize",
                field="X-Access-Reason",
            )
        },
    ),
    401: ErrorDoc(
        "Unauthenticated",
        "No API key, or one that is unknown, revoked or of a disabled principal.",
        {
            "unauthenticated": _error(
                "unauthenticated", "a valid API key is required: Authorization: Bearer <api key>"
            )
        },
    ),
    403: ErrorDoc(
        "Forbidden",
        "The caller's role may not do this (forbidden), or no active grant covers the record "
        "(grant_required). Audited as a denial.",
        {
            "forbidden": _error("forbidden", "this action needs the admin role"),
            "grant_required": _error(
                "grant_required", "no active grant allows this operation on this record"
            ),
        },
    ),
    404: ErrorDoc(
        "NotFound",
        "No such resource (or none the caller may know of).",
        {"not_found": _error("not_found", "no grant with this id", field="id")},
    ),
    409: ErrorDoc(
        "Conflict",
        "The request conflicts with the current state (a name taken, a grant already revoked).",
        {"conflict": _error("conflict", "the grant is already revoked or retired", field="id")},
    ),
    410: ErrorDoc(
        "Gone",
        "The record was erased or its retention period ended (told only to a caller whose grant "
        "covers it; anyone else gets the answer an unknown token gets).",
        {
            "erased": _error("erased", "this record was erased"),
            "expired": _error("expired", "this record's retention period has ended"),
        },
    ),
    413: ErrorDoc(
        "TooLarge",
        "The body, a value or a batch is larger than the vault's limit.",
        {"too_large": _error("too_large", "items has 1001 entries; at most 1000 are allowed", field="items")},
    ),
    422: ErrorDoc(
        "InvalidInput",
        "The request is not valid. `field` names the first bad field; for a request that failed "
        "schema validation, `problems` lists every one. No submitted value is ever echoed.",
        {
            "invalid_input": _error(
                "invalid_input",
                "customer_id: String should match pattern '^[A-Za-z0-9._:-]{1,128}$'",
                field="customer_id",
                problems=[
                    {
                        "field": "customer_id",
                        "message": "String should match pattern '^[A-Za-z0-9._:-]{1,128}$'",
                        "type": "string_pattern_mismatch",
                    }
                ],
            )
        },
    ),
    # Not answered by any route yet: for the rate-limited endpoints being added.
    429: ErrorDoc(
        "RateLimited",
        "Too many requests from this principal; send again after Retry-After seconds.",
        {"rate_limited": _error("rate_limited", "too many requests; retry later")},
        retry_after=True,
    ),
    500: ErrorDoc(
        "IntegrityFailure",
        "The stored record failed its integrity check (tampered, moved or corrupted) and was not "
        "returned. Deliberately opaque; audited.",
        {
            "record_integrity": _error(
                "record_integrity", "the record failed its integrity check and was not returned"
            )
        },
    ),
    503: ErrorDoc(
        "Unavailable",
        "A dependency failed, so nothing happened. With Retry-After when it is down for now "
        "(database_unavailable, key_service_unavailable, audit_unavailable): send the same request "
        "again later. Without Retry-After when it refuses the vault itself (key_access_denied, "
        "key_not_allowed, key_service_invalid_response): an operator must act, so do not retry.",
        {
            "database_unavailable": _error(
                "database_unavailable", "the vault's database is unavailable; retry later"
            ),
            "key_access_denied": _error(
                "key_access_denied",
                "the key service refused the vault's request; an operator must check the key",
            ),
        },
        retry_after=True,
    ),
}

# What any route that reads the caller's API key can answer: X-Access-Reason is read (and
# validated) with the key, and the key is checked against the database.
AUTHENTICATED: tuple[int, ...] = (401, 403, 422, 429, 503)


def error_responses(
    statuses: Iterable[int], descriptions: Mapping[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """The `responses=` entries for these statuses, from ERRORS; `descriptions` overrides what a
    status means for this route (a response with its own description is not shared)."""
    descriptions = descriptions or {}
    return {status: ERRORS[status].response(descriptions.get(status)) for status in sorted(set(statuses))}


def documented(
    operation_id: str,
    summary: str,
    *,
    errors: Iterable[int] = (),
    descriptions: Mapping[int, str] | None = None,
    status: int = 200,
    example: Any = None,
    media_type: str = "application/json",
    headers: Mapping[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for a route decorator: a stable camelCase operation id, a summary, the
    error responses (statuses from ERRORS) and, if given, the success response's example and
    headers (OpenAPI header objects by name, e.g. Idempotent-Replayed)."""
    responses = error_responses(errors, descriptions)
    success: dict[str, Any] = {}
    if example is not None:
        schema = {} if media_type == "application/json" else {"schema": {"type": "string"}}
        success["content"] = {media_type: {"example": example, **schema}}
    if headers:
        success["headers"] = dict(headers)
    if success:
        responses[status] = success
    return {"operation_id": operation_id, "summary": summary, "responses": responses}


# The dependencies that read the caller's API key.
_AUTH_CALLS: frozenset[Callable[..., Any]] = frozenset(
    {deps.get_caller, deps.get_data_call, deps.get_keyed_data_call}
)


def _reads_api_key(dependant: Dependant) -> bool:
    return dependant.call in _AUTH_CALLS or any(_reads_api_key(sub) for sub in dependant.dependencies)


def api_routes(app: FastAPI) -> Iterator[tuple[str, APIRoute]]:
    """Every API route of the app with its full path (FastAPI 0.16x keeps included routers whole
    in app.routes and flattens them with iter_route_contexts; before, app.routes was flat)."""
    iterate = getattr(routing, "iter_route_contexts", None)
    if iterate is None:
        for route in app.routes:
            if isinstance(route, APIRoute):
                yield route.path_format, route
        return
    for context in iterate(app.routes):
        if isinstance(context.original_route, APIRoute):
            yield str(context.path_format), context.original_route


def secured_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every documented operation that reads the caller's API key."""
    return {
        (method.lower(), path)
        for path, route in api_routes(app)
        if route.include_in_schema and _reads_api_key(route.dependant)
        for method in route.methods or ()
    }


def _share_error_responses(document: dict[str, Any]) -> None:
    """An error response as the table describes it becomes a $ref to components/responses, so a
    client generator sees one type per error; one with a route's own description stays inline."""
    shared: dict[str, Any] = document.setdefault("components", {}).setdefault("responses", {})
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            for key, response in operation.get("responses", {}).items():
                doc = ERRORS.get(int(key)) if key.isdigit() else None
                if doc is not None and response.get("description") == doc.description:
                    shared.setdefault(doc.name, response)
                    operation["responses"][key] = {"$ref": f"#/components/responses/{doc.name}"}


def build_document(app: FastAPI) -> dict[str, Any]:
    document = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    components = document.setdefault("components", {})
    components["securitySchemes"] = {
        SECURITY_SCHEME: {
            "type": "http",
            "scheme": "bearer",
            "description": "A vault API key, sent as `Authorization: Bearer <api key>`. The first "
            "admin's comes from `piivault admin create`; the others from POST /v1/principals.",
        }
    }
    secured = secured_routes(app)
    _document_hand_read_headers(app, document)
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            if (method, path) in secured:
                operation["security"] = [{SECURITY_SCHEME: []}]
            for response in operation.get("responses", {}).values():
                response.setdefault("headers", {})["X-Request-ID"] = _X_REQUEST_ID
    _share_error_responses(document)
    _restore_example_nulls(document)
    return document


def _hand_read(dependant: Dependant) -> Iterator[dict[str, Any]]:
    yield from deps.HAND_READ.get(dependant.call, ()) if dependant.call is not None else ()
    for sub in dependant.dependencies:
        yield from _hand_read(sub)


def _document_hand_read_headers(app: FastAPI, document: dict[str, Any]) -> None:
    """The headers the data path's dependencies read by hand (deps.HAND_READ), documented after
    the route's declared parameters, as FastAPI places declared headers."""
    paths = document.get("paths", {})
    for path, route in api_routes(app):
        headers = list(_hand_read(route.dependant))
        if not headers or not route.include_in_schema:
            continue
        for method in route.methods or ():
            operation = paths[path][method.lower()]
            operation["parameters"] = [*operation.get("parameters", []), *headers]


def _restore_example_nulls(document: dict[str, Any]) -> None:
    """FastAPI drops every null from the document it generates (exclude_none), examples' nulls
    too, which leaves an example without a required field (`"next_cursor": null`): each model's
    examples are put back as the model gives them."""
    for name, schema in document.get("components", {}).get("schemas", {}).items():
        model = getattr(schemas, name, None)
        extra = getattr(model, "model_config", {}).get("json_schema_extra")
        if isinstance(extra, dict) and "examples" in schema:
            schema["examples"] = extra["examples"]


def install(app: FastAPI) -> None:
    """The app's /openapi.json is the finished document, built once."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
