"""ASGI middleware: request ids, security headers, the body limit and request metrics, in one pass."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logs import ACCESS_LOGGER, begin_request, end_request
from app.metrics import LATENCY, REQUESTS

access_log = logging.getLogger(ACCESS_LOGGER)

_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# On every response: nothing the vault answers (a value, an API key, an audit page) is kept by a
# cache, sniffed as another type, framed, or sent on as a referrer.
_COMMON_HEADERS: dict[str, str] = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
# JSON loads nothing and may be framed by nothing. The docs page sets its own policy (app/main.py).
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
SECURITY_HEADERS: dict[str, str] = {**_COMMON_HEADERS, "Content-Security-Policy": API_CSP}


def route_template(scope: Scope) -> str:
    """The template of the route that served the request ("/v1/tokens/{token}"), for metrics and
    the access log. FastAPI's API routes leave themselves in the scope; plain Starlette routes
    (/docs, /openapi.json) do not, and are looked up; anything else is "unmatched"."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    if template:
        return str(template)
    router = getattr(scope.get("app"), "router", None)
    for candidate in getattr(router, "routes", ()):
        if isinstance(candidate, BaseRoute) and candidate.matches(scope)[0] is Match.FULL:
            return str(getattr(candidate, "path", None) or "unmatched")
    return "unmatched"


def _raw(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


class VaultMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        own_csp_paths: frozenset[str] = frozenset(),
        csp_by_prefix: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """own_csp_paths: routes that set their own Content-Security-Policy (the docs page);
        csp_by_prefix: (path prefix, policy) for a tree of pages with a policy of its own (the
        console's HTML)."""
        self.app = app
        self.max_body_bytes = max_body_bytes
        self._own_csp_paths = own_csp_paths
        # Built once: a response only concatenates them.
        self._headers = _raw(SECURITY_HEADERS)
        self._headers_own_csp = _raw(_COMMON_HEADERS)
        self._prefixed = [
            (prefix, _raw({**_COMMON_HEADERS, "Content-Security-Policy": csp}))
            for prefix, csp in csp_by_prefix
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        offered = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = offered if _SAFE_REQUEST_ID.match(offered) else str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = request_id
        log_scope = begin_request(request_id)
        started = time.perf_counter()
        status = 500
        path, root_path = scope["path"], scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        extra = self._headers_own_csp if path in self._own_csp_paths else self._headers
        for prefix, headers_of_tree in self._prefixed:
            if path == prefix or path.startswith(prefix + "/"):
                extra = headers_of_tree

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                    *extra,
                ]
            await send(message)

        declared = headers.get(b"content-length")
        try:
            if declared is None:
                # A streamed body: read it here, up to the limit, before the app sees any of it.
                buffered = await self._buffer(receive)
                if buffered is None:
                    await self._too_large(send_with_id, request_id)
                else:
                    await self.app(scope, buffered, send_with_id)
            elif not declared.isdigit() or int(declared) > self.max_body_bytes:
                await self._too_large(send_with_id, request_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            template = route_template(scope)
            REQUESTS.labels(scope["method"], template, str(status)).inc()
            LATENCY.labels(scope["method"], template).observe(elapsed)
            if access_log.isEnabledFor(logging.INFO):
                # The route's template, never the path: tokens are in paths.
                access_log.info(
                    "%s %s %s",
                    scope["method"],
                    template,
                    status,
                    extra={
                        "method": scope["method"],
                        "route": template,
                        "status": status,
                        "latency_ms": round(elapsed * 1000, 3),
                    },
                )
            end_request(log_scope)

    async def _buffer(self, receive: Receive) -> Receive | None:
        """The whole body as one message, or None if it is larger than the limit."""
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                break
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return replay

    async def _too_large(self, send: Send, request_id: str) -> None:
        body: dict[str, Any] = {
            "error": {
                "code": "too_large",
                "message": f"the request body is larger than {self.max_body_bytes} bytes",
                "field": "body",
                "request_id": request_id,
            }
        }
        payload = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
