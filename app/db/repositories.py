"""All SQL lives here. Repositories never commit: the ORM ones work in the caller's session
(Database.transaction commits it); the data path's run single statements on an autocommit connection,
each statement committing on its own; the sealer's run in the transaction Database.raw_transaction holds."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from operator import attrgetter
from typing import Any

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy import func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session, defer

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


@dataclass(frozen=True, slots=True)
class KeyCredentials:
    secret_hash: bytes
    key_revoked_at: datetime | None
    principal_id: uuid.UUID
    principal_name: str
    role: str
    principal_disabled_at: datetime | None


@dataclass(frozen=True, slots=True)
class GrantTerms:
    """The part of a grant an access decision reads; a plain row, not an ORM object."""

    id: uuid.UUID
    constraint_kind: str | None
    constraint_context: dict[str, str] | None
    expires_at: datetime | None
    revoked_at: datetime | None
    retired_at: datetime | None


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


@dataclass(slots=True)
class EventRow:
    """An audit event as written: plain fields (no ORM object on the hot path), MAC set by the Auditor."""

    event_id: uuid.UUID
    time: datetime
    request_id: str | None
    principal_id: uuid.UUID | None
    principal_name: str | None
    api_key_id: str | None
    action: str
    outcome: str
    reason: str | None
    token: str | None
    customer_id: str | None
    data_type: str | None
    grant_id: uuid.UUID | None
    target_id: str | None
    access_reason: str | None
    source_ip: str | None
    user_agent: str | None
    kms_request_id: str | None
    key_version: int | None = None
    event_mac: bytes | None = None


@dataclass(frozen=True, slots=True)
class RecordRow:
    """A stored record: what the data path writes and reads. `repr` shows no ciphertext."""

    token: str
    customer_id: str
    data_type: str
    format_version: int
    ciphertext: bytes
    wrapped_key: bytes
    kms_key_id: str
    created_by: uuid.UUID
    created_at: datetime

    def __repr__(self) -> str:
        return f"RecordRow(token={self.token!r}, data_type={self.data_type!r})"


_EVENT_COLUMNS = tuple(f.name for f in fields(EventRow))
_RECORD_COLUMNS = tuple(f.name for f in fields(RecordRow))
_event_values = attrgetter(*_EVENT_COLUMNS)
_record_values = attrgetter(*_RECORD_COLUMNS)
# Column types for unnest(): one array parameter per column, so one prepared statement serves
# a single item and a batch of a hundred alike.
_EVENT_TYPES = (
    "uuid", "timestamptz", "varchar", "uuid", "varchar", "varchar", "varchar", "varchar", "varchar",
    "varchar", "varchar", "varchar", "uuid", "varchar", "varchar", "varchar", "varchar", "varchar",
    "smallint", "bytea",
)  # fmt: skip
_RECORD_TYPES = (
    "varchar", "varchar", "varchar", "smallint", "bytea", "bytea", "varchar", "uuid", "timestamptz",
)  # fmt: skip


def _unnest(columns: Sequence[str], types: Sequence[str], prefix: str) -> str:
    arrays = ", ".join(f"%({prefix}{column})s::{kind}[]" for column, kind in zip(columns, types, strict=True))
    return f"SELECT * FROM unnest({arrays})"  # noqa: S608 (column names are constants, values parameters)


def _values(columns: Sequence[str]) -> str:
    return f"VALUES ({', '.join(['%s'] * len(columns))})"


_INTO_EVENTS = f"INSERT INTO audit_events ({', '.join(_EVENT_COLUMNS)}) "
_INTO_RECORDS = f"INSERT INTO records ({', '.join(_RECORD_COLUMNS)}) "
_INSERT_EVENTS = _INTO_EVENTS + _unnest(_EVENT_COLUMNS, _EVENT_TYPES, "e_")
# Records and their events in one statement: in autocommit, it commits or fails whole.
_INSERT_RECORDS_AND_EVENTS = (
    f"WITH new_records AS ({_INTO_RECORDS}{_unnest(_RECORD_COLUMNS, _RECORD_TYPES, 'r_')}) {_INSERT_EVENTS}"
)
# The same for one item (most requests), with plain parameters: dumping scalars costs a fraction
# of dumping arrays.
_INSERT_ONE_EVENT = _INTO_EVENTS + _values(_EVENT_COLUMNS)
_INSERT_ONE_RECORD = _INTO_RECORDS + _values(_RECORD_COLUMNS)
_INSERT_ONE_RECORD_AND_EVENT = (
    f"WITH new_record AS ({_INTO_RECORDS}{_values(_RECORD_COLUMNS)}) {_INSERT_ONE_EVENT}"
)
# Authentication and the caller's grants for one operation, in one round trip. The key id is the
# public half of an API key; the secret is compared by the caller of this query, in constant time.
_ACCESS = f"""
SELECT k.secret_hash, k.revoked_at, p.id, p.name, p.role, p.disabled_at,
       g.id, g.constraint_kind, g.constraint_context, g.expires_at, g.revoked_at, g.retired_at,
       {", ".join("r." + column for column in _RECORD_COLUMNS)}
  FROM api_keys k
  JOIN principals p ON p.id = k.principal_id
  LEFT JOIN grants g ON g.grantee_id = p.id AND %(operation)s = ANY(g.operations)
  LEFT JOIN records r ON r.token = %(token)s
 WHERE k.id = %(key_id)s
 ORDER BY g.created_at, g.id
