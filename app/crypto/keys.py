"""What every key provider offers, and the data key it hands out."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Coroutine, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

EncryptionContext = Mapping[str, str]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DataKey:
    """A plaintext data key with its wrapped form. `repr` never shows the plaintext."""

    plaintext: bytes = field(repr=False)
    wrapped: bytes = field(repr=False)
    key_id: str
    request_id: str | None


class KeyProvider(Protocol):
    """Wraps and unwraps data keys under master keys, binding each to its encryption context.

    New data keys go under the current master key (`key_id`); a wrapped key is opened under the
    master key its record names, which must be one this vault may use, else KeyNotAllowed.
    Every call is awaited: a remote key service's latency then holds no thread."""

    @property
    def key_id(self) -> str:
        """The current master key: new data keys are wrapped under it."""
        ...

    async def generate_data_key(self, context: EncryptionContext) -> DataKey: ...

    async def decrypt_data_key(self, wrapped: bytes, context: EncryptionContext, *, key_id: str) -> DataKey:
        """Unwrap under `key_id`, the master key stored with the wrapped key."""
        ...

    async def reencrypt_data_key(
        self, wrapped: bytes, context: EncryptionContext, *, key_id: str, to_key_id: str
    ) -> DataKey:
        """Rewrap from `key_id` to `to_key_id` under the same context; the result's plaintext is
        empty (the data key never enters the vault in clear)."""
        ...

    def check(self) -> None:
        """Raise KeyServiceUnavailable / KeyAccessDenied unless the current master key is usable."""

    def close(self) -> None:
        """Release pooled connections to the key service, if any."""


@runtime_checkable
class KeyAllowList(Protocol):
    """The master keys a provider may use, named as records name them (KMS: ARNs). Blocking: the
    first call may ask the key service to resolve ids and aliases."""

    def key_arn(self) -> str:
        """The current key, as records name it."""
        ...

    def allowed_arns(self) -> frozenset[str]:
        """Every key this vault may use: the current key and the decrypt keys."""
        ...

    def allowed_arn_for(self, name: str) -> str:
        """The key `name` (an id, ARN or alias) as records name it, if it is on the allow-list;
        else KeyNotAllowed."""
        ...


_outside_loop: ContextVar[bool] = ContextVar("piivault_outside_loop", default=False)


def run_blocking(call: Coroutine[Any, Any, T]) -> T:
    """Await a key-provider call from code that runs outside any event loop (a worker thread,
    the CLI): the rare, one-time calls such as unwrapping the audit key."""
    token = _outside_loop.set(True)
    try:
        return asyncio.run(call)
    finally:
        _outside_loop.reset(token)


def called_outside_loop() -> bool:
    """Whether this call came through run_blocking, on a loop of its own that closes after it."""
    return _outside_loop.get()


@dataclass(frozen=True, slots=True)
class GrantConstraints:
    """KMS grant constraints: at most one of the two is set."""

    subset: Mapping[str, str] | None = None
    equals: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class KmsGrant:
    """A KMS grant a mirror made: its id, and the master key (ARN) that holds it."""

    key_arn: str
    grant_id: str


class GrantMirror(Protocol):
    """Mirrors vault grants as grants on the master key, so KMS itself refuses what no grant covers."""

    def create_grant(
        self,
        *,
        name: str,
        operations: list[str],
        constraints: GrantConstraints,
        key_arn: str | None = None,
    ) -> KmsGrant | None:
        """A KMS grant on `key_arn` (default: the current key); None if nothing is to be mirrored."""
        ...

    def revoke_grant(self, kms_grant_id: str, key_arn: str | None = None) -> None:
        """Revoke it on `key_arn`; None (a mirror whose key was not recorded): on whichever
        allowed key holds it. One already gone is not an error."""
        ...


class NoGrantMirror:
    """For providers (or settings) without KMS grants: nothing to mirror."""

    def create_grant(
        self,
        *,
        name: str,
        operations: list[str],
        constraints: GrantConstraints,
        key_arn: str | None = None,
    ) -> KmsGrant | None:
        return None

    def revoke_grant(self, kms_grant_id: str, key_arn: str | None = None) -> None:
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
