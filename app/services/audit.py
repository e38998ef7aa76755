"""Audit events: every allow and every deny, tamper-evident. Never a value, a data key or an API key.

Allowed operations write their event in the request's own transaction, so an operation that
committed always has its event and one whose event cannot be written does not happen. Denials are
written in a transaction of their own, since the request itself is refused and rolled back.

Tamper evidence is one HMAC chain over all events: at commit, under the chain head's row lock, each
event gets the next sequence number, the previous event's MAC and its own MAC over every field.
The HMAC key is wrapped by the key provider (KMS), so someone with only the database can neither
forge an event nor mend the chain after changing, deleting, inserting or reordering events.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from app.crypto.keys import KeyProvider, length_prefixed
from app.db.models import AuditEvent, AuditKey
from app.db.repositories import AuditFilter, AuditRepository
from app.db.session import Database
from app.errors import AuditUnavailable, DatabaseUnavailable
from app.metrics import AUDIT_EVENTS
from app.services.alerts import Alerter
from app.services.context import Caller, RequestContext, utcnow

log = logging.getLogger(__name__)

Outcome = Literal["allowed", "denied", "error"]
GENESIS_MAC = bytes(32)
# The audit key is no record's: its context names its purpose, never a customer.
AUDIT_KEY_CONTEXT = {"purpose": "piivault-audit-chain"}
_PENDING = "piivault.audit.pending"
_NONE = b"\xff"


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


def _part(value: object) -> bytes:
    if value is None:
        return _NONE
    if isinstance(value, datetime):
        value = value.astimezone(UTC).isoformat()
    if isinstance(value, bytes):
        return b"\x00" + value
    return b"\x00" + str(value).encode("utf-8")


def event_mac(key: bytes, event: AuditEvent) -> bytes:
    """HMAC-SHA256 over every field of the event, its place in the chain and the previous link."""
    message = length_prefixed(
        b"piivault.audit.v1",
        *(
            _part(value)
            for value in (
                event.chain_seq, event.key_version, event.prev_mac, event.event_id, event.time,
                event.request_id, event.principal_id, event.principal_name, event.action, event.outcome,
                event.reason, event.token, event.customer_id, event.data_type, event.grant_id,
                event.target_id, event.access_reason, event.source_ip, event.user_agent,
                event.kms_request_id,
            )
        ),
    )  # fmt: skip
    return hmac.new(key, message, hashlib.sha256).digest()


class AuditKeyring:
    """The chain's HMAC keys, unwrapped once per process through the key provider."""

    def __init__(self, database: Database, keys: KeyProvider) -> None:
        self._database = database
        self._keys = keys
        self._unwrapped: dict[int, bytes] = {}
        self._current: int | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AuditKeyring(versions={sorted(self._unwrapped)})"

    def current(self) -> tuple[int, bytes]:
        with self._lock:
            if self._current is None:
                self._current = self._load_or_create()
            return self._current, self._unwrapped[self._current]

    def get(self, version: int) -> bytes | None:
        with self._lock:
            if version not in self._unwrapped:
                with self._database.transaction() as session:
                    stored = AuditRepository(session).key(version)
                if stored is None:
                    return None
                self._unwrap(stored)
            return self._unwrapped[version]

    def _unwrap(self, stored: AuditKey) -> None:
        data_key = self._keys.decrypt_data_key(stored.wrapped_key, AUDIT_KEY_CONTEXT)
        self._unwrapped[stored.version] = data_key.plaintext

    def _load_or_create(self) -> int:
        with self._database.transaction() as session:
            repository = AuditRepository(session)
            stored = repository.latest_key()
            if stored is None:
                made = self._keys.generate_data_key(AUDIT_KEY_CONTEXT)
                repository.add_key_if_absent(
                    AuditKey(version=1, wrapped_key=made.wrapped, kms_key_id=made.key_id)
                )
                stored = repository.latest_key()
                assert stored is not None  # noqa: S101 (just inserted, or inserted by a racing process)
        self._unwrap(stored)
        return stored.version


@dataclass
class VerifyReport:
    ok: bool
    events_checked: int
    head_seq: int
    first_bad_event: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