"""  # noqa: S608 (column names are constants, values parameters)
_RECORDS = f"SELECT {', '.join(_RECORD_COLUMNS)} FROM records WHERE token = ANY(%(tokens)s::varchar[])"  # noqa: S608
_GRANT_COLUMNS = slice(6, 12)
_RECORD_IN_ACCESS = slice(12, None)


def _columns(rows: Sequence[Any], columns: Sequence[str], prefix: str) -> dict[str, list[Any]]:
    return {prefix + column: [getattr(row, column) for row in rows] for column in columns}


class DataPathRepository:
    """The data path's SQL on one asynchronous autocommit connection: every method is one round
    trip, and every write one statement, so each write commits or fails whole."""

    def __init__(self, connection: psycopg.AsyncConnection[Any]) -> None:
        self.connection = connection

    async def access(
        self, key_id: str, operation: str, tokens: Sequence[str] = ()
    ) -> tuple[KeyCredentials | None, list[GrantTerms], dict[str, RecordRow]]:
        """The key's credentials, the principal's grants naming this operation (active or not:
        the caller decides) and the records of the tokens given: one round trip.

        One token (most requests) rides along in the access query; several are fetched by a
        second query in the same pipeline. Results come in binary: uuids and timestamps then
        cost far less to load."""
        single = tokens[0] if len(tokens) == 1 else None
        parameters = {"key_id": key_id, "operation": operation, "token": single}
        access = self.connection.cursor(binary=True)
        found = None
        if len(tokens) > 1:
            found = self.connection.cursor(binary=True)
            async with self.connection.pipeline():
                await access.execute(_ACCESS, parameters)
                await found.execute(_RECORDS, {"tokens": list(tokens)})
        else:
            await access.execute(_ACCESS, parameters)
        rows = await access.fetchall()
        if found is not None:
            records = {row[0]: RecordRow(*row) for row in await found.fetchall()}
        else:
            records = {row[12]: RecordRow(*row[_RECORD_IN_ACCESS]) for row in rows[:1] if row[12] is not None}
        if not rows:
            return None, [], records
        credentials = KeyCredentials(*rows[0][:6])
        grants = [GrantTerms(*row[_GRANT_COLUMNS]) for row in rows if row[6] is not None]
        return credentials, grants, records

    async def add_events(self, events: Sequence[EventRow]) -> None:
        if len(events) == 1:
            await self.connection.execute(_INSERT_ONE_EVENT, _event_values(events[0]))
        elif events:
            await self.connection.execute(_INSERT_EVENTS, _columns(events, _EVENT_COLUMNS, "e_"))

    async def add_records_with_events(self, records: Sequence[RecordRow], events: Sequence[EventRow]) -> None:
        if not records:
            await self.add_events(events)
        elif len(records) == 1 and not events:
            await self.connection.execute(_INSERT_ONE_RECORD, _record_values(records[0]))
        elif len(records) == 1 and len(events) == 1:
            await self.connection.execute(
                _INSERT_ONE_RECORD_AND_EVENT, _record_values(records[0]) + _event_values(events[0])
            )
        else:
            parameters = _columns(records, _RECORD_COLUMNS, "r_") | _columns(events, _EVENT_COLUMNS, "e_")
            await self.connection.execute(_INSERT_RECORDS_AND_EVENTS, parameters)


# One page of the sealer's work: the next `limit` events in (written_xid, id) order after the
# given pair, among those written by transactions in [low, high), each with whether the chain
# already holds it. A page is bounded by the rows it reads, linked or not, so that no statement
# walks far whatever the backlog. The link lookup is a scalar subquery, so that it probes the
# event_row_id index once per row: as EXISTS, the planner may hash the whole chain instead.
_EVENT_COLUMNS_OF_E = ", ".join("e." + column for column in _EVENT_COLUMNS)
_SEAL_PAGE = (
    f"SELECT e.id, e.written_xid, {_EVENT_COLUMNS_OF_E},"  # noqa: S608 (constant column names)
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
            rows = [{column: getattr(event, column) for column in _EVENT_COLUMNS} for event in events]
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
