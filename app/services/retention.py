"""Retention: how long a record may be kept, and the sweeper that erases expired records.

A record's expiry is fixed when it is written (tokenize's `expires_at`, within its data type's
cap, or the cap when none is given): a later change of the cap applies to records written after
it, never retroactively, so no admin's change can mass-erase. An expired record is refused at once
by detokenize (tokens.py); the sweeper then erases it, audited as `Expire`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from app.db.repositories import ErasedRow, ErasureRepository, EventRow
from app.db.session import Database
from app.services.audit import Auditor, Subject, build_event
from app.services.context import RequestContext, utcnow

log = logging.getLogger(__name__)

# The tombstone's reason for a record erased at the end of its retention period.
EXPIRED_REASON = "retention period ended"


class RetentionSweeper:
    """Erases expired records in batches, each batch in one transaction with its `Expire` events.
    One replica at a time: each batch first takes a transaction-scoped advisory lock, and a
    sweeper that cannot have it stops (another replica is sweeping)."""

    def __init__(self, database: Database, auditor: Auditor, *, batch: int = 500) -> None:
        self._store = ErasureRepository(database)
        self._auditor = auditor
        self._batch = batch

    async def sweep(self, ctx: RequestContext, *, max_batches: int = 1000) -> int | None:
        """Erase what has expired; returns how many records, or None if another sweeper holds the
        lock. At most max_batches per call: the next round goes on."""
        await self._auditor.ready()
        erased = 0
        written: list[EventRow] = []

        def events(rows: Sequence[ErasedRow]) -> Sequence[EventRow]:
            built = [
                build_event(
                    "Expire",
                    "allowed",
                    ctx,
                    None,
                    Subject(token=row.token, customer_id=row.customer_id, data_type=row.data_type),
                )
                for row in rows
            ]
            written[:] = built
            return self._auditor.stamp(built)

        for _ in range(max_batches):
            batch = await self._store.erase_expired_batch(self._batch, EXPIRED_REASON, utcnow(), events)
            if batch is None:
                return None if erased == 0 else erased
            if not batch:
                break
            self._auditor.counted(written)
            erased += len(batch)
        if erased:
            log.info("retention sweep erased %d expired records", erased)
        return erased