class Auditor:
    def __init__(self, database: Database, keyring: AuditKeyring, alerter: Alerter | None = None) -> None:
        self._database = database
        self._keyring = keyring
        self._alerter = alerter or Alerter()
        database.before_commit(self._seal)

    def record(self, session: Session, events: Sequence[AuditEvent]) -> None:
        """Queue events on the caller's transaction; they are chained and written as it commits."""
        if events:
            session.info.setdefault(_PENDING, []).extend(events)

    def record_on_its_own(self, events: Sequence[AuditEvent]) -> None:
        """Write (denial) events in their own transaction, then raise the alarms."""
        if not events:
            return
        try:
            with self._database.transaction() as session:
                self.record(session, events)
        except DatabaseUnavailable:
            raise AuditUnavailable() from None
        self._alerter.denied(events)

    def _seal(self, session: Session) -> None:
        """At commit: chain the transaction's events under the head's lock, as its last statements,
        so the lock is held only for the commit itself. Failing here fails the whole commit."""
        pending: list[AuditEvent] = session.info.pop(_PENDING, [])
        if not pending:
            return
        # The key service being down is reported as such (503 key_service_unavailable).
        version, key = self._keyring.current()
        try:
            repository = AuditRepository(session)
            head = repository.lock_head()
            seq, prev = head.seq, head.mac
            for event in pending:
                seq += 1
                event.chain_seq, event.key_version, event.prev_mac = seq, version, prev
                event.mac = prev = event_mac(key, event)
            repository.add_all(pending)
            head.seq, head.mac = seq, prev
            session.flush()
        except (DBAPIError, LookupError) as err:
            log.error("audit chain could not be written: %s", type(err).__name__)
            raise AuditUnavailable() from None
        for event in pending:
            AUDIT_EVENTS.labels(event.action, event.outcome).inc()

    def search(self, session: Session, where: AuditFilter, limit: int) -> Sequence[AuditEvent]:
        return AuditRepository(session).search(where, limit)

    def verify(self, since: datetime | None = None, until: datetime | None = None) -> VerifyReport:
        """Check the chain (or the part of it between since and until) and name the first bad event."""
        with self._database.transaction() as session:
            # One snapshot: events and head as of the same instant, whatever writers do meanwhile.
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            return self._verify(AuditRepository(session), since, until)

    def _verify(
        self, repository: AuditRepository, since: datetime | None, until: datetime | None
    ) -> VerifyReport:
        head = repository.head()
        head_seq = head.seq if head else 0
        for stray in repository.unchained(1):
            return _bad(0, head_seq, stray, "not in the chain: written behind the vault's back")
        low, high = repository.seq_bounds(since, until)
        ranged = since is not None or until is not None
        if low is None or high is None:
            if not ranged and head is not None and head.seq != 0:
                return VerifyReport(
                    False, 0, head_seq, {"chain_seq": 1, "problem": "every event was deleted"}
                )
            return VerifyReport(True, 0, head_seq)
        # Unranged, walk past the head too: an event appended behind the vault's back is found.
        first, last = (low, high) if ranged else (1, max(head_seq, high))
        prev = GENESIS_MAC
        if first > 1:
            before = repository.at_seq(first - 1)
            if before is None or before.mac is None:
                return VerifyReport(
                    False, 0, head_seq, {"chain_seq": first - 1, "problem": "missing: event deleted"}
                )
            prev = before.mac
        expected, checked = first, 0
        for event in repository.walk(first, last):
            if event.chain_seq != expected:
                return _bad(
                    checked, head_seq, event, f"events {expected}..{event.chain_seq} missing: deleted"
                )
            if event.prev_mac != prev:
                return _bad(checked, head_seq, event, "broken link: events inserted, deleted or reordered")
            key = self._keyring.get(event.key_version) if event.key_version is not None else None
            if key is None or event.mac is None or not hmac.compare_digest(event_mac(key, event), event.mac):
                return _bad(checked, head_seq, event, "MAC mismatch: event modified or forged")
            prev, expected, checked = event.mac, expected + 1, checked + 1
        if expected != last + 1:
            return VerifyReport(
                False, checked, head_seq, {"chain_seq": expected, "problem": "missing: events deleted"}
            )
        if not ranged and head is not None and prev != head.mac:
            return VerifyReport(
                False, checked, head_seq, {"chain_seq": head_seq, "problem": "chain head does not match"}
            )
        return VerifyReport(True, checked, head_seq)

    def export(self, since: datetime | None, until: datetime | None) -> Iterator[AuditEvent]:
        """Events in chain order (oldest first) for shipping to a SIEM, streamed from one snapshot."""
        with self._database.transaction() as session:
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            repository = AuditRepository(session)
            low, high = repository.seq_bounds(since, until)
            if low is not None and high is not None:
                yield from repository.walk(low, high)

    def close(self) -> None:
        self._alerter.close()


def _bad(checked: int, head_seq: int, event: AuditEvent, problem: str) -> VerifyReport:
    bad = {"event_id": str(event.event_id), "chain_seq": event.chain_seq, "problem": problem}
    return VerifyReport(False, checked, head_seq, bad)
