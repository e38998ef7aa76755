"""All SQL lives here. Repositories never commit: the ORM ones work in the caller's session
(Database.transaction commits it); the data path's run single statements on an autocommit connection,
each statement committing on its own; the sealer's run in the transaction Database.raw_transaction holds."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy import func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session, defer

from app.db.data_path import EVENT_COLUMNS, EventRow, KeyCredentials
from app.db.models import ApiKey, AuditChainHead, AuditChainLink, AuditEvent, AuditKey, Grant, Principal


class PrincipalRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, principal: Principal) -> Principal:
        self.session.add(principal)
        self.session.flush()
        return principal

    def get(self, principal_id: uuid.UUID) -> Principal | None:
        return self.session.get(Principal, principal_id)

    def get_by_name(self, name: str) -> Principal | None:
        return self.session.scalar(select(Principal).where(Principal.name == name))

    def name_taken(self, name: str) -> bool:
        return self.session.scalar(select(Principal.id).where(Principal.name == name)) is not None

    def list(self) -> Sequence[Principal]:
        return self.session.scalars(select(Principal).order_by(Principal.created_at, Principal.name)).all()


class ApiKeyRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, key: ApiKey) -> ApiKey:
        self.session.add(key)
        self.session.flush()
        return key

    def get(self, key_id: str) -> ApiKey | None:
        return self.session.get(ApiKey, key_id)

    def credentials(self, key_id: str) -> KeyCredentials | None:
        """What authentication needs, in one round trip and without ORM objects (the hot path)."""
        row = self.session.execute(
            select(
                ApiKey.secret_hash,
                ApiKey.revoked_at,
                Principal.id,
                Principal.name,
                Principal.role,
                Principal.disabled_at,
            )
            .join(Principal, Principal.id == ApiKey.principal_id)
            .where(ApiKey.id == key_id)
        ).first()
        return None if row is None else KeyCredentials(*row)

    def list_for(self, principal_id: uuid.UUID) -> Sequence[ApiKey]:
        query = select(ApiKey).where(ApiKey.principal_id == principal_id).order_by(ApiKey.created_at)
        return self.session.scalars(query).all()

    def revoke_all_for(self, principal_id: uuid.UUID, now: datetime) -> None:
        self.session.execute(
            update(ApiKey)
            .where(ApiKey.principal_id == principal_id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=now)
        )


class GrantRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, grant: Grant) -> Grant:
        self.session.add(grant)
        self.session.flush()
        return grant

    def get(self, grant_id: uuid.UUID, *, for_update: bool = False) -> Grant | None:
        return self.session.get(Grant, grant_id, with_for_update=for_update)

    def list(self, *, grantee_id: uuid.UUID | None, active: bool | None, now: datetime) -> Sequence[Grant]:
        query = select(Grant).order_by(Grant.created_at, Grant.id)
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

    def expired_unaudited(self, now: datetime, limit: int) -> Sequence[Grant]:
        """Grants that expired and whose expiry has no audit event yet; locked, one replica each."""
        query = (
            select(Grant)
            .where(
                Grant.expires_at <= now,
                Grant.expiry_audited_at.is_(None),
                Grant.revoked_at.is_(None),
                Grant.retired_at.is_(None),
            )
            .order_by(Grant.expires_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return self.session.scalars(query).all()

    def mirrors_to_revoke(self, now: datetime, limit: int) -> Sequence[Grant]:
        """Inactive grants whose KMS mirror still stands; locked so that one replica handles each."""
        query = (
            select(Grant)
            .where(
                Grant.kms_grant_id.is_not(None),
                Grant.kms_revoked_at.is_(None),
                ~Grant.active_at(now),
            )
            .order_by(Grant.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return self.session.scalars(query).all()


# One page of the sealer's work: the next `limit` events in (written_xid, id) order after the
# given pair, among those written by transactions in [low, high), each with whether the chain
# already holds it. A page is bounded by the rows it reads, linked or not, so that no statement
# walks far whatever the backlog. The link lookup is a scalar subquery, so that it probes the
# event_row_id index once per row: as EXISTS, the planner may hash the whole chain instead.
EVENT_COLUMNS_OF_E = ", ".join("e." + column for column in EVENT_COLUMNS)
_SEAL_PAGE = (
    f"SELECT e.id, e.written_xid, {EVENT_COLUMNS_OF_E},"  # noqa: S608 (constant column names)
    " (SELECT c.seq FROM audit_chain c WHERE c.event_row_id = e.id) IS NOT NULL AS linked"
    " FROM (SELECT * FROM audit_events"
    "        WHERE written_xid >= %s AND written_xid < %s AND (written_xid, id) > (%s, %s)"
    "        ORDER BY written_xid, id LIMIT %s) e"
    " ORDER BY e.written_xid, e.id"
)


class SealRepository:
    """The audit sealer's SQL, on a connection in a transaction of its own."""

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self.connection = connection

    def lock_head(self) -> tuple[int, bytes, int, list[int]] | None:
        """The chain head (seq, mac, sealed_below, pending_xids), locked for this transaction;
        None if another sealer holds it."""
        row = self.connection.execute(
            "SELECT seq, mac, sealed_below, pending_xids FROM audit_chain_head WHERE id = 1"
            " FOR UPDATE SKIP LOCKED"
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2], list(row[3]))

    def horizon(self) -> tuple[int, list[int]]:
        """This moment's first unassigned transaction id and the transactions still running:
        every other one has ended, so its events, if it committed, are visible to any later
        statement."""
        row = self.connection.execute(
            "SELECT (pg_snapshot_xmax(s)::text)::bigint,"
            " ARRAY(SELECT (x::text)::bigint FROM pg_snapshot_xip(s) x)"
            " FROM pg_current_snapshot() s"
        ).fetchone()
        assert row is not None  # noqa: S101 (one row, always)
        return row[0], list(row[1])

    def seal_page(self, low: int, high: int, after: tuple[int, int], limit: int) -> list[Any]:
        """The next `limit` events written by transactions in [low, high), in (written_xid, id)
        order after the given pair, each with `linked`: whether the chain holds it already."""
        with self.connection.cursor(binary=True, row_factory=namedtuple_row) as cursor:
            # Planned for these values every time: a generic plan cannot know the range is recent.
            parameters = (low, high, *after, limit)
            return cursor.execute(_SEAL_PAGE, parameters, prepare=False).fetchall()

    def link(self, links: Sequence[tuple[int, int, bytes, bytes]]) -> None:
        """Chain links (seq, event row id, prev_mac, mac), inserted by COPY."""
        if links:
            with (
                self.connection.cursor() as cursor,
                cursor.copy("COPY audit_chain (seq, event_row_id, prev_mac, mac) FROM STDIN") as copy,
            ):
                for link in links:
                    copy.write_row(link)

    def move_head(self, seq: int, mac: bytes, sealed_below: int, pending_xids: Sequence[int]) -> None:
        self.connection.execute(
            "UPDATE audit_chain_head SET seq = %s, mac = %s, sealed_below = %s, pending_xids = %s"
            " WHERE id = 1",
            (seq, mac, sealed_below, list(pending_xids)),
        )


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
