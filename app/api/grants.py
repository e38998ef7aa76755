"""Grants (admin only, except retire, which is the grantee's)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, status

from app.access import EQUALS, SUBSET
from app.api.deps import AdminDep, CallerDep, ContextDep, KnownQueryOnly, SessionDep, VaultDep
from app.api.idempotency import IDEMPOTENCY_409, REPLAYED_HEADER, IdempotencyDep, run_idempotent
from app.api.openapi import AUTHENTICATED, documented
from app.api.paging import CursorParam, Limit, decode_cursor, split_page
from app.api.schemas import GrantCreate, GrantList, GrantOut, Text
from app.db.models import Grant
from app.services.context import utcnow
from app.services.grants import GrantRequest

CURSOR_KIND = "g"

router = APIRouter(prefix="/v1/grants", tags=["grants"])


def grant_out(grant: Grant) -> GrantOut:
    now = utcnow()
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
        active=grant.active_at(now),
        status=grant.status_at(now),
        approval_id=grant.approval_id,
        approved_by=grant.approved_by,
        approved_at=grant.approved_at,
        kms_grant_id=grant.kms_grant_id,
        reveal=grant.reveal,
    )


def grant_request(body: GrantCreate) -> GrantRequest:
    """A validated body as the grant service takes it (the console builds the same body)."""
    kind: str | None = None
    context: dict[str, str] | None = None
    if body.constraints is not None:
        if body.constraints.encryption_context_subset is not None:
            kind, pairs = SUBSET, body.constraints.encryption_context_subset
        else:
            kind, pairs = EQUALS, body.constraints.encryption_context_equals or {}
        context = {str(key): value for key, value in pairs.items()}
    return GrantRequest(
        grantee=body.grantee,
        operations=list(body.operations),
        constraint_kind=kind,
        constraint_context=context,
        expires_at=body.expires_at,
        name=body.name,
        reveal=body.reveal,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    name="CreateGrant",
    **documented(
        "createGrant",
        "Grant a service principal Encrypt, Decrypt and/or Erase",
        errors=(*AUTHENTICATED, 409, 413),
        descriptions=IDEMPOTENCY_409,
        status=201,
        headers=REPLAYED_HEADER,
    ),
)
def create_grant(
    body: GrantCreate,
    vault: VaultDep,
    session: SessionDep,
    admin: AdminDep,
    ctx: ContextDep,
    keyed: IdempotencyDep,
) -> GrantOut:
    """Allow a service principal to Encrypt (tokenize) and/or Decrypt (detokenize) records whose
    encryption context matches the constraints. Mirrored as a KMS grant when mirroring is on.
    Under dual control a Decrypt grant is created `pending`: it matches nothing (and has no KMS
    mirror) until a second admin approves it (POST /v1/grants/{id}/approve)."""
    request = grant_request(body)

    def create() -> GrantOut:
        grant = vault.grants.create(session, admin, request, ctx)
        session.flush()
        session.refresh(grant)
        return grant_out(grant)

    # With an Idempotency-Key, a retry gets this grant again: no second grant, no second KMS mirror.
    return run_idempotent(vault, session, admin, keyed, body, status.HTTP_201_CREATED, create)


@router.get("", name="ListGrants", **documented("listGrants", "List grants", errors=AUTHENTICATED))
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


@router.get(
    "/{grant_id}", name="GetGrant", **documented("getGrant", "Get a grant", errors=(*AUTHENTICATED, 404))
)
def get_grant(grant_id: uuid.UUID, vault: VaultDep, session: SessionDep, admin: AdminDep) -> GrantOut:
    return grant_out(vault.grants.get(session, grant_id))


@router.delete(
    "/{grant_id}",
    name="RevokeGrant",
    **documented("revokeGrant", "Revoke a grant", errors=(*AUTHENTICATED, 404, 409)),
)
def revoke_grant(
    grant_id: uuid.UUID, vault: VaultDep, session: SessionDep, admin: AdminDep, ctx: ContextDep
) -> GrantOut:
    """Revoke a grant: effective at once for every replica."""
    return grant_out(vault.grants.revoke(session, admin, grant_id, ctx))


@router.post(
    "/{grant_id}/retire",
    name="RetireGrant",
    **documented("retireGrant", "Give up a grant one holds", errors=(*AUTHENTICATED, 404, 409)),
)
def retire_grant(
    grant_id: uuid.UUID, vault: VaultDep, session: SessionDep, caller: CallerDep, ctx: ContextDep
) -> GrantOut:
    """The grantee gives up its own grant."""
    return grant_out(vault.grants.retire(session, caller, grant_id, ctx))


@router.post(
    "/{grant_id}/approve",
    name="ApproveGrant",
    **documented(
        "approveGrant",
        "Approve a pending grant (a second admin)",
        errors=(*AUTHENTICATED, 404, 409),
        descriptions={409: "The grant's request is no longer pending (not_pending)."},
    ),
)
def approve_grant(
    grant_id: uuid.UUID, vault: VaultDep, session: SessionDep, admin: AdminDep, ctx: ContextDep
) -> GrantOut:
    """A second admin approves a pending grant: it is mirrored and active from now on. 403
    second_admin_required for its requester, key_issuer_conflict while the grantee holds a key
    the requester or the approver issued; 409 not_pending once decided or expired."""
    grant = vault.approvals.approve_grant(session, admin, grant_id, ctx)
    session.flush()
    session.refresh(grant)
    return grant_out(grant)


@router.post(
    "/{grant_id}/reject",
    name="RejectGrant",
    **documented(
        "rejectGrant",
        "Reject a pending grant",
        errors=(*AUTHENTICATED, 404, 409),
        descriptions={409: "The grant's request is no longer pending (not_pending)."},
    ),
)
def reject_grant(
    grant_id: uuid.UUID, vault: VaultDep, session: SessionDep, admin: AdminDep, ctx: ContextDep
) -> GrantOut:
    """Reject a pending grant (any admin, its requester too): it never becomes active."""
    grant = vault.approvals.reject_grant(session, admin, grant_id, ctx)
    session.flush()
    session.refresh(grant)
    return grant_out(grant)
