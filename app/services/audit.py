"""Audit events: every allow and every deny. Never a value, a data key or an API key.

Allowed operations write their event in the request's own transaction, so an operation that
committed always has its event and one whose event cannot be written does not happen. Denials are
written on their own transaction, since the request itself is refused and rolled back.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from app.db.models import AuditEvent
from app.db.repositories import AuditRepository
from app.db.session import Database
from app.errors import AuditUnavailable, DatabaseUnavailable
from app.services.context import Caller, RequestContext, utcnow

log = logging.getLogger(__name__)

Outcome = Literal["allowed", "denied", "error"]


@dataclass(frozen=True, slots=True)
class Subject:
    """What an event is about. Identifiers only: the value is never part of it."""

    token: str | None = None
    customer_id: str | None = None
    data_type: str | None = None
    grant_id: uuid.UUID | None = None
    target_id: str | None = None
    kms_request_id: str | None = None


def build_event(
    action: str,
    outcome: Outcome,
    ctx: RequestContext,
    caller: Caller | None,
    subject: Subject = Subject(),
    reason: str | None = None,
) -> AuditEvent:
    return AuditEvent(
        event_id=uuid.uuid4(),
        time=utcnow(),
        request_id=ctx.request_id,
        principal_id=caller.id if caller else None,
        principal_name=caller.name if caller else None,
        action=action,
        outcome=outcome,
        reason=reason,
        token=subject.token,
        customer_id=subject.customer_id,
        data_type=subject.data_type,
        grant_id=subject.grant_id,
        target_id=subject.target_id,
        access_reason=ctx.access_reason,
        source_ip=ctx.source_ip,
        user_agent=ctx.user_agent,
        kms_request_id=subject.kms_request_id,
    )


class Auditor:
    def __init__(self, database: Database) -> None:
        self._database = database

    def record(self, session: Session, events: Sequence[AuditEvent]) -> None:
        """Write events in the caller's transaction; if they cannot be written, neither is the rest."""
        if not events:
            return
        try:
            AuditRepository(session).add_all(events)
        except DBAPIError as err:
            log.error("audit write failed: %s", type(err.orig).__name__)
            raise AuditUnavailable() from None

    def record_on_its_own(self, events: Sequence[AuditEvent]) -> None:
        """Write denial events in their own transaction; the refused request is rolled back."""
        if not events:
            return
        try:
            with self._database.transaction() as session:
                self.record(session, events)
        except DatabaseUnavailable:
            raise AuditUnavailable() from None
