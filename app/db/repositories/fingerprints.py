"""The fingerprint backfill's SQL: live records of lookup-enabled types without a fingerprint, a
page at a time by keyset on token, and the fingerprints written back, in the caller's session."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, text
from sqlalchemy.orm import Session

_LIVE_WITHOUT = (
    "fingerprint IS NULL AND erased_at IS NULL AND (expires_at IS NULL OR expires_at > now())"
    " AND data_type = ANY(CAST(:types AS varchar[]))"
)
_LOOKUP_TYPES = text("SELECT name, normalize FROM data_types WHERE lookup ORDER BY name")
_PAGE = text(
    "SELECT token, customer_id, data_type, ciphertext, wrapped_key, kms_key_id FROM records"  # noqa: S608
    f" WHERE token > :after AND {_LIVE_WITHOUT} ORDER BY token LIMIT :limit"
)
_LEFT = text(f"SELECT count(*) FROM records WHERE {_LIVE_WITHOUT}")  # noqa: S608 (constants only)
# A row erased, rewrapped or filled since it was read is left as it is: the fingerprint is written
# only under the wrapped key whose value it was computed from.
_FILL = text(
    "UPDATE records r SET fingerprint = u.fingerprint"
    " FROM unnest(CAST(:tokens AS varchar[]), CAST(:olds AS bytea[]), CAST(:fingerprints AS bytea[]))"
    " AS u(token, old, fingerprint)"
    " WHERE r.token = u.token AND r.fingerprint IS NULL AND r.wrapped_key = u.old"
)


@dataclass(frozen=True, slots=True)
class SealedRecord:
    """A live record's sealed value and wrapped key. `repr` shows neither."""

    token: str
    customer_id: str
    data_type: str
    ciphertext: bytes
    wrapped_key: bytes
    kms_key_id: str

    def __repr__(self) -> str:
        return f"SealedRecord(token={self.token!r}, data_type={self.data_type!r})"


class FingerprintRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def lookup_types(self) -> dict[str, str]:
        """The types whose lookup flag is on, with their normaliser."""
        return {name: normalize for name, normalize in self.session.execute(_LOOKUP_TYPES).all()}

    def page(self, after: str, types: Sequence[str], limit: int) -> list[SealedRecord]:
        rows = self.session.execute(_PAGE, {"after": after, "types": list(types), "limit": limit}).all()
        return [
            SealedRecord(r.token, r.customer_id, r.data_type, r.ciphertext, r.wrapped_key, r.kms_key_id)
            for r in rows
        ]

    def left(self, types: Sequence[str]) -> int:
        return int(self.session.execute(_LEFT, {"types": list(types)}).scalar_one())

    def fill(self, filled: Sequence[tuple[str, bytes, bytes]]) -> int:
        """(token, the wrapped key read, fingerprint) each; returns how many rows were filled."""
        if not filled:
            return 0
        parameters = {
            "tokens": [token for token, _, _ in filled],
            "olds": [old for _, old, _ in filled],
            "fingerprints": [fingerprint for _, _, fingerprint in filled],
        }
        result = cast(CursorResult[Any], self.session.execute(_FILL, parameters))
        return result.rowcount
