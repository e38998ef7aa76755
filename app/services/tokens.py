"""Tokenize and detokenize: the vault's data path.

Each record gets its own data key from the key provider under exactly
{"customerID", "dataType"}; the value is sealed with AES-256-GCM bound to the token, customer and
data type. Access is decided by GrantSet.decide, once per record; every decision is audited.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from app.access import Decision, GrantSet
from app.crypto.envelope import FORMAT_VERSION, RecordBinding, open_sealed, seal
from app.crypto.keys import KeyProvider
from app.datatypes import Reveal, mask
from app.db.repositories.data_path import DataPathRepository, EventRow, RecordRow
from app.db.session import Database
from app.errors import (
    AccessReasonRequired,
    Denied,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    Unauthenticated,
    VaultError,
)
from app.services.audit import Auditor, Subject, build_event
from app.services.context import Caller, Operation, RequestContext, context_of, utcnow
from app.services.data_types import DataTypeService
from app.services.principals import PrincipalService, parse_api_key

TOKEN_PREFIX = "tok_"  # noqa: S105 (a prefix, not a secret)
_TOKEN_RANDOM_BYTES = 24  # 192 bits: not derivable from the value, never guessable
# Exactly what new_token makes: anything else is refused before it reaches a query or the audit.
TOKEN_PATTERN = re.compile(r"tok_[A-Za-z0-9_-]{32}")

# The audit reason of an allowed Detokenize that revealed only the value's mask.
REVEALED_MASKED = "masked"

T = TypeVar("T")
R = TypeVar("R")


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(_TOKEN_RANDOM_BYTES)


@dataclass(frozen=True, slots=True)
class TokenizeItem:
    customer_id: str
    data_type: str
    value: str = ""

    def __repr__(self) -> str:
        return f"TokenizeItem(customer_id={self.customer_id!r}, data_type={self.data_type!r})"


@dataclass(frozen=True, slots=True)
class Tokenized:
    token: str
    customer_id: str
    data_type: str
    created_at: datetime


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
    ) -> None:
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

    def _check_value(self, value: str) -> bytes:
        if not value:
            raise InvalidInput("value must not be empty", field="value")
        raw = value.encode("utf-8")
        if len(raw) > self._max_value_bytes:
            raise PayloadTooLarge(f"value is larger than {self._max_value_bytes} bytes", field="value")
        return raw

    async def _admit(
        self, presented: str | None, operation: Operation, ctx: RequestContext, tokens: Sequence[str] = ()
    ) -> tuple[Caller, GrantSet, dict[str, RecordRow]]:
        """Authenticate, and read the caller's grants (and the records asked for): one round trip."""
        key = parse_api_key(presented)
        access = await self._store.access(key.key_id, operation, tokens) if key else None
        found = access.credentials if access else None
        caller, refusal = self._principals.admit(presented, key, found, ctx)
        if caller is None or access is None:
            await self._auditor.record_denials([refusal] if refusal else [])
            raise Unauthenticated()
        return caller, GrantSet(access.grants, utcnow()), access.records

    async def tokenize(
        self, *, presented: str | None, items: Sequence[TokenizeItem | VaultError], ctx: RequestContext
    ) -> list[Tokenized | ItemError]:
        caller, grants, _ = await self._admit(presented, "Encrypt", ctx)
        registry = await self._types.registry()  # in process: no round trip (see DataTypeService)
        denials: list[EventRow] = []
        results: list[Tokenized | ItemError | None] = [None] * len(items)
        allowed: list[tuple[int, TokenizeItem, bytes, Decision]] = []
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
                await self._types.check_value(item.data_type, item.value, registry)
            except VaultError as err:
                results[index] = ItemError(err)
                continue
            allowed.append((index, item, raw, decision))
        # Denials first, on their own: a refusal is on record whatever happens next.
        await self._auditor.record_denials(denials)

        async def encrypt(entry: tuple[int, TokenizeItem, bytes, Decision]) -> tuple[RecordRow, str | None]:
            _, item, raw, _ = entry
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
            )
            return record, data_key.request_id

        sealed = await self._map(encrypt, allowed)
        records: list[RecordRow] = []
        events: list[EventRow] = []
        failures: list[EventRow] = []
        for (index, item, _, decision), outcome in zip(allowed, sealed, strict=True):
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
            results[index] = Tokenized(record.token, record.customer_id, record.data_type, record.created_at)
        await self._auditor.record_denials(failures)
        # The one commit: records and their events, one statement.
        await self._auditor.record_with_records(records, events)
        return [result for result in results if result is not None]

    async def tokenize_one(
        self, *, presented: str | None, item: TokenizeItem, ctx: RequestContext
    ) -> Tokenized:
        (result,) = await self.tokenize(presented=presented, items=[item], ctx=ctx)
        if isinstance(result, ItemError):
            raise result.error
        return result

    async def detokenize(
        self, *, presented: str | None, tokens: Sequence[str], ctx: RequestContext, reveal: Reveal = "plain"
    ) -> list[Revealed | ItemError]:
        """Each token's value, or its mask when the caller asks `reveal="masked"` or the grant
        that covers the record is a masked one (whatever the caller asks)."""
        well_formed = [token for token in tokens if TOKEN_PATTERN.fullmatch(token)]
        caller, grants, records = await self._admit(presented, "Decrypt", ctx, well_formed)
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
            data_key = await self._keys.decrypt_data_key(
                record.wrapped_key, context, key_id=record.kms_key_id
            )
            binding = RecordBinding(record.token, record.customer_id, record.data_type)
            plaintext = open_sealed(data_key.plaintext, record.ciphertext, binding)
            return plaintext.decode("utf-8"), data_key.request_id

        opened = await self._map(decrypt, allowed)
        wants_mask = reveal == "masked" or any(decision.masked for _, _, decision in allowed)
        registry = await self._types.registry() if wants_mask else {}
        events: list[EventRow] = []
        failures: list[EventRow] = []
        for (index, record, decision), outcome in zip(allowed, opened, strict=True):
            subject = Subject(
                token=record.token,
                customer_id=record.customer_id,
                data_type=record.data_type,
                grant_id=decision.grant_id,
            )
            if isinstance(outcome, VaultError):
                failures.append(build_event("Detokenize", "error", ctx, caller, subject, outcome.code))
                results[index] = ItemError(outcome, record.token)
                continue
            value, kms_request_id = outcome
            masked = reveal == "masked" or decision.masked
            events.append(
                build_event(
                    "Detokenize",
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
                    # Which form left: "masked" here; an allowed Detokenize without it revealed the value.
                    REVEALED_MASKED if masked else None,
                )
            )
            if masked:
                # A type unknown to the registry (none should be) is masked wholly.
                spec = registry.get(record.data_type)
                hidden = mask(spec.mask if spec else "none", value)
                results[index] = Revealed(record.token, record.customer_id, record.data_type, None, hidden)
            else:
                results[index] = Revealed(record.token, record.customer_id, record.data_type, value)
        await self._auditor.record_denials(failures)
        # The value leaves only once its allowed event has committed.
        await self._auditor.record_with_records((), events)
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
