"""What every key provider offers, and the data key it hands out."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

EncryptionContext = Mapping[str, str]


@dataclass(frozen=True, slots=True)
class DataKey:
    """A plaintext data key with its wrapped form. `repr` never shows the plaintext."""

    plaintext: bytes = field(repr=False)
    wrapped: bytes = field(repr=False)
    key_id: str
    request_id: str | None


class KeyProvider(Protocol):
    """Wraps and unwraps data keys under a master key, binding each to its encryption context."""

    @property
    def key_id(self) -> str: ...

    def generate_data_key(self, context: EncryptionContext) -> DataKey: ...

    def decrypt_data_key(self, wrapped: bytes, context: EncryptionContext) -> DataKey: ...

    def check(self) -> None:
        """Raise KeyServiceUnavailable / KeyAccessDenied unless the master key is usable."""


@runtime_checkable
class RemoteKeyProvider(KeyProvider, Protocol):
    """A provider whose key service is a network hop away: the data path awaits its calls on the
    event loop, many at once, instead of blocking a thread for each."""

    async def generate_data_key_async(self, context: EncryptionContext) -> DataKey: ...

    async def decrypt_data_key_async(self, wrapped: bytes, context: EncryptionContext) -> DataKey: ...


@dataclass(frozen=True, slots=True)
class GrantConstraints:
    """KMS grant constraints: at most one of the two is set."""

    subset: Mapping[str, str] | None = None
    equals: Mapping[str, str] | None = None


class GrantMirror(Protocol):
    """Mirrors vault grants as grants on the master key, so KMS itself refuses what no grant covers."""

    def create_grant(
        self, *, name: str, operations: list[str], constraints: GrantConstraints
    ) -> str | None: ...

    def revoke_grant(self, kms_grant_id: str) -> None: ...


class NoGrantMirror:
    """For providers (or settings) without KMS grants: nothing to mirror."""

    def create_grant(self, *, name: str, operations: list[str], constraints: GrantConstraints) -> str | None:
        return None

    def revoke_grant(self, kms_grant_id: str) -> None:
        return None


_length = struct.Struct(">I").pack


def length_prefixed(*parts: str | bytes) -> bytes:
    """An unambiguous encoding of a sequence of strings: each part as a 4-byte length, then its bytes."""
    out: list[bytes] = []
    for part in parts:
        raw = part.encode("utf-8") if isinstance(part, str) else part
        out += (_length(len(raw)), raw)
    return b"".join(out)


def canonical_context(context: EncryptionContext) -> bytes:
    """The encryption context as associated data: pairs sorted by key, length-prefixed."""
    parts: list[str] = []
    for key in sorted(context):
        parts += [key, context[key]]
    return length_prefixed(*parts)
