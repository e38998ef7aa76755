"""The vault's own secret keys (the fingerprint key, ...): made once by the key provider, stored
wrapped in vault_keys, unwrapped once per process. The database alone holds no usable key."""

from __future__ import annotations

import threading

from app.crypto.keys import EncryptionContext, KeyProvider, run_blocking
from app.db.repositories.vault_keys import VaultKeyRepository
from app.db.session import Database

FINGERPRINT = "fingerprint"


def vault_key_context(purpose: str) -> EncryptionContext:
    """No customer's: the context names the key's purpose, so no record's wrapped key opens as it."""
    return {"purpose": f"piivault-{purpose}"}


class VaultKeyring:
    """One purpose's key. Never rotated in place: what it protects (fingerprints) depends on its
    bytes; a rewrap moves only its wrapping."""

    def __init__(self, database: Database, keys: KeyProvider, purpose: str) -> None:
        self._database = database
        self._keys = keys
        self._purpose = purpose
        self._key: bytes | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"VaultKeyring(purpose={self._purpose!r}, loaded={self._key is not None})"

    def key(self) -> bytes:
        """The key, from the database (made on first use). Blocking: may call the key provider."""
        with self._lock:
            if self._key is None:
                self._key = self._load_or_create()
            return self._key

    def _load_or_create(self) -> bytes:
        # No database connection is held across a key-provider call.
        context = vault_key_context(self._purpose)
        stored = self._read()
        if stored is None:
            made = run_blocking(self._keys.generate_data_key(context))
            with self._database.transaction(side=True) as session:
                VaultKeyRepository(session).add_if_absent(self._purpose, made.wrapped, made.key_id)
            stored = self._read()  # ours, or a racing process's
            assert stored is not None  # noqa: S101 (inserted above if absent)
        wrapped, key_id = stored
        # Under the key it was wrapped with: it outlives a change of the current key.
        return run_blocking(self._keys.decrypt_data_key(wrapped, context, key_id=key_id)).plaintext

    def _read(self) -> tuple[bytes, str] | None:
        with self._database.transaction(side=True) as session:
            stored = VaultKeyRepository(session).get(self._purpose)
            return None if stored is None else (stored.wrapped_key, stored.kms_key_id)
