"""Grants (admin only, except retire, which is the grantee's)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, status

from app.access import EQUALS, SUBSET
from app.api.deps import AdminDep, CallerDep, ContextDep, KnownQueryOnly, SessionDep, VaultDep
from app.api.paging import CursorParam, Limit, decode_cursor, split_page
from app.api.schemas import ErrorResponse, GrantCreate, GrantList, GrantOut, Text
from app.db.models import Grant
from app.services.context import utcnow
from app.services.grants import GrantRequest

CURSOR_KIND = "g"

router = APIRouter(
    prefix="/v1/grants",
    tags=["grants"],
    responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}},
)


def grant_out(grant: Grant) -> GrantOut:
    constraints = (
        {grant.constraint_kind: dict(grant.constraint_context or {})} if grant.constraint_kind else None
    )
    return GrantOut(
        id=grant.id,
        name=grant.name,
        grantee=grant.grantee_id,
        operations=grant.operations,
        constraints=constraints,
        expires_at=grant.expires_at,
        created_at=grant.created_at,
        revoked_at=grant.revoked_at,
        retired_at=grant.retired_at,
        active=grant.active_at(utcnow()),
        kms_grant_id=grant.kms_grant_id,
        reveal=grant.reveal,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    name="CreateGrant",
    responses={422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
def create_grant(
    body: GrantCreate, vault: VaultDep, session: SessionDep, admin: AdminDep, ctx: ContextDep
) -> GrantOut:
    """Allow a service principal to Encrypt (tokenize) and/or Decrypt (detokenize) records whose
    encryption context matches the constraints. Mirrored as a KMS grant when mirroring is on."""
    kind: str | None = None
    context: dict[str, str] | None = None
    if body.constraints is not None:
        if body.constraints.encryption_context_subset is not None:
            kind, pairs = SUBSET, body.constraints.encryption_context_subset
        else:
            kind, pairs = EQUALS, body.constraints.encryption_context_equals or {}
        context = {str(key): value for key, value in pairs.items()}
    request = GrantRequest(
        grantee=body.grantee,
        operations=list(body.operations),
        constraint_kind=kind,
        constraint_context=context,
        expires_at=body.expires_at,
        name=body.name,
        reveal=body.reveal,
    )
    grant = vault.grants.create(session, admin, request, ctx)
    session.flush()
    session.refresh(grant)
    return grant_out(grant)


@router.get("", name="ListGrants", responses={422: {"model": ErrorResponse}})
def list_grants(
    vault: VaultDep,
    session: SessionDep,
    admin: AdminDep,
    _known: KnownQueryOnly,
    grantee: Annotated[Text | None, Query(description="A principal's id or name.", max_length=128)] = None,
    active: bool | None = None,
    cursor: CursorParam = None,
    limit: Limit = 100,
) -> GrantList:
    """Grants, oldest first, a page at a time (follow `next_cursor`); the filters hold on every page."""
    after = decode_cursor(CURSOR_KIND, cursor)
    rows = vault.grants.list(session, grantee, active, after=after, limit=limit + 1)
    page, next_cursor = split_page(CURSOR_KIND, rows, limit)
    return GrantList(grants=[grant_out(g) for g in page], next_cursor=next_cursor)


@router.get("/{grant_id}", name="GetGrant", responses={404: {"model": ErrorResponse}})
def get_grant(grant_id: uuid.UUID, vault: VaultDep, session: SessionDep, admin: AdminDep) -> GrantOut:
    return grant_out(vault.grants.get(session, grant_id))


@router.delete("/{grant_id}", name="RevokeGrant", responses={404: {"model": ErrorResponse}})
def revoke_grant(
    grant_id: uuid.UUID, vault: VaultDep, session: SessionDep, admin: AdminDep, ctx: ContextDep
) -> GrantOut:
    """Revoke a grant: effective at once for every replica."""
    return grant_out(vault.grants.revoke(session, admin, grant_id, ctx))


@router.post("/{grant_id}/retire", name="RetireGrant", responses={404: {"model": ErrorResponse}})
def retire_grant(
    grant_id: uuid.UUID, vault: VaultDep, session: SessionDep, caller: CallerDep, ctx: ContextDep
) -> GrantOut:
    """The grantee gives up its own grant."""
    return grant_out(vault.grants.retire(session, caller, grant_id, ctx))
