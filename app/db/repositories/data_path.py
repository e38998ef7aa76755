"""The data path's SQL (tokenize, detokenize): plain row types and one repository.

Every method takes a connection from the data path's pool for its one statement (or one
pipeline) and gives it back: no connection is held while the key service is asked for a data
key, so a slow key service cannot drain the pool. The connections are in autocommit, so each
write, one statement, commits or fails whole; the one exception is a detokenize's release when a
grant changed while it asked the key service (a re-read of its grants, then its events), one
explicit transaction. Database.data_connection maps database errors to the vault's own.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from datetime import datetime
from operator import attrgetter
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.rows import namedtuple_row

from app.db.repositories.grants import GRANT_LOCK_NAMESPACE
from app.db.repositories.idempotency import COMPLETE
from app.db.session import Database


@dataclass(frozen=True, slots=True)
class KeyCredentials:
    secret_hash: bytes
    key_revoked_at: datetime | None
    principal_id: uuid.UUID
    principal_name: str
    role: str
    principal_disabled_at: datetime | None
    # The principal's own rate limit, if an admin set one (else the vault's defaults).
    rate_limit_rps: int | None = None
    rate_limit_burst: int | None = None


@dataclass(frozen=True, slots=True)
class GrantTerms:
    """The part of a grant an access decision reads; a plain row, not an ORM object."""

    id: uuid.UUID
    constraint_kind: str | None
    constraint_context: dict[str, str] | None
    expires_at: datetime | None
    revoked_at: datetime | None
    retired_at: datetime | None
    reveal: str = "plain"
    # Dual control: a grant waiting for a second admin matches nothing.
    awaiting_approval: bool = False
    # The operations it allows (a request may read grants for more than one).
    operations: tuple[str, ...] = ()


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
    repeat_count: int | None = None


@dataclass(frozen=True, slots=True)
class RecordRow:
    """A stored record: what the data path writes and reads. `repr` shows no ciphertext.

    A tombstone (erased_at set) has no format_version, ciphertext, wrapped_key or kms_key_id."""

    token: str
    customer_id: str
    data_type: str
    format_version: int | None
    ciphertext: bytes | None
    wrapped_key: bytes | None
    kms_key_id: str | None
    created_by: uuid.UUID
    created_at: datetime
    expires_at: datetime | None = None
    erased_at: datetime | None = None
    # The keyed fingerprint of the normalised value (types whose lookup flag is on), else None.
    fingerprint: bytes | None = None

    def __repr__(self) -> str:
        return f"RecordRow(token={self.token!r}, data_type={self.data_type!r})"

    def gone(self, now: datetime) -> Literal["erased", "expired"] | None:
        """Why the record no longer answers with its value, if it does not: erased, or past its
        expiry (refused at once, whether or not the sweeper has erased it yet)."""
        if self.erased_at is not None:
            return "erased"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return None


@dataclass(frozen=True, slots=True)
class Found:
    """A live record found by its fingerprint: identifiers only."""

    token: str
    customer_id: str
    data_type: str
    created_at: datetime
    expires_at: datetime | None


EVENT_COLUMNS = tuple(f.name for f in fields(EventRow))
RECORD_COLUMNS = tuple(f.name for f in fields(RecordRow))
_event_values = attrgetter(*EVENT_COLUMNS)
_record_values = attrgetter(*RECORD_COLUMNS)
# Column types for unnest(): one array parameter per column, so one prepared statement serves
# a single item and a batch of a hundred alike.
_EVENT_TYPES = (
    "uuid", "timestamptz", "varchar", "uuid", "varchar", "varchar", "varchar", "varchar", "varchar",
    "varchar", "varchar", "varchar", "uuid", "varchar", "varchar", "varchar", "varchar", "varchar",
    "smallint", "bytea", "integer",
)  # fmt: skip
_RECORD_TYPES = (
    "varchar", "varchar", "varchar", "smallint", "bytea", "bytea", "varchar", "uuid", "timestamptz",
    "timestamptz", "timestamptz", "bytea",
)  # fmt: skip


def _unnest(columns: Sequence[str], types: Sequence[str], prefix: str) -> str:
    arrays = ", ".join(f"%({prefix}{column})s::{kind}[]" for column, kind in zip(columns, types, strict=True))
    return f"SELECT * FROM unnest({arrays})"  # noqa: S608 (column names are constants, values parameters)


def _values(columns: Sequence[str]) -> str:
    return f"VALUES ({', '.join(['%s'] * len(columns))})"


_INTO_EVENTS = f"INSERT INTO audit_events ({', '.join(EVENT_COLUMNS)}) "
_INTO_RECORDS = f"INSERT INTO records ({', '.join(RECORD_COLUMNS)}) "
_INSERT_EVENTS = _INTO_EVENTS + _unnest(EVENT_COLUMNS, _EVENT_TYPES, "e_")
# Records and their events in one statement: in autocommit, it commits or fails whole.
_INSERT_RECORDS_AND_EVENTS = (
    f"WITH new_records AS ({_INTO_RECORDS}{_unnest(RECORD_COLUMNS, _RECORD_TYPES, 'r_')}) {_INSERT_EVENTS}"
)
# The same for one item (most requests), with plain parameters: dumping scalars costs a fraction
# of dumping arrays.
_INSERT_ONE_EVENT = _INTO_EVENTS + _values(EVENT_COLUMNS)
_INSERT_ONE_RECORD = _INTO_RECORDS + _values(RECORD_COLUMNS)
_INSERT_ONE_RECORD_AND_EVENT = (
    f"WITH new_record AS ({_INTO_RECORDS}{_values(RECORD_COLUMNS)}) {_INSERT_ONE_EVENT}"
)
# The same, storing an Idempotency-Key's answer too: all three commit together, and the records
# and events only if the request still holds the key's lease (else none of them).
_INSERT_RECORDS_AND_EVENTS_COMPLETING = (
    f"WITH done AS ({COMPLETE} RETURNING 1),"  # noqa: S608 (column names are constants, values parameters)
    f" new_records AS ({_INTO_RECORDS}{_unnest(RECORD_COLUMNS, _RECORD_TYPES, 'r_')}"
    " WHERE EXISTS (SELECT FROM done))"
    f" {_INSERT_EVENTS} WHERE EXISTS (SELECT FROM done)"
)
# Authentication and the caller's grants for one operation, in one round trip. The key id is the
# public half of an API key; the secret is compared by the caller of this query, in constant time.
# Every column has a name of its own: rows are read by name.
_RECORD_OF_R = ", ".join("r." + column for column in RECORD_COLUMNS)
_ACCESS = f"""
SELECT k.secret_hash, k.revoked_at AS key_revoked_at, p.id AS principal_id, p.name AS principal_name,
       p.role, p.disabled_at AS principal_disabled_at, p.rate_limit_rps, p.rate_limit_burst,
       g.id AS grant_id, g.constraint_kind, g.constraint_context, g.expires_at AS grant_expires_at,
       g.revoked_at AS grant_revoked_at, g.retired_at AS grant_retired_at, g.reveal,
       g.awaiting_approval, g.operations AS grant_operations,
       {_RECORD_OF_R}
  FROM api_keys k
  JOIN principals p ON p.id = k.principal_id
  LEFT JOIN grants g ON g.grantee_id = p.id AND g.operations && %(operations)s::text[]
  LEFT JOIN records r ON r.token = %(token)s
 WHERE k.id = %(key_id)s
 ORDER BY g.created_at, g.id
