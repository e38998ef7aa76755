"""The audit event's format: building an event and its MACs. Pure functions, no I/O."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any, Literal

from app.crypto.keys import length_prefixed
from app.db.models import AuditEvent
from app.db.repositories import EventRow
from app.services.context import Caller, RequestContext, utcnow

Outcome = Literal["allowed", "denied", "error"]
GENESIS_MAC = bytes(32)
_NONE = b"\xff"


@dataclass(frozen=True, slots=True)
class Subject:
    """What an event is about. Identifiers only: the value is never part of it."""

    token: str | None = None
    customer_id: str | None = None
    data_type: str | None = None
    grant_id: uuid.UUID | None = None
    target_id: str | None = None
    kms_request_id: str | None = None


def _bounded(text: str | None, limit: int) -> str | None:
    """Caller-supplied text fits its column and holds no NUL: a denial is never lost to its input."""
    return None if text is None else text.replace("\x00", "\ufffd")[:limit]


def new_event_id() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits. Time-ordered ids
    land at the right edge of the event_id index instead of anywhere in it."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # RFC 9562 variant
    return uuid.UUID(int=value)


def build_event(
    action: str,
    outcome: Outcome,
    ctx: RequestContext,
    caller: Caller | None,
    subject: Subject = Subject(),
    reason: str | None = None,
    repeat_count: int | None = None,
) -> EventRow:
    return EventRow(
        event_id=new_event_id(),
        time=utcnow(),
        request_id=_bounded(ctx.request_id, 128),
        principal_id=caller.id if caller else None,
        principal_name=caller.name if caller else None,
        api_key_id=caller.key_id if caller else None,
        action=action,
        outcome=outcome,
        reason=reason,
        token=_bounded(subject.token, 64),
        customer_id=_bounded(subject.customer_id, 128),
        data_type=_bounded(subject.data_type, 64),
        grant_id=subject.grant_id,
        target_id=_bounded(subject.target_id, 128),
        access_reason=_bounded(ctx.access_reason, 512),
        source_ip=_bounded(ctx.source_ip, 64),
        user_agent=_bounded(ctx.user_agent, 512),
        kms_request_id=subject.kms_request_id,
        repeat_count=repeat_count,
    )


_EVENT_MAC_TAG = length_prefixed(b"piivault.audit.event.v1")
_NONE_PART = length_prefixed(_NONE)
_length = struct.Struct(">I").pack
# The fields an event MAC covers, in this order for ever: a change of order or of set is a new
# format version (a new tag above), since every MAC already written would stop verifying.
_MAC_FIELDS = attrgetter(
    "key_version", "event_id", "time", "request_id", "principal_id", "principal_name", "api_key_id",
    "action", "outcome", "reason", "token", "customer_id", "data_type", "grant_id", "target_id",
    "access_reason", "source_ip", "user_agent", "kms_request_id",
)  # fmt: skip


def event_mac(key: bytes, event: EventRow | AuditEvent | Any) -> bytes:
    """HMAC-SHA256 over every field the event says, made as it is written.

    The message is length_prefixed(tag, *parts), each part b"\xff" for None or b"\x00" + the
    value (bytes as they are, datetimes as UTC ISO 8601, anything else as str), built inline:
    this runs for every event on the hot path."""
    chunks = [_EVENT_MAC_TAG]
    for value in _MAC_FIELDS(event):
        if value is None:
            chunks.append(_NONE_PART)
            continue
        if isinstance(value, bytes):
            raw = value
        elif isinstance(value, datetime):
            raw = value.astimezone(UTC).isoformat().encode()
        else:
            raw = str(value).encode()
        chunks += (_length(len(raw) + 1), b"\x00", raw)
    # A later field, covered only when set: every MAC written before it existed still verifies,
    # and a count added, changed or removed afterwards does not (the message has one part more).
    repeat_count = getattr(event, "repeat_count", None)
    if repeat_count is not None:
        raw = str(repeat_count).encode()
        chunks += (_length(len(raw) + 1), b"\x00", raw)
    return hmac.digest(key, b"".join(chunks), "sha256")


def chain_mac(key: bytes, seq: int, prev_mac: bytes, one_event_mac: bytes) -> bytes:
    """The chain link: this event's MAC bound to its place and to the link before it."""
    message = length_prefixed(b"piivault.audit.chain.v1", str(seq), prev_mac, one_event_mac)
    return hmac.new(key, message, hashlib.sha256).digest()
