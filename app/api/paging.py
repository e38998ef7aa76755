"""Cursors of the lists that page in (created_at, id) order: opaque to callers, checked on return."""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Protocol, TypeVar

from fastapi import Query

from app.errors import InvalidInput

PageKey = tuple[datetime, uuid.UUID]


class Keyed(Protocol):
    @property
    def created_at(self) -> datetime: ...

    @property
    def id(self) -> uuid.UUID: ...


K = TypeVar("K", bound=Keyed)

_URL_SAFE = re.compile(r"[A-Za-z0-9_-]+")

Limit = Annotated[int, Query(ge=1, le=1000, description="At most this many per page.")]
CursorParam = Annotated[
    str | None,
    Query(max_length=128, description="The `next_cursor` of the previous page; omit for the first."),
]


def encode_cursor(kind: str, created_at: datetime, row_id: uuid.UUID) -> str:
    """A cursor to the row after (created_at, row_id) in a list of `kind`."""
    raw = f"{kind}|{created_at.isoformat()}|{row_id}".encode("ascii")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(kind: str, cursor: str | None) -> PageKey | None:
    """The position a cursor of this kind of list names; 422 naming `cursor` for anything else."""
    if cursor is None:
        return None
    try:
        if not _URL_SAFE.fullmatch(cursor):
            raise ValueError("not URL-safe base64")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        given_kind, stamp, row_id = raw.split("|")
        created_at = datetime.fromisoformat(stamp)
        key = uuid.UUID(row_id)
        if given_kind != kind or created_at.tzinfo is None:
            raise ValueError("another list's cursor")
    except ValueError:
        raise InvalidInput("cursor is not one this endpoint returned", field="cursor") from None
    return created_at, key


def split_page(kind: str, rows: Sequence[K], limit: int) -> tuple[Sequence[K], str | None]:
    """The page out of `rows` (fetched as limit + 1) and the cursor to the next; None on the last."""
    page = rows[:limit]
    if len(rows) <= limit or not page:
        return page, None
    return page, encode_cursor(kind, page[-1].created_at, page[-1].id)
