"""Four-eyes requests (the approval queue), in the caller's ORM session."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import ColumnElement, and_, or_, select, tuple_
from sqlalchemy.orm import Session

from app.db.models import Approval


def _status_is(status: str, now: datetime) -> ColumnElement[bool]:
    """The effective status in SQL, as app.access.approval_status says it in Python: a pending
    request past its deadline is expired."""
    if status == "pending":
        return and_(Approval.status == "pending", Approval.expires_at > now)
    if status == "expired":
        return or_(
            Approval.status == "expired", and_(Approval.status == "pending", Approval.expires_at <= now)
        )
    return Approval.status == status


class ApprovalRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, approval: Approval) -> Approval:
        self.session.add(approval)
        self.session.flush()
        return approval

    def get(self, approval_id: uuid.UUID, *, for_update: bool = False) -> Approval | None:
        return self.session.get(
            Approval, approval_id, with_for_update=for_update, populate_existing=for_update
        )

    def lock(self, approval: Approval) -> Approval:
        """Lock the request's row and reload it. Lock order, everywhere: a grant's row before its
        request's, so that an approval and a revoke of the same grant cannot deadlock."""
        self.session.refresh(approval, with_for_update=True)
        return approval

    def list(
        self,
        *,
        now: datetime,
        status: str | None = None,
        kind: str | None = None,
        after: tuple[datetime, uuid.UUID] | None = None,
        limit: int | None = None,
    ) -> Sequence[Approval]:
        """In (created_at, id) order, from just after `after`; `limit` rows at most."""
        query = select(Approval).order_by(Approval.created_at, Approval.id).limit(limit)
        if after is not None:
            query = query.where(tuple_(Approval.created_at, Approval.id) > tuple_(*after))
        if status is not None:
            query = query.where(_status_is(status, now))
        if kind is not None:
            query = query.where(Approval.kind == kind)
        return self.session.scalars(query).all()

    def lapsed(self, now: datetime, limit: int) -> Sequence[Approval]:
        """Pending requests past their deadline, not yet recorded as expired; locked, one replica each."""
        query = (
            select(Approval)
            .where(Approval.status == "pending", Approval.expires_at <= now)
            .order_by(Approval.expires_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return self.session.scalars(query).all()
