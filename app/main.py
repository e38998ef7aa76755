"""The FastAPI application."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from app import metrics
from app.api import (
    approvals,
    audit,
    console,
    customers,
    data_types,
    errors,
    grants,
    keys,
    openapi,
    ops,
    principals,
    tokens,
)
from app.api.middleware import VaultMiddleware
from app.container import Vault, build_vault
from app.errors import VaultError
from app.logs import TypeOnlyExceptions, escape_log_records
from app.services.context import RequestContext
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)
METRICS_REFRESH_S = 5.0

DESCRIPTION = """
Keeps personally identifiable information. Callers send plaintext PII and get back an opaque
token; the value is envelope-encrypted under a KMS data key bound to
`{"customerID", "dataType"}`. Only callers holding a matching grant can turn a token back into
plaintext, and every allow and deny is audited.

Authenticate with `Authorization: Bearer <api key>` (the Authorize button). Every error has one
shape, `{"error": {"code", "message", "request_id", "field"?, "problems"?}}`: branch on `code`.
A 503 whose cause is temporary (a dependency down for now) carries `Retry-After`: send the same
request again after it. A 503 without `Retry-After` means a dependency refuses the vault itself
(`key_access_denied`, `key_not_allowed`, `key_service_invalid_response`): an operator must act,
and retrying will not help. Every response carries `X-Request-ID`.
"""


def _every(
    interval_s: float,
    task: Callable[[], object],
    stop: threading.Event,
    name: str,
    done: Callable[[], object] | None = None,
) -> threading.Thread:
    """Run task every interval until stop, then `done` (its metrics) if it succeeded; a failure is
    logged and retried next round."""

    def loop() -> None:
        while not stop.wait(interval_s):
            try:
                task()
                if done is not None:
                    done()
            except Exception as err:  # must never kill the process
                log.warning("%s failed: %s", name, type(err).__name__)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread


# Records escape control characters and uvicorn's error log keeps exception types only, also when
# the app runs without `piivault serve`'s logging configuration (tests, another ASGI server).
TYPE_ONLY_EXCEPTIONS = TypeOnlyExceptions()


async def _every_on_loop(
    interval_s: float,
    task: Callable[[], Awaitable[object]],
    name: str,
    done: Callable[[], None] | None = None,
) -> None:
    """Run task every interval on the event loop until cancelled; a failure is logged and retried
    next round. `done` runs after each run that succeeded (a metric)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await task()
        except Exception as err:  # must never end the loop
            log.warning("%s failed: %s", name, type(err).__name__)
            continue
        if done is not None:
            done()


DOCS_PATH = "/docs"
OPENAPI_PATH = "/openapi.json"
# Swagger UI's files, vendored from the swagger-ui-dist npm package with its licence, and served
# by the vault itself: /docs works on a network that cannot reach a CDN, and loads nothing else.
DOCS_ASSETS_PATH = "/docs/assets"
DOCS_ASSETS_DIR = Path(__file__).parent / "static" / "swagger-ui"
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


