"""Safe retries: the Idempotency-Key rules (no FastAPI, no SQL).

A request carrying a key claims it (principal, method, path, key) before it does anything: the
first claim owns the key under a lease; a later one with the same body gets the first answer
again once there is one (a Replay), 409 idempotency_in_flight while there is not, and 422
idempotency_key_reused with another body. The owner stores its answer in the same statement or
transaction as its records and audit events, so no record exists without a replayable answer;
an answer of 500 or more is never stored: the lease is released and the key runs afresh.

The body is compared by an HMAC under a key derived (HKDF) from the audit chain's key, which
KMS wraps: the database alone cannot test a guess at the PII in a stored body. The derived key
has a purpose of its own (the HKDF info), so it is independent of the chain's MACs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy.orm import Session

from app.crypto.keys import length_prefixed
from app.db.repositories.idempotency import (
    Claimed,
    EntryKey,
    IdempotencyRepository,
    completion_parameters,
    session_connection,
)
from app.db.session import Database
from app.errors import IdempotencyInFlight, IdempotencyKeyReused, InvalidInput, VaultError
from app.metrics import idempotent_replay
from app.services.audit.keyring import AuditKeyring

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
RETENTION_S = 24 * 3600.0
_KEY_PATTERN = re.compile(r"[\x20-\x7e]{1,255}")
_HKDF_INFO = b"piivault.idempotency.body-mac.v1"


def parse_key(raw: str | None) -> str | None:
    """The header's value, or None when absent; 1 to 255 printable ASCII characters, else 422."""
    if raw is None:
        return None
    if not _KEY_PATTERN.fullmatch(raw):
        raise InvalidInput(f"{HEADER} must be 1 to 255 printable ASCII characters", field=HEADER)
    return raw


@dataclass(frozen=True, slots=True)
class Answer:
    """A response to store and replay: status and JSON body (never plaintext, never an API key)."""

    status: int
    body: bytes = field(repr=False)


class Replay(Exception):  # not an error: the first answer, to be sent again
    """The key's first answer, to send again with Idempotent-Replayed: true."""

    def __init__(self, answer: Answer) -> None:
        super().__init__("replay")
        self.answer = answer


@dataclass(frozen=True, slots=True)
class IdempotentRequest:
    """A request that carries an Idempotency-Key: where it goes and its body (JSON-able), which
    is only ever kept as an HMAC."""

    key: str
    method: str
    path: str
    body: Any = field(repr=False)


@dataclass(frozen=True, slots=True)
class Lease:
    """This request's hold on a key: only its holder may store the answer or release the key."""

    entry: EntryKey
    lease_id: uuid.UUID

    def completion(self, answer: Answer, tokens: Sequence[str] = ()) -> dict[str, Any]:
        """The parameters of the statement that stores the answer (for a write that does more)."""
        return completion_parameters(self.entry, self.lease_id, answer.status, answer.body, tokens)


