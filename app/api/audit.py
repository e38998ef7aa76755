"""The audit trail, for admins and auditors."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from app.api.deps import AuditorDep, KnownQueryOnly, SessionDep, VaultDep
from app.api.schemas import (
    MAX_BIGINT,
    AuditEventOut,
    AuditEventPage,
    AuditVerifyOut,
    ErrorResponse,
    Text,
    UtcDatetime,
)
from app.db.models import AuditEvent
from app.db.repositories import AuditFilter
from app.errors import InvalidInput

router = APIRouter(
    prefix="/v1/audit",
    tags=["audit"],
    responses={
        401: {"model": ErrorResponse},
        403: {"model": ErrorResponse},
        429: {"model": ErrorResponse, "description": "over the rate limit; see Retry-After"},
    },
)


def event_out(event: AuditEvent) -> AuditEventOut:
    # The response names the event's public id "id"; every other field has the column's name.
    fields = {name: getattr(event, name) for name in AuditEventOut.model_fields if name != "id"}
    return AuditEventOut(id=event.event_id, **fields)


@router.get("/events", name="ListAuditEvents")
def list_events(
    vault: VaultDep,
    session: SessionDep,
    auditor: AuditorDep,
    _known: KnownQueryOnly,
    principal: Annotated[Text | None, Query(description="A principal's id or name.", max_length=128)] = None,
    action: Annotated[Text | None, Query(max_length=64, examples=["Detokenize"])] = None,
    outcome: Literal["allowed", "denied", "error"] | None = None,
    customer_id: Annotated[Text | None, Query(max_length=128)] = None,
    token: Annotated[Text | None, Query(max_length=128)] = None,
    since: Annotated[UtcDatetime | None, Query(description="RFC 3339; without an offset, UTC.")] = None,
    until: Annotated[UtcDatetime | None, Query(description="RFC 3339; without an offset, UTC.")] = None,
    cursor: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditEventPage:
    """Who touched whose data, when and why: newest first, with cursor pagination."""
    principal_id, principal_name = None, None
    if principal is not None:
        try:
            principal_id = uuid.UUID(principal)
        except ValueError:
            principal_name = principal
    # ASCII digits only ("²".isdigit() is true), and within the id column's range.
    if cursor is not None and not (cursor.isascii() and cursor.isdigit() and int(cursor) <= MAX_BIGINT):
        raise InvalidInput("cursor is not one this endpoint returned", field="cursor")
    where = AuditFilter(
        principal_id=principal_id,
        principal_name=principal_name,
        action=action,
        outcome=outcome,
        customer_id=customer_id,
        token=token,
        since=since,
        until=until,
        before_id=int(cursor) if cursor else None,
    )
    events = vault.auditor.search(session, where, limit + 1)
    page, more = events[:limit], len(events) > limit
    next_cursor = str(page[-1].id) if more and page else None
    return AuditEventPage(events=[event_out(e) for e in page], next_cursor=next_cursor)


@router.get("/verify", name="VerifyAuditTrail")
def verify(
    vault: VaultDep,
    auditor: AuditorDep,
    since: Annotated[UtcDatetime | None, Query(description="RFC 3339; without an offset, UTC.")] = None,
    until: Annotated[UtcDatetime | None, Query(description="RFC 3339; without an offset, UTC.")] = None,
    anchor_seq: Annotated[
        int | None, Query(ge=1, le=MAX_BIGINT, description="A head_seq kept from an earlier verify.")
    ] = None,
    anchor_mac: Annotated[str | None, Query(pattern="^[0-9a-f]{64}$", description="Its head_mac.")] = None,
) -> AuditVerifyOut:
    """Check the audit chain (or a time range of it): detects modified, deleted, inserted and
    reordered events, and names the first bad one. Keep the returned head_seq and head_mac outside
    the vault; passed back as an anchor, they also expose the newest events deleted."""
    if (anchor_seq is None) != (anchor_mac is None):
        raise InvalidInput("give anchor_seq and anchor_mac together", field="anchor_seq")
    anchor = (anchor_seq, bytes.fromhex(anchor_mac)) if anchor_seq and anchor_mac else None
    report = vault.auditor.verify(since, until, anchor)
    return AuditVerifyOut(**dataclasses.asdict(report))
