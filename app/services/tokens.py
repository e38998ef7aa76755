"""Tokenize and detokenize: the vault's data path.

Each record gets its own data key from the key provider under exactly
{"customerID", "dataType"}; the value is sealed with AES-256-GCM bound to the token, customer and
data type. Access is decided by GrantSet.decide, once per record; every decision is audited. A
detokenize decides twice: before its key-service calls, and again on the grants as they stand
just before any value leaves (one query, in the transaction of its audit events).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from app.access import Decision, GrantSet, GrantTerms, OperationGrant, grants_for, may_learn_gone
from app.crypto.envelope import FORMAT_VERSION, RecordBinding, open_sealed, seal
from app.crypto.fingerprint import fingerprint
from app.crypto.keys import KeyProvider
from app.datatypes import DataTypeSpec, Reveal, mask
from app.db.repositories.data_path import DataPathRepository, EventRow, Found, RecordRow
from app.db.session import Database
from app.errors import (
    AccessReasonRequired,
    Denied,
    IdempotencyInFlight,
    IntegrityFailure,
    InvalidInput,
    LookupNotEnabled,
    NotFound,
    PayloadTooLarge,
    RecordErased,
    RecordExpired,
    RetentionExceeded,
    Unauthenticated,
    VaultError,
)
from app.services.audit import Auditor, Subject, build_event
from app.services.context import Caller, Operation, RequestContext, context_of, utcnow
from app.services.data_types import DataTypeService
from app.services.idempotency import Answer, IdempotencyService, IdempotentRequest, Lease
from app.services.limits import LookupLimits
from app.services.principals import PrincipalService, parse_api_key

TOKEN_PREFIX = "tok_"  # noqa: S105 (a prefix, not a secret)
_TOKEN_RANDOM_BYTES = 24  # 192 bits: not derivable from the value, never guessable
# Exactly what new_token makes: anything else is refused before it reaches a query or the audit.
TOKEN_PATTERN = re.compile(r"tok_[A-Za-z0-9_-]{32}")

# The audit reason of an allowed Detokenize that revealed only the value's mask.
REVEALED_MASKED = "masked"
# The audit reason of an allowed Tokenize that stored nothing: the customer's record was there.
DEDUPLICATED = "deduplicated"
# Of a refused deduplicating tokenize whose Encrypt grant covers the record but no Lookup grant does.
DEDUPLICATE_NEEDS_LOOKUP = "deduplicate_needs_lookup"
# At most this many records answer one lookup (and are audited as found by it).
MAX_LOOKUP_MATCHES = 1000

T = TypeVar("T")
R = TypeVar("R")


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(_TOKEN_RANDOM_BYTES)


@dataclass(frozen=True, slots=True)
class TokenizeItem:
    customer_id: str
    data_type: str
    value: str = ""
    # Retention: refused from then on, and erased by the sweeper. None: the type's cap, if any.
    expires_at: datetime | None = None
    # Answer the customer's live record of this type with the same value, if any, storing nothing
    # (needs a Lookup grant covering the record as well as Encrypt).
    deduplicate: bool = False

    def __repr__(self) -> str:
        return f"TokenizeItem(customer_id={self.customer_id!r}, data_type={self.data_type!r})"


@dataclass(frozen=True, slots=True)
class Tokenized:
    token: str
    customer_id: str
    data_type: str
    created_at: datetime
    expires_at: datetime | None = None
    # The customer's existing record (deduplicate): nothing was stored.
    deduplicated: bool = False


@dataclass(frozen=True, slots=True)
class Revealed:
    """A detokenized record: its value, or (a masked reveal) only the value's mask."""

    token: str
    customer_id: str
    data_type: str
    value: str | None = None
    value_masked: str | None = None

    def __repr__(self) -> str:
        return f"Revealed(token={self.token!r}, data_type={self.data_type!r})"


@dataclass(frozen=True, slots=True)
class ItemError:
    """A per-item failure in a batch, shaped like the one error shape."""

    error: VaultError
    token: str | None = None


