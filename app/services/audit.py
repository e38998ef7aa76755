"""Audit events: every allow and every deny, tamper-evident. Never a value, a data key or an API key.

Allowed operations write their event in the request's own transaction, so an operation that
committed always has its event and one whose event cannot be written does not happen. Denials are
written in a transaction of their own, since the request itself is refused and rolled back.

Tamper evidence, in two steps. As it is written, each event gets an HMAC over every field (no lock,
so writers never queue behind each other). Moments later a sealer (one at a time, cluster-wide)
chains committed events: each gets a link (the next sequence number, the previous link's MAC and
a chain MAC binding the two to the event's MAC) in a table of its own, so an event row is written
once and never updated. The HMAC key is wrapped by the key provider (KMS), so someone with only the
database can neither forge an event nor mend the chain after changing, deleting, inserting or
reordering events. The one gap: an event deleted in the moments before it is sealed leaves no trace.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import struct
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any, Literal

import anyio.to_thread
import psycopg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from app.crypto.keys import KeyProvider, length_prefixed, run_blocking
from app.db.models import AuditEvent, AuditKey
from app.db.repositories import AuditFilter, AuditRepository, SealRepository
from app.db.repositories.data_path import DataPathRepository, EventRow, RecordRow
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


def _bounded(text: str | None, limit: int) -> str | None:
    """Caller-supplied text fits its column and holds no NUL: a denial is never lost to its input."""
    return None if text is None else text.replace("\x00", "\ufffd")[:limit]


def new_event_id() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits. Time-ordered ids
    land at the right edge of the event_id index instead of anywhere in it (measured: a fifth
    of an event insert's database CPU)."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # RFC 9562 variant
    return uuid.UUID(int=value)


def build_event(
    action: str,
    outcome: Outcome,
    ctx: RequestContext,
    caller: Caller | None,
    subject: Subject = Subject(),
    reason: str | None = None,
) -> EventRow:
    return EventRow(
        event_id=new_event_id(),
        time=utcnow(),
        request_id=_bounded(ctx.request_id, 128),
        principal_id=caller.id if caller else None,
        principal_name=caller.name if caller else None,
        api_key_id=caller.key_id if caller else None,
        action=action,
        outcome=outcome,
        reason=reason,
        token=_bounded(subject.token, 64),
        customer_id=_bounded(subject.customer_id, 128),
        data_type=_bounded(subject.data_type, 64),
        grant_id=subject.grant_id,
        target_id=_bounded(subject.target_id, 128),
        access_reason=_bounded(ctx.access_reason, 512),
        source_ip=_bounded(ctx.source_ip, 64),
        user_agent=_bounded(ctx.user_agent, 512),
        kms_request_id=subject.kms_request_id,
    )


_EVENT_MAC_TAG = length_prefixed(b"piivault.audit.event.v1")
_NONE_PART = length_prefixed(_NONE)
_length = struct.Struct(">I").pack
# The fields an event MAC covers, in this order for ever: a change of order or of set is a new
# format version (v1 is below), since every MAC already written would stop verifying.
_MAC_FIELDS = attrgetter(
    "key_version", "event_id", "time", "request_id", "principal_id", "principal_name", "api_key_id",
    "action", "outcome", "reason", "token", "customer_id", "data_type", "grant_id", "target_id",
    "access_reason", "source_ip", "user_agent", "kms_request_id",
)  # fmt: skip


def event_mac(key: bytes, event: EventRow | AuditEvent | Any) -> bytes:
    """HMAC-SHA256 over every field the event says, made as it is written.

    The message is length_prefixed(tag, *parts), each part b"\xff" for None or b"\x00" + the
    value (bytes as they are, datetimes as UTC ISO 8601, anything else as str), built inline:
    this runs for every event on the hot path."""
    chunks = [_EVENT_MAC_TAG]
    for value in _MAC_FIELDS(event):
        if value is None:
            chunks.append(_NONE_PART)
            continue
        if isinstance(value, bytes):
            raw = value
        elif isinstance(value, datetime):
            raw = value.astimezone(UTC).isoformat().encode()
        else:
            raw = str(value).encode()
        chunks += (_length(len(raw) + 1), b"\x00", raw)
    return hmac.digest(key, b"".join(chunks), "sha256")


def chain_mac(key: bytes, seq: int, prev_mac: bytes, one_event_mac: bytes) -> bytes:
    """The chain link: this event's MAC bound to its place and to the link before it."""
    message = length_prefixed(b"piivault.audit.chain.v1", str(seq), prev_mac, one_event_mac)
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

    @property
    def loaded(self) -> bool:
        return self._current is not None

    def current(self) -> tuple[int, bytes]:
        with self._lock:
            if self._current is None:
                self._current = self._load_or_create()
            return self._current, self._unwrapped[self._current]

    def get(self, version: int) -> bytes | None:
        with self._lock:
            if version not in self._unwrapped:
                with self._database.transaction(side=True) as session:
                    stored = AuditRepository(session).key(version)
                if stored is None:
                    return None
                self._unwrap(stored)
            return self._unwrapped[version]

    def _unwrap(self, stored: AuditKey) -> None:
        # Under the key it was wrapped with: an audit key outlives a change of the current key.
        unwrap = self._keys.decrypt_data_key(stored.wrapped_key, AUDIT_KEY_CONTEXT, key_id=stored.kms_key_id)
        data_key = run_blocking(unwrap)
        self._unwrapped[stored.version] = data_key.plaintext

    def _load_or_create(self) -> int:
        with self._database.transaction(side=True) as session:
            repository = AuditRepository(session)
            stored = repository.latest_key()
            if stored is None:
                made = run_blocking(self._keys.generate_data_key(AUDIT_KEY_CONTEXT))
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
    # Keep (head_seq, head_mac) outside the database: a later verify with it as anchor finds
    # the newest events deleted even if the head row was rolled back with them.
    head_mac: str | None = None


