"""The stored record format: AES-256-GCM under a per-record data key.

Format v1: b"\\x01" || 96-bit random nonce || ciphertext || 128-bit tag. The associated data binds the
token, customer, data type and version, so a ciphertext moved onto another row, or a row whose
customer_id is edited, fails to decrypt instead of returning someone else's data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from app.crypto.keys import length_prefixed
from app.errors import IntegrityFailure

FORMAT_VERSION = 1
_VERSION_BYTE = bytes([FORMAT_VERSION])
_NONCE_BYTES = 12
_TAG_BYTES = 16
DATA_KEY_BYTES = 32


@dataclass(frozen=True, slots=True)
class RecordBinding:
    """What a record's ciphertext is bound to; all of it is authenticated, none of it secret."""

    token: str
    customer_id: str
    data_type: str

    def associated_data(self, version: int) -> bytes:
        return length_prefixed("piivault.record", str(version), self.token, self.customer_id, self.data_type)


def seal(data_key: bytes, plaintext: bytes, binding: RecordBinding) -> bytes:
    if len(data_key) != DATA_KEY_BYTES:
        raise ValueError("data key must be 256 bits")
    nonce = os.urandom(_NONCE_BYTES)
    sealed = AESGCM(data_key).encrypt(nonce, plaintext, binding.associated_data(FORMAT_VERSION))
    return _VERSION_BYTE + nonce + sealed


def open_sealed(data_key: bytes, blob: bytes, binding: RecordBinding) -> bytes:
    """Decrypt a sealed value. Any failure, whatever its cause, is the same opaque IntegrityFailure."""
    if (
        len(data_key) != DATA_KEY_BYTES
        or len(blob) < 1 + _NONCE_BYTES + _TAG_BYTES
        or blob[:1] != _VERSION_BYTE
    ):
        raise IntegrityFailure()
    nonce, sealed = blob[1 : 1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES :]
    try:
        return AESGCM(data_key).decrypt(nonce, sealed, binding.associated_data(FORMAT_VERSION))
    except InvalidTag:
        raise IntegrityFailure() from None
