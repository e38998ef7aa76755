"""The vault's own wrapped keys (vault_keys), one per purpose, in the caller's session."""

from __future__ import annotations

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from app.db.models import VaultKey


class VaultKeyRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, purpose: str) -> VaultKey | None:
        return self.session.get(VaultKey, purpose, populate_existing=True)

    def add_if_absent(self, purpose: str, wrapped_key: bytes, kms_key_id: str) -> None:
        """Several processes may race to create a key: one wins, the others read it."""
        self.session.execute(
            pg_insert(VaultKey)
            .values(purpose=purpose, wrapped_key=wrapped_key, kms_key_id=kms_key_id)
            .on_conflict_do_nothing(index_elements=[VaultKey.purpose])
        )