"""  # noqa: S608 (column names are constants, values parameters)
# The re-check before a release when a grant changed meanwhile: the grants a detokenize rests on,
# held in shared advisory locks until the release commits and read as they stand, both by
# piivault_hold_grants (migration 0012; see GRANT_LOCK_NAMESPACE: a revoke or retire holds the
# grant's lock exclusively). What can change (the state) is the function's own read, taken once
# the locks are held; the join adds what never changes after a grant is made (its terms). A revoke
# that committed first is seen; one that comes later waits until the values are on record.
# Sent as one simple-protocol message (BEGIN; the read), so one round trip and no pipeline (whose
# wait for results spins on a writable socket: a detokenize's CPU doubled with it). The ids are
# literals (uuids, quoted by psycopg): the simple protocol takes no parameters.
_BEGIN_HOLD_AND_READ_GRANTS = sql.SQL("""
BEGIN;
SELECT h.grant_id, g.constraint_kind, g.constraint_context, h.expires_at AS grant_expires_at,
       h.revoked_at AS grant_revoked_at, h.retired_at AS grant_retired_at, g.reveal,
       h.awaiting_approval, g.operations AS grant_operations
  FROM piivault_hold_grants({namespace}, {ids}::uuid[]) AS h JOIN grants g ON g.id = h.grant_id
