"""The sealer: chains committed events, one pass at a time cluster-wide."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Sequence
from typing import Any

from app.db.models import AuditEvent
from app.db.repositories import SealRepository
from app.db.session import Database
from app.services.audit.events import chain_mac, event_mac
from app.services.audit.keyring import AuditKeyring

log = logging.getLogger(__name__)


def verified_key(keyring: AuditKeyring, event: AuditEvent | Any) -> bytes | None:
    """The event's MAC key if its own MAC holds, else None."""
    key = keyring.get(event.key_version) if event.key_version is not None else None
    if key is None or event.event_mac is None:
        return None
    return key if hmac.compare_digest(event_mac(key, event), event.event_mac) else None


def seal(database: Database, keyring: AuditKeyring, batch: int = 2000) -> int:
    """Chain committed events not yet sealed; returns how many were sealed.

    An event whose own MAC does not verify (written behind the vault's back, or changed before it
    was sealed) is never chained: it stays outside, and verify names it. The new head is logged as
    a checkpoint, so a copy outside the database (the SIEM) can anchor it.

    Work is found by transaction id, not by marking events: the head's sealed_below and
    pending_xids say which transactions' events the chain has passed. A pass holds the head's row
    lock throughout (one sealer at a time, cluster-wide), takes a horizon first (the first
    unassigned transaction id and those still running), reads the events of pending_xids and then
    those of [sealed_below, horizon) a page at a time in (written_xid, id) order, and moves the
    head to the horizon. Every other transaction had ended before the pass looked, so all its
    events were visible to it; a transaction left open holds back only its own events.
    """
    sealed = 0
    with database.raw_transaction() as connection:
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
                key = verified_key(keyring, event)
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


def unsealed_age_s(database: Database) -> float:
    """The age of the oldest event written by a transaction the chain head has not passed yet."""
    with database.raw_transaction() as connection:
        return SealRepository(connection).oldest_unsealed_age_s()
