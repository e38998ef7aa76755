"""Key rotation: moving every wrapped data key to another master key, and which key wraps what.

A rewrap asks the key service to ReEncrypt each wrapped key from the key its row names to the
target key, under the same encryption context both sides: the data key never enters the vault in
clear, and no value is decrypted. It works a batch at a time (keyset pagination): read a page,
ReEncrypt it with a bounded number of calls in flight, then one transaction moves the page's rows
(only those whose wrapped key is still the one read) and writes the batch's audit event. A batch
commits whole or not at all, and the old wrapped key stays valid until its row is moved, so a
rewrap killed at any point loses nothing; run again, it finds what is left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, TypeVar

from sqlalchemy.orm import Session

from app.crypto.keys import DataKey, EncryptionContext, KeyAllowList, KeyProvider
from app.db.repositories import EventRow, KeyRepository, Rewrapped, WrappedKey
from app.db.session import Database
from app.errors import DependencyUnavailable, KeyNotAllowed, VaultError
from app.services.audit import AUDIT_KEY_CONTEXT, Auditor, Subject, build_event
from app.services.context import RequestContext, context_of
from app.services.grants import GrantService
from app.services.vault_keys import vault_key_context

log = logging.getLogger(__name__)

REWRAP = "RewrapKeys"
Kind = Literal["records", "audit_keys", "vault_keys"]
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class KeyUsage:
    """A master key: how many records and vault keys it wraps, and what this vault may do with it."""

    key_id: str
    records: int
    audit_keys: int
    vault_keys: int
    current: bool
    decrypt_allowed: bool


@dataclass
class RewrapReport:
    """A rewrap's counts so far. `total`: what was left when it started (records and vault keys)."""

    to_key: str
    total: int = 0
    rewrapped: int = 0
    # Changed or erased between read and write: left as they are (another run moves them).
    skipped: int = 0
    # Refused by the key service (each has an error event); a rerun tries them again.
    failed: int = 0
    batches: int = 0
    # Active grants' KMS mirrors made on the target key (before any record moved there).
    mirrors: int = 0

    @property
    def done(self) -> int:
        return self.rewrapped + self.skipped + self.failed

    def counts(self) -> str:
        return f"rewrapped {self.rewrapped}, skipped {self.skipped}, failed {self.failed}"


async def bounded_map(
    fn: Callable[[T], Awaitable[R]], items: Sequence[T], limit: int
) -> list[R | VaultError]:
    """fn over items with at most `limit` awaiting at once; a VaultError is kept as that item's
    result (the data path's pattern: `limit` workers share the items)."""
    results: list[R | VaultError | None] = [None] * len(items)
    pending = iter(enumerate(items))

    async def worker() -> None:
        for index, item in pending:
            try:
                results[index] = await fn(item)
            except VaultError as err:
                results[index] = err

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(limit, len(items))):
                group.create_task(worker())
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None  # not a VaultError: a bug, raised as itself
    return [result for result in results if result is not None]


class CurrentKeyOnly:
    """The allow-list of a provider that tells none: its current key alone."""

    def __init__(self, keys: KeyProvider) -> None:
        self._keys = keys

    def key_arn(self) -> str:
        return self._keys.key_id

    def allowed_arns(self) -> frozenset[str]:
        return frozenset({self._keys.key_id})

    def allowed_arn_for(self, name: str) -> str:
        if name != self._keys.key_id:
            raise KeyNotAllowed()
        return name


def allow_list_of(keys: KeyProvider) -> KeyAllowList:
    return keys if isinstance(keys, KeyAllowList) else CurrentKeyOnly(keys)


