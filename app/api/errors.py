"""The one place where errors become HTTP responses: one shape, no tracebacks, no values."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app import errors
from app.api.middleware import SECURITY_HEADERS
from app.services.idempotency import Replay

log = logging.getLogger(__name__)

# Most specific first: the first class an error is an instance of decides its status.
STATUS: list[tuple[type[errors.VaultError], int]] = [
    (errors.InvalidInput, 422),
    (errors.PayloadTooLarge, 413),
    (errors.HeadersTooLarge, 431),
    (errors.RequestTimeout, 408),
    (errors.RateLimited, 429),
    (errors.Unauthenticated, 401),
    (errors.Forbidden, 403),
    (errors.AccessReasonRequired, 400),
    (errors.NotFound, 404),
    (errors.Conflict, 409),
    (errors.Gone, 410),
    (errors.DependencyUnavailable, 503),
    (errors.Misconfigured, 503),
    (errors.IntegrityFailure, 500),
]
REPLAYED_HEADER = "Idempotent-Replayed"
_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def status_of(err: errors.VaultError) -> int:
    return next((status for cls, status in STATUS if isinstance(err, cls)), 500)


def error_body(err: errors.VaultError) -> dict[str, Any]:
    """The shape of an error inside a batch result (no request id: the response carries it)."""
    body: dict[str, Any] = {"code": err.code, "message": err.message}
    body.update(err.details())
    return body


def _respond(
    request: Request, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> JSONResponse:
    body["request_id"] = getattr(request.state, "request_id", None)
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _field(loc: tuple[int | str, ...]) -> str:
    # ("body", "items", 0, "value") -> "items[0].value"; a header or path keeps its place name.
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def validation_problem(exc: RequestValidationError | Any) -> tuple[str, str, list[dict[str, str]]]:
    """The first bad field and a message naming it. Pydantic's `input` (a value) is never echoed."""
    problems = [
        {
            "field": _field(tuple(e.get("loc", ()))),
            "message": str(e.get("msg", "invalid")),
            "type": str(e.get("type", "")),
        }
        for e in exc.errors()
    ]
    first = problems[0] if problems else {"field": "body", "message": "invalid request"}
    if first.get("type") == "json_invalid":
        return "body", "the body is not valid JSON", problems
    return first["field"], f"{first['field']}: {first['message']}", problems


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> str:
    """Every method some route serves at this path, asked of the routes themselves. (Starlette's
    own Allow names the methods of the first route that matched the path only, so DELETE
    /v1/grants would be told POST, not GET and POST.)"""
    routes = request.app.router.routes
    return ", ".join(
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(errors.VaultError)
    async def vault_error(request: Request, exc: errors.VaultError) -> JSONResponse:
        status = status_of(exc)
        headers = None
        if isinstance(exc, errors.RateLimited):
            headers = {"Retry-After": str(exc.retry_after_s)}
        elif exc.retryable:
            headers = {"Retry-After": str(request.app.state.vault.settings.retry_after_s)}
        return _respond(request, status, error_body(exc), headers)

    @app.exception_handler(Replay)
    async def replay(request: Request, exc: Replay) -> Response:
        # Not an error: an Idempotency-Key's first answer, sent again as it was stored.
        answer = exc.answer
        return Response(
            answer.body, answer.status, headers={REPLAYED_HEADER: "true"}, media_type="application/json"
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        field, message, problems = validation_problem(exc)
        body = {"code": "invalid_input", "message": message, "field": field, "problems": problems}
        return _respond(request, 422, body)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request)
        return _respond(request, exc.status_code, {"code": code, "message": str(exc.detail)}, headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Logged with its type only: an exception's text could quote data.
        log.error("unexpected %s on %s %s", type(exc).__name__, request.method, request.url.path)
        err = errors.VaultError()
        # This handler runs outside the middleware that stamps the headers, so stamp them here.
        request_id = getattr(request.state, "request_id", None)
        headers = {**SECURITY_HEADERS, **({"X-Request-ID": request_id} if request_id else {})}
        return _respond(request, 500, error_body(err), headers)