@dataclass(frozen=True, slots=True)
class IdempotentTokenize:
    """A tokenize carrying an Idempotency-Key: the request, and how its results become the answer
    to store (None: an answer of 500 or more, never stored)."""

    request: IdempotentRequest
    render: Callable[[Sequence[Tokenized | ItemError]], Answer | None]


class TokenService:
    def __init__(
        self,
        *,
        keys: KeyProvider,
        database: Database,
        principals: PrincipalService,
        auditor: Auditor,
        data_types: DataTypeService,
        max_value_bytes: int,
        require_access_reason: bool = False,
        key_concurrency: int = 32,
        idempotency: IdempotencyService | None = None,
        fingerprint_key: Callable[[], bytes] | None = None,
        lookup_limits: LookupLimits | None = None,
    ) -> None:
        self._idempotency = idempotency
        # Blocking (it may ask the key provider): loaded once, in a worker thread, then kept.
        self._load_fingerprint_key = fingerprint_key
        self._fingerprint_key: bytes | None = None
        self._lookup_limits = lookup_limits
        self._require_access_reason = require_access_reason
        self._keys = keys
        self._store = DataPathRepository(database)
        self._principals = principals
        self._auditor = auditor
        self._types = data_types
        self._max_value_bytes = max_value_bytes
        # A batch's key-service calls are awaited up to key_concurrency at once: a remote key
        # service's latency then overlaps. (A local provider never suspends, so its items run
        # one after another whatever this is.)
        self._key_concurrency = key_concurrency

    async def _map(self, fn: Callable[[T], Awaitable[R]], items: Sequence[T]) -> list[R | VaultError]:
        """Apply fn to each item; a VaultError is kept as that item's result."""

        async def guarded(item: T) -> R | VaultError:
            try:
                return await fn(item)
            except VaultError as err:
                return err

        if len(items) <= 1:
            return [await guarded(item) for item in items]
        # key_concurrency workers share the items: that many calls in flight, no more, and no
        # task (or semaphore wait) per item.
        results: list[R | VaultError | None] = [None] * len(items)
        pending = iter(enumerate(items))

        async def worker() -> None:
            for index, item in pending:
                results[index] = await guarded(item)

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(self._key_concurrency, len(items))):
                    group.create_task(worker())
        except ExceptionGroup as failed:
            # Not a VaultError: a bug. Raised as itself (the others were cancelled with it), so it
            # reaches the error handler as any other unexpected error does.
            raise failed.exceptions[0] from None
        return [result for result in results if result is not None]

    async def _fingerprint(self, spec: DataTypeSpec, value: str) -> bytes | None:
        """The record's fingerprint if its type's lookup flag is on. The key is unwrapped once per
        process (one key-provider call, off the event loop); after that this is an HMAC."""
        if not spec.lookup:
            return None
        if self._fingerprint_key is None:
            if self._load_fingerprint_key is None:
                raise IntegrityFailure()  # a vault built without its fingerprint key: a wiring bug
            self._fingerprint_key = await asyncio.to_thread(self._load_fingerprint_key)
        return fingerprint(self._fingerprint_key, spec.name, spec.normalised(value))

    def _check_value(self, value: str) -> bytes:
        if not value:
            raise InvalidInput("value must not be empty", field="value")
        raw = value.encode("utf-8")
        if len(raw) > self._max_value_bytes:
            raise PayloadTooLarge(f"value is larger than {self._max_value_bytes} bytes", field="value")
        return raw

    async def admit(
        self,
        presented: str | None,
        operations: Sequence[Operation],
        ctx: RequestContext,
        tokens: Sequence[str] = (),
    ) -> tuple[Caller, list[OperationGrant], dict[str, RecordRow]]:
        """Authenticate, and read the caller's grants naming any of `operations` (and the records
        asked for): one round trip. grant_set() picks one operation's grants. A source blocked for
        failed authentications is refused before any lookup."""
        screened = self._principals.screen(ctx)
        if screened is not None:
            refused, event = screened
            await self._auditor.record_denials([event] if event else [])
            raise refused
        key = parse_api_key(presented)
        access = await self._store.access(key.key_id, operations, tokens) if key else None
        found = access.credentials if access else None
        caller, refusal = self._principals.admit(presented, key, found, ctx)
        if caller is None or access is None:
            await self._auditor.record_denials([refusal] if refusal else [])
            raise Unauthenticated()
        return caller, list(access.grants), access.records

    async def _admit(
        self, presented: str | None, operation: Operation, ctx: RequestContext, tokens: Sequence[str] = ()
    ) -> tuple[Caller, GrantSet, dict[str, RecordRow]]:
        caller, grants, records = await self.admit(presented, (operation,), ctx, tokens)
        return caller, GrantSet(grants, utcnow()), records

    @staticmethod
    def _expiry(item: TokenizeItem, now: datetime, cap_days: int | None) -> datetime | None:
        """The record's expiry: the one asked for, within the data type's cap (its registered
        max_retention_days); the cap when none was asked for. The cap read now applies to this
        record only (never retroactively)."""
        if item.expires_at is not None and item.expires_at <= now:
            raise InvalidInput("expires_at must be in the future", field="expires_at")
        if cap_days is None:
            return item.expires_at
        latest = now + timedelta(days=cap_days)
        if item.expires_at is None:
            return latest
        if item.expires_at > latest:
            raise RetentionExceeded(
                f"expires_at is beyond the {cap_days} days {item.data_type} records may be kept",
                field="expires_at",
            )
        return item.expires_at

    async def tokenize(
        self,
        *,
        presented: str | None,
        items: Sequence[TokenizeItem | VaultError],
        ctx: RequestContext,
        idempotent: IdempotentTokenize | None = None,
    ) -> list[Tokenized | ItemError]:
        # The Lookup grants ride along in the same query: a deduplicating item needs one.
        caller, read, _ = await self.admit(presented, ("Encrypt", "Lookup"), ctx)
        now = utcnow()
        grants = GrantSet(grants_for(read, "Encrypt"), now)
        finders = GrantSet(grants_for(read, "Lookup"), now)
        if idempotent is None or self._idempotency is None:
            return await self._tokenize(caller, grants, finders, items, ctx)
        # Claimed once the caller is known (the key is the caller's): a replay, a key in flight
        # or reused with another body is answered here, before any grant check or KMS call.
        lease = await self._idempotency.claim(caller.id, idempotent.request)
        try:
            return await self._tokenize(caller, grants, finders, items, ctx, (idempotent, lease))
        except BaseException:
            await self._idempotency.release(lease)
            raise

    async def _tokenize(
        self,
        caller: Caller,
        grants: GrantSet,
        finders: GrantSet,
        items: Sequence[TokenizeItem | VaultError],
        ctx: RequestContext,
        idempotent: tuple[IdempotentTokenize, Lease] | None = None,
    ) -> list[Tokenized | ItemError]:
        registry = await self._types.registry()  # in process: no round trip (see DataTypeService)
        denials: list[EventRow] = []
        results: list[Tokenized | ItemError | None] = [None] * len(items)
        checked: list[tuple[int, TokenizeItem, bytes, Decision, bytes | None]] = []
        for index, item in enumerate(items):
            if isinstance(item, VaultError):
                results[index] = ItemError(item)
                continue
            try:
                raw = self._check_value(item.value)
            except VaultError as err:
                results[index] = ItemError(err)
                continue
            decision = grants.decide(context_of(item.customer_id, item.data_type))
            subject = Subject(customer_id=item.customer_id, data_type=item.data_type)
            if not decision.allowed:
                denials.append(build_event("Tokenize", "denied", ctx, caller, subject, decision.deny_reason))
                results[index] = ItemError(Denied(decision.deny_reason))
                continue
            # The type and the value's shape are checked once the caller may write the record:
            # one without a grant learns nothing more than grant_required.
            try:
                spec = await self._types.check_value(item.data_type, item.value, registry)
                expires_at = self._expiry(item, utcnow(), spec.max_retention_days)
                if item.deduplicate and not spec.lookup:
                    raise LookupNotEnabled(
                        f"{spec.name} has lookup off: its records cannot be deduplicated", field="deduplicate"
                    )
            except VaultError as err:
                results[index] = ItemError(err)
                continue
            if item.deduplicate and not finders.decide(context_of(item.customer_id, item.data_type)).allowed:
                # Refused whether or not a duplicate exists: without a Lookup grant covering the
                # record, 200-versus-201 would tell the caller whether the customer holds this value.
                reason = DEDUPLICATE_NEEDS_LOOKUP
                denials.append(build_event("Tokenize", "denied", ctx, caller, subject, reason))
                results[index] = ItemError(Denied(reason))
                continue
            if expires_at != item.expires_at:
                item = dataclasses.replace(item, expires_at=expires_at)
            checked.append((index, item, raw, decision, await self._fingerprint(spec, item.value)))
        # Denials first, on their own: a refusal is on record whatever happens next.
        await self._auditor.record_denials(denials)
        events: list[EventRow] = []
        allowed = await self._deduplicate(caller, checked, ctx, results, events)

        async def encrypt(
            entry: tuple[int, TokenizeItem, bytes, Decision, bytes | None],
        ) -> tuple[RecordRow, str | None]:
            _, item, raw, _, fingerprint = entry
            token = new_token()
            data_key = await self._keys.generate_data_key(context_of(item.customer_id, item.data_type))
            binding = RecordBinding(token, item.customer_id, item.data_type)
            record = RecordRow(
                token=token,
                customer_id=item.customer_id,
                data_type=item.data_type,
                format_version=FORMAT_VERSION,
                ciphertext=seal(data_key.plaintext, raw, binding),
                wrapped_key=data_key.wrapped,
                kms_key_id=data_key.key_id,
                created_by=caller.id,
                created_at=utcnow(),
                expires_at=item.expires_at,
                fingerprint=fingerprint,
            )
            return record, data_key.request_id

        sealed = await self._map(encrypt, allowed)
        records: list[RecordRow] = []
        failures: list[EventRow] = []
        for (index, item, _, decision, _), outcome in zip(allowed, sealed, strict=True):
            if isinstance(outcome, VaultError):
                subject = Subject(customer_id=item.customer_id, data_type=item.data_type)
                failures.append(build_event("Tokenize", "error", ctx, caller, subject, outcome.code))
                results[index] = ItemError(outcome)
                continue
            record, kms_request_id = outcome
            records.append(record)
            events.append(
                build_event(
                    "Tokenize",
                    "allowed",
                    ctx,
                    caller,
                    Subject(
                        token=record.token,
                        customer_id=record.customer_id,
                        data_type=record.data_type,
                        grant_id=decision.grant_id,
                        kms_request_id=kms_request_id,
                    ),
                )
            )
            results[index] = Tokenized(
                record.token, record.customer_id, record.data_type, record.created_at, record.expires_at
            )
        await self._auditor.record_denials(failures)
        done = [result for result in results if result is not None]
        if idempotent is None:
            # The one commit: records and their events, one statement.
            await self._auditor.record_with_records(records, events)
            return done
        await self._commit_with_answer(records, events, done, *idempotent)
        return done

    async def _deduplicate(
        self,
        caller: Caller,
        checked: list[tuple[int, TokenizeItem, bytes, Decision, bytes | None]],
        ctx: RequestContext,
        results: list[Tokenized | ItemError | None],
        events: list[EventRow],
    ) -> list[tuple[int, TokenizeItem, bytes, Decision, bytes | None]]:
        """Answer each deduplicating item whose customer already holds a live record of its type
        with the same fingerprint with that record (and an allowed event that says so); returns
        the items still to store. One query for the whole request, none without such an item."""
        asked = [
            (position, entry, entry[4])
            for position, entry in enumerate(checked)
            if entry[1].deduplicate and entry[4] is not None
        ]
        if not asked:
            return checked
        found = await self._store.duplicates(
            [(item.customer_id, item.data_type, print_) for _, (_, item, *_), print_ in asked]
        )
        answered: set[int] = set()
        for number, (position, (index, _, _, decision, _), _) in enumerate(asked):
            record = found.get(number)
            if record is None:
                continue
            answered.add(position)
            subject = Subject(
                token=record.token,
                customer_id=record.customer_id,
                data_type=record.data_type,
                grant_id=decision.grant_id,
            )
            events.append(build_event("Tokenize", "allowed", ctx, caller, subject, DEDUPLICATED))
            results[index] = Tokenized(
                record.token, record.customer_id, record.data_type, record.created_at, record.expires_at, True
            )
        return [entry for position, entry in enumerate(checked) if position not in answered]

    async def lookup(
        self,
        *,
        presented: str | None,
        data_type: str,
        value: str,
        customer_id: str | None,
        ctx: RequestContext,
    ) -> list[Found]:
        """The live records of this type holding this value (of this customer, if given) that the
        caller's Lookup grants cover, each decided on its own context. Rate-limited per principal
        (an equality oracle), audited: one event for the lookup (the type, the number of matches)
        and one per record found, so each customer's subject-access report shows it."""
        caller, grants, _ = await self._admit(presented, "Lookup", ctx)
        if self._lookup_limits is not None:
            self._lookup_limits.check(caller.id)
        asked = Subject(customer_id=customer_id, data_type=data_type)
        if not grants.any_active:
            # Nothing to search with: refused before the type or the value is looked at.
            partial = {"dataType": data_type} | ({"customerID": customer_id} if customer_id else {})
            reason = grants.decide(partial).deny_reason or "no_grant"
            await self._auditor.record_denials([build_event("Lookup", "denied", ctx, caller, asked, reason)])
            raise Denied(reason)
        self._check_value(value)
        spec = await self._types.check_value(data_type, value)
        if not spec.lookup:
            message = f"{spec.name} has lookup off: its records carry no fingerprint"
            raise LookupNotEnabled(message, field="data_type")
        print_ = await self._fingerprint(spec, value)
        assert print_ is not None  # noqa: S101 (lookup is on)
        found = await self._store.matches(spec.name, print_, customer_id, MAX_LOOKUP_MATCHES)
        matches: list[Found] = []
        events: list[EventRow] = []
        for record in found:
            decision = grants.decide(context_of(record.customer_id, record.data_type))
            if not decision.allowed:
                continue  # not the caller's to find: not told, not audited as found
            matches.append(record)
            subject = Subject(
                token=record.token,
                customer_id=record.customer_id,
                data_type=record.data_type,
                grant_id=decision.grant_id,
            )
            events.append(build_event("LookupMatch", "allowed", ctx, caller, subject))
        summary = build_event("Lookup", "allowed", ctx, caller, asked, f"matches={len(matches)}")
        # One statement: the lookup and what it found are on record before any token leaves.
        await self._auditor.record_events([summary, *events])
        return matches

    async def _commit_with_answer(
        self,
        records: Sequence[RecordRow],
        events: Sequence[EventRow],
        done: Sequence[Tokenized | ItemError],
        idempotent: IdempotentTokenize,
        lease: Lease,
    ) -> None:
        """The one commit with an Idempotency-Key: records, their events and the answer in one
        statement, so a record never exists without its replayable answer."""
        assert self._idempotency is not None  # noqa: S101 (a lease comes from it)
        answer = idempotent.render(done)
        if answer is None:  # 5xx: not stored, and the key runs afresh next time
            await self._auditor.record_with_records(records, events)
            await self._idempotency.release(lease)
            return
        # The tokens its answer names, a deduplicated one's too: erasing either purges the entry.
        tokens = [result.token for result in done if isinstance(result, Tokenized)]
        if records or events:  # a deduplicated item writes no record, but its event
            stored = await self._auditor.record_with_records(
                records, events, lease.completion(answer, tokens)
            )
            if not stored:  # the lease expired and another request took the key: nothing written
                raise IdempotencyInFlight(field="Idempotency-Key")
        else:
            await self._idempotency.complete(lease, answer)

    async def tokenize_one(
        self,
        *,
        presented: str | None,
        item: TokenizeItem,
        ctx: RequestContext,
        idempotent: IdempotentTokenize | None = None,
    ) -> Tokenized:
        (result,) = await self.tokenize(presented=presented, items=[item], ctx=ctx, idempotent=idempotent)
        if isinstance(result, ItemError):
            raise result.error
        return result

    async def detokenize(
        self, *, presented: str | None, tokens: Sequence[str], ctx: RequestContext, reveal: Reveal = "plain"
    ) -> list[Revealed | ItemError]:
        """Each token's value, or its mask when the caller asks `reveal="masked"` or the grant
        that covers the record is a masked one (whatever the caller asks)."""
        well_formed = [token for token in tokens if TOKEN_PATTERN.fullmatch(token)]
        # Erase grants too: a caller whose Erase grant covers an erased record is told so (410).
        caller, read, records = await self.admit(presented, ("Decrypt", "Erase"), ctx, well_formed)
        now = utcnow()
        grants = GrantSet(grants_for(read, "Decrypt"), now)
        erasers = GrantSet(grants_for(read, "Erase"), now)
        if self._require_access_reason and not (ctx.access_reason or "").strip():
            refused = [
                build_event("Detokenize", "denied", ctx, caller, Subject(token=t), "access_reason_required")
                for t in tokens
            ]
            await self._auditor.record_denials(refused)
            raise AccessReasonRequired(field="X-Access-Reason")
        may_learn_existence = grants.any_active
        denials: list[EventRow] = []
        results: list[Revealed | ItemError | None] = [None] * len(tokens)
        allowed: list[tuple[int, RecordRow, Decision]] = []
        for index, token in enumerate(tokens):
            if not TOKEN_PATTERN.fullmatch(token):
                message = f"tokens[{index}] is not a vault token (tok_ and 32 URL-safe characters)"
                results[index] = ItemError(InvalidInput(message, field=f"tokens[{index}]"), token[:64])
                continue
            record = records.get(token)
            gone = record.gone(now) if record is not None else None
            if record is not None and gone is not None:
                context = context_of(record.customer_id, record.data_type)
                decision = grants.decide(context)
                if may_learn_gone(decision, erasers.decide(context)):
                    subject = Subject(
                        token=token,
                        customer_id=record.customer_id,
                        data_type=record.data_type,
                        grant_id=decision.grant_id,
                    )
                    denials.append(build_event("Detokenize", "denied", ctx, caller, subject, gone))
                    results[index] = ItemError(RecordErased() if gone == "erased" else RecordExpired(), token)
                    continue
                record = None  # anyone else: exactly as if the token were unknown
            if record is None:
                # Without any Decrypt grant a caller cannot tell an unknown token from a refused one.
                reason = "not_found" if may_learn_existence else "no_grant"
                denials.append(build_event("Detokenize", "denied", ctx, caller, Subject(token=token), reason))
                error: VaultError = (
                    NotFound("no record for this token", field="token")
                    if may_learn_existence
                    else Denied(reason)
                )
                results[index] = ItemError(error, token)
                continue
            decision = grants.decide(context_of(record.customer_id, record.data_type))
            if not decision.allowed:
                subject = Subject(token=token, customer_id=record.customer_id, data_type=record.data_type)
                denials.append(
                    build_event("Detokenize", "denied", ctx, caller, subject, decision.deny_reason)
                )
                results[index] = ItemError(Denied(decision.deny_reason), token)
                continue
            allowed.append((index, record, decision))
        await self._auditor.record_denials(denials)

        async def decrypt(entry: tuple[int, RecordRow, Decision]) -> tuple[str, str | None]:
            _, record, _ = entry
            context = context_of(record.customer_id, record.data_type)
            if record.wrapped_key is None or record.kms_key_id is None or record.ciphertext is None:
                raise IntegrityFailure()  # a live row without its secret columns: the CHECK forbids it
            data_key = await self._keys.decrypt_data_key(
                record.wrapped_key, context, key_id=record.kms_key_id
            )
            binding = RecordBinding(record.token, record.customer_id, record.data_type)
            plaintext = open_sealed(data_key.plaintext, record.ciphertext, binding)
            return plaintext.decode("utf-8"), data_key.request_id

        opened = await self._map(decrypt, allowed)
        failures: list[EventRow] = []
        opened_ok: list[tuple[int, RecordRow, str, str | None]] = []
        for (index, record, decision), outcome in zip(allowed, opened, strict=True):
            if isinstance(outcome, VaultError):
                subject = Subject(
                    token=record.token,
                    customer_id=record.customer_id,
                    data_type=record.data_type,
                    grant_id=decision.grant_id,
                )
                failures.append(build_event("Detokenize", "error", ctx, caller, subject, outcome.code))
                results[index] = ItemError(outcome, record.token)
                continue
            value, kms_request_id = outcome
            opened_ok.append((index, record, value, kms_request_id))
        await self._auditor.record_denials(failures)
        # In process (see DataTypeService): the masks, for a grant that turns out masked below.
        registry = await self._types.registry() if opened_ok else {}

        def release(current: Sequence[GrantTerms]) -> list[EventRow]:
            # The re-check: the KMS calls took time, and a grant revoked, retired or expired
            # meanwhile releases nothing. Refused like any refusal (grant_required); the audit
            # event says why.
            now = GrantSet(current, utcnow())
            events: list[EventRow] = []
            for index, record, value, kms_request_id in opened_ok:
                decision = now.decide(context_of(record.customer_id, record.data_type))
                subject = Subject(
                    token=record.token,
                    customer_id=record.customer_id,
                    data_type=record.data_type,
                    grant_id=decision.grant_id,
                    kms_request_id=kms_request_id,
                )
                if not decision.allowed:
                    reason = decision.deny_reason
                    events.append(build_event("Detokenize", "denied", ctx, caller, subject, reason))
                    results[index] = ItemError(Denied(reason), record.token)
                    continue
                masked = reveal == "masked" or decision.masked
                # Which form left: "masked" here; an allowed Detokenize without it revealed the value.
                form = REVEALED_MASKED if masked else None
                events.append(build_event("Detokenize", "allowed", ctx, caller, subject, form))
                if masked:
                    # A type unknown to the registry (none should be) is masked wholly.
                    spec = registry.get(record.data_type)
                    hidden = mask(spec.mask if spec else "none", value)
                    results[index] = Revealed(
                        record.token, record.customer_id, record.data_type, None, hidden
                    )
                else:
                    results[index] = Revealed(record.token, record.customer_id, record.data_type, value)
            return events

        if opened_ok:
            # The value leaves only once its allowed event has committed, in the statement that
            # re-checked the grants it rests on: one query per request, whatever the batch's size.
            await self._auditor.record_release(grants.active, release)
        return [result for result in results if result is not None]

    async def detokenize_one(
        self, *, presented: str | None, token: str, ctx: RequestContext, reveal: Reveal = "plain"
    ) -> Revealed:
        if not TOKEN_PATTERN.fullmatch(token):
            await self._admit(presented, "Decrypt", ctx)  # strangers are refused before anything else
            raise InvalidInput("token is not a vault token (tok_ and 32 URL-safe characters)", field="token")
        (result,) = await self.detokenize(presented=presented, tokens=[token], ctx=ctx, reveal=reveal)
        if isinstance(result, ItemError):
            raise result.error
        return result
