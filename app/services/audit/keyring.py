"""The audit chain's HMAC keys, wrapped by the key provider and stored in audit_keys."""

from __future__ import annotations

import threading

from app.crypto.keys import KeyProvider, run_blocking
from app.db.models import AuditKey
from app.db.repositories import AuditRepository
from app.db.session import Database

# The audit key is no record's: its context names its purpose, never a customer.
AUDIT_KEY_CONTEXT = {"purpose": "piivault-audit-chain"}


class AuditKeyring:
    """The chain's HMAC keys, unwrapped once per process through the key provider."""

    def __init__(self, database: Database, keys: KeyProvider) -> None:
        self._database = database
        self._keys = keys
        self._unwrapped: dict[int, bytes] = {}
        self._current: int | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AuditKeyring(versions={sorted(self._unwrapped)})"

    @property
    def loaded(self) -> bool:
        return self._current is not None

    def current(self) -> tuple[int, bytes]:
        with self._lock:
            if self._current is None:
                self._current = self._load_or_create()
            return self._current, self._unwrapped[self._current]

    def get(self, version: int) -> bytes | None:
        with self._lock:
            if version not in self._unwrapped:
                with self._database.transaction(side=True) as session:
                    stored = AuditRepository(session).key(version)
                if stored is None:
                    return None
                self._unwrap(stored)
            return self._unwrapped[version]

    def _unwrap(self, stored: AuditKey) -> None:
        # Under the key it was wrapped with: an audit key outlives a change of the current key.
        unwrap = self._keys.decrypt_data_key(stored.wrapped_key, AUDIT_KEY_CONTEXT, key_id=stored.kms_key_id)
        data_key = run_blocking(unwrap)
        self._unwrapped[stored.version] = data_key.plaintext

    def _load_or_create(self) -> int:
        with self._database.transaction(side=True) as session:
            repository = AuditRepository(session)
            stored = repository.latest_key()
            if stored is None:
                made = run_blocking(self._keys.generate_data_key(AUDIT_KEY_CONTEXT))
                repository.add_key_if_absent(
                    AuditKey(version=1, wrapped_key=made.wrapped, kms_key_id=made.key_id)
                )
                stored = repository.latest_key()
                assert stored is not None  # noqa: S101 (just inserted, or inserted by a racing process)
        self._unwrap(stored)
        return stored.version
