"""The FastAPI application."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api import audit, errors, grants, ops, principals, tokens
from app.api.middleware import VaultMiddleware
from app.container import Vault, build_vault
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


def _sweep_grants(vault: Vault, stop: threading.Event) -> None:
    interval = vault.settings.grant_sweep_interval_s
    ctx = RequestContext(request_id="grant-sweep")
    while not stop.wait(interval):
        try:
            vault.grants.sweep(ctx)
        except Exception as err:  # the sweep retries next round; it must never kill the process
            log.warning("grant sweep failed: %s", type(err).__name__)


def create_app(vault: Vault | None = None, settings: Settings | None = None) -> FastAPI:
    settings = vault.settings if vault else (settings or get_settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = app.state.vault is None
        if owned:
            app.state.vault = build_vault(settings)
        stop = threading.Event()
        sweeper = None
        if settings.grant_sweep_interval_s > 0:
            sweeper = threading.Thread(
                target=_sweep_grants, args=(app.state.vault, stop), name="grant-sweep", daemon=True
            )
            sweeper.start()
        try:
            yield
        finally:
            stop.set()
            if sweeper:
                sweeper.join(timeout=5)
            if owned:
                app.state.vault.close()

    app = FastAPI(
        title="pii-vault",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.vault = vault
    app.add_middleware(VaultMiddleware, max_body_bytes=settings.max_body_bytes)
    errors.install(app)
    for router in (principals.router, grants.router, tokens.router, audit.router, ops.router):
        app.include_router(router)
    return app
