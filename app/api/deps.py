"""Every FastAPI dependency, as an Annotated alias."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session

from app.access import ADMINS, AUDIT_READERS
from app.api.idempotency import IDEMPOTENCY_KEY_PARAMETER, KeyedRoute, keyed_route
from app.api.schemas import Text
from app.container import Vault
from app.errors import InvalidInput
from app.services.context import Caller, RequestContext
from app.services.idempotency import HEADER
from app.services.tokens import TokenService


# Dependencies without I/O are async: FastAPI runs sync ones in the thread pool, a hop each.
async def get_vault(request: Request) -> Vault:
    vault: Vault = request.app.state.vault
    return vault


VaultDep = Annotated[Vault, Depends(get_vault)]


ACCESS_REASON_HEADER = "X-Access-Reason"
_ACCESS_REASON_MAX = 512
_ACCESS_REASON_DESCRIPTION = "Why the caller needs the value; recorded in the audit event."
AccessReasonHeader = Annotated[
    Text | None,
    Header(alias=ACCESS_REASON_HEADER, max_length=_ACCESS_REASON_MAX, description=_ACCESS_REASON_DESCRIPTION),
]
# The same parameter as FastAPI documents AccessReasonHeader, for the data path's routes, which
# read the header by hand (get_data_call).
ACCESS_REASON_PARAMETER = {
    "name": ACCESS_REASON_HEADER,
    "in": "header",
    "required": False,
    "schema": {
        "anyOf": [{"type": "string", "maxLength": _ACCESS_REASON_MAX}, {"type": "null"}],
        "description": _ACCESS_REASON_DESCRIPTION,
        "title": ACCESS_REASON_HEADER,
    },
    "description": _ACCESS_REASON_DESCRIPTION,
}


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


@dataclass(frozen=True, slots=True)
class DataCall:
    """What a data-path route hands the token service: the bearer key as presented (the service
    authenticates it in its own query) and the request's context. One dependency, not three:
    each costs on every request of the hot path."""

    tokens: TokenService
    presented: str | None
    ctx: RequestContext
    # The Idempotency-Key, on the routes that take one (tokenize).
    keyed: KeyedRoute | None = None


# The data path's headers are read by hand rather than declared as Header parameters, which
# FastAPI validates on every request at a cost the hot path feels (counted by bench/instructions.py).
# Each is checked as its declared form would be, and documented as it would be (HAND_READ).


def _access_reason(request: Request) -> str | None:
    """X-Access-Reason as AccessReasonHeader takes it: at most 512 characters, no NUL."""
    reason = request.headers.get(ACCESS_REASON_HEADER)
    if reason is None:
        return None
    field = f"header.{ACCESS_REASON_HEADER}"
    if len(reason) > _ACCESS_REASON_MAX:
        message = f"{field}: String should have at most {_ACCESS_REASON_MAX} characters"
        raise InvalidInput(message, field=field)
    if "\x00" in reason:
        raise InvalidInput(f"{field}: Value error, must not contain a NUL character", field=field)
    return reason


async def get_data_call(request: Request) -> DataCall:
    context = _context(request, _access_reason(request))
    return DataCall(request.app.state.vault.tokens, _bearer(request), context)


DataCallDep = Annotated[DataCall, Depends(get_data_call)]


async def get_keyed_data_call(request: Request) -> DataCall:
    """get_data_call, and the Idempotency-Key (still one dependency: the hot path pays per one)."""
    context = _context(request, _access_reason(request))
    keyed = keyed_route(request, request.headers.get(HEADER))
    return DataCall(request.app.state.vault.tokens, _bearer(request), context, keyed)


KeyedDataCallDep = Annotated[DataCall, Depends(get_keyed_data_call)]

# The headers each hand-reading dependency takes, for the OpenAPI document (openapi.py).
HAND_READ: dict[Callable[..., object], tuple[dict[str, Any], ...]] = {
    get_data_call: (ACCESS_REASON_PARAMETER,),
    get_keyed_data_call: (ACCESS_REASON_PARAMETER, IDEMPOTENCY_KEY_PARAMETER),
}


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


def _query_names(dependant: Dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


async def reject_unknown_query(request: Request) -> None:
    """Refuse a query parameter the endpoint does not declare: a misspelt filter (`?grante=`) would
    otherwise be ignored, and the caller would take the whole list for the filtered one."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    declared = _query_names(route.dependant)
    unknown = next((name for name in request.query_params if name not in declared), None)
    if unknown is not None:
        name = unknown[:64]
        takes = ", ".join(sorted(declared)) or "none"
        raise InvalidInput(f"unknown query parameter {name!r}; this endpoint takes: {takes}", field=name)


# Put after the caller's dependency, so that a stranger is refused (and audited) first.
KnownQueryOnly = Annotated[None, Depends(reject_unknown_query)]
