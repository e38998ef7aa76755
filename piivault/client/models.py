"""What the client's calls return: plain, typed, immutable. A value is never in a repr."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True, slots=True)
class TokenizeItem:
    """One value to tokenize (batch input; plain dicts with these keys are accepted too)."""

    customer_id: str
    data_type: str
    value: str = field(repr=False)

    def as_json(self) -> dict[str, str]:
        return {"customer_id": self.customer_id, "data_type": self.data_type, "value": self.value}


@dataclass(frozen=True, slots=True)
class Tokenized:
    token: str
    customer_id: str
    data_type: str
    created_at: datetime | None = None
    # The customer's existing record (tokenize with deduplicate=True): nothing was stored.
    deduplicated: bool = False

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Tokenized:
        return cls(
            body["token"],
            body["customer_id"],
            body["data_type"],
            _time(body.get("created_at")),
            bool(body.get("deduplicated", False)),
        )


@dataclass(frozen=True, slots=True)
class Revealed:
    """A detokenized record: `value` (or `value_masked` for a masked reveal)."""

    token: str
    customer_id: str
    data_type: str
    value: str | None = field(default=None, repr=False)
    value_masked: str | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Revealed:
        return cls(
            body["token"], body["customer_id"], body["data_type"], body.get("value"), body.get("value_masked")
        )


@dataclass(frozen=True, slots=True)
class Match:
    """A record found by lookup."""

    token: str
    customer_id: str
    created_at: datetime | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Match:
        return cls(body["token"], body["customer_id"], _time(body.get("created_at")))


@dataclass(frozen=True, slots=True)
class Erasure:
    """A customer erasure's outcome: how many records, and their tokens."""

    erased: int
    tokens: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Limits:
    """The server's bounds (GET /v1/limits): batches are split at max_batch_items."""

    max_batch_items: int
    max_value_bytes: int
