"""The audit trail's reads and its ORM writes (events, chain links, keys), in the caller's session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Select, func, insert, select, union
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session, defer

from app.db.models import AuditChainHead, AuditChainLink, AuditEvent, AuditKey, Record
from app.db.repositories.data_path import EVENT_COLUMNS, EventRow


@dataclass(frozen=True, slots=True)
class AuditFilter:
    principal_id: uuid.UUID | None = None
    principal_name: str | None = None
    action: str | None = None
    outcome: str | None = None
    customer_id: str | None = None
    token: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    before_id: int | None = None


class AuditRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add_all(self, events: Sequence[EventRow]) -> None:
        # One multi-row INSERT, without the ORM's unit of work.
        if events:
            rows = [{column: getattr(event, column) for column in EVENT_COLUMNS} for event in events]
            self.session.execute(insert(AuditEvent), rows)

    def unsealed(self, batch: int = 1000) -> Iterator[AuditEvent]:
        """Committed events the chain does not hold, oldest first, streamed."""
        linked = select(AuditChainLink.seq).where(AuditChainLink.event_row_id == AuditEvent.id)
        query = (
            select(AuditEvent)
            .where(~linked.exists())
            .order_by(AuditEvent.id)
            .execution_options(yield_per=batch)
        )
        yield from self.session.scalars(query)

    def head(self) -> AuditChainHead | None:
        return self.session.get(AuditChainHead, 1, populate_existing=True)

    def latest_key(self) -> AuditKey | None:
        return self.session.scalar(select(AuditKey).order_by(AuditKey.version.desc()).limit(1))

    def key(self, version: int) -> AuditKey | None:
        return self.session.get(AuditKey, version)

    def add_key_if_absent(self, key: AuditKey) -> None:
        """Several processes may race to create the first key: one wins, the others read it."""
        self.session.execute(
            pg_insert(AuditKey)
            .values(version=key.version, wrapped_key=key.wrapped_key, kms_key_id=key.kms_key_id)
            .on_conflict_do_nothing(index_elements=[AuditKey.version])
        )

    def by_event_id(self, event_id: uuid.UUID) -> AuditEvent | None:
        return self.session.scalar(select(AuditEvent).where(AuditEvent.event_id == event_id))

    def search(self, where: AuditFilter, limit: int) -> Sequence[AuditEvent]:
        """Newest first (by insertion), sealed or not yet."""
        query = select(AuditEvent)
        if where.principal_id is not None:
            query = query.where(AuditEvent.principal_id == where.principal_id)
        if where.principal_name is not None:
            query = query.where(AuditEvent.principal_name == where.principal_name)
        for column, value in (
            (AuditEvent.action, where.action),
            (AuditEvent.outcome, where.outcome),
            (AuditEvent.customer_id, where.customer_id),
            (AuditEvent.token, where.token),
        ):
            if value is not None:
                query = query.where(column == value)
        if where.since is not None:
            query = query.where(AuditEvent.time >= where.since)
        if where.until is not None:
            query = query.where(AuditEvent.time < where.until)
        if where.before_id is not None:
            query = query.where(AuditEvent.id < where.before_id)
        return self.session.scalars(query.order_by(AuditEvent.id.desc()).limit(limit)).all()

    def about_customer(self, customer_id: str, batch: int = 1000) -> Iterator[AuditEvent]:
        """Every event about the customer or one of its records (an attempt on a token may name
        only the token), oldest first, streamed."""
        query = customer_events_query(customer_id).execution_options(yield_per=batch)
        yield from self.session.scalars(query)

    def seq_bounds(self, since: datetime | None, until: datetime | None) -> tuple[int | None, int | None]:
        query = select(func.min(AuditChainLink.seq), func.max(AuditChainLink.seq))
        if since is not None or until is not None:
            query = query.join(AuditEvent, AuditEvent.id == AuditChainLink.event_row_id)
        if since is not None:
            query = query.where(AuditEvent.time >= since)
        if until is not None:
            query = query.where(AuditEvent.time < until)
        low, high = self.session.execute(query).one()
        return low, high

    def at_seq(self, seq: int) -> tuple[AuditEvent | None, AuditChainLink] | None:
        """The link at this place in the chain, with its event (None if the event is gone)."""
        link = self.session.get(AuditChainLink, seq)
        if link is None:
            return None
        return self.session.get(AuditEvent, link.event_row_id), link

    def walk(
        self, first_seq: int, last_seq: int, *, events_say_seq: bool = False, batch: int = 1000
    ) -> Iterator[tuple[AuditEvent | None, AuditChainLink]]:
        """Links in chain order with their events (None where an event is gone), streamed. The
        events' own chain_seq is loaded only when asked for: the link says it."""
        query = (
            select(AuditChainLink, AuditEvent)
            .outerjoin(AuditEvent, AuditEvent.id == AuditChainLink.event_row_id)
            .where(AuditChainLink.seq >= first_seq, AuditChainLink.seq <= last_seq)
            .order_by(AuditChainLink.seq)
            .execution_options(yield_per=batch)
        )
        if not events_say_seq:
            query = query.options(defer(AuditEvent.chain_seq))
        for link, event in self.session.execute(query):
            yield event, link


def customer_events_query(customer_id: str) -> Select[AuditEvent]:
    """The subject-access report's events: ix_audit_events_customer_id, and through the customer's
    tokens (ix_records_customer_id) ix_audit_events_token; oldest first."""
    tokens = select(Record.token).where(Record.customer_id == customer_id)
    # A union of two indexed lookups: an OR of the two would be a scan of the whole trail.
    ids = union(
        select(AuditEvent.id).where(AuditEvent.customer_id == customer_id),
        select(AuditEvent.id).where(AuditEvent.token.in_(tokens)),
    )
    return (
        select(AuditEvent)
        .where(AuditEvent.id.in_(ids.scalar_subquery()))
        .order_by(AuditEvent.id)
        .options(defer(AuditEvent.chain_seq))
    )
