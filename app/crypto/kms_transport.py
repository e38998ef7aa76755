"""How the key provider's KMS calls reach KMS: one small protocol, two transports.

- Boto3Transport: the boto3 client's own call, in a thread. Always correct; the fallback.
- LeanTransport (app/crypto/kms_wire.py): GenerateDataKey and Decrypt signed and sent on the event
  loop with botocore's public pieces, at a fraction of boto3's client CPU; the default.

Both return the operation's response as boto3 returns it (bytes for blobs, `KeyId`,
`ResponseMetadata.RequestId`) and raise botocore's ClientError / BotoCoreError as boto3 raises
them, so the provider maps errors the same way whichever carried the call. `PIIVAULT_KMS_TRANSPORT`
chooses; the lean path is used only with a botocore inside the range it was tested against, and
only for a client it can serve exactly as boto3 would, else boto3 carries the call (one log line).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

import botocore
from botocore import xform_name
from botocore.exceptions import BotoCoreError, ClientError

from app.crypto.kms_wire import LeanPathUnavailable, LeanTransport, MalformedKmsResponse, resolved_verify

if TYPE_CHECKING:
    from botocore.session import Session
    from mypy_boto3_kms.client import KMSClient

log = logging.getLogger(__name__)

TransportKind = Literal["lean", "boto3"]
# The botocore releases the lean path is tested against: [first, below). pyproject.toml pins
# boto3 and botocore to the same range; a test checks the installed botocore is inside it.
BOTOCORE_TESTED_FROM = (1, 44)
BOTOCORE_TESTED_BELOW = (1, 45)


class KmsTransport(Protocol):
    async def call(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        """Run a KMS operation (API name, e.g. "GenerateDataKey") with boto3-style params."""
        ...

    def close(self) -> None: ...


class Boto3Transport:
    """The boto3 client's own call (`ReEncrypt` -> `client.re_encrypt`), in a thread: it blocks."""

    def __init__(self, client: KMSClient) -> None:
        self._client = client

    def __repr__(self) -> str:
        return "Boto3Transport()"

    def call_blocking(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        method = getattr(self._client, xform_name(operation))
        try:
            return cast(dict[str, Any], method(**params))
        except (ClientError, BotoCoreError):
            raise
        except (TypeError, ValueError):
            # botocore's parser fails so on a 2xx answer that is not the operation's document
            # (a blob that is not base64, say): raised below, outside the handler, so no
            # exception chain keeps the body (data keys) alive.
            pass
        raise MalformedKmsResponse(operation=operation)

    async def call(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        return await asyncio.to_thread(self.call_blocking, operation, params)

    def close(self) -> None:
        """Nothing to close: the boto3 client keeps its own pool."""


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def botocore_is_tested(version: str | None = None) -> bool:
    """Whether `version` (the installed botocore's by default) is in the lean path's tested range."""
    return BOTOCORE_TESTED_FROM <= _release(version or botocore.__version__) < BOTOCORE_TESTED_BELOW


def build_transport(
    client: KMSClient,
    kind: TransportKind,
    *,
    session: Session | None = None,
    verify: bool | str | None = None,
) -> KmsTransport:
    """The transport for `client`. The lean one needs the botocore `session` that made the client
    (its credentials) and the `verify` value the client was given (None: botocore's default);
    without them, or when it cannot serve the client, boto3's transport is returned instead."""
    boto3_transport = Boto3Transport(client)
    if kind == "boto3":
        return boto3_transport
    if not botocore_is_tested():
        lowest = ".".join(map(str, BOTOCORE_TESTED_FROM))
        below = ".".join(map(str, BOTOCORE_TESTED_BELOW))
        log.warning(
            "kms transport: boto3 (the lean path is tested with botocore >=%s,<%s, not %s)",
            lowest,
            below,
            botocore.__version__,
        )
        return boto3_transport
    if session is None:
        log.warning("kms transport: boto3 (the lean path needs the session that made the client)")
        return boto3_transport
    try:
        return LeanTransport.for_client(
            client, session=session, verify=resolved_verify(verify, session), fallback=boto3_transport
        )
    except LeanPathUnavailable as reason:
        log.warning("kms transport: boto3 (%s)", reason)
        return boto3_transport