""")
# The release, as it nearly always goes: one autocommit statement. piivault_grants_unchanged
# (migration 0013) holds the grants (shared, as above) and, in a snapshot of its own, answers
# whether every one is still active at `now`; the events go in only if so. Otherwise nothing is
# written and the caller decides again under release(). The locks last until the statement commits.
# A scalar subquery: evaluated once for the statement (an InitPlan), never once per event row.
_ONLY_IF_UNCHANGED = " WHERE (SELECT piivault_grants_unchanged({namespace}, {ids}::uuid[], {now}))"
_RELEASE_EVENTS = _INSERT_EVENTS + _ONLY_IF_UNCHANGED.format(
    namespace=GRANT_LOCK_NAMESPACE, ids="%(grant_ids)s", now="%(now)s"
)
# One event (most requests): plain parameters, each cast to its column's type.
_RELEASE_ONE_EVENT = (
    _INTO_EVENTS
    + "SELECT "
    + ", ".join(f"%s::{kind}" for kind in _EVENT_TYPES)
    + _ONLY_IF_UNCHANGED.format(namespace=GRANT_LOCK_NAMESPACE, ids="%s", now="%s")
)
# Lookup by value: live records of one type with one fingerprint (the partial index on
# (data_type, fingerprint) finds them), oldest first, at most `limit`.
_LIVE = "erased_at IS NULL AND (expires_at IS NULL OR expires_at > now())"
_MATCHES = f"""
SELECT token, customer_id, data_type, created_at, expires_at
  FROM records
 WHERE data_type = %(data_type)s AND fingerprint = %(fingerprint)s AND {_LIVE}
   AND (%(customer_id)s::varchar IS NULL OR customer_id = %(customer_id)s::varchar)
 ORDER BY created_at, token
 LIMIT %(limit)s
"""  # noqa: S608 (constants only)
# Deduplication: for each (customer, type, fingerprint) asked, its oldest live record, if any.
_DUPLICATES = f"""
SELECT DISTINCT ON (asked.i) asked.i, r.token, r.customer_id, r.data_type, r.created_at, r.expires_at
  FROM unnest(%(customers)s::varchar[], %(types)s::varchar[], %(fingerprints)s::bytea[])
       WITH ORDINALITY AS asked(customer_id, data_type, fingerprint, i)
  JOIN records r ON r.data_type = asked.data_type AND r.fingerprint = asked.fingerprint
                AND r.customer_id = asked.customer_id AND {_LIVE}
 ORDER BY asked.i, r.created_at, r.token
"""  # noqa: S608 (constants only)
_RECORDS = f"SELECT {', '.join(RECORD_COLUMNS)} FROM records WHERE token = ANY(%(tokens)s::varchar[])"  # noqa: S608


def _grant_terms(row: Any) -> GrantTerms:
    """A grant as the access query and the release's re-read name its columns."""
    return GrantTerms(
        id=row.grant_id,
        constraint_kind=row.constraint_kind,
        constraint_context=row.constraint_context,
        expires_at=row.grant_expires_at,
        revoked_at=row.grant_revoked_at,
        retired_at=row.grant_retired_at,
        reveal=row.reveal,
        awaiting_approval=row.awaiting_approval,
        operations=tuple(row.grant_operations),
    )


def _record(row: Any) -> RecordRow:
    return RecordRow(
        token=row.token,
        customer_id=row.customer_id,
        data_type=row.data_type,
        format_version=row.format_version,
        ciphertext=row.ciphertext,
        wrapped_key=row.wrapped_key,
        kms_key_id=row.kms_key_id,
        created_by=row.created_by,
        created_at=row.created_at,
        expires_at=row.expires_at,
        erased_at=row.erased_at,
        fingerprint=row.fingerprint,
    )


_ARRAY_SAFE = re.compile(r"[A-Za-z0-9-]+")


def array_literal(items: Sequence[str | uuid.UUID]) -> str:
    """A PostgreSQL array literal of operation names or uuids (no character of theirs needs
    quoting), for a parameter cast to its array type: psycopg dumps a str at once, where a list
    is inspected element by element to choose its dumper on every call."""
    text = [str(item) for item in items]
    if not all(_ARRAY_SAFE.fullmatch(item) for item in text):
        raise ValueError("not an operation name or a uuid")
    return "{" + ",".join(text) + "}"


