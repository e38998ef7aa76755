"""Grants, in the caller's ORM session."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, exists, or_, select, text, tuple_
from sqlalchemy.orm import Session

from app.db.models import Approval, Grant, KmsGrantMirror

# Revocation against work in flight: a detokenize's release holds each grant it rests on in a
# shared transaction-level advisory lock (data_path.py), a revoke or retire holds the grant's
# exclusively. So a revoke waits for the releases that already re-checked the grant, and the
# releases that come later wait for the revoke and see it. Advisory, not row, locks: they write
# nothing to the grant's row, and a waiting revoke is queued ahead of later releases rather than
# starved by a stream of overlapping ones. The key: this namespace and hashtext of the grant's id
# (a collision only makes an unrelated revoke and release wait for each other).
GRANT_LOCK_NAMESPACE = 0x67726E74
_LOCK_GRANT = text("SELECT pg_advisory_xact_lock(:namespace, hashtext(CAST(:grant_id AS text)))")


class GrantRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, grant: Grant) -> Grant:
        self.session.add(grant)
        self.session.flush()
        return grant

    def get(self, grant_id: uuid.UUID, *, for_update: bool = False) -> Grant | None:
        """The grant; `for_update`: to change it (revoke, retire), locked until the transaction
        ends, and releases in flight that rest on it waited for (GRANT_LOCK_NAMESPACE)."""
        if for_update:
            self.session.execute(_LOCK_GRANT, {"namespace": GRANT_LOCK_NAMESPACE, "grant_id": str(grant_id)})
        # A locked read reloads a row the session holds already: the lock is for its latest state.
        return self.session.get(Grant, grant_id, with_for_update=for_update, populate_existing=for_update)

    def list(
        self,
        *,
        grantee_id: uuid.UUID | None,
        active: bool | None,
        now: datetime,
        after: tuple[datetime, uuid.UUID] | None = None,
        limit: int | None = None,
    ) -> Sequence[Grant]:
        """In (created_at, id) order, from just after `after`; `limit` rows at most."""
        query = select(Grant).order_by(Grant.created_at, Grant.id).limit(limit)
        if after is not None:
            query = query.where(tuple_(Grant.created_at, Grant.id) > tuple_(*after))
        if grantee_id is not None:
            query = query.where(Grant.grantee_id == grantee_id)
        if active is True:
            query = query.where(Grant.active_at(now))
        elif active is False:
            query = query.where(~Grant.active_at(now))
        return self.session.scalars(query).all()

    def any_active_for(self, grantee_id: uuid.UUID, now: datetime) -> bool:
        query = select(Grant.id).where(Grant.grantee_id == grantee_id, Grant.active_at(now))
        return self.session.scalar(query.limit(1)) is not None

    def any_active_or_pending_for(self, grantee_id: uuid.UUID, now: datetime) -> bool:
        """Whether the principal holds a grant that is active, or waiting for approval (and could
        become active): an admin then may not mint keys for it."""
        pending = and_(
            Grant.awaiting_approval.is_(True),
            Grant.revoked_at.is_(None),
            Grant.retired_at.is_(None),
            Approval.status == "pending",
            Approval.expires_at > now,
        )
        query = (
            select(Grant.id)
            .outerjoin(Approval, Approval.id == Grant.approval_id)
            .where(Grant.grantee_id == grantee_id, or_(Grant.active_at(now), pending))
        )
        return self.session.scalar(query.limit(1)) is not None

    def expired_unaudited(self, now: datetime, limit: int) -> Sequence[Grant]:
        """Grants that expired and whose expiry has no audit event yet; locked, one replica each."""
        query = (
            select(Grant)
            .where(
                Grant.expires_at <= now,
                Grant.expiry_audited_at.is_(None),
                # A grant that was never approved expires with its request (ExpireRequest).
                Grant.awaiting_approval.is_(False),
                Grant.revoked_at.is_(None),
                Grant.retired_at.is_(None),
            )
            .order_by(Grant.expires_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return self.session.scalars(query).all()

    def mirrors_to_revoke(self, now: datetime, limit: int) -> Sequence[Grant]:
        """Inactive grants whose KMS mirrors (one or more) still stand; locked so that one replica
        handles each."""
        standing = exists().where(KmsGrantMirror.grant_id == Grant.id, KmsGrantMirror.revoked_at.is_(None))
        query = (
            select(Grant)
            .where(
                or_(Grant.kms_grant_id.is_not(None), standing),
                Grant.kms_revoked_at.is_(None),
                ~Grant.active_at(now),
            )
            .order_by(Grant.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return self.session.scalars(query).all()


class GrantMirrorRepository:
    """A grant's KMS mirrors, one per master key (grant_mirrors)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, grant_id: uuid.UUID, kms_grant_id: str, key_arn: str) -> KmsGrantMirror:
        mirror = KmsGrantMirror(grant_id=grant_id, kms_grant_id=kms_grant_id, kms_key_arn=key_arn)
        self.session.add(mirror)
        self.session.flush()
        return mirror

    def of(self, grant_id: uuid.UUID) -> Sequence[KmsGrantMirror]:
        query = select(KmsGrantMirror).where(KmsGrantMirror.grant_id == grant_id)
        return self.session.scalars(query.order_by(KmsGrantMirror.created_at)).all()

    def to_mirror_on(self, key_arn: str, now: datetime, limit: int) -> Sequence[Grant]:
        """Active grants that are mirrored (on some key) but not yet on `key_arn`: for a rewrap to
        that key. Locked (a revoke waits, or has already made the grant drop out)."""
        mirrored = exists().where(KmsGrantMirror.grant_id == Grant.id)
        on_key = exists().where(KmsGrantMirror.grant_id == Grant.id, KmsGrantMirror.kms_key_arn == key_arn)
        query = (
            select(Grant)
            .where(Grant.active_at(now), mirrored, ~on_key)
            .order_by(Grant.created_at, Grant.id)
            .limit(limit)
            .with_for_update(of=Grant)
        )
        return self.session.scalars(query).all()
