"""Idempotency-Key entries: the claim, its completion or release, the sweep, the purge.

Each statement stands alone (autocommit on the data path, or one statement inside the caller's
transaction), so the same SQL serves the data path's async connections and the admin routes'
psycopg connection under their ORM session. The claim is one INSERT ... ON CONFLICT on the
primary key (principal, method, path, key): whichever replica inserts first owns the key, and
every other request with that key reads back, under the row's lock, what it must answer.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy.orm import Session

from app.db.session import Database


@dataclass(frozen=True, slots=True)
class EntryKey:
    """Which entry: a key is scoped to the principal, the method and the path."""

    principal_id: uuid.UUID
    method: str
    path: str
    key: str

    def __repr__(self) -> str:
        return f"EntryKey(method={self.method!r}, path={self.path!r})"


@dataclass(frozen=True, slots=True)
class Claimed:
    """What a claim found: `ours` if this request holds the lease now; otherwise the entry as the
    first request left it (its body MAC, and its answer once completed)."""

    ours: bool
    body_mac: bytes
    mac_key_version: int
    completed: bool
    response_status: int | None
    response_body: bytes | None


_COLUMNS = (
    "body_mac", "mac_key_version", "lease_id", "lease_expires_at", "created_at",
    "completed_at", "response_status", "response_body", "tokens",
)  # fmt: skip
_WHERE_ENTRY = "principal_id = %(principal_id)s AND method = %(method)s AND path = %(path)s AND key = %(key)s"
# The request takes the entry over when it has expired (the key is new again), or when its holder
# crashed: the lease ran out before an answer, and the body is the same.
_TAKEOVER = (
    "(k.created_at <= now() - make_interval(secs => %(retention_s)s)"
    " OR (k.completed_at IS NULL AND k.lease_expires_at <= now()"
    " AND k.mac_key_version = EXCLUDED.mac_key_version AND k.body_mac = EXCLUDED.body_mac))"
)
# DO UPDATE (not DO NOTHING) on conflict: the row comes back locked and current, committed after
# this statement's snapshot or not, in this one round trip. Without a takeover it is rewritten
# as it was.
_SET = ", ".join(f"{c} = CASE WHEN {_TAKEOVER} THEN EXCLUDED.{c} ELSE k.{c} END" for c in _COLUMNS)
_CLAIM = f"""
INSERT INTO idempotency_keys AS k
       (principal_id, method, path, key, body_mac, mac_key_version, lease_id, lease_expires_at, created_at)
VALUES (%(principal_id)s, %(method)s, %(path)s, %(key)s, %(body_mac)s, %(mac_key_version)s, %(lease_id)s,
        now() + make_interval(secs => %(lease_s)s), now())
ON CONFLICT (principal_id, method, path, key) DO UPDATE SET {_SET}
RETURNING k.lease_id = %(lease_id)s AS ours, k.body_mac, k.mac_key_version,
          k.completed_at IS NOT NULL AS completed, k.response_status, k.response_body
"""  # noqa: S608 (column names are constants, values parameters)
# The answer, stored only by the lease's holder and only once.
COMPLETE = f"""
UPDATE idempotency_keys
   SET completed_at = now(), response_status = %(status)s, response_body = %(body)s,
       tokens = %(tokens)s::varchar[]
 WHERE {_WHERE_ENTRY} AND lease_id = %(lease_id)s AND completed_at IS NULL