def _columns(rows: Sequence[Any], columns: Sequence[str], prefix: str) -> dict[str, list[Any]]:
    return {prefix + column: [getattr(row, column) for row in rows] for column in columns}


async def add_events_on(connection: psycopg.AsyncConnection[Any], events: Sequence[EventRow]) -> None:
    """Insert events on this connection (in its transaction, if one is open)."""
    if len(events) == 1:
        await connection.execute(_INSERT_ONE_EVENT, _event_values(events[0]))
    elif events:
        await connection.execute(_INSERT_EVENTS, _columns(events, EVENT_COLUMNS, "e_"))


@dataclass(frozen=True, slots=True)
class Access:
    """What one access query found: the key's credentials (None for an unknown key), the
    principal's grants naming the operation (active or not: the caller decides), and the
    records of the tokens asked for."""

    credentials: KeyCredentials | None
    grants: list[GrantTerms]
    records: dict[str, RecordRow]


class Release:
    """A release in progress: the grants it rests on as they stand now (held until it commits),
    and the one transaction its audit events are written in."""

    def __init__(self, connection: psycopg.AsyncConnection[Any], grants: list[GrantTerms]) -> None:
        self._connection = connection
        self.grants = grants

    async def add_events(self, events: Sequence[EventRow]) -> None:
        if len(events) == 1:
            await self._connection.execute(_INSERT_ONE_EVENT, _event_values(events[0]))
        elif events:
            await self._connection.execute(_INSERT_EVENTS, _columns(events, EVENT_COLUMNS, "e_"))


