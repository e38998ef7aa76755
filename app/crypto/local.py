"""The local development key provider: KMS semantics without KMS, for the embedded default only.

A 256-bit master key in a 0600 file wraps each data key with AES-256-GCM, the encryption context as
associated data, so a wrapped key opens only under the context it was made for, as with KMS.
Master keys are versioned files (`dev-master.key` is version 1, `dev-master.N.key` version N): new
data keys go to the highest version, and a record opens under the version its key id names, so
`piivault keys new-local` then `piivault keys rewrap --to local:N` rotates as with KMS.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
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
_VERSION_ALIAS = re.compile(r"local:([1-9][0-9]{0,5})")
WARNING = (
    "LOCAL DEVELOPMENT KEY PROVIDER IN USE: the master key is a file on this disk. "
    "Never store real personal data under it; use PIIVAULT_KMS_KEY_ID in production."
)


def master_key_file(directory: Path, version: int) -> Path:
    return directory / ("dev-master.key" if version == 1 else f"dev-master.{version}.key")


def _read_master_key(path: Path) -> bytes:
    key = path.read_bytes()
    if len(key) != DATA_KEY_BYTES:
        raise KeyAccessDenied(f"{path} is not a 256-bit key")
    if path.stat().st_mode & 0o077:
        raise KeyAccessDenied(f"{path} must be readable by its owner only (chmod 600)")
    return key


def _create_master_key(path: Path) -> bytes:
    """A new random key in a new 0600 file; FileExistsError if the file is there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    key = os.urandom(DATA_KEY_BYTES)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    return key


def load_or_create_master_key(path: Path) -> bytes:
    try:
        return _create_master_key(path)
    except FileExistsError:
        return _read_master_key(path)


def local_key_id(master_key: bytes) -> str:
    """A key id derived from the key (never the key itself), stable across restarts."""
    return "local:" + hashlib.sha256(b"piivault.local" + master_key).hexdigest()[:16]


_VERSION_FILE = re.compile(r"dev-master(?:\.([1-9][0-9]{0,5}))?\.key")


def local_key_versions(directory: Path) -> list[int]:
    """The master key versions `directory` holds, ascending (a retired version's file may be gone)."""
    if not directory.is_dir():
        return []
    versions = []
    for path in directory.iterdir():
        matched = _VERSION_FILE.fullmatch(path.name)
        # The name the version would be written under, only (no dev-master.1.key twin of version 1).
        if matched and path.name == master_key_file(directory, int(matched.group(1) or 1)).name:
            versions.append(int(matched.group(1) or 1))
    return sorted(versions)


def create_local_key_version(directory: Path) -> tuple[int, str]:
    """The next master key version, made the current one for processes started after this.
    Returns (version, key id)."""
    version = max(local_key_versions(directory), default=0) + 1
    try:
        key = _create_master_key(master_key_file(directory, version))
    except FileExistsError:  # another `new-local` won the race: this is not a new version
        raise KeyAccessDenied(f"{master_key_file(directory, version)} appeared meanwhile") from None
    return version, local_key_id(key)


class LocalKeyProvider:
    """Master keys by version; the highest is current. Key ids name the key material; `local:N`
    names version N, as an alias names a KMS key."""

    def __init__(self, master_keys: bytes | dict[int, bytes]) -> None:
        versions = {1: master_keys} if isinstance(master_keys, bytes) else master_keys
        if not versions or any(len(key) != DATA_KEY_BYTES for key in versions.values()):
            raise ValueError("master keys must be 256 bits")
        ids = {number: local_key_id(key) for number, key in versions.items()}
        self._aeads = {ids[number]: AESGCM(key) for number, key in versions.items()}
        self._versions = {f"local:{number}": key_id for number, key_id in ids.items()}
        self._key_id = ids[max(versions)]
        log.warning(WARNING)

    @classmethod
    def from_file(cls, path: Path) -> LocalKeyProvider:
        return cls(load_or_create_master_key(path))

    @classmethod
    def from_directory(cls, directory: Path) -> LocalKeyProvider:
        """Every version in `directory`, the highest current; version 1 is made on first use."""
        versions = local_key_versions(directory) or [1]
        keys = {n: load_or_create_master_key(master_key_file(directory, n)) for n in versions}
        return cls(keys)

    def __repr__(self) -> str:
        return f"LocalKeyProvider(key_id={self._key_id!r}, versions={len(self._aeads)})"

    @property
    def key_id(self) -> str:
        return self._key_id

    def _aead(self, key_id: str) -> AESGCM:
        aead = self._aeads.get(key_id)
        if aead is None:
            log.error("refused to use key %s: the local provider holds %s", key_id, sorted(self._aeads))
            raise KeyNotAllowed()
        return aead

    def _wrap(self, aead: AESGCM, plaintext: bytes, context: EncryptionContext) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _MAGIC + nonce + aead.encrypt(nonce, plaintext, canonical_context(context))

    def _unwrap(self, aead: AESGCM, wrapped: bytes, context: EncryptionContext) -> bytes:
        header = len(_MAGIC) + _NONCE_BYTES
        if not wrapped.startswith(_MAGIC) or len(wrapped) <= header:
            raise IntegrityFailure()
        nonce, sealed = wrapped[len(_MAGIC) : header], wrapped[header:]
        try:
            return aead.decrypt(nonce, sealed, canonical_context(context))
        except InvalidTag:
            raise IntegrityFailure() from None

    async def generate_data_key(self, context: EncryptionContext) -> DataKey:
        plaintext = os.urandom(DATA_KEY_BYTES)
        wrapped = self._wrap(self._aeads[self._key_id], plaintext, context)
        return DataKey(plaintext, wrapped, self._key_id, str(uuid.uuid4()))

    async def decrypt_data_key(self, wrapped: bytes, context: EncryptionContext, *, key_id: str) -> DataKey:
        plaintext = self._unwrap(self._aead(key_id), wrapped, context)
        return DataKey(plaintext, wrapped, key_id, str(uuid.uuid4()))

    async def reencrypt_data_key(
        self, wrapped: bytes, context: EncryptionContext, *, key_id: str, to_key_id: str
    ) -> DataKey:
        source, target = self._aead(key_id), self._aead(to_key_id)
        rewrapped = self._wrap(target, self._unwrap(source, wrapped, context), context)
        return DataKey(b"", rewrapped, to_key_id, str(uuid.uuid4()))

    def key_arn(self) -> str:
        return self._key_id

    def allowed_arns(self) -> frozenset[str]:
        return frozenset(self._aeads)

    def allowed_arn_for(self, name: str) -> str:
        """A key id, or `local:N` for version N, as the id records name it."""
        key_id = self._versions.get(name, name) if _VERSION_ALIAS.fullmatch(name) else name
        self._aead(key_id)
        return key_id

    def check(self) -> None:
        return None

    def close(self) -> None:
        return None
