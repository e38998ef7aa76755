"""Verifying the chain, and exporting it, each from one snapshot."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from app.db.models import AuditEvent
from app.db.repositories import AuditRepository
from app.db.session import Database
from app.services.audit.events import GENESIS_MAC, chain_mac
from app.services.audit.keyring import AuditKeyring
from app.services.audit.sealer import seal, verified_key

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    ok: bool
    events_checked: int
    head_seq: int
    first_bad_event: dict[str, Any] | None = None
    # Keep (head_seq, head_mac) outside the database: a later verify with it as anchor finds
    # the newest events deleted even if the head row was rolled back with them.
    head_mac: str | None = None


def verify(
    database: Database,
    keyring: AuditKeyring,
    since: datetime | None = None,
    until: datetime | None = None,
    anchor: tuple[int, bytes] | None = None,
) -> VerifyReport:
    """Seal what is pending, then check the chain (or the part of it between since and until)
    and name the first bad event. An anchor (a checkpoint's seq and MAC kept outside the
    database) also catches the newest events deleted with the head rolled back."""
    try:
        seal(database, keyring)
    except psycopg.IntegrityError:
        # A link planted past the head jams the sealer; the walk below names it.
        log.error("audit verify: sealing failed on a link that should not exist; verifying what is there")
    with database.transaction() as session:
        # One snapshot: events and head as of the same instant, whatever writers do meanwhile.
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        repository = AuditRepository(session)
        report = _verify(repository, keyring, since, until)
        if report.ok and anchor is not None:
            report = _check_anchor(repository, report, *anchor)
        return report


def export(
    database: Database, keyring: AuditKeyring, since: datetime | None, until: datetime | None
) -> Iterator[AuditEvent]:
    """Sealed events in chain order (oldest first) for shipping to a SIEM, from one snapshot."""
    seal(database, keyring)
    with database.transaction() as session:
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        repository = AuditRepository(session)
        low, high = repository.seq_bounds(since, until)
        if low is not None and high is not None:
            for event, _ in repository.walk(low, high, events_say_seq=True):
                if event is not None:  # a deleted event is verify's to report, not export's
                    yield event


def _check_anchor(repository: AuditRepository, report: VerifyReport, seq: int, mac: bytes) -> VerifyReport:
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
    repository: AuditRepository, keyring: AuditKeyring, since: datetime | None, until: datetime | None
) -> VerifyReport:
    head = repository.head()
    head_seq = head.seq if head else 0
    sealed_below = head.sealed_below if head else 0
    still_running = set(head.pending_xids) if head else set()
    # Events not sealed yet are fine if their own MAC holds and the sealer has not passed them.
    for stray in repository.unsealed():
        if verified_key(keyring, stray) is None:
            return _bad(0, head_seq, "not in the chain: fails its MAC (forged or modified)", stray)
        if stray.written_xid < sealed_below and stray.written_xid not in still_running:
            return _bad(
                0, head_seq, "not in the chain though the sealer passed it: its link was deleted", stray
            )
    low, high = repository.seq_bounds(since, until)
    ranged = since is not None or until is not None
    if low is None or high is None:
        if not ranged and head_seq != 0:
            return VerifyReport(False, 0, head_seq, {"chain_seq": 1, "problem": "every event was deleted"})
        return VerifyReport(True, 0, head_seq)
    if low < 1:
        found = repository.at_seq(low)
        return _bad(0, head_seq, "outside the chain's numbering: forged", found[0] if found else None, low)
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
        key = verified_key(keyring, event)
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


def _bad(
    checked: int, head_seq: int, problem: str, event: AuditEvent | None = None, seq: int | None = None
) -> VerifyReport:
    bad = {
        "event_id": str(event.event_id) if event is not None else None,
        "chain_seq": seq if seq is not None else getattr(event, "chain_seq", None),
        "problem": problem,
    }
    return VerifyReport(False, checked, head_seq, bad)