class KeyRotation:
    def __init__(
        self,
        database: Database,
        auditor: Auditor,
        keys: KeyProvider,
        allow_list: KeyAllowList,
        *,
        grants: GrantService | None = None,
        concurrency: int = 32,
    ) -> None:
        self._grants = grants
        self._database = database
        self._auditor = auditor
        self._keys = keys
        self._allow_list = allow_list
        self._concurrency = concurrency

    # Which key wraps what

    def inventory(self, session: Session) -> list[KeyUsage]:
        """Every key that wraps something or is on the allow-list: the current key first."""
        repository = KeyRepository(session)
        records = repository.records_by_key()
        audit_keys = repository.audit_keys_by_key()
        vault_keys = repository.vault_keys_by_key()
        current = self._allow_list.key_arn()
        allowed = self._allow_list.allowed_arns()
        wrapping = set(records) | set(audit_keys) | set(vault_keys)
        names = sorted(wrapping | allowed, key=lambda key: (key != current, key))
        return [
            KeyUsage(
                key,
                records.get(key, 0),
                audit_keys.get(key, 0),
                vault_keys.get(key, 0),
                key == current,
                key in allowed,
            )
            for key in names
        ]

    # Rewrap

    def target(self, name: str, ctx: RequestContext) -> str:
        """KEY (an id, ARN or alias) as records name it, if it is on the allow-list; a key off the
        list is refused, and the refusal audited. Blocking (may ask the key service once)."""
        try:
            return self._allow_list.allowed_arn_for(name)
        except KeyNotAllowed:
            refused = build_event(REWRAP, "denied", ctx, None, Subject(target_id=name), "key_not_allowed")
            self._auditor.record_on_its_own([refused])
            raise

    def left(self, to_key: str, from_key: str | None = None) -> int:
        """How many wrapped keys (records and vault keys) a rewrap to `to_key` would move."""
        with self._database.transaction() as session:
            repository = KeyRepository(session)
            return (
                repository.records_left(to=to_key, from_=from_key)
                + len(repository.audit_keys(to=to_key, from_=from_key))
                + len(repository.vault_keys(to=to_key, from_=from_key))
            )

    def run(
        self,
        to_key: str,
        *,
        from_key: str | None = None,
        batch: int = 500,
        ctx: RequestContext,
        on_progress: Callable[[RewrapReport], None] | None = None,
    ) -> RewrapReport:
        """rewrap() for a caller outside any event loop (the CLI): on a loop of its own, whose
        worker threads (boto3's calls, the database) are as many as the calls in flight."""

        async def main() -> RewrapReport:
            workers = ThreadPoolExecutor(self._concurrency + 4, thread_name_prefix="piivault-rewrap")
            asyncio.get_running_loop().set_default_executor(workers)
            return await self.rewrap(to_key, from_key=from_key, batch=batch, ctx=ctx, on_progress=on_progress)

        return asyncio.run(main())

    async def rewrap(
        self,
        to_key: str,
        *,
        from_key: str | None = None,
        batch: int = 500,
        ctx: RequestContext,
        on_progress: Callable[[RewrapReport], None] | None = None,
    ) -> RewrapReport:
        """Move every wrapped key not under `to_key` (or only those under `from_key`) to `to_key`,
        which target() has checked. `on_progress` is called with the counts once before the first
        batch and after each. Stops at the first batch that met a transient failure (the key
        service or the database down), once that batch's successes are committed, by raising it."""
        report = RewrapReport(to_key=to_key)
        report.total = await asyncio.to_thread(self.left, to_key, from_key)
        if self._grants is not None:
            # First the grants: KMS lets a grantee at a record under the target key from its move on.
            report.mirrors = await asyncio.to_thread(self._grants.mirror_active_on, to_key, ctx)
        if on_progress is not None:
            on_progress(report)
        # The vault's own keys first: then a key that wraps no record wraps nothing.
        for kind in ("audit_keys", "vault_keys"):
            own = await asyncio.to_thread(self._read, kind, "", batch, to_key, from_key)
            if own:
                await self._batch(kind, own, report, ctx, on_progress)
        after = ""
        while page := await asyncio.to_thread(self._read, "records", after, batch, to_key, from_key):
            await self._batch("records", page, report, ctx, on_progress)
            after = page[-1].ref
            if len(page) < batch:
                break
        return report

    def _read(self, kind: Kind, after: str, limit: int, to: str, from_: str | None) -> list[WrappedKey]:
        with self._database.transaction() as session:
            repository = KeyRepository(session)
            if kind == "audit_keys":
                return repository.audit_keys(to=to, from_=from_)
            if kind == "vault_keys":
                return repository.vault_keys(to=to, from_=from_)
            return repository.records_page(after, limit, to=to, from_=from_)

    async def _batch(
        self,
        kind: Kind,
        items: Sequence[WrappedKey],
        report: RewrapReport,
        ctx: RequestContext,
        on_progress: Callable[[RewrapReport], None] | None,
    ) -> None:
        to = report.to_key

        async def reencrypt(item: WrappedKey) -> DataKey:
            context: EncryptionContext
            if kind == "audit_keys":
                context = AUDIT_KEY_CONTEXT
            elif kind == "vault_keys":
                context = vault_key_context(item.ref)
            else:
                assert item.customer_id is not None and item.data_type is not None  # noqa: S101
                context = context_of(item.customer_id, item.data_type)
            return await self._keys.reencrypt_data_key(
                item.wrapped_key, context, key_id=item.kms_key_id, to_key_id=to
            )

        results = await bounded_map(reencrypt, items, self._concurrency)
        moved: list[Rewrapped] = []
        failures: list[tuple[WrappedKey, VaultError]] = []
        for item, result in zip(items, results, strict=True):
            if isinstance(result, VaultError):
                failures.append((item, result))
            else:
                moved.append(Rewrapped(item.ref, item.wrapped_key, result.wrapped))
        count = await asyncio.to_thread(self._commit, kind, moved, failures, to, ctx)
        report.batches += 1
        report.rewrapped += count
        report.skipped += len(moved) - count
        report.failed += len(failures)
        if on_progress is not None:
            on_progress(report)
        transient = [err for _, err in failures if isinstance(err, DependencyUnavailable)]
        if transient:
            raise transient[0]

    def _commit(
        self,
        kind: Kind,
        moved: Sequence[Rewrapped],
        failures: Sequence[tuple[WrappedKey, VaultError]],
        to: str,
        ctx: RequestContext,
    ) -> int:
        """The batch's rows and its audit event, in one transaction; returns how many rows moved."""
        with self._database.transaction() as session:
            repository = KeyRepository(session)
            if kind == "audit_keys":
                count = repository.move_audit_keys(moved, to)
            elif kind == "vault_keys":
                count = repository.move_vault_keys(moved, to)
            else:
                count = repository.move_records(moved, to)
            counts = f"{kind} rewrapped={count} skipped={len(moved) - count} failed={len(failures)}"
            events: list[EventRow] = [
                build_event(REWRAP, "allowed", ctx, None, Subject(target_id=to), counts[:64])
            ]
            for item, err in failures:
                subject = (
                    Subject(
                        token=item.ref, customer_id=item.customer_id, data_type=item.data_type, target_id=to
                    )
                    if kind == "records"
                    else Subject(target_id=to)
                )
                events.append(build_event(REWRAP, "error", ctx, None, subject, err.code))
            self._auditor.record(session, events)
        if failures:
            log.warning("rewrap: %d %s could not be rewrapped (%s)", len(failures), kind, failures[0][1].code)
        return count
