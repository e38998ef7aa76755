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
    may_receive_grant,
    may_retire_grant,
)
from app.crypto.keys import GrantConstraints, GrantMirror
from app.db.models import Grant
from app.db.repositories import GrantRepository
from app.db.session import Database, on_rollback
from app.errors import Conflict, DependencyUnavailable, InvalidInput, Misconfigured, NotFound
from app.services.audit import Auditor, Subject, build_event
from app.services.context import Caller, Operation, RequestContext, utcnow
from app.services.data_types import DataTypeService
from app.services.principals import PrincipalService

log = logging.getLogger(__name__)


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
        data_types: DataTypeService | None = None,
    ) -> None:
        self._database = database
        self._auditor = auditor
        self._principals = principals
        self._mirror = mirror
        self._data_types = data_types

    def create(self, session: Session, actor: Caller, request: GrantRequest, ctx: RequestContext) -> Grant:
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
            )
        )
        constraints = GrantConstraints(
            subset=request.constraint_context if request.constraint_kind == SUBSET else None,
            equals=request.constraint_context if request.constraint_kind == EQUALS else None,
        )
        # A failed mirror fails the request; a mirror made before a failed commit is revoked.
        kms_grant_id = self._mirror.create_grant(
            name=f"piivault-{grant.id}", operations=grant.operations, constraints=constraints
        )
        if kms_grant_id is not None:
            grant.kms_grant_id = kms_grant_id
            on_rollback(session, lambda: self._mirror.revoke_grant(kms_grant_id))
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
        self._revoke_mirror(grant)
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
        self._revoke_mirror(grant)
        self._auditor.record(
            session, [build_event("RetireGrant", "allowed", ctx, caller, Subject(grant_id=grant.id))]
        )
        return grant

    def _revoke_mirror(self, grant: Grant) -> None:
        """Revoke the KMS mirror now if KMS answers; else the sweep retries. The vault's own
        revocation never waits on KMS: it is effective at commit."""
        if grant.kms_grant_id is None:
            return
        try:
            self._mirror.revoke_grant(grant.kms_grant_id)
        except (DependencyUnavailable, Misconfigured):
            log.warning("KMS mirror of grant %s not revoked yet; the sweep will retry", grant.id)
            return
        grant.kms_revoked_at = utcnow()

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
                self._revoke_mirror(grant)
                revoked += grant.kms_revoked_at is not None
        return revoked
