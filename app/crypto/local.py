"""The local development key provider: KMS semantics without KMS, for the embedded default only.

A 256-bit master key in a 0600 file wraps each data key with AES-256-GCM, the encryption context as
associated data, so a wrapped key opens only under the context it was made for, as with KMS.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from app.crypto.envelope import DATA_KEY_BYTES
from app.crypto.keys import DataKey, EncryptionContext, canonical_context
from app.errors import IntegrityFailure, KeyAccessDenied, KeyNotAllowed

log = logging.getLogger(__name__)

_MAGIC = b"pvlk\x01"
_NONCE_BYTES = 12
WARNING = (
    "LOCAL DEVELOPMENT KEY PROVIDER IN USE: the master key is a file on this disk. "
    "Never store real personal data under it; use PIIVAULT_KMS_KEY_ID in production."
)


def load_or_create_master_key(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) != DATA_KEY_BYTES:
            raise KeyAccessDenied(f"{path} is not a 256-bit key") from None
        if path.stat().st_mode & 0o077:
            raise KeyAccessDenied(f"{path} must be readable by its owner only (chmod 600)") from None
        return key
    key = os.urandom(DATA_KEY_BYTES)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    return key


class LocalKeyProvider:
    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != DATA_KEY_BYTES:
            raise ValueError("master key must be 256 bits")
        self._aead = AESGCM(master_key)
        self._key_id = "local:" + hashlib.sha256(b"piivault.local" + master_key).hexdigest()[:16]
        log.warning(WARNING)

    @classmethod
    def from_file(cls, path: Path) -> LocalKeyProvider:
        return cls(load_or_create_master_key(path))

    def __repr__(self) -> str:
        return f"LocalKeyProvider(key_id={self._key_id!r})"

    @property
    def key_id(self) -> str:
        return self._key_id

    def _allowed(self, key_id: str) -> None:
        if key_id != self._key_id:
            log.error("refused to use key %s: the local provider holds only %s", key_id, self._key_id)
            raise KeyNotAllowed()

    def _wrap(self, plaintext: bytes, context: EncryptionContext) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _MAGIC + nonce + self._aead.encrypt(nonce, plaintext, canonical_context(context))

    def _unwrap(self, wrapped: bytes, context: EncryptionContext) -> bytes:
        header = len(_MAGIC) + _NONCE_BYTES
        if not wrapped.startswith(_MAGIC) or len(wrapped) <= header:
            raise IntegrityFailure()
        nonce, sealed = wrapped[len(_MAGIC) : header], wrapped[header:]
        try:
            return self._aead.decrypt(nonce, sealed, canonical_context(context))
        except InvalidTag:
            raise IntegrityFailure() from None

    async def generate_data_key(self, context: EncryptionContext) -> DataKey:
        plaintext = os.urandom(DATA_KEY_BYTES)
        return DataKey(plaintext, self._wrap(plaintext, context), self._key_id, str(uuid.uuid4()))

    async def decrypt_data_key(self, wrapped: bytes, context: EncryptionContext, *, key_id: str) -> DataKey:
        self._allowed(key_id)
        return DataKey(self._unwrap(wrapped, context), wrapped, self._key_id, str(uuid.uuid4()))

    async def reencrypt_data_key(
        self, wrapped: bytes, context: EncryptionContext, *, key_id: str, to_key_id: str
    ) -> DataKey:
        self._allowed(key_id)
        self._allowed(to_key_id)
        rewrapped = self._wrap(self._unwrap(wrapped, context), context)
        return DataKey(b"", rewrapped, self._key_id, str(uuid.uuid4()))

    def key_arn(self) -> str:
        return self._key_id

    def allowed_arns(self) -> frozenset[str]:
        return frozenset({self._key_id})

    def allowed_arn_for(self, name: str) -> str:
        self._allowed(name)
        return name

    def check(self) -> None:
        return None

    def close(self) -> None:
        return None
