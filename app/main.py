"""The FastAPI application."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

from app.api import audit, data_types, errors, grants, keys, ops, principals, tokens
from app.api.middleware import VaultMiddleware
from app.container import Vault, build_vault
from app.errors import VaultError
from app.services.context import RequestContext
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)

DESCRIPTION = """
Keeps personally identifiable information. Callers send plaintext PII and get back an opaque
token; the value is envelope-encrypted under a KMS data key bound to
`{"customerID", "dataType"}`. Only callers holding a matching grant can turn a token back into
plaintext, and every allow and deny is audited.

Authenticate with `Authorization: Bearer <api key>`. Errors share one shape:
`{"error": {"code", "message", "field"?, "request_id"}}`; a 503 carries `Retry-After`.
"""


def _every(
    interval_s: float, task: Callable[[], object], stop: threading.Event, name: str
) -> threading.Thread:
    """Run task every interval until stop; a failure is logged and retried next round."""

    def loop() -> None:
        while not stop.wait(interval_s):
            try:
                task()
            except Exception as err:  # must never kill the process
                log.warning("%s failed: %s", name, type(err).__name__)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread


class _TypeOnlyExceptions(logging.Filter):
    """Keeps an exception's type and drops its text and traceback from a log record.

    Starlette re-raises an unexpected exception after the 500 handler has answered, and uvicorn
    then logs it with its traceback; the text of, say, a database error can quote row data."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.getMessage()} ({type(record.exc_info[1]).__name__})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


TYPE_ONLY_EXCEPTIONS = _TypeOnlyExceptions()

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """Control characters as \\xNN: a value in a log line cannot forge a line or drive a terminal."""
    return _CONTROL_CHARACTERS.sub(lambda found: f"\\x{ord(found.group()):02x}", text)


class EscapedLogRecord(logging.LogRecord):
    """A log record whose rendered message has its control characters escaped, whatever handler
    or formatter writes it. String arguments are escaped too, for formatters that read them
    directly (uvicorn's access log builds its request line from them)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(self.args, tuple):
            self.args = tuple(escape_controls(a) if isinstance(a, str) else a for a in self.args)

    def getMessage(self) -> str:
        return escape_controls(super().getMessage())


def escape_log_records() -> None:
    """Every log record of the process escapes control characters (if no one else installed a
    record factory; a second call changes nothing)."""
    if logging.getLogRecordFactory() is logging.LogRecord:
        logging.setLogRecordFactory(EscapedLogRecord)


DOCS_PATH = "/docs"
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


def docs_csp(page: bytes) -> str:
    """The docs page's policy: the Swagger UI assets FastAPI's page loads from its CDN, its one
    inline script by hash, inline styles (Swagger UI sets some), and fetches to this origin only."""
    hashes = "".join(
        f" 'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(page)
    )
    return (
        "default-src 'none'; "
        f"script-src https://cdn.jsdelivr.net{hashes}; "
        "style-src https://cdn.jsdelivr.net 'unsafe-inline'; "
        "img-src 'self' data: https://fastapi.tiangolo.com; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )


def create_app(vault: Vault | None = None, settings: Settings | None = None) -> FastAPI:
    settings = vault.settings if vault else (settings or get_settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = app.state.vault is None
        if owned:
            app.state.vault = build_vault(settings)
        vault: Vault = app.state.vault
        # Worker threads run the admin routes (ORM sessions): as many as database connections, so
        # an admin request's thread never waits for the pool. (The data path runs on the loop.)
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = settings.db_pool_size + settings.db_max_overflow
        await vault.database.open_data_path()
        # Resolves the key allow-list now rather than on the first request; what is wrong with
        # the key, check() has logged with the key's id. (Refusing to start is not decided here.)
        with contextlib.suppress(VaultError):
            await anyio.to_thread.run_sync(vault.keys.check)
        stop = threading.Event()
        background = []
        if settings.grant_sweep_interval_s > 0:
            sweep = partial(vault.grants.sweep, RequestContext(request_id="grant-sweep"))
            background.append(_every(settings.grant_sweep_interval_s, sweep, stop, "grant-sweep"))
        if settings.audit_seal_interval_s > 0:
            background.append(_every(settings.audit_seal_interval_s, vault.auditor.seal, stop, "audit-seal"))
        try:
            yield
        finally:
            stop.set()
            for thread in background:
                thread.join(timeout=5)
            await vault.database.close_data_path()
            if owned:
                app.state.vault.close()

    logging.getLogger("uvicorn.error").addFilter(TYPE_ONLY_EXCEPTIONS)  # once: the same instance
    escape_log_records()
    app = FastAPI(
        title="pii-vault",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        # No redirect to the path with(out) its trailing slash: Starlette builds its Location from
        # the request's Host header, which the caller chooses.
        redirect_slashes=False,
        # The docs page is served below, with a policy of its own; ReDoc would need a looser one
        # (workers from blob:, web fonts, inline styles) for a second copy of the same document.
        docs_url=None,
        redoc_url=None,
    )
    app.state.vault = vault
    app.state.readiness = ops.Readiness(settings.ready_cache_s)

    async def docs(request: Request) -> HTMLResponse:
        root_path = request.scope.get("root_path", "").rstrip("/")
        page = get_swagger_ui_html(openapi_url=f"{root_path}/openapi.json", title="pii-vault - Swagger UI")
        page.headers["Content-Security-Policy"] = docs_csp(bytes(page.body))
        return page

    app.add_route(DOCS_PATH, docs, include_in_schema=False)
    app.add_middleware(
        VaultMiddleware, max_body_bytes=settings.max_body_bytes, own_csp_paths=frozenset({DOCS_PATH})
    )
    errors.install(app)
    # The data path first: routes are matched in order, and it carries nearly all the traffic.
    for router in (
        tokens.router,
        principals.router,
        grants.router,
        data_types.router,
        data_types.limits_router,
        audit.router,
        keys.router,
        ops.router,
    ):
        app.include_router(router)
    return app
