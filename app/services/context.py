"""Who is asking, and from where: what every service call carries for its decisions and its audit."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, get_args

# What a grant allows; the API's operation names are these. Lookup finds tokens by a value's
# keyed fingerprint, Erase erases records (neither is mirrored as a KMS grant: neither makes a
# KMS call under the record's context).
Operation = Literal["Encrypt", "Decrypt", "Lookup", "Erase"]
OPERATIONS: tuple[Operation, ...] = get_args(Operation)


@dataclass(frozen=True, slots=True)
class Caller:
    id: uuid.UUID
    name: str
    role: str
    key_id: str | None = None


@dataclass(frozen=True, slots=True)
class RequestContext:
    request_id: str
    source_ip: str | None = None
    user_agent: str | None = None
    access_reason: str | None = None


def utcnow() -> datetime:
    return datetime.now(UTC)


def context_of(customer_id: str, data_type: str) -> dict[str, str]:
    """The encryption context of a record: exactly these two pairs, on every KMS call (invariant 1)."""
    return {"customerID": customer_id, "dataType": data_type}
