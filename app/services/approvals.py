"""Dual control (four eyes): requests that wait for a second admin, and the one queue of them.

ApprovalQueue opens requests; the grant and principal services use it when a change needs a
second admin (app.access says which). ApprovalService lists them and carries out, rejects or
expires them; it uses no HTTP, so the API and a console can both drive it. Every request,
approval, rejection and expiry is an audit event in the same transaction as the change; a
refused approval is a denied event of its own."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from app.access import (
    ADMINS,
    APPROVAL_KINDS,
    APPROVAL_STATES,
    ApprovalKind,
    KeyIssuers,
    Role,
    approval_refusal,
)
from app.db.models import Approval, Grant
from app.db.repositories import ApiKeyRepository, ApprovalRepository, GrantRepository
from app.db.session import Database
from app.errors import (
    InvalidInput,
    KeyIssuerConflict,
    NotFound,
    NotPending,
    SecondAdminRequired,
)
from app.services.audit import Auditor, Subject, build_event
from app.services.context import Caller, RequestContext, utcnow

if TYPE_CHECKING:  # they import ApprovalQueue from here
    from app.services.grants import GrantService
    from app.services.principals import IssuedKey, PrincipalService

# The audit actions of the queue.
REQUEST = "RequestApproval"
APPROVE = "ApproveRequest"
REJECT = "RejectRequest"
EXPIRE = "ExpireRequest"


def _subject(approval: Approval) -> Subject:
    grant_id = uuid.UUID(approval.target_id) if approval.kind == "grant" and approval.target_id else None
    return Subject(grant_id=grant_id, target_id=str(approval.id))


class ApprovalQueue:
    """Opens four-eyes requests. `enabled` is PIIVAULT_DUAL_CONTROL in effect."""

    def __init__(self, auditor: Auditor, *, enabled: bool, ttl: timedelta) -> None:
        self._auditor = auditor
        self.enabled = enabled
        self.ttl = ttl

    def open(
        self,
        session: Session,
        requester: Caller,
        kind: ApprovalKind,
        target_id: str | None,
        details: dict[str, Any],
        ctx: RequestContext,
    ) -> Approval:
        approval = ApprovalRepository(session).add(
            Approval(
                id=uuid.uuid4(),
                kind=kind,
                status="pending",
                requested_by=requester.id,
                target_id=target_id,
                details=details,
                expires_at=utcnow() + self.ttl,
            )
        )
        self._auditor.record(session, [build_event(REQUEST, "allowed", ctx, requester, _subject(approval))])
        return approval


@dataclass(frozen=True, slots=True)
class Approved:
    """An approved request; for create_admin, the new admin's first key (shown to the approver
    once, and issued by it: the new admin cannot approve the approver's requests until it has
    minted its own key and revoked this one)."""

    approval: Approval
    issued_key: IssuedKey | None = None


class ApprovalService:
    def __init__(
        self,
        database: Database,
        auditor: Auditor,
        queue: ApprovalQueue,
        principals: PrincipalService,
        grants: GrantService,
    ) -> None:
        self._database = database
        self._auditor = auditor
        self._queue = queue
        self._principals = principals
        self._grants = grants

    @property
    def enabled(self) -> bool:
        return self._queue.enabled

    def list(
        self,
        session: Session,
        *,
        status: str | None = None,
        kind: str | None = None,
        after: tuple[datetime, uuid.UUID] | None = None,
        limit: int | None = None,
    ) -> Sequence[Approval]:
        """Requests, oldest first; `status` is the effective one (a lapsed request is expired)."""
        if status is not None and status not in APPROVAL_STATES:
            raise InvalidInput(f"status must be one of {', '.join(APPROVAL_STATES)}", field="status")
        if kind is not None and kind not in APPROVAL_KINDS:
            raise InvalidInput(f"kind must be one of {', '.join(APPROVAL_KINDS)}", field="kind")
        return ApprovalRepository(session).list(
            now=utcnow(), status=status, kind=kind, after=after, limit=limit
        )

    def get(self, session: Session, approval_id: uuid.UUID) -> Approval:
        approval = ApprovalRepository(session).get(approval_id)
        if approval is None:
            raise NotFound("no approval request with this id", field="id")
        return approval

    def approve(
        self, session: Session, approver: Caller, approval_id: uuid.UUID, ctx: RequestContext
    ) -> Approved:
        """Carry out a pending request as a second admin would: refused to its requester
        (second_admin_required) and while a party holds a key the other admin issued
        (key_issuer_conflict); 409 not_pending once decided or expired."""
        self._principals.require_role(approver, ADMINS, APPROVE, ctx)  # may_decide_approvals
        approval = self.get(session, approval_id)
        # The grant's row is locked before the request's (ApprovalRepository.lock).
        grant = self._grant_of(session, approval) if approval.kind == "grant" else None
        self._still_pending(session, approver, approval, APPROVE, ctx)
        keys = ApiKeyRepository(session)
        issuers = KeyIssuers(
            requester=keys.valid_key_issuers(approval.requested_by),
            approver=keys.valid_key_issuers(approver.id),
            grantee=keys.valid_key_issuers(grant.grantee_id) if grant is not None else (),
        )
        refusal = approval_refusal(approver.id, approval.requested_by, issuers)
        if refusal is not None:
            self._refuse(approver, approval, APPROVE, refusal, ctx)
            raise SecondAdminRequired() if refusal == "second_admin_required" else KeyIssuerConflict()
        issued = None
        if grant is not None:
            self._grants.activate(session, approver, grant, ctx)
        elif approval.kind == "create_admin":
            principal, issued = self._principals.create_approved(
                session, approver, str(approval.details["name"]), Role.ADMIN, ctx
            )
            approval.target_id = str(principal.id)
        elif approval.kind == "disable_admin":
            self._principals.disable_approved(session, approver, uuid.UUID(str(approval.target_id)), ctx)
        else:  # revoke_admin_key
            self._principals.revoke_key_approved(
                session,
                approver,
                uuid.UUID(str(approval.details["principal_id"])),
                str(approval.target_id),
                ctx,
            )
        self._decide(session, approver, approval, "approved", APPROVE, ctx)
        return Approved(approval, issued)

    def reject(
        self, session: Session, actor: Caller, approval_id: uuid.UUID, ctx: RequestContext
    ) -> Approval:
        """Any admin may reject a pending request, its requester too (withdrawing it)."""
        self._principals.require_role(actor, ADMINS, REJECT, ctx)
        approval = self.get(session, approval_id)
        self._still_pending(session, actor, approval, REJECT, ctx)
        self._decide(session, actor, approval, "rejected", REJECT, ctx)
        return approval

    def approve_grant(
        self, session: Session, approver: Caller, grant_id: uuid.UUID, ctx: RequestContext
    ) -> Grant:
        grant = self._grant_request(session, grant_id)
        self.approve(session, approver, grant.approval_id, ctx)  # type: ignore[arg-type]
        return grant

    def reject_grant(
        self, session: Session, actor: Caller, grant_id: uuid.UUID, ctx: RequestContext
    ) -> Grant:
        grant = self._grant_request(session, grant_id)
        self.reject(session, actor, grant.approval_id, ctx)  # type: ignore[arg-type]
        return grant

    def sweep(self, ctx: RequestContext, limit: int = 100) -> int:
        """Record the expiry of requests whose deadline passed (each once, one replica each);
        returns how many. They were expired already: nothing approves a lapsed request."""
        with self._database.transaction() as session:
            now = utcnow()
            lapsed = ApprovalRepository(session).lapsed(now, limit)
            for approval in lapsed:
                approval.status = "expired"
                approval.decided_at = now
            self._auditor.record(
                session, [build_event(EXPIRE, "allowed", ctx, None, _subject(a)) for a in lapsed]
            )
        return len(lapsed)

    def _grant_request(self, session: Session, grant_id: uuid.UUID) -> Grant:
        grant = GrantRepository(session).get(grant_id)
        if grant is None:
            raise NotFound("no grant with this id", field="id")
        if grant.approval_id is None:
            raise NotPending("this grant needed no approval")
        return grant

    def _grant_of(self, session: Session, approval: Approval) -> Grant:
        grant = GrantRepository(session).get(uuid.UUID(str(approval.target_id)), for_update=True)
        if grant is None:  # grants are never deleted
            raise NotFound("the request's grant no longer exists", field="id")
        return grant

    def _still_pending(
        self, session: Session, actor: Caller, approval: Approval, action: str, ctx: RequestContext
    ) -> None:
        """Lock the request; 409 not_pending (and a denied event) once it is decided or lapsed."""
        ApprovalRepository(session).lock(approval)
        if approval.status_at(utcnow()) != "pending":
            self._refuse(actor, approval, action, "not_pending", ctx)
            raise NotPending(f"the request is {approval.status_at(utcnow())}, no longer pending")

    def _refuse(
        self, actor: Caller, approval: Approval, action: str, reason: str, ctx: RequestContext
    ) -> None:
        self._auditor.record_on_its_own(
            [build_event(action, "denied", ctx, actor, _subject(approval), reason)]
        )

    def _decide(
        self,
        session: Session,
        actor: Caller,
        approval: Approval,
        status: str,
        action: str,
        ctx: RequestContext,
    ) -> None:
        approval.status = status
        approval.decided_by = actor.id
        approval.decided_at = utcnow()
        self._auditor.record(session, [build_event(action, "allowed", ctx, actor, _subject(approval))])