def canonical_body(body: Any) -> bytes:
    """One encoding per JSON value: key order and spacing do not make another body."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class IdempotencyService:
    def __init__(
        self,
        database: Database,
        keyring: AuditKeyring,
        *,
        lease_s: float = 120.0,
        retention_s: float = RETENTION_S,
    ) -> None:
        self._database = database
        self._repository = IdempotencyRepository(database)
        self._keyring = keyring
        self._lease_s = lease_s
        self._retention_s = retention_s
        self._mac_keys: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"IdempotencyService(lease_s={self._lease_s})"

    # The body MAC ---------------------------------------------------------------------------

    def _mac_key(self, version: int, audit_key: bytes) -> bytes:
        with self._lock:
            derived = self._mac_keys.get(version)
            if derived is None:
                hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO)
                derived = self._mac_keys[version] = hkdf.derive(audit_key)
            return derived

    def _current_mac(self, request: IdempotentRequest) -> tuple[int, bytes]:
        version, audit_key = self._keyring.current()
        return version, self._mac(self._mac_key(version, audit_key), request)

    def _mac_under(self, version: int, request: IdempotentRequest) -> bytes | None:
        audit_key = self._keyring.get(version)
        return None if audit_key is None else self._mac(self._mac_key(version, audit_key), request)

    @staticmethod
    def _mac(key: bytes, request: IdempotentRequest) -> bytes:
        message = length_prefixed(request.method, request.path, canonical_body(request.body))
        return hmac.new(key, message, hashlib.sha256).digest()

    # Claiming -------------------------------------------------------------------------------

    def _decide(self, claimed: Claimed, request: IdempotentRequest, version: int, mac: bytes) -> None:
        """Raise what a request that does not own the key gets."""
        theirs = (
            mac if claimed.mac_key_version == version else self._mac_under(claimed.mac_key_version, request)
        )
        if theirs is None or not hmac.compare_digest(theirs, claimed.body_mac):
            raise IdempotencyKeyReused(field=HEADER)
        if claimed.completed and claimed.response_status is not None and claimed.response_body is not None:
            idempotent_replay(request.path)
            raise Replay(Answer(claimed.response_status, claimed.response_body))
        raise IdempotencyInFlight(field=HEADER)

    async def claim(self, principal_id: uuid.UUID, request: IdempotentRequest) -> Lease:
        """On the data path: own the key, or raise Replay, IdempotencyInFlight, IdempotencyKeyReused."""
        if not self._keyring.loaded:
            # The keyring loads once per process (a database read and a KMS call): off the loop.
            await anyio.to_thread.run_sync(self._keyring.current)
        version, mac = self._current_mac(request)
        entry = EntryKey(principal_id, request.method, request.path, request.key)
        lease = Lease(entry, uuid.uuid4())
        claimed = await self._repository.claim(
            entry, mac, version, lease.lease_id, self._lease_s, self._retention_s
        )
        if not claimed.ours:
            if claimed.mac_key_version != version:
                await anyio.to_thread.run_sync(self._decide, claimed, request, version, mac)
            self._decide(claimed, request, version, mac)
        return lease

    def claim_sync(self, principal_id: uuid.UUID, request: IdempotentRequest) -> Lease:
        """claim, for the admin routes: committed at once in a transaction of its own, so other
        requests see the key in flight while this one works."""
        version, mac = self._current_mac(request)
        entry = EntryKey(principal_id, request.method, request.path, request.key)
        lease = Lease(entry, uuid.uuid4())
        with self._database.transaction(side=True) as session:
            claimed = self._repository.claim_on(
                session_connection(session),
                entry,
                mac,
                version,
                lease.lease_id,
                self._lease_s,
                self._retention_s,
            )
        if not claimed.ours:
            self._decide(claimed, request, version, mac)
        return lease

    # Settling -------------------------------------------------------------------------------

    async def complete(self, lease: Lease, answer: Answer, tokens: Sequence[str] = ()) -> None:
        """Store the answer on its own (an answer that wrote no records)."""
        if not await self._repository.complete(
            lease.entry, lease.lease_id, answer.status, answer.body, tokens
        ):
            raise IdempotencyInFlight(field=HEADER)

    def complete_in(self, session: Session, lease: Lease, answer: Answer) -> None:
        """Store the answer in the request's own transaction: it commits with what it answers.
        A lease lost meanwhile (taken over after it expired) fails the whole transaction."""
        if not self._repository.complete_on(
            session_connection(session), lease.entry, lease.lease_id, answer.status, answer.body
        ):
            raise IdempotencyInFlight(field=HEADER)

    def settle_on_its_own(self, lease: Lease, answer: Answer) -> None:
        """Store a refusal's answer (a 4xx) beside the request's transaction, which rolls back."""
        try:
            with self._database.transaction(side=True) as session:
                self._repository.complete_on(
                    session_connection(session), lease.entry, lease.lease_id, answer.status, answer.body
                )
        except VaultError as err:
            # Not stored: the lease runs out and the key is free again; the refusal still stands.
            log.warning("idempotency answer not stored: %s", err.code)

    async def release(self, lease: Lease) -> None:
        """Give the key back (5xx, or anything unexpected): a retry runs afresh. Best effort: if
        the database is down, the lease expires instead."""
        try:
            await self._repository.release(lease.entry, lease.lease_id)
        except VaultError as err:
            log.warning("idempotency lease not released: %s", err.code)

    def release_sync(self, lease: Lease) -> None:
        try:
            with self._database.transaction(side=True) as session:
                self._repository.release_on(session_connection(session), lease.entry, lease.lease_id)
        except VaultError as err:
            log.warning("idempotency lease not released: %s", err.code)

    # Housekeeping ---------------------------------------------------------------------------

    def sweep(self, limit: int = 1000, rounds: int = 10) -> int:
        """Delete entries older than the retention, `limit` per transaction, at most `rounds`
        transactions a call (bounded work; the next sweep goes on). Returns how many."""
        deleted = 0
        for _ in range(rounds):
            with self._database.transaction(side=True) as session:
                count = self._repository.sweep_on(session_connection(session), self._retention_s, limit)
            deleted += count
            if count < limit:
                break
        return deleted

    @staticmethod
    def purge_for_tokens(session: Session, tokens: Sequence[str]) -> int:
        """For erasure, in its transaction: delete the entries whose answers name these tokens."""
        return IdempotencyRepository.purge_for_tokens(session, tokens)
