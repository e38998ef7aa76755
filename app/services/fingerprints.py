"""The fingerprint backfill: records stored before lookup existed (or before their type's lookup
flag was turned on) get their keyed fingerprint. Not a migration: migrations run without the key
service, and each record's value must be decrypted (one KMS Decrypt per record) to be fingerprinted.

A page at a time by keyset on token; each page commits on its own with one audit event, so a run
killed at any point is resumed by running it again, and a run with nothing left does nothing. The
value exists only in this process's memory, between decrypt and HMAC: never logged, never stored."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

from app.crypto.envelope import RecordBinding, open_sealed
from app.crypto.fingerprint import fingerprint
from app.crypto.keys import KeyProvider
from app.datatypes import Normalize, normalise
from app.db.repositories.fingerprints import FingerprintRepository, SealedRecord
from app.db.session import Database
from app.errors import DependencyUnavailable, VaultError
from app.services.audit import Auditor, Subject, build_event
from app.services.context import RequestContext, context_of
from app.services.keys import bounded_map

log = logging.getLogger(__name__)

BACKFILL = "BackfillFingerprints"


@dataclass
class BackfillReport:
    """A backfill's counts so far. `total`: what was left when it started."""

    total: int = 0
    filled: int = 0
    # Changed (erased, rewrapped, filled by another run) between read and write: left as they are.
    skipped: int = 0
    # Refused by the key service or not opening (each has an error event); a rerun tries again.
    failed: int = 0
    batches: int = 0

    @property
    def done(self) -> int:
        return self.filled + self.skipped + self.failed

    def counts(self) -> str:
        return f"filled {self.filled}, skipped {self.skipped}, failed {self.failed}"


class FingerprintBackfill:
    def __init__(
        self,
        database: Database,
        auditor: Auditor,
        keys: KeyProvider,
        fingerprint_key: Callable[[], bytes],
        *,
        concurrency: int = 32,
    ) -> None:
        self._database = database
        self._auditor = auditor
        self._keys = keys
        self._fingerprint_key = fingerprint_key
        self._concurrency = concurrency

    def run(
        self, *, batch: int, ctx: RequestContext, on_progress: Callable[[BackfillReport], None] | None = None
    ) -> BackfillReport:
        """backfill() for a caller outside any event loop (the CLI), on a loop of its own."""

        async def main() -> BackfillReport:
            workers = ThreadPoolExecutor(self._concurrency + 4, thread_name_prefix="piivault-backfill")
            asyncio.get_running_loop().set_default_executor(workers)
            return await self.backfill(batch=batch, ctx=ctx, on_progress=on_progress)

        return asyncio.run(main())

    def _types(self) -> dict[str, str]:
        with self._database.transaction() as session:
            return FingerprintRepository(session).lookup_types()

    def left(self) -> int:
        types = list(self._types())
        with self._database.transaction() as session:
            return FingerprintRepository(session).left(types)

    def _page(self, after: str, types: Sequence[str], limit: int) -> list[SealedRecord]:
        with self._database.transaction() as session:
            return FingerprintRepository(session).page(after, types, limit)

    async def backfill(
        self, *, batch: int, ctx: RequestContext, on_progress: Callable[[BackfillReport], None] | None = None
    ) -> BackfillReport:
        """Fill every live record of a lookup-enabled type that has no fingerprint. Stops at the
        first page that met a transient failure (the key service down), once that page's
        successes are committed, by raising it."""
        report = BackfillReport()
        types = await asyncio.to_thread(self._types)
        key = await asyncio.to_thread(self._fingerprint_key)
        names = sorted(types)
        report.total = await asyncio.to_thread(self.left)
        if on_progress is not None:
            on_progress(report)

        async def fingerprint_of(record: SealedRecord) -> bytes:
            context = context_of(record.customer_id, record.data_type)
            wrapped, key_id = record.wrapped_key, record.kms_key_id
            data_key = await self._keys.decrypt_data_key(wrapped, context, key_id=key_id)
            binding = RecordBinding(record.token, record.customer_id, record.data_type)
            value = open_sealed(data_key.plaintext, record.ciphertext, binding).decode("utf-8")
            kind = cast(Normalize, types[record.data_type])
            return fingerprint(key, record.data_type, normalise(kind, value))

        after = ""
        while names and (page := await asyncio.to_thread(self._page, after, names, batch)):
            results = await bounded_map(fingerprint_of, page, self._concurrency)
            filled: list[tuple[str, bytes, bytes]] = []
            failures: list[tuple[SealedRecord, VaultError]] = []
            for record, result in zip(page, results, strict=True):
                if isinstance(result, VaultError):
                    failures.append((record, result))
                else:
                    filled.append((record.token, record.wrapped_key, result))
            count = await asyncio.to_thread(self._commit, filled, failures, ctx)
            report.batches += 1
            report.filled += count
            report.skipped += len(filled) - count
            report.failed += len(failures)
            if on_progress is not None:
                on_progress(report)
            transient = [err for _, err in failures if isinstance(err, DependencyUnavailable)]
            if transient:
                raise transient[0]
            after = page[-1].token
            if len(page) < batch:
                break
        return report

    def _commit(
        self,
        filled: Sequence[tuple[str, bytes, bytes]],
        failures: Sequence[tuple[SealedRecord, VaultError]],
        ctx: RequestContext,
    ) -> int:
        """The page's fingerprints and its audit event (one per page; one more per failed record),
        in one transaction; returns how many rows were filled."""
        with self._database.transaction() as session:
            count = FingerprintRepository(session).fill(filled)
            counts = f"filled={count} skipped={len(filled) - count} failed={len(failures)}"
            events = [build_event(BACKFILL, "allowed", ctx, None, Subject(), counts)]
            for record, err in failures:
                subject = Subject(
                    token=record.token, customer_id=record.customer_id, data_type=record.data_type
                )
                events.append(build_event(BACKFILL, "error", ctx, None, subject, err.code))
            self._auditor.record(session, events)
        if failures:
            log.warning("fingerprint backfill: %d records failed (%s)", len(failures), failures[0][1].code)
        return count
