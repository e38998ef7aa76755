"""Erasure's SQL: records become tombstones, a batch at a time, each batch in one transaction with
its audit events. Also the subject-access report's reads.

A tombstone keeps token, customer_id, data_type, created_at (and expires_at), erased_at and
erasure_reason; the ciphertext, the wrapped data key and the key id are set to NULL (a CHECK
constraint on the table refuses a tombstone that keeps any of them). PostgreSQL keeps the old row
version until VACUUM: see the README's "What erasure does not reach".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy import text
from sqlalchemy.orm import Session

from app.db.repositories.data_path import EventRow, add_events_on
from app.db.repositories.idempotency import PURGE_IDEMPOTENCY_ENTRIES
from app.db.session import Database

# One key for the retention sweeper's advisory lock, cluster-wide: "piivault-retention" folded
# into a bigint. pg_try_advisory_xact_lock: released with the transaction, so a crashed sweeper
# never leaves it held.
RETENTION_SWEEP_LOCK = 0x70_69_69_76_72_65_74  # "piivret"


@dataclass(frozen=True, slots=True)
class ErasedRow:
    """A record just made a tombstone (or found one already): identifiers only."""

    token: str
    customer_id: str
    data_type: str


@dataclass(frozen=True, slots=True)
class ReportRecord:
    token: str
    data_type: str
    created_at: datetime
    expires_at: datetime | None
    erased_at: datetime | None
    erasure_reason: str | None


# Make tombstones of the rows picked (locked FOR UPDATE first, so a concurrent erasure or rewrap
# waits, then finds them erased and leaves them).
_TOMBSTONE = """
UPDATE records SET format_version = NULL, ciphertext = NULL, wrapped_key = NULL, kms_key_id = NULL,
       fingerprint = NULL,
       erased_at = %(now)s, erasure_reason = %(why)s
 WHERE token = ANY(%(tokens)s::varchar[]) AND erased_at IS NULL
"""
_PICK_ONE = """
SELECT token, customer_id, data_type FROM records
 WHERE token = %(token)s AND erased_at IS NULL FOR UPDATE
"""
# Not SKIP LOCKED: a row locked by a concurrent rewrap must be waited for and erased, not skipped
# (the request would answer done with the row still live).
_PICK_CUSTOMER = """
SELECT token, customer_id, data_type FROM records
 WHERE customer_id = %(customer_id)s AND data_type = ANY(%(data_types)s::varchar[]) AND erased_at IS NULL
 ORDER BY token LIMIT %(limit)s FOR UPDATE
"""
# Live records past their expiry, soonest first (ix_records_expires_at_live).
_PICK_EXPIRED = """
SELECT token, customer_id, data_type FROM records
 WHERE erased_at IS NULL AND expires_at IS NOT NULL AND expires_at <= %(now)s
 ORDER BY expires_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED
"""
_LIVE_TYPES = """
SELECT DISTINCT data_type FROM records WHERE customer_id = %(customer_id)s AND erased_at IS NULL
"""
_TRY_SWEEP_LOCK = "SELECT pg_try_advisory_xact_lock(%(lock)s)"


BuildEvents = Callable[[Sequence[ErasedRow]], Sequence[EventRow]]


class ErasureRepository:
    """Each method is one transaction on a data-path connection of its own (never held across a
    key-service call: erasure makes none)."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def live_types(self, customer_id: str) -> list[str]:
        """The data types of the customer's records not yet erased (ix_records_customer_id)."""
        async with self._database.data_connection() as connection:
            cursor = await connection.execute(_LIVE_TYPES, {"customer_id": customer_id})
            return sorted(row[0] for row in await cursor.fetchall())

    async def erase_token(self, token: str, why: str | None, now: datetime, events: BuildEvents) -> bool:
        """Erase one record if it is not erased yet; False if it already was (or is gone)."""
        erased = await self._erase(_PICK_ONE, {"token": token}, why, now, events)
        return erased is not None and len(erased) > 0

    async def erase_customer_batch(
        self,
        customer_id: str,
        data_types: Sequence[str],
        limit: int,
        why: str | None,
        now: datetime,
        events: BuildEvents,
    ) -> list[ErasedRow]:
        """Up to `limit` of the customer's live records of these types, erased with their events in
        one transaction: all or nothing. An empty list when none is left (a shorter one does not
        mean that: rows erased concurrently while this batch waited drop out of it)."""
        parameters = {"customer_id": customer_id, "data_types": list(data_types), "limit": limit}
        return await self._erase(_PICK_CUSTOMER, parameters, why, now, events) or []

    async def erase_expired_batch(
        self, limit: int, why: str, now: datetime, events: BuildEvents
    ) -> list[ErasedRow] | None:
        """Up to `limit` expired records erased with their events; None if another sweeper holds
        the retention lock (one replica sweeps at a time)."""
        return await self._erase(_PICK_EXPIRED, {"now": now, "limit": limit}, why, now, events, locked=True)

    async def _erase(
        self,
        pick: str,
        parameters: dict[str, Any],
        why: str | None,
        now: datetime,
        events: BuildEvents,
        *,
        locked: bool = False,
    ) -> list[ErasedRow] | None:
        async with self._database.data_connection() as connection, connection.transaction():
            if locked:
                cursor = await connection.execute(_TRY_SWEEP_LOCK, {"lock": RETENTION_SWEEP_LOCK})
                acquired = await cursor.fetchone()
                if not acquired or not acquired[0]:
                    return None
            cursor = await connection.execute(pick, parameters)
            erased = [ErasedRow(*row) for row in await cursor.fetchall()]
            if not erased:
                return erased
            tokens = [row.token for row in erased]
            await connection.execute(_TOMBSTONE, {"tokens": tokens, "now": now, "why": why})
            await self.purge_idempotency_entries(connection, tokens)
            # The events, built (and MAC'd) for exactly the rows erased, in the same transaction:
            # no tombstone without its event, no event without its tombstone.
            await add_events_on(connection, events(erased))
        return erased

    async def purge_idempotency_entries(
        self, connection: psycopg.AsyncConnection[Any], tokens: Sequence[str]
    ) -> None:
        """Erasure also purges the records' idempotency entries (a stored tokenize answer names
        the token, customer and data type), in the erasure's own transaction."""
        await connection.execute(PURGE_IDEMPOTENCY_ENTRIES, {"tokens": list(tokens)})


class ReportRepository:
    """The subject-access report's reads, in the caller's ORM session."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def records_of(self, customer_id: str) -> list[ReportRecord]:
        rows = self.session.execute(
            text(
                "SELECT token, data_type, created_at, expires_at, erased_at, erasure_reason FROM records"
                " WHERE customer_id = :customer_id ORDER BY created_at, token"
            ),
            {"customer_id": customer_id},
        ).all()
        return [
            ReportRecord(r.token, r.data_type, r.created_at, r.expires_at, r.erased_at, r.erasure_reason)
            for r in rows
        ]
