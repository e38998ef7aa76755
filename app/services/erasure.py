"""Erasure (GDPR Art. 17) and the subject-access report (Art. 15).

Erasing a record removes its ciphertext, wrapped data key and key id in the same transaction as
its audit event; what stays is a tombstone (token, customer, data type, created, expires, erased,
why). A customer's records are erased in batches, each all-or-nothing with its events, so an
erasure of any size runs in bounded memory and statement time; one that fails part-way answers
503 and a retry finishes it (what is erased stays erased, and is counted 0 the second time).

Who may erase is decided like detokenize: an Erase grant whose constraints match the record's
context. A caller whose grant does not cover a record learns nothing of it.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from app.access import GrantSet, may_read_customer_report
from app.db.repositories import (
    AuditRepository,
    ErasedRow,
    ErasureRepository,
    EventRow,
    ReportRecord,
    ReportRepository,
)
from app.db.session import Database
from app.errors import AccessReasonRequired, Denied, Forbidden, InvalidInput, NotFound
from app.services.audit import Auditor, Subject, build_event
from app.services.context import Caller, RequestContext, context_of, utcnow
from app.services.tokens import TOKEN_PATTERN, TokenService


@dataclass(frozen=True, slots=True)
class CustomerErasure:
    erased: int
    tokens: list[str]


@dataclass(frozen=True, slots=True)
class ReportAccess:
    """One event about the customer's records: who, when, why, outcome. Never a value."""

    time: datetime
    action: str
    outcome: str
    principal_id: str | None
    principal_name: str | None
    token: str | None
    data_type: str | None
    access_reason: str | None
    reason: str | None
    grant_id: str | None
    request_id: str | None


@dataclass(frozen=True, slots=True)
class CustomerReport:
    customer_id: str
    generated_at: datetime
    records: list[ReportRecord]
    accesses: list[ReportAccess]


