"""Grants, modelled on KMS grants, and the one place where data access is decided."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from app.access import (
    EQUALS,
    SUBSET,
    grant_needs_approval,
    may_receive_grant,
    may_retire_grant,
)
from app.crypto.keys import GrantConstraints, GrantMirror, KmsGrant
from app.db.models import Grant
from app.db.repositories import ApprovalRepository, GrantMirrorRepository, GrantRepository
from app.db.session import Database, on_rollback
from app.errors import Conflict, DependencyUnavailable, InvalidInput, Misconfigured, NotFound
from app.services.approvals import ApprovalQueue
from app.services.audit import Auditor, Subject, build_event
from app.services.context import Caller, Operation, RequestContext, utcnow
from app.services.data_types import DataTypeService
from app.services.principals import PrincipalService

log = logging.getLogger(__name__)

# A grant's KMS mirror made on another key than the current one (a rewrap's target).
MIRROR_GRANT = "MirrorGrant"


@dataclass(frozen=True, slots=True)
class GrantRequest:
    grantee: str
    operations: list[Operation]
    constraint_kind: str | None
    constraint_context: dict[str, str] | None
    expires_at: datetime | None
    name: str | None
    reveal: str = "plain"


class GrantService:
    def __init__(
        self,
        database: Database,
        auditor: Auditor,
        principals: PrincipalService,
        mirror: GrantMirror,
        queue: ApprovalQueue,
        data_types: DataTypeService | None = None,
    ) -> None:
        self._database = database
        self._auditor = auditor
        self._principals = principals
        self._mirror = mirror
        self._data_types = data_types
        self._queue = queue

    def create(self, session: Session, actor: Caller, request: GrantRequest, ctx: RequestContext) -> Grant:
        """Make a grant. Under dual control one that reads, finds or erases data is created
        pending: it matches nothing, and has no KMS mirror, until a second admin approves it
        (ApprovalService)."""
        grantee = self._principals.resolve(session, request.grantee)
        if grantee.disabled_at is not None:
            raise InvalidInput("the grantee is disabled", field="grantee")
        if not may_receive_grant(grantee.role):
            raise InvalidInput("grants can only be made to service principals", field="grantee")
        if request.expires_at is not None and request.expires_at <= utcnow():
            raise InvalidInput("expires_at must be in the future", field="expires_at")
        named_type = (request.constraint_context or {}).get("dataType")
        if named_type is not None and self._data_types is not None:
            # A grant for an unregistered type would match no record: refused, so a typo shows.
            field = f"constraints.{request.constraint_kind}.dataType"
            self._data_types.require_registered(session, [named_type], field)
        grant = GrantRepository(session).add(
            Grant(
                id=uuid.uuid4(),
                name=request.name,
                grantee_id=grantee.id,
                operations=sorted(set(request.operations)),
                constraint_kind=request.constraint_kind,
                constraint_context=request.constraint_context,
                expires_at=request.expires_at,
                created_by=actor.id,
                reveal=request.reveal,
                awaiting_approval=grant_needs_approval(request.operations, self._queue.enabled),
            )
        )
        if grant.awaiting_approval:
            details = {
                "grantee": str(grantee.id),
                "grantee_name": grantee.name,
                "operations": grant.operations,
                "constraints": {request.constraint_kind: request.constraint_context}
                if request.constraint_kind
                else None,
                "expires_at": request.expires_at.isoformat() if request.expires_at else None,
                "name": request.name,
            }
            approval = self._queue.open(session, actor, "grant", str(grant.id), details, ctx)
            grant.approval_id = approval.id
            grant.approval = approval
        else:
            self._mirror_now(session, grant)
        self._auditor.record(
            session,
            [
                build_event(
                    "CreateGrant",
                    "allowed",
                    ctx,
                    actor,
                    Subject(grant_id=grant.id, target_id=str(grantee.id)),
                )
            ],
        )
        return grant

    def activate(self, session: Session, approver: Caller, grant: Grant, ctx: RequestContext) -> None:
        """A pending grant approved by a second admin (ApprovalService checked who may): it is
        mirrored now, and matches from the commit on."""
        if not grant.awaiting_approval or grant.revoked_at is not None or grant.retired_at is not None:
            raise Conflict("the grant is not waiting for approval", field="id")
        now = utcnow()
        if grant.expires_at is not None and grant.expires_at <= now:
            raise Conflict("the grant expired before it was approved", field="id")
        grantee = self._principals.get(session, grant.grantee_id)
        if grantee.disabled_at is not None:
            raise Conflict("the grantee is disabled", field="id")
        self._mirror_now(session, grant)
        grant.awaiting_approval = False
        grant.approved_by = approver.id
        grant.approved_at = now

    def _mirror_now(self, session: Session, grant: Grant) -> None:
        made = self.mirror_on(session, grant, None)
        if made is not None:
            grant.kms_grant_id = made.grant_id  # the first mirror: the one the API shows

    def mirror_on(self, session: Session, grant: Grant, key_arn: str | None) -> KmsGrant | None:
        """Mirror the grant on `key_arn` (None: the current key), with its operations and
        constraints, and record the mirror; None if it has nothing KMS would check. A failed
        mirror fails the caller; a mirror made before a failed commit is revoked."""
        constraints = GrantConstraints(
            subset=grant.constraint_context if grant.constraint_kind == SUBSET else None,
            equals=grant.constraint_context if grant.constraint_kind == EQUALS else None,
        )
        made = self._mirror.create_grant(
            name=f"piivault-{grant.id}", operations=grant.operations, constraints=constraints, key_arn=key_arn
        )
        if made is None:
            return None
        on_rollback(session, lambda: self._mirror.revoke_grant(made.grant_id, made.key_arn))
        GrantMirrorRepository(session).add(grant.id, made.grant_id, made.key_arn)
        return made

    def mirror_active_on(self, key_arn: str, ctx: RequestContext, batch: int = 100) -> int:
        """For a rewrap to `key_arn`: mirror there every active grant that has a mirror elsewhere
        and none there yet (pending, revoked, Erase-only and unmirrored grants are left alone),
        with the same operations and constraints, each audited (MirrorGrant), a batch per
        transaction. Idempotent: run again, it finds nothing left. Returns how many were made."""
        made = 0
        while True:
            with self._database.transaction() as session:
                grants = GrantMirrorRepository(session).to_mirror_on(key_arn, utcnow(), batch)
                events = [
                    build_event(
                        MIRROR_GRANT, "allowed", ctx, None, Subject(grant_id=grant.id, target_id=key_arn)
                    )
                    for grant in grants
                    if self.mirror_on(session, grant, key_arn) is not None
                ]
                self._auditor.record(session, events)
            made += len(events)
            # (No mirror made from a full page: nothing here mirrors, so nothing more will.)
            if len(grants) < batch or not events:
                return made

    def _withdraw_request(self, session: Session, actor: Caller, grant: Grant, now: datetime) -> None:
        """A pending grant revoked or retired: its request is closed as withdrawn. (The grant's
        row is locked already: the request's comes second, as in an approval.)"""
        if grant.approval is None:
            return
        ApprovalRepository(session).lock(grant.approval)
        if grant.approval.status_at(now) == "pending":
            grant.approval.status = "withdrawn"
            grant.approval.decided_by = actor.id
            grant.approval.decided_at = now

    def get(self, session: Session, grant_id: uuid.UUID) -> Grant:
        grant = GrantRepository(session).get(grant_id)
        if grant is None:
            raise NotFound("no grant with this id", field="id")
        return grant

    def list(
        self,
        session: Session,
        grantee: str | None,
        active: bool | None,
        *,
        after: tuple[datetime, uuid.UUID] | None = None,
        limit: int | None = None,
    ) -> Sequence[Grant]:
        grantee_id = self._principals.resolve(session, grantee).id if grantee else None
        return GrantRepository(session).list(
            grantee_id=grantee_id, active=active, now=utcnow(), after=after, limit=limit
        )

    def revoke(self, session: Session, actor: Caller, grant_id: uuid.UUID, ctx: RequestContext) -> Grant:
        grant = GrantRepository(session).get(grant_id, for_update=True)
        if grant is None:
            raise NotFound("no grant with this id", field="id")
        if grant.revoked_at is not None or grant.retired_at is not None:
            raise Conflict("the grant is already revoked or retired", field="id")
        grant.revoked_at = utcnow()
        self._withdraw_request(session, actor, grant, grant.revoked_at)
        self._revoke_mirrors(session, grant)
        self._auditor.record(
            session, [build_event("RevokeGrant", "allowed", ctx, actor, Subject(grant_id=grant.id))]
        )
        return grant

    def retire(self, session: Session, caller: Caller, grant_id: uuid.UUID, ctx: RequestContext) -> Grant:
        grant = GrantRepository(session).get(grant_id, for_update=True)
        # Others learn nothing of grants not theirs: not even whether the id exists.
        if grant is None or not may_retire_grant(caller, grant.grantee_id):
            attempt = build_event(
                "RetireGrant", "denied", ctx, caller, Subject(target_id=str(grant_id)), "not_grantee"
            )
            self._auditor.record_on_its_own([attempt])
            raise NotFound("no grant with this id is held by the caller", field="id")
        if grant.revoked_at is not None or grant.retired_at is not None:
            raise Conflict("the grant is already revoked or retired", field="id")
        grant.retired_at = utcnow()
        self._withdraw_request(session, caller, grant, grant.retired_at)
        self._revoke_mirrors(session, grant)
        self._auditor.record(
            session, [build_event("RetireGrant", "allowed", ctx, caller, Subject(grant_id=grant.id))]
        )
        return grant

    def _revoke_mirrors(self, session: Session, grant: Grant) -> None:
        """Revoke every KMS mirror of the grant, each on the key that holds it, now if KMS answers;
        else the sweep retries. The vault's own revocation never waits on KMS: it is effective at
        commit. kms_revoked_at is set once none is left standing."""
        mirrors = GrantMirrorRepository(session).of(grant.id)
        if not mirrors:
            # A grant row mirrored without a grant_mirrors row (none such after migration 0011):
            # its one mirror is looked for on every allowed key.
            if grant.kms_grant_id is not None and self._revoked(grant, grant.kms_grant_id, None):
                grant.kms_revoked_at = utcnow()
            return
        for mirror in mirrors:
            if mirror.revoked_at is None and self._revoked(grant, mirror.kms_grant_id, mirror.kms_key_arn):
                mirror.revoked_at = utcnow()
        if all(mirror.revoked_at is not None for mirror in mirrors):
            grant.kms_revoked_at = utcnow()

    def _revoked(self, grant: Grant, kms_grant_id: str, key_arn: str | None) -> bool:
        try:
            self._mirror.revoke_grant(kms_grant_id, key_arn)
        except (DependencyUnavailable, Misconfigured):
            log.warning("KMS mirror of grant %s not revoked yet; the sweep will retry", grant.id)
            return False
        return True

    def sweep(self, ctx: RequestContext, limit: int = 100) -> int:
        """Record each expiry once, and revoke the KMS mirrors of grants that are no longer active
        (expired, or revoked while KMS was unreachable). Returns how many mirrors were revoked."""
        revoked = 0
        with self._database.transaction() as session:
            now = utcnow()
            repository = GrantRepository(session)
            expired = repository.expired_unaudited(now, limit)
            for grant in expired:
                grant.expiry_audited_at = now
            self._auditor.record(
                session,
                [build_event("ExpireGrant", "allowed", ctx, None, Subject(grant_id=g.id)) for g in expired],
            )
            for grant in repository.mirrors_to_revoke(now, limit):
                self._revoke_mirrors(session, grant)
                revoked += grant.kms_revoked_at is not None
        return revoked