class DataPathRepository:
    """The data path's SQL: every method is one round trip on a connection of its own."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def access(self, key_id: str, operations: Sequence[str], tokens: Sequence[str] = ()) -> Access:
        """The caller's grants naming any of `operations`. One token (most requests) rides along
        in the access query; several are fetched by a second query in the same pipeline. Results
        come in binary: uuids and timestamps then cost far less to load."""
        single = tokens[0] if len(tokens) == 1 else None
        parameters = {"key_id": key_id, "operations": array_literal(operations), "token": single}
        async with self._database.data_connection() as connection:
            access = connection.cursor(binary=True, row_factory=namedtuple_row)
            if len(tokens) > 1:
                found = connection.cursor(binary=True, row_factory=namedtuple_row)
                async with connection.pipeline():
                    await access.execute(_ACCESS, parameters)
                    await found.execute(_RECORDS, {"tokens": list(tokens)})
                rows: list[Any] = await access.fetchall()
                records = {row.token: _record(row) for row in await found.fetchall()}  # type: ignore[attr-defined]
            else:
                await access.execute(_ACCESS, parameters)
                rows = list(await access.fetchall())
                records = {row.token: _record(row) for row in rows[:1] if row.token is not None}
        if not rows:
            return Access(None, [], records)
        first = rows[0]
        credentials = KeyCredentials(
            secret_hash=first.secret_hash,
            key_revoked_at=first.key_revoked_at,
            principal_id=first.principal_id,
            principal_name=first.principal_name,
            role=first.role,
            principal_disabled_at=first.principal_disabled_at,
            rate_limit_rps=first.rate_limit_rps,
            rate_limit_burst=first.rate_limit_burst,
        )
        grants = [_grant_terms(row) for row in rows if row.grant_id is not None]
        return Access(credentials, grants, records)

    async def release_unless_changed(
        self, grant_ids: Sequence[uuid.UUID], events: Sequence[EventRow], now: datetime
    ) -> bool:
        """A detokenize's release in one statement: its events written, and True, only if every
        grant in `grant_ids` is still active at `now`; else nothing written (then release())."""
        # Sorted and distinct: the locks are taken in one order (piivault_grants_unchanged).
        ids = array_literal(sorted(set(grant_ids)))
        async with self._database.data_connection() as connection:
            if len(events) == 1:
                parameters = (*_event_values(events[0]), ids, now)
                cursor = await connection.execute(_RELEASE_ONE_EVENT, parameters)
            else:
                shared = {"now": now, "grant_ids": ids}
                cursor = await connection.execute(
                    _RELEASE_EVENTS, shared | _columns(events, EVENT_COLUMNS, "e_")
                )
            return cursor.rowcount == len(events)

    @asynccontextmanager
    async def release(self, grant_ids: Sequence[uuid.UUID]) -> AsyncIterator[Release]:
        """One transaction for a detokenize's release: the grants it rests on are held (shared)
        and read first, the events written in the block commit with it when the block ends.
        BEGIN, the locks and the read are one round trip; the events, then COMMIT, two more."""
        async with self._database.data_connection() as connection:
            query = _BEGIN_HOLD_AND_READ_GRANTS.format(
                namespace=sql.Literal(GRANT_LOCK_NAMESPACE),
                ids=sql.Literal([str(grant_id) for grant_id in grant_ids]),
            )
            cursor = connection.cursor(row_factory=namedtuple_row)
            try:
                await cursor.execute(query)
                while cursor.nextset():  # to the last statement's rows: the grants as they stand
                    pass
                rows: list[Any] = await cursor.fetchall()
                yield Release(connection, [_grant_terms(row) for row in rows])
            except BaseException:
                if not connection.broken:
                    await connection.execute("ROLLBACK")
                raise
            await connection.execute("COMMIT")

    async def matches(
        self, data_type: str, fingerprint: bytes, customer_id: str | None, limit: int
    ) -> list[Found]:
        """Live records of this type with this fingerprint (of this customer, if given)."""
        parameters = {
            "data_type": data_type,
            "fingerprint": fingerprint,
            "customer_id": customer_id,
            "limit": limit,
        }
        async with self._database.data_connection() as connection:
            cursor = connection.cursor(binary=True, row_factory=namedtuple_row)
            await cursor.execute(_MATCHES, parameters)
            rows: list[Any] = await cursor.fetchall()
        return [Found(r.token, r.customer_id, r.data_type, r.created_at, r.expires_at) for r in rows]

    async def duplicates(self, asked: Sequence[tuple[str, str, bytes]]) -> dict[int, Found]:
        """For each (customer_id, data_type, fingerprint) asked, by its index: the customer's oldest
        live record of that type with that fingerprint, if there is one. One round trip."""
        if not asked:
            return {}
        parameters = {
            "customers": [customer for customer, _, _ in asked],
            "types": [data_type for _, data_type, _ in asked],
            "fingerprints": [fingerprint for _, _, fingerprint in asked],
        }
        async with self._database.data_connection() as connection:
            cursor = connection.cursor(binary=True, row_factory=namedtuple_row)
            await cursor.execute(_DUPLICATES, parameters)
            rows: list[Any] = await cursor.fetchall()
        return {
            int(r.i) - 1: Found(r.token, r.customer_id, r.data_type, r.created_at, r.expires_at) for r in rows
        }

    async def add_events(self, events: Sequence[EventRow]) -> None:
        if not events:
            return
        async with self._database.data_connection() as connection:
            await add_events_on(connection, events)

    async def add_records_with_events(self, records: Sequence[RecordRow], events: Sequence[EventRow]) -> None:
        if not records:
            await self.add_events(events)
            return
        async with self._database.data_connection() as connection:
            if len(records) == 1 and not events:
                await connection.execute(_INSERT_ONE_RECORD, _record_values(records[0]))
            elif len(records) == 1 and len(events) == 1:
                await connection.execute(
                    _INSERT_ONE_RECORD_AND_EVENT, _record_values(records[0]) + _event_values(events[0])
                )
            else:
                parameters = _columns(records, RECORD_COLUMNS, "r_") | _columns(events, EVENT_COLUMNS, "e_")
                await connection.execute(_INSERT_RECORDS_AND_EVENTS, parameters)

    async def add_records_with_events_completing(
        self, records: Sequence[RecordRow], events: Sequence[EventRow], completion: dict[str, Any]
    ) -> bool:
        """Records, their events and an Idempotency-Key's answer (parameters of
        idempotency.COMPLETE) in one statement; False, and nothing written, if the lease is lost."""
        parameters = (
            completion | _columns(records, RECORD_COLUMNS, "r_") | _columns(events, EVENT_COLUMNS, "e_")
        )
        async with self._database.data_connection() as connection:
            cursor = await connection.execute(_INSERT_RECORDS_AND_EVENTS_COMPLETING, parameters)
            return cursor.rowcount > 0