class ErasureService:
    def __init__(
        self,
        *,
        database: Database,
        tokens: TokenService,
        auditor: Auditor,
        batch: int = 500,
        require_reason: bool = False,
    ) -> None:
        self._store = ErasureRepository(database)
        self._tokens = tokens
        self._auditor = auditor
        self._batch = batch
        self._require_reason = require_reason

    async def erase_token(self, *, presented: str | None, token: str, ctx: RequestContext) -> None:
        """DELETE /v1/tokens/{token}: erase one record. Erasing an erased record succeeds (and is
        audited) without changing anything."""
        if not TOKEN_PATTERN.fullmatch(token):
            await self._tokens.admit(presented, ("Erase",), ctx)  # strangers are refused first
            raise InvalidInput("token is not a vault token (tok_ and 32 URL-safe characters)", field="token")
        caller, read, records = await self._tokens.admit(presented, ("Erase",), ctx, [token])
        now = utcnow()
        grants = GrantSet(read, now)
        if self._require_reason and not (ctx.access_reason or "").strip():
            refused = build_event(
                "Erase", "denied", ctx, caller, Subject(token=token), "access_reason_required"
            )
            await self._auditor.record_denials([refused])
            raise AccessReasonRequired(
                "this vault requires an X-Access-Reason header", field="X-Access-Reason"
            )
        record = records.get(token)
        decision = grants.decide(context_of(record.customer_id, record.data_type)) if record else None
        if record is None or decision is None or not decision.allowed:
            # Not covered: a live record is refused as detokenize refuses it; an erased or expired
            # one (or an unknown token) answers as an unknown token does, as detokenize does.
            if record is not None and record.gone(now) is None and decision is not None:
                subject = Subject(token=token, customer_id=record.customer_id, data_type=record.data_type)
                await self._auditor.record_denials(
                    [build_event("Erase", "denied", ctx, caller, subject, decision.deny_reason)]
                )
                raise Denied(decision.deny_reason)
            known = grants.any_active
            reason = "not_found" if known else "no_grant"
            await self._auditor.record_denials(
                [build_event("Erase", "denied", ctx, caller, Subject(token=token), reason)]
            )
            raise NotFound("no record for this token", field="token") if known else Denied(reason)
        subject = Subject(
            token=token,
            customer_id=record.customer_id,
            data_type=record.data_type,
            grant_id=decision.grant_id,
        )
        await self._auditor.ready()

        def events(rows: Sequence[ErasedRow]) -> Sequence[EventRow]:
            return self._auditor.stamp([build_event("Erase", "allowed", ctx, caller, subject)])

        erased = await self._store.erase_token(token, ctx.access_reason, now, events)
        if erased:
            self._auditor.counted([build_event("Erase", "allowed", ctx, caller, subject)])
        else:
            # Already a tombstone: idempotent, and on record.
            await self._auditor.record_events(
                [build_event("Erase", "allowed", ctx, caller, subject, "already_erased")]
            )

    async def erase_customer(
        self,
        *,
        presented: str | None,
        customer_id: str,
        data_types: Sequence[str] | None,
        reason: str,
        ctx: RequestContext,
    ) -> CustomerErasure:
        """POST /v1/customers/{customer_id}/erase: every record of the customer (of these types)
        that the caller's Erase grants cover, in batches. Records no grant covers are left, and
        the caller learns nothing of them."""
        caller, read, _ = await self._tokens.admit(presented, ("Erase",), ctx)
        grants = GrantSet(read, utcnow())
        ctx = dataclasses.replace(ctx, access_reason=reason)
        if not grants.any_active:
            subject = Subject(customer_id=customer_id)
            await self._auditor.record_denials(
                [build_event("EraseCustomer", "denied", ctx, caller, subject, "no_grant")]
            )
            raise Denied("no_grant")
        wanted = set(data_types) if data_types is not None else None
        covered: dict[str, uuid.UUID | None] = {}
        denials: list[EventRow] = []
        for data_type in await self._store.live_types(customer_id):
            if wanted is not None and data_type not in wanted:
                continue
            decision = grants.decide(context_of(customer_id, data_type))
            if decision.allowed:
                covered[data_type] = decision.grant_id
            else:
                subject = Subject(customer_id=customer_id, data_type=data_type)
                denials.append(
                    build_event("EraseCustomer", "denied", ctx, caller, subject, decision.deny_reason)
                )
        await self._auditor.record_denials(denials)
        erased: list[str] = []
        if covered:
            await self._auditor.ready()
        written: list[EventRow] = []

        def events(rows: Sequence[ErasedRow]) -> Sequence[EventRow]:
            built = [
                build_event(
                    "Erase",
                    "allowed",
                    ctx,
                    caller,
                    Subject(
                        token=row.token,
                        customer_id=row.customer_id,
                        data_type=row.data_type,
                        grant_id=covered[row.data_type],
                    ),
                )
                for row in rows
            ]
            written[:] = built
            return self._auditor.stamp(built)

        while covered:
            batch = await self._store.erase_customer_batch(
                customer_id, sorted(covered), self._batch, reason, utcnow(), events
            )
            if not batch:
                break
            self._auditor.counted(written)
            erased.extend(row.token for row in batch)
        # The request itself, whatever it found: on record with its count.
        summary = Subject(customer_id=customer_id)
        await self._auditor.record_events(
            [build_event("EraseCustomer", "allowed", ctx, caller, summary, f"erased:{len(erased)}")]
        )
        return CustomerErasure(len(erased), erased)


class ReportService:
    """The subject-access report: every record of a customer (tombstones too) and every event
    about them from the audit trail. Identifiers, times and reasons only: never a value."""

    def __init__(self, auditor: Auditor) -> None:
        self._auditor = auditor

    def customer_report(
        self, session: Session, caller: Caller | None, customer_id: str, ctx: RequestContext
    ) -> CustomerReport:
        if caller is not None and not may_read_customer_report(caller.role):
            raise Forbidden()
        records = ReportRepository(session).records_of(customer_id)
        accesses = [
            ReportAccess(
                time=event.time,
                action=event.action,
                outcome=event.outcome,
                principal_id=str(event.principal_id) if event.principal_id else None,
                principal_name=event.principal_name,
                token=event.token,
                data_type=event.data_type,
                access_reason=event.access_reason,
                reason=event.reason,
                grant_id=str(event.grant_id) if event.grant_id else None,
                request_id=event.request_id,
            )
            for event in AuditRepository(session).about_customer(customer_id)
        ]
        # The report itself is an access to the customer's data: on record, in this transaction.
        self._auditor.record(
            session,
            [build_event("CustomerReport", "allowed", ctx, caller, Subject(customer_id=customer_id))],
        )
        return CustomerReport(customer_id, utcnow(), records, accesses)
