"""Every FastAPI dependency, as an Annotated alias."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from app.access import ADMINS, AUDIT_READERS
from app.api.schemas import Text
from app.container import Vault
from app.services.context import Caller, RequestContext
from app.services.tokens import TokenService


# Dependencies without I/O are async: FastAPI runs sync ones in the thread pool, a hop each.
async def get_vault(request: Request) -> Vault:
    vault: Vault = request.app.state.vault
    return vault


VaultDep = Annotated[Vault, Depends(get_vault)]


AccessReasonHeader = Annotated[
    Text | None,
    Header(
        alias="X-Access-Reason",
        max_length=512,
        description="Why the caller needs the value; recorded in the audit event.",
    ),
]


def _context(request: Request, access_reason: str | None) -> RequestContext:
    return RequestContext(
        request_id=request.state.request_id,
        source_ip=request.client.host if request.client else None,
        # (PostgreSQL text cannot hold NUL; no HTTP server passes one on, but an ASGI caller could.)
        user_agent=(request.headers.get("user-agent") or "")[:512].replace("\x00", "") or None,
        access_reason=access_reason,
    )


async def get_request_context(request: Request, access_reason: AccessReasonHeader = None) -> RequestContext:
    return _context(request, access_reason)


ContextDep = Annotated[RequestContext, Depends(get_request_context)]


def get_session(vault: VaultDep) -> Iterator[Session]:
    # scope="function": the transaction commits before the response is sent, so a token or a
    # value is returned only once its record and audit event are committed.
    with vault.database.transaction() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def _bearer(request: Request) -> str | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else None


def get_caller(vault: VaultDep, session: SessionDep, ctx: ContextDep, request: Request) -> Caller:
    return vault.principals.authenticate(session, _bearer(request), ctx)


CallerDep = Annotated[Caller, Depends(get_caller)]


async def get_tokens(request: Request) -> TokenService:
    tokens: TokenService = request.app.state.vault.tokens
    return tokens


TokensDep = Annotated[TokenService, Depends(get_tokens)]


async def get_presented_key(request: Request) -> str | None:
    """The bearer key as presented; the data path's service authenticates it in its own query."""
    return _bearer(request)


PresentedKeyDep = Annotated[str | None, Depends(get_presented_key)]


def require_admin(vault: VaultDep, caller: CallerDep, ctx: ContextDep, request: Request) -> Caller:
    vault.principals.require_role(caller, ADMINS, _action(request), ctx)
    return caller


def require_auditor(vault: VaultDep, caller: CallerDep, ctx: ContextDep, request: Request) -> Caller:
    vault.principals.require_role(caller, AUDIT_READERS, _action(request), ctx)
    return caller


def _action(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "name", None) or request.url.path


AdminDep = Annotated[Caller, Depends(require_admin)]
AuditorDep = Annotated[Caller, Depends(require_auditor)]
