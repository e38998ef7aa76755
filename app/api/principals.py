"""Principals and their API keys (admin only)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Path, status

from app.api.deps import AdminDep, CallerDep, ContextDep, KnownQueryOnly, SessionDep, VaultDep
from app.api.idempotency import IdempotencyDep, run_idempotent
from app.api.paging import CursorParam, Limit, decode_cursor, split_page
from app.api.schemas import (
    ApiKeyCreated,
    ApiKeyOut,
    ErrorResponse,
    PrincipalCreate,
    PrincipalCreated,
    PrincipalList,
    PrincipalOut,
    Text,
)
from app.db.models import ApiKey, Principal

CURSOR_KIND = "p"

router = APIRouter(
    prefix="/v1/principals",
    tags=["principals"],
    responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}},
)


def principal_out(principal: Principal, keys: Sequence[ApiKey] = ()) -> PrincipalOut:
    return PrincipalOut(
        id=principal.id,
        name=principal.name,
        role=principal.role,
        created_at=principal.created_at,
        disabled_at=principal.disabled_at,
        keys=[ApiKeyOut(key_id=k.id, created_at=k.created_at, revoked_at=k.revoked_at) for k in keys],
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    name="CreatePrincipal",
    responses={409: {"model": ErrorResponse, "description": "the name is taken"}},
)
def create_principal(
    body: PrincipalCreate,
    vault: VaultDep,
    session: SessionDep,
    admin: AdminDep,
    ctx: ContextDep,
    keyed: IdempotencyDep,
) -> PrincipalCreated:
    """Register a caller. Its API key is in this response only; it is stored hashed. With an
    Idempotency-Key, a retry gets the principal again with `"api_key": null` (the key was shown
    once; mint another with POST /v1/principals/{id}/keys)."""

    def create() -> PrincipalCreated:
        principal, issued = vault.principals.create(session, admin, body.name, body.role, ctx)
        keys = vault.principals.keys_of(session, principal.id)
        out = principal_out(principal, keys)
        return PrincipalCreated(**out.model_dump(), key_id=issued.key_id, api_key=issued.secret_key)

    # The stored answer never holds the API key.
    return run_idempotent(
        vault, session, admin, keyed, body, status.HTTP_201_CREATED, create,
        stored=lambda created: created.model_copy(update={"api_key": None}),
    )  # fmt: skip


@router.get("", name="ListPrincipals", responses={422: {"model": ErrorResponse}})
def list_principals(
    vault: VaultDep,
    session: SessionDep,
    admin: AdminDep,
    _known: KnownQueryOnly,
    cursor: CursorParam = None,
    limit: Limit = 100,
) -> PrincipalList:
    """Principals, oldest first, a page at a time (follow `next_cursor`)."""
    after = decode_cursor(CURSOR_KIND, cursor)
    rows = vault.principals.list(session, after=after, limit=limit + 1)
    page, next_cursor = split_page(CURSOR_KIND, rows, limit)
    return PrincipalList(principals=[principal_out(p) for p in page], next_cursor=next_cursor)


@router.get("/{principal_id}", name="GetPrincipal", responses={404: {"model": ErrorResponse}})
def get_principal(
    principal_id: uuid.UUID, vault: VaultDep, session: SessionDep, admin: AdminDep
) -> PrincipalOut:
    principal = vault.principals.get(session, principal_id)
    return principal_out(principal, vault.principals.keys_of(session, principal.id))


@router.post(
    "/{principal_id}/keys",
    status_code=status.HTTP_201_CREATED,
    name="CreateApiKey",
    responses={404: {"model": ErrorResponse}},
)
def create_key(
    principal_id: uuid.UUID, vault: VaultDep, session: SessionDep, caller: CallerDep, ctx: ContextDep
) -> ApiKeyCreated:
    """Issue another key (rotation): both work until the old one is deleted. A principal rotates
    its own keys; an admin may issue keys only to principals that hold no grants and are not
    admins (separation of duties)."""
    issued = vault.principals.add_key(session, caller, principal_id, ctx)
    return ApiKeyCreated(key_id=issued.key_id, api_key=issued.secret_key)


@router.delete(
    "/{principal_id}/keys/{key_id}", name="RevokeApiKey", responses={404: {"model": ErrorResponse}}
)
def revoke_key(
    principal_id: uuid.UUID,
    key_id: Annotated[Text, Path(max_length=64)],
    vault: VaultDep,
    session: SessionDep,
    caller: CallerDep,
    ctx: ContextDep,
) -> ApiKeyOut:
    """Revoke a key (an admin, or the principal itself): it stops working at once."""
    key = vault.principals.revoke_key(session, caller, principal_id, key_id, ctx)
    return ApiKeyOut(key_id=key.id, created_at=key.created_at, revoked_at=key.revoked_at)


@router.delete("/{principal_id}", name="DisablePrincipal", responses={404: {"model": ErrorResponse}})
def disable_principal(
    principal_id: uuid.UUID, vault: VaultDep, session: SessionDep, admin: AdminDep, ctx: ContextDep
) -> PrincipalOut:
    """Disable a principal: every key of it stops working at once."""
    principal = vault.principals.disable(session, admin, principal_id, ctx)
    return principal_out(principal, vault.principals.keys_of(session, principal.id))