"""  # noqa: S608
_RELEASE = (
    f"DELETE FROM idempotency_keys WHERE {_WHERE_ENTRY} AND lease_id = %(lease_id)s AND completed_at IS NULL"  # noqa: S608
)
_SWEEP = """
DELETE FROM idempotency_keys WHERE (principal_id, method, path, key) IN (
  SELECT principal_id, method, path, key FROM idempotency_keys
   WHERE created_at <= now() - make_interval(secs => %(retention_s)s)
   ORDER BY created_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
"""
# Every entry whose stored answer names one of the tokens (erasure purges them with the records).
PURGE_IDEMPOTENCY_ENTRIES = "DELETE FROM idempotency_keys WHERE tokens && %(tokens)s::varchar[]"
_PURGE = PURGE_IDEMPOTENCY_ENTRIES


def entry_parameters(entry: EntryKey) -> dict[str, Any]:
    return {"principal_id": entry.principal_id, "method": entry.method, "path": entry.path, "key": entry.key}


def completion_parameters(
    entry: EntryKey, lease_id: uuid.UUID, status: int, body: bytes, tokens: Sequence[str]
) -> dict[str, Any]:
    return entry_parameters(entry) | {
        "lease_id": lease_id,
        "status": status,
        "body": body,
        "tokens": list(tokens),
    }


def _claimed(row: Any) -> Claimed:
    return Claimed(
        ours=bool(row.ours),
        body_mac=bytes(row.body_mac),
        mac_key_version=row.mac_key_version,
        completed=bool(row.completed),
        response_status=row.response_status,
        response_body=None if row.response_body is None else bytes(row.response_body),
    )


def session_connection(session: Session) -> psycopg.Connection[Any]:
    """The psycopg connection under an ORM session, inside the session's transaction."""
    driver: psycopg.Connection[Any] = session.connection().connection.driver_connection  # type: ignore[assignment]
    return driver


class IdempotencyRepository:
    """Async methods use the data path's pool (one autocommit statement each); the `_on`
    methods run on a psycopg connection the caller holds (in its transaction)."""

    def __init__(self, database: Database) -> None:
        self._database = database

    @staticmethod
    def _claim_parameters(
        entry: EntryKey,
        body_mac: bytes,
        mac_key_version: int,
        lease_id: uuid.UUID,
        lease_s: float,
        retention_s: float,
    ) -> dict[str, Any]:
        return entry_parameters(entry) | {
            "body_mac": body_mac,
            "mac_key_version": mac_key_version,
            "lease_id": lease_id,
            "lease_s": lease_s,
            "retention_s": retention_s,
        }

    async def claim(
        self,
        entry: EntryKey,
        body_mac: bytes,
        mac_key_version: int,
        lease_id: uuid.UUID,
        lease_s: float,
        retention_s: float,
    ) -> Claimed:
        parameters = self._claim_parameters(entry, body_mac, mac_key_version, lease_id, lease_s, retention_s)
        async with self._database.data_connection() as connection:
            cursor = connection.cursor(row_factory=namedtuple_row)
            await cursor.execute(_CLAIM, parameters)
            row = await cursor.fetchone()
        assert row is not None  # noqa: S101 (an upsert always returns its row)
        return _claimed(row)

    @staticmethod
    def claim_on(
        connection: psycopg.Connection[Any],
        entry: EntryKey,
        body_mac: bytes,
        mac_key_version: int,
        lease_id: uuid.UUID,
        lease_s: float,
        retention_s: float,
    ) -> Claimed:
        parameters = IdempotencyRepository._claim_parameters(
            entry, body_mac, mac_key_version, lease_id, lease_s, retention_s
        )
        row = connection.cursor(row_factory=namedtuple_row).execute(_CLAIM, parameters).fetchone()
        assert row is not None  # noqa: S101 (an upsert always returns its row)
        return _claimed(row)

    async def complete(
        self, entry: EntryKey, lease_id: uuid.UUID, status: int, body: bytes, tokens: Sequence[str] = ()
    ) -> bool:
        """Store the answer; False if the lease is no longer this request's."""
        async with self._database.data_connection() as connection:
            cursor = await connection.execute(
                COMPLETE, completion_parameters(entry, lease_id, status, body, tokens)
            )
            return cursor.rowcount == 1

    @staticmethod
    def complete_on(
        connection: psycopg.Connection[Any],
        entry: EntryKey,
        lease_id: uuid.UUID,
        status: int,
        body: bytes,
        tokens: Sequence[str] = (),
    ) -> bool:
        cursor = connection.execute(COMPLETE, completion_parameters(entry, lease_id, status, body, tokens))
        return cursor.rowcount == 1

    async def release(self, entry: EntryKey, lease_id: uuid.UUID) -> None:
        """Give the key back (no answer stored): the next request with it runs afresh."""
        async with self._database.data_connection() as connection:
            await connection.execute(_RELEASE, entry_parameters(entry) | {"lease_id": lease_id})

    @staticmethod
    def release_on(connection: psycopg.Connection[Any], entry: EntryKey, lease_id: uuid.UUID) -> None:
        connection.execute(_RELEASE, entry_parameters(entry) | {"lease_id": lease_id})

    @staticmethod
    def sweep_on(connection: psycopg.Connection[Any], retention_s: float, limit: int) -> int:
        """Delete up to `limit` expired entries (skipping rows another replica is deleting)."""
        return connection.execute(_SWEEP, {"retention_s": retention_s, "limit": limit}).rowcount

    @staticmethod
    def purge_for_tokens(session: Session, tokens: Sequence[str]) -> int:
        """Delete every entry whose answer names one of these tokens, in the caller's transaction
        (the erase's): an erased record's token, customer and data type leave no stored answer."""
        if not tokens:
            return 0
        return session_connection(session).execute(_PURGE, {"tokens": list(tokens)}).rowcount

    async def purge_for_tokens_async(self, tokens: Sequence[str]) -> int:
        """purge_for_tokens on the data path (a statement of its own)."""
        if not tokens:
            return 0
        async with self._database.data_connection() as connection:
            return (await connection.execute(_PURGE, {"tokens": list(tokens)})).rowcount
