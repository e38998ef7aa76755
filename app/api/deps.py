"""Every FastAPI dependency, as an Annotated alias."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from app.access import ADMINS, AUDIT_READERS
from app.container import Vault
from app.db.repositories import DataPathRepository
from app.services.context import Caller, RequestContext
from app.services.tokens import TokenService

T = TypeVar("T")
# What a data-path route runs: the token service, the connection's repository, the presented key.
DataPathOperation = Callable[[TokenService, DataPathRepository, str | None, RequestContext], Awaitable[T]]


# Dependencies without I/O are async: FastAPI runs sync ones in the thread pool, a hop each.
async def get_vault(request: Request) -> Vault:
    vault: Vault = request.app.state.vault
    return vault


VaultDep = Annotated[Vault, Depends(get_vault)]


AccessReasonHeader = Annotated[
    str | None,
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
        user_agent=(request.headers.get("user-agent") or "")[:512] or None,
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


@dataclass(frozen=True, slots=True)
class Work:
    """The data path's unit of work on one asynchronous autocommit connection: the operation
    authenticates, decides, and writes its records and events in one statement; the response is
    built only after that statement has committed.

    One dependency for the data path's routes, not several: each costs on every request. No
    thread hop either: the data path is asynchronous, a remote key service's calls included."""

    vault: Vault
    ctx: RequestContext
    presented: str | None

    async def __call__(self, operation: DataPathOperation[T]) -> T:
        async with self.vault.database.data_connection() as connection:
            return await operation(
                self.vault.tokens, DataPathRepository(connection), self.presented, self.ctx
            )


async def get_work(request: Request, access_reason: AccessReasonHeader = None) -> Work:
    return Work(request.app.state.vault, _context(request, access_reason), _bearer(request))


WorkDep = Annotated[Work, Depends(get_work)]


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
