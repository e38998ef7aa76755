"""Which master key wraps what: the wrapped data keys of records and of the vault's own keys
(audit_keys, vault_keys), read a page at a time and moved to another key, in the caller's session."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, TextClause, text
from sqlalchemy.orm import Session


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """One wrapped data key and what it is bound to. `ref` is the row's key (a record's token, an
    audit key's version); `repr` shows no wrapped key."""

    ref: str
    wrapped_key: bytes
    kms_key_id: str
    customer_id: str | None = None
    data_type: str | None = None

    def __repr__(self) -> str:
        return f"WrappedKey(ref={self.ref!r}, kms_key_id={self.kms_key_id!r})"


@dataclass(frozen=True, slots=True)
class Rewrapped:
    """A wrapped key's new form, to replace `old` only if the row still holds it."""

    ref: str
    old: bytes
    new: bytes


# Rows not under `to` (or only those under `from_`), after `after` in key order: keyset pagination,
# so a page costs the same wherever it starts. A row without a wrapped key (none today) is skipped.
_RECORDS_PAGE = text(
    "SELECT token, wrapped_key, kms_key_id, customer_id, data_type FROM records"
    " WHERE token > :after AND kms_key_id <> :to"
    " AND (CAST(:from_ AS varchar) IS NULL OR kms_key_id = :from_) AND wrapped_key IS NOT NULL"
    " ORDER BY token LIMIT :limit"
)
_RECORDS_LEFT = text(
    "SELECT count(*) FROM records WHERE kms_key_id <> :to"
    " AND (CAST(:from_ AS varchar) IS NULL OR kms_key_id = :from_) AND wrapped_key IS NOT NULL"
)
# One statement for the whole page; a row whose wrapped key changed since it was read (erased,
# or moved by another run) is left as it is.
_MOVE_RECORDS = text(
    "UPDATE records r SET wrapped_key = u.new, kms_key_id = :to"
    " FROM unnest(CAST(:refs AS varchar[]), CAST(:olds AS bytea[]), CAST(:news AS bytea[]))"
    " AS u(ref, old, new)"
    " WHERE r.token = u.ref AND r.wrapped_key = u.old"
)
_AUDIT_KEYS = text(
    "SELECT version, wrapped_key, kms_key_id FROM audit_keys WHERE kms_key_id <> :to"
    " AND (CAST(:from_ AS varchar) IS NULL OR kms_key_id = :from_) ORDER BY version"
)
_MOVE_AUDIT_KEYS = text(
    "UPDATE audit_keys a SET wrapped_key = u.new, kms_key_id = :to"
    " FROM unnest(CAST(:refs AS smallint[]), CAST(:olds AS bytea[]), CAST(:news AS bytea[]))"
    " AS u(ref, old, new)"
    " WHERE a.version = u.ref AND a.wrapped_key = u.old"
)
_VAULT_KEYS = text(
    "SELECT purpose, wrapped_key, kms_key_id FROM vault_keys WHERE kms_key_id <> :to"
    " AND (CAST(:from_ AS varchar) IS NULL OR kms_key_id = :from_) ORDER BY purpose"
)
_MOVE_VAULT_KEYS = text(
    "UPDATE vault_keys v SET wrapped_key = u.new, kms_key_id = :to"
    " FROM unnest(CAST(:refs AS varchar[]), CAST(:olds AS bytea[]), CAST(:news AS bytea[]))"
    " AS u(ref, old, new)"
    " WHERE v.purpose = u.ref AND v.wrapped_key = u.old"
)
_VAULT_KEYS_BY_KEY = text("SELECT kms_key_id, count(*) FROM vault_keys GROUP BY kms_key_id")
# Tombstones (erased records) wrap nothing: no key id, not counted.
_RECORDS_BY_KEY = text(
    "SELECT kms_key_id, count(*) FROM records WHERE kms_key_id IS NOT NULL GROUP BY kms_key_id"
)
_AUDIT_KEYS_BY_KEY = text("SELECT kms_key_id, count(*) FROM audit_keys GROUP BY kms_key_id")


class KeyRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def records_page(self, after: str, limit: int, *, to: str, from_: str | None) -> list[WrappedKey]:
        rows = self.session.execute(
            _RECORDS_PAGE, {"after": after, "to": to, "from_": from_, "limit": limit}
        ).all()
        return [WrappedKey(r.token, r.wrapped_key, r.kms_key_id, r.customer_id, r.data_type) for r in rows]

    def records_left(self, *, to: str, from_: str | None) -> int:
        return int(self.session.execute(_RECORDS_LEFT, {"to": to, "from_": from_}).scalar_one())

    def move_records(self, moved: Sequence[Rewrapped], to: str) -> int:
        """Returns how many rows were moved."""
        return self._move(_MOVE_RECORDS, [m.ref for m in moved], moved, to)

    def audit_keys(self, *, to: str, from_: str | None) -> list[WrappedKey]:
        rows = self.session.execute(_AUDIT_KEYS, {"to": to, "from_": from_}).all()
        return [WrappedKey(str(r.version), r.wrapped_key, r.kms_key_id) for r in rows]

    def move_audit_keys(self, moved: Sequence[Rewrapped], to: str) -> int:
        return self._move(_MOVE_AUDIT_KEYS, [int(m.ref) for m in moved], moved, to)

    def vault_keys(self, *, to: str, from_: str | None) -> list[WrappedKey]:
        rows = self.session.execute(_VAULT_KEYS, {"to": to, "from_": from_}).all()
        return [WrappedKey(r.purpose, r.wrapped_key, r.kms_key_id) for r in rows]

    def move_vault_keys(self, moved: Sequence[Rewrapped], to: str) -> int:
        return self._move(_MOVE_VAULT_KEYS, [m.ref for m in moved], moved, to)

    def _move(
        self, statement: TextClause, refs: Sequence[object], moved: Sequence[Rewrapped], to: str
    ) -> int:
        if not moved:
            return 0
        parameters = {"refs": refs, "olds": [m.old for m in moved], "news": [m.new for m in moved], "to": to}
        result = cast(CursorResult[Any], self.session.execute(statement, parameters))
        return result.rowcount

    def records_by_key(self) -> dict[str, int]:
        return {key: int(count) for key, count in self.session.execute(_RECORDS_BY_KEY).all()}

    def audit_keys_by_key(self) -> dict[str, int]:
        return {key: int(count) for key, count in self.session.execute(_AUDIT_KEYS_BY_KEY).all()}

    def vault_keys_by_key(self) -> dict[str, int]:
        return {key: int(count) for key, count in self.session.execute(_VAULT_KEYS_BY_KEY).all()}