def docs_csp(page: bytes) -> str:
    """The docs page's policy: Swagger UI's own files from this origin, its one inline script by
    hash, inline styles (Swagger UI sets some), and fetches to this origin only."""
    hashes = "".join(
        f" 'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(page)
    )
    return (
        "default-src 'none'; "
        f"script-src 'self'{hashes}; "
        "style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; "
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
        unwatch = metrics.watch_pools(vault.database.pool_stats)
        # Sampled gauges (pools) also between scrapes: each worker's value stays current.
        background = [_every(METRICS_REFRESH_S, metrics.refresh, stop, "metrics-refresh")]
        if settings.grant_sweep_interval_s > 0:
            # Grant expiries and mirrors, then lapsed four-eyes requests.
            sweep = partial(vault.sweep, RequestContext(request_id="grant-sweep"))
            grant_swept = partial(metrics.sweeper_ran, "grant")
            background.append(
                _every(settings.grant_sweep_interval_s, sweep, stop, "grant-sweep", grant_swept)
            )
        if settings.idempotency_sweep_interval_s > 0:
            idempotency_swept = partial(metrics.sweeper_ran, "idempotency")
            background.append(
                _every(
                    settings.idempotency_sweep_interval_s,
                    vault.idempotency.sweep,
                    stop,
                    "idempotency-sweep",
                    idempotency_swept,
                )
            )
        if settings.audit_seal_interval_s > 0:
            lag_checked = [0.0]

            def seal_lag() -> None:
                # The lag is a query: at most once per METRICS_REFRESH_S, not after every pass.
                now = time.monotonic()
                if now - lag_checked[0] >= METRICS_REFRESH_S:
                    lag_checked[0] = now
                    metrics.sealed(vault.auditor.unsealed_age_s())
                else:
                    metrics.sealed_pass()

            background.append(
                _every(settings.audit_seal_interval_s, vault.auditor.seal, stop, "audit-seal", seal_lag)
            )
        # The retention sweeper runs on the loop: it uses the data path's pool, which belongs to it.
        retention = None
        if settings.retention_sweep_interval_s > 0:
            sweep_expired = partial(vault.retention.sweep, RequestContext(request_id="retention-sweep"))
            retention = asyncio.create_task(
                _every_on_loop(
                    settings.retention_sweep_interval_s,
                    sweep_expired,
                    "retention-sweep",
                    partial(metrics.sweeper_ran, "retention"),
                )
            )
        # Repeated failed authentications, counted in memory, are written as one event each
        # when their window ends; checked every second (a scan of a small table).
        flush = vault.principals.flush_failed_authentications
        background.append(_every(1.0, flush, stop, "auth-failure-flush"))
        try:
            yield
        finally:
            stop.set()
            unwatch()
            if retention is not None:
                retention.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await retention
            for thread in background:
                thread.join(timeout=5)
            with contextlib.suppress(VaultError):
                flush(everything=True)
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
        openapi_url=OPENAPI_PATH if settings.serves_docs else None,
        # FastAPI's own OpenTelemetry spans off: they record url.path, and tokens are in paths (the
        # vault's metrics and logs name route templates only). Off, no request asks the
        # environment for a provider either.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    openapi.install(app)
    app.state.vault = vault
    app.state.readiness = ops.Readiness(settings.ready_cache_s)

    async def docs(request: Request) -> HTMLResponse:
        root_path = request.scope.get("root_path", "").rstrip("/")
        assets = f"{root_path}{DOCS_ASSETS_PATH}"
        page = get_swagger_ui_html(
            openapi_url=f"{root_path}{OPENAPI_PATH}",
            title="pii-vault - Swagger UI",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon-32x32.png",
            # No badge fetched from Swagger's online validator.
            swagger_ui_parameters={"validatorUrl": None},
        )
        page.headers["Content-Security-Policy"] = docs_csp(bytes(page.body))
        return page

    if settings.serves_docs:
        app.add_route(DOCS_PATH, docs, include_in_schema=False)
    app.add_middleware(
        VaultMiddleware,
        max_body_bytes=settings.max_body_bytes,
        own_csp_paths=frozenset({DOCS_PATH}),
        csp_by_prefix=(("/console", console.CONSOLE_CSP),),
    )
    errors.install(app)
    # The data path first: routes are matched in order, and it carries nearly all the traffic.
    for router in (
        tokens.router,
        principals.router,
        grants.router,
        approvals.router,
        data_types.router,
        data_types.limits_router,
        customers.router,
        audit.router,
        keys.router,
        ops.router,
    ):
        app.include_router(router)
    app.include_router(console.router)
    app.mount("/console/static", StaticFiles(directory=console.ASSETS / "static"), name="console-static")
    app.add_exception_handler(console.SignInRequired, _to_sign_in)
    if settings.serves_docs:  # last: a mount is matched by prefix, before the routes after it
        app.mount(DOCS_ASSETS_PATH, StaticFiles(directory=DOCS_ASSETS_DIR), name="docs-assets")
    return app


async def _to_sign_in(request: Request, exc: Exception) -> Response:
    return RedirectResponse("/console/sign-in", status_code=303)
