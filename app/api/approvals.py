"""The four-eyes queue (admin only): every request waiting for a second admin."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from app.access import ApprovalKind, ApprovalState
from app.api.deps import AdminDep, ContextDep, KnownQueryOnly, SessionDep, VaultDep
from app.api.openapi import AUTHENTICATED, documented
from app.api.paging import CursorParam, Limit, decode_cursor, split_page
from app.api.schemas import ApprovalDecided, ApprovalList, ApprovalOut
from app.db.models import Approval
from app.services.context import utcnow

CURSOR_KIND = "a"

router = APIRouter(prefix="/v1/approvals", tags=["approvals"])
_NOT_PENDING = {409: "The request is no longer pending (not_pending)."}


def approval_out(approval: Approval) -> ApprovalOut:
    return ApprovalOut(
        id=approval.id,
        kind=approval.kind,  # checked by the table's constraint
        status=approval.status_at(utcnow()),
        requester=approval.requested_by,
        target=approval.target_id,
        details=approval.details,
        created_at=approval.created_at,
        expires_at=approval.expires_at,
        decided_by=approval.decided_by,
        decided_at=approval.decided_at,
    )


@router.get(
    "", name="ListApprovals", **documented("listApprovals", "The four-eyes queue", errors=AUTHENTICATED)
)
def list_approvals(
    vault: VaultDep,
    session: SessionDep,
    admin: AdminDep,
    _known: KnownQueryOnly,
    status: Annotated[ApprovalState | None, Query(description="e.g. pending: the queue.")] = None,
    kind: ApprovalKind | None = None,
    cursor: CursorParam = None,
    limit: Limit = 100,
) -> ApprovalList:
    """Four-eyes requests, oldest first, a page at a time (follow `next_cursor`)."""
    after = decode_cursor(CURSOR_KIND, cursor)
    rows = vault.approvals.list(session, status=status, kind=kind, after=after, limit=limit + 1)
    page, next_cursor = split_page(CURSOR_KIND, rows, limit)
    return ApprovalList(approvals=[approval_out(a) for a in page], next_cursor=next_cursor)


@router.get(
    "/{approval_id}",
    name="GetApproval",
    **documented("getApproval", "Get a four-eyes request", errors=(*AUTHENTICATED, 404)),
)
def get_approval(
    approval_id: uuid.UUID, vault: VaultDep, session: SessionDep, admin: AdminDep
) -> ApprovalOut:
    return approval_out(vault.approvals.get(session, approval_id))


@router.post(
    "/{approval_id}/approve",
    name="ApproveRequest",
    **documented(
        "approveRequest",
        "Approve a four-eyes request (a second admin)",
        errors=(*AUTHENTICATED, 404, 409),
        descriptions=_NOT_PENDING,
    ),
)
def approve(
    approval_id: uuid.UUID, vault: VaultDep, session: SessionDep, admin: AdminDep, ctx: ContextDep
) -> ApprovalDecided:
    """A second admin carries out the request. 403 second_admin_required for its requester,
    key_issuer_conflict while a party holds a key the other admin issued; 409 not_pending once
    decided or expired. For create_admin, the new admin's first key is in this response only."""
    approved = vault.approvals.approve(session, admin, approval_id, ctx)
    session.flush()
    out = approval_out(approved.approval).model_dump()
    key = approved.issued_key.secret_key if approved.issued_key is not None else None
    return ApprovalDecided(**out, api_key=key)


@router.post(
    "/{approval_id}/reject",
    name="RejectRequest",
    **documented(
        "rejectRequest",
        "Reject a four-eyes request",
        errors=(*AUTHENTICATED, 404, 409),
        descriptions=_NOT_PENDING,
    ),
)
def reject(
    approval_id: uuid.UUID, vault: VaultDep, session: SessionDep, admin: AdminDep, ctx: ContextDep
) -> ApprovalOut:
    """Reject a pending request (any admin, its requester too): nothing is carried out."""
    return approval_out(vault.approvals.reject(session, admin, approval_id, ctx))
