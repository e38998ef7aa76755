"""Writing audit events: in an operation's own transaction or statement, or a refusal on its own."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

import anyio.to_thread
import psycopg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from app.access import GrantTerms
from app.db.models import AuditEvent
from app.db.repositories import (
    AuditFilter,
    AuditRepository,
    DataPathRepository,
    EventRow,
    RecordRow,
)
from app.db.session import Database
from app.errors import AuditUnavailable, DatabaseUnavailable, NotFound
from app.metrics import AUDIT_EVENTS
from app.services.alerts import Alerter
from app.services.audit import sealer
from app.services.audit import verify as chain
from app.services.audit.events import event_mac
from app.services.audit.keyring import AuditKeyring
from app.services.context import utcnow

log = logging.getLogger(__name__)


class Auditor:
    """Writes events with their MACs; seal, verify and export are the sealer's and verify's.

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
    def counted(events: Sequence[EventRow]) -> None:
        """Count events written (the metric), once their transaction has committed."""
        for event in events:
            AUDIT_EVENTS.labels(event.action, event.outcome).inc()

    _counted = counted

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

    async def ready(self) -> None:
        """Load the MAC key (once per process) off the event loop, so stamp() never blocks it."""
        if not self._keyring.loaded:
            await anyio.to_thread.run_sync(self._keyring.current)

    def stamp(self, events: Sequence[EventRow]) -> Sequence[EventRow]:
        """MAC events that a repository writes in a transaction of its own (erasure: the
        tombstones and their events commit together); after ready()."""
        self._stamp(events)
        return events

    async def record_events(self, events: Sequence[EventRow]) -> None:
        """Allowed events that change nothing else (an erasure of what was already erased),
        written at once in a statement of their own."""
        if not events:
            return
        await self._stamp_on_loop(events)
        try:
            await self._data_path.add_events(events)
        except psycopg.Error as err:
            log.error("audit write failed: %s", err.sqlstate or type(err).__name__)
            raise AuditUnavailable() from None
        self._counted(events)

    async def record_with_records(
        self,
        records: Sequence[RecordRow],
        events: Sequence[EventRow],
        completion: dict[str, Any] | None = None,
    ) -> bool:
        """The data path's write: records and their events in one statement, so neither commits
        without the other. With `completion` (an Idempotency-Key's answer) that commits with them,
        and nothing is written if the key's lease is lost: then False."""
        if not events and not records:
            return True
        await self._stamp_on_loop(events)
        try:
            if completion is not None:
                if not await self._data_path.add_records_with_events_completing(records, events, completion):
                    return False
            else:
                await self._data_path.add_records_with_events(records, events)
        except (psycopg.OperationalError, psycopg.IntegrityError):
            raise  # the database is down, or a token collided: mapped as such by the Database
        except psycopg.Error as err:
            log.error("audit write failed: %s", err.sqlstate or type(err).__name__)
            raise AuditUnavailable() from None
        self._counted(events)
        return True

    async def record_release(
        self,
        as_decided: Sequence[GrantTerms],
        build: Callable[[Sequence[GrantTerms]], Sequence[EventRow]],
    ) -> None:
        """A detokenize's write, after its key-service calls and before any value leaves. `build`
        makes the events of a decision on the grants given (allowed, or denied for a grant
        revoked, retired or expired). The events of the decision already made go in only if every
        grant it rested on is still active (one statement); if one changed meanwhile, the grants
        are held, read as they stand and decided on again, in one transaction with the events."""
        await self.ready()
        grant_ids = [grant.id for grant in as_decided]
        try:
            events = build(as_decided)
            self._stamp(events)
            if not await self._data_path.release_unless_changed(grant_ids, events, utcnow()):
                async with self._data_path.release(grant_ids) as release:
                    events = build(release.grants)
                    self._stamp(events)
                    await release.add_events(events)
        except psycopg.OperationalError:
            raise  # the database is down: mapped as such by the Database
        except psycopg.Error as err:
            log.error("audit write failed: %s", err.sqlstate or type(err).__name__)
            raise AuditUnavailable() from None
        self._counted(events)
        self._alerter.denied(events)

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

    def alert(self, kind: str, events: Sequence[EventRow]) -> None:
        """Raise an alarm of `kind` for allowed events someone must look at (a break-glass admin)."""
        self._alerter.alarm(kind, events)

    def seal(self, batch: int = 2000) -> int:
        """Chain committed events not yet sealed (sealer.seal); returns how many were sealed."""
        return sealer.seal(self._database, self._keyring, batch)

    def unsealed_age_s(self) -> float:
        """Seconds since the oldest committed event the chain does not hold yet was written (0 if
        none): the sealer's lag, for the metrics."""
        return sealer.unsealed_age_s(self._database)

    def search(self, session: Session, where: AuditFilter, limit: int) -> Sequence[AuditEvent]:
        return AuditRepository(session).search(where, limit)

    def event(self, session: Session, event_id: uuid.UUID) -> AuditEvent:
        found = AuditRepository(session).by_event_id(event_id)
        if found is None:
            raise NotFound("no such audit event", field="event_id")
        return found

    def verify(
        self,
        since: datetime | None = None,
        until: datetime | None = None,
        anchor: tuple[int, bytes] | None = None,
    ) -> chain.VerifyReport:
        """Seal what is pending, then check the chain (verify.verify)."""
        return chain.verify(self._database, self._keyring, since, until, anchor)

    def export(self, since: datetime | None, until: datetime | None) -> Iterator[AuditEvent]:
        """Sealed events in chain order, oldest first (verify.export)."""
        return chain.export(self._database, self._keyring, since, until)

    def close(self) -> None:
        self._alerter.close()