class Auditor:
    """Writes events with their MACs, seals them into the chain, and verifies the chain.

    Writing takes no lock: concurrent requests (and replicas) never wait on each other for the
    audit. Sealing is one transaction at a time cluster-wide (the chain head's row lock); each
    replica's sealer runs every fraction of a second, and verify seals first.
    """

    def __init__(self, database: Database, keyring: AuditKeyring, alerter: Alerter | None = None) -> None:
        self._database = database
        self._data_path = DataPathRepository(database)
        self._keyring = keyring
        self._alerter = alerter or Alerter()

    def _stamp(self, events: Sequence[EventRow]) -> None:
        # The key service being down is reported as such (503 key_service_unavailable).
        version, key = self._keyring.current()
        for event in events:
            event.key_version = version
            event.event_mac = event_mac(key, event)

    @staticmethod
    def _counted(events: Sequence[EventRow]) -> None:
        for event in events:
            AUDIT_EVENTS.labels(event.action, event.outcome).inc()

    def record(self, session: Session, events: Sequence[EventRow]) -> None:
        """Write events in the caller's transaction: if they cannot be written, neither is the rest."""
        if not events:
            return
        self._stamp(events)
        try:
            AuditRepository(session).add_all(events)
        except DBAPIError as err:
            log.error("audit write failed: %s", type(err.orig).__name__)
            raise AuditUnavailable() from None
        self._counted(events)

    async def _stamp_on_loop(self, events: Sequence[EventRow]) -> None:
        # The keyring loads (a database read and a key-service call) once per process: in a
        # worker thread, so the event loop never blocks on it.
        if not self._keyring.loaded:
            await anyio.to_thread.run_sync(self._keyring.current)
        self._stamp(events)

    async def record_with_records(self, records: Sequence[RecordRow], events: Sequence[EventRow]) -> None:
        """The data path's write: records and their events in one statement, so neither commits
        without the other."""
        if not events and not records:
            return
        await self._stamp_on_loop(events)
        try:
            await self._data_path.add_records_with_events(records, events)
        except (psycopg.OperationalError, psycopg.IntegrityError):
            raise  # the database is down, or a token collided: mapped as such by the Database
        except psycopg.Error as err:
            log.error("audit write failed: %s", err.sqlstate or type(err).__name__)
            raise AuditUnavailable() from None
        self._counted(events)

    async def record_denials(self, events: Sequence[EventRow]) -> None:
        """The data path's refusals: written at once in a statement of their own (autocommit),
        whatever happens to the request next; then the alarms."""
        if not events:
            return
        await self._stamp_on_loop(events)
        try:
            await self._data_path.add_events(events)
        except psycopg.Error as err:
            log.error("audit write failed: %s", err.sqlstate or type(err).__name__)
            raise AuditUnavailable() from None
        self._counted(events)
        self._alerter.denied(events)

    def record_on_its_own(self, events: Sequence[EventRow]) -> None:
        """Write (denial) events in their own transaction, then raise the alarms."""
        if not events:
            return
        try:
            with self._database.transaction(side=True) as session:
                self.record(session, events)
        except DatabaseUnavailable:
            raise AuditUnavailable() from None
        self._alerter.denied(events)

    def _verified_key(self, event: AuditEvent | Any) -> bytes | None:
        """The event's MAC key if its own MAC holds, else None."""
        key = self._keyring.get(event.key_version) if event.key_version is not None else None
        if key is None or event.event_mac is None:
            return None
        return key if hmac.compare_digest(event_mac(key, event), event.event_mac) else None

    def seal(self, batch: int = 2000) -> int:
        """Chain committed events not yet sealed; returns how many were sealed.

        An event whose own MAC does not verify (written behind the vault's back, or changed
        before it was sealed) is never chained: it stays outside, and verify names it. The new
        head is logged as a checkpoint, so a copy outside the database (the SIEM) can anchor it.

        Work is found by transaction id, not by marking events. The head keeps sealed_below and
        pending_xids: every event written by a transaction below sealed_below and not in
        pending_xids is sealed. A pass holds the head's lock throughout (one sealer at a time,
        cluster-wide), takes a horizon first (the first unassigned transaction id and those
        still running), reads the events of pending_xids and then those from sealed_below up to
        the horizon, a page at a time in (written_xid, id) order, each page bounded by the rows
        it reads, and moves the head to its horizon: every other transaction had ended before
        the pass looked, so its events were all visible to it. A transaction left open holds
        back only its own events, not the sealer's window.
        """
        sealed = 0
        with self._database.raw_transaction() as connection:
            repository = SealRepository(connection)
            head = repository.lock_head()
            if head is None:
                return 0  # another replica is sealing right now
            seq, prev, written_from, still_running = head
            horizon = repository.horizon()
            if horizon[0] < written_from:
                # Transaction ids went backwards: the database was restored into, or moved to,
                # another cluster. Look at every event once, then carry on from the new ids. (Not
                # seen if the new cluster's ids overtake the old head's before a pass runs: events
                # written in between stay outside the chain, and verify names them.)
                log.error("audit sealer: transaction ids went back, rescanning every event")
                written_from, still_running = 0, []

            def chain(events: Sequence[Any]) -> None:
                nonlocal seq, prev, sealed
                links: list[tuple[int, int, bytes, bytes]] = []
                for event in events:
                    key = self._verified_key(event)
                    if key is None or event.event_mac is None:
                        log.error("audit event %s fails its MAC: not sealed", event.event_id)
                        continue
                    seq += 1
                    mac = chain_mac(key, seq, prev, event.event_mac)
                    links.append((seq, event.id, prev, mac))
                    prev = mac
                    sealed += 1
                repository.link(links)

            # The transactions running at the last horizon, one at a time, then every one from
            # that horizon up to this one: later ones are the next pass's.
            ranges = [(xid, xid + 1) for xid in sorted(still_running)] + [(written_from, horizon[0])]
            for low, high in ranges:
                after = (low - 1, 0)
                while page := repository.seal_page(low, high, after, batch):
                    chain([event for event in page if not event.linked])
                    after = (page[-1].written_xid, page[-1].id)
                    if len(page) < batch:
                        break
            repository.move_head(seq, prev, *horizon)
        if sealed:
            log.info(json.dumps({"audit_checkpoint": {"seq": seq, "mac": prev.hex()}}))
        return sealed

    def search(self, session: Session, where: AuditFilter, limit: int) -> Sequence[AuditEvent]:
        return AuditRepository(session).search(where, limit)

    def verify(
        self,
        since: datetime | None = None,
        until: datetime | None = None,
        anchor: tuple[int, bytes] | None = None,
    ) -> VerifyReport:
        """Seal what is pending, then check the chain (or the part of it between since and until)
        and name the first bad event. An anchor (a checkpoint's seq and MAC kept outside the
        database) also catches the newest events deleted with the head rolled back."""
        try:
            self.seal()
        except psycopg.IntegrityError:
            # A link planted past the head jams the sealer; the walk below names it.
            log.error("audit verify: sealing failed on a link that should not exist; verifying what is there")
        with self._database.transaction() as session:
            # One snapshot: events and head as of the same instant, whatever writers do meanwhile.
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            repository = AuditRepository(session)
            report = self._verify(repository, since, until)
            if report.ok and anchor is not None:
                report = self._check_anchor(repository, report, *anchor)
            return report

    def _check_anchor(
        self, repository: AuditRepository, report: VerifyReport, seq: int, mac: bytes
    ) -> VerifyReport:
        found = repository.at_seq(seq)
        if seq > report.head_seq or found is None:
            problem = f"the anchored event {seq} is gone: the newest events were deleted"
            return VerifyReport(
                False, report.events_checked, report.head_seq, {"chain_seq": seq, "problem": problem}
            )
        event, link = found
        if not hmac.compare_digest(link.mac, mac):
            problem = "the anchored event's MAC differs: the chain was rewritten"
            return _bad(report.events_checked, report.head_seq, problem, event, seq)
        return report

    def _verify(
        self, repository: AuditRepository, since: datetime | None, until: datetime | None
    ) -> VerifyReport:
        head = repository.head()
        head_seq = head.seq if head else 0
        sealed_below = head.sealed_below if head else 0
        still_running = set(head.pending_xids) if head else set()
        # Events not sealed yet are fine if their own MAC holds and the sealer has not passed them.
        for stray in repository.unsealed():
            if self._verified_key(stray) is None:
                return _bad(0, head_seq, "not in the chain: fails its MAC (forged or modified)", stray)
            if stray.written_xid < sealed_below and stray.written_xid not in still_running:
                return _bad(
                    0, head_seq, "not in the chain though the sealer passed it: its link was deleted", stray
                )
        low, high = repository.seq_bounds(since, until)
        ranged = since is not None or until is not None
        if low is None or high is None:
            if not ranged and head_seq != 0:
                return VerifyReport(
                    False, 0, head_seq, {"chain_seq": 1, "problem": "every event was deleted"}
                )
            return VerifyReport(True, 0, head_seq)
        if low < 1:
            found = repository.at_seq(low)
            return _bad(
                0, head_seq, "outside the chain's numbering: forged", found[0] if found else None, low
            )
        # Unranged, walk past the head too: a link appended behind the vault's back is found.
        first, last = (low, high) if ranged else (1, max(head_seq, high))
        prev = GENESIS_MAC
        if first > 1:
            before = repository.at_seq(first - 1)
            if before is None:
                return VerifyReport(
                    False, 0, head_seq, {"chain_seq": first - 1, "problem": "missing: event deleted"}
                )
            prev = before[1].mac
        expected, checked = first, 0
        for event, link in repository.walk(first, last):
            if link.seq != expected:
                problem = f"events {expected}..{link.seq - 1} missing: deleted"
                return _bad(checked, head_seq, problem, event, link.seq)
            if event is None:
                return _bad(checked, head_seq, "missing: event deleted", None, link.seq)
            if link.prev_mac != prev:
                problem = "broken link: events inserted, deleted or reordered"
                return _bad(checked, head_seq, problem, event, link.seq)
            key = self._verified_key(event)
            if key is None or event.event_mac is None:
                return _bad(checked, head_seq, "MAC mismatch: event modified or forged", event, link.seq)
            if not hmac.compare_digest(chain_mac(key, expected, prev, event.event_mac), link.mac):
                return _bad(checked, head_seq, "chain MAC mismatch: event moved or forged", event, link.seq)
            prev, expected, checked = link.mac, expected + 1, checked + 1
        if expected != last + 1:
            return VerifyReport(
                False, checked, head_seq, {"chain_seq": expected, "problem": "missing: events deleted"}
            )
        if not ranged and head is not None and prev != head.mac:
            return VerifyReport(
                False, checked, head_seq, {"chain_seq": head_seq, "problem": "chain head does not match"}
            )
        return VerifyReport(True, checked, head_seq, head_mac=prev.hex() if not ranged else None)

    def export(self, since: datetime | None, until: datetime | None) -> Iterator[AuditEvent]:
        """Sealed events in chain order (oldest first) for shipping to a SIEM, from one snapshot."""
        self.seal()
        with self._database.transaction() as session:
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            repository = AuditRepository(session)
            low, high = repository.seq_bounds(since, until)
            if low is not None and high is not None:
                for event, _ in repository.walk(low, high, events_say_seq=True):
                    if event is not None:  # a deleted event is verify's to report, not export's
                        yield event

    def close(self) -> None:
        self._alerter.close()


def _bad(
    checked: int, head_seq: int, problem: str, event: AuditEvent | None = None, seq: int | None = None
) -> VerifyReport:
    bad = {
        "event_id": str(event.event_id) if event is not None else None,
        "chain_seq": seq if seq is not None else getattr(event, "chain_seq", None),
        "problem": problem,
    }
    return VerifyReport(False, checked, head_seq, bad)
