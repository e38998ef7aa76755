"""AWS KMS key provider: GenerateDataKey / Decrypt with the record's encryption context.

The data path's calls (`*_async`: one per tokenize, one per detokenize) go through a KmsTransport
(app/crypto/kms_transport.py): the lean one by default, awaited on the event loop, or boto3's own.
Everything else (the audit key's one-time unwrap, DescribeKey, grants, readiness) calls the boto3
client directly.

boto and KMS errors stop here and become the vault's own: KeyServiceUnavailable (retry later),
KeyAccessDenied (an operator must act), IntegrityFailure (the wrapped key does not open under
this context).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from app.crypto.envelope import DATA_KEY_BYTES
from app.crypto.keys import DataKey, EncryptionContext, GrantConstraints
from app.crypto.kms_transport import Boto3Transport, KmsTransport, TransportKind, build_transport
from app.crypto.kms_wire import resolved_verify
from app.errors import IntegrityFailure, KeyAccessDenied, KeyServiceUnavailable, VaultError

if TYPE_CHECKING:
    from botocore.session import Session
    from mypy_boto3_kms.client import KMSClient

log = logging.getLogger(__name__)
# botocore logs whole response bodies at DEBUG, data keys (Plaintext) included: never below INFO.
logging.getLogger("botocore.parsers").setLevel(logging.INFO)
T = TypeVar("T")

_UNAVAILABLE = {
    "ThrottlingException",
    "RequestLimitExceeded",
    "LimitExceededException",
    "KMSInternalException",
    "DependencyTimeoutException",
    "ServiceUnavailableException",
    "InternalFailure",
    "KeyUnavailableException",
}
_INVALID_CIPHERTEXT = {"InvalidCiphertextException", "IncorrectKeyException"}
_OPERATIONS = {"Encrypt": "GenerateDataKey", "Decrypt": "Decrypt"}
_default_session: Session | None = None
_default_session_lock = threading.Lock()


def _shared_session() -> Session:
    """One botocore session for the process, as boto3's default: making one loads the service
    models again (about 0.3 s)."""
    global _default_session
    with _default_session_lock:
        if _default_session is None:
            _default_session = botocore.session.get_session()
        return _default_session


def _vault_error_for(code: str, status: int) -> VaultError:
    """The vault's error for a KMS error answer: its code and HTTP status, whichever path it came by."""
    if code in _INVALID_CIPHERTEXT:
        return IntegrityFailure()
    if code in _UNAVAILABLE or status >= 500:
        return KeyServiceUnavailable()
    return KeyAccessDenied()


def _translate(operation: str, err: Exception) -> Exception:
    """Map a boto error to the vault's own, logging only the error code (never a payload)."""
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        log.warning("kms %s failed: %s (HTTP %s)", operation, code, status)
        return _vault_error_for(code, status)
    if isinstance(err, NoCredentialsError):
        log.error("kms %s failed: no AWS credentials found", operation)
        return KeyAccessDenied("the vault has no AWS credentials for the key service")
    log.warning("kms %s failed: %s", operation, type(err).__name__)
    return KeyServiceUnavailable()


def _generated(response: dict[str, Any]) -> DataKey:
    plaintext = response["Plaintext"]
    if len(plaintext) != DATA_KEY_BYTES:
        raise KeyAccessDenied("the key service returned a data key of the wrong size")
    return DataKey(
        plaintext=plaintext,
        wrapped=response["CiphertextBlob"],
        key_id=response["KeyId"],
        request_id=response["ResponseMetadata"].get("RequestId"),
    )


def _decrypted(wrapped: bytes, response: dict[str, Any]) -> DataKey:
    return DataKey(
        plaintext=response["Plaintext"],
        wrapped=wrapped,
        key_id=response["KeyId"],
        request_id=response["ResponseMetadata"].get("RequestId"),
    )


class KmsKeyProvider:
    def __init__(
        self,
        key_id: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 5.0,
        max_attempts: int = 3,
        grantee_principal: str | None = None,
        max_pool_connections: int = 64,
        verify: bool | str | None = None,
        transport: TransportKind | KmsTransport = "lean",
        session: Session | None = None,
        client: KMSClient | None = None,
    ) -> None:
        """`verify`: TLS verification for the client and the lean path alike (a CA bundle's path,
        or False; None: botocore's default). An injected `client` should come with the `session`
        that made it and the `verify` it was given, or the lean path cannot serve it."""
        self._key_id = key_id
        self._grantee_principal = grantee_principal
        # "standard" retries back off on throttling and transient errors, within max_attempts.
        config = Config(
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            max_pool_connections=max_pool_connections,
        )
        if client is None:
            session = session or _shared_session()
            verify = resolved_verify(verify, session)
            built: Any = session.create_client(
                "kms", endpoint_url=endpoint_url, region_name=region, config=config, verify=verify
            )
            client = built
        self.client: KMSClient = client
        self._boto3 = Boto3Transport(client)
        if isinstance(transport, str):
            transport = build_transport(client, transport, session=session, verify=verify)
        self._transport: KmsTransport = transport
        self._key_arn: str | None = None
        self._arn_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"KmsKeyProvider(key_id={self._key_id!r})"

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def transport(self) -> KmsTransport:
        return self._transport

    def close(self) -> None:
        """Close the transport's pooled connections (the boto3 client keeps its own)."""
        self._transport.close()

    def _call(self, operation: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (ClientError, BotoCoreError) as err:
            raise _translate(operation, err) from None

    def _hot_call(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        """A blocking call by the boto3 client (the audit key's one-time unwrap, say)."""
        return self._call(operation, lambda: self._boto3.call_blocking(operation, params))

    async def _hot_call_async(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        """A call by the transport, awaited: the lean one's on the event loop, boto3's in a thread."""
        try:
            return await self._transport.call(operation, params)
        except (ClientError, BotoCoreError) as err:
            raise _translate(operation, err) from None

    def _generate_params(self, context: EncryptionContext) -> dict[str, Any]:
        return {"KeyId": self._key_id, "KeySpec": "AES_256", "EncryptionContext": dict(context)}

    def _decrypt_params(self, wrapped: bytes, context: EncryptionContext) -> dict[str, Any]:
        # KeyId pins the master key: a wrapped key from another key is refused, not silently used.
        return {"CiphertextBlob": wrapped, "KeyId": self._key_id, "EncryptionContext": dict(context)}

    def generate_data_key(self, context: EncryptionContext) -> DataKey:
        return _generated(self._hot_call("GenerateDataKey", self._generate_params(context)))

    def decrypt_data_key(self, wrapped: bytes, context: EncryptionContext) -> DataKey:
        return _decrypted(wrapped, self._hot_call("Decrypt", self._decrypt_params(wrapped, context)))

    async def generate_data_key_async(self, context: EncryptionContext) -> DataKey:
        params = self._generate_params(context)
        return _generated(await self._hot_call_async("GenerateDataKey", params))

    async def decrypt_data_key_async(self, wrapped: bytes, context: EncryptionContext) -> DataKey:
        params = self._decrypt_params(wrapped, context)
        return _decrypted(wrapped, await self._hot_call_async("Decrypt", params))

    def key_arn(self) -> str:
        """The master key's ARN (CreateGrant takes no alias); looked up once."""
        with self._arn_lock:
            if self._key_arn is None:
                meta = self._call("DescribeKey", lambda: self.client.describe_key(KeyId=self._key_id))
                self._key_arn = meta["KeyMetadata"]["Arn"]
            return self._key_arn

    def check(self) -> None:
        meta = self._call("DescribeKey", lambda: self.client.describe_key(KeyId=self._key_id))
        if meta["KeyMetadata"].get("KeyState") != "Enabled":
            raise KeyAccessDenied("the vault's KMS key is not enabled")

    # GrantMirror
    def create_grant(self, *, name: str, operations: list[str], constraints: GrantConstraints) -> str | None:
        if not self._grantee_principal:
            raise KeyAccessDenied("grant mirroring needs PIIVAULT_KMS_GRANTEE_PRINCIPAL")
        kms_constraints: dict[str, Any] = {}
        if constraints.subset is not None:
            kms_constraints["EncryptionContextSubset"] = dict(constraints.subset)
        if constraints.equals is not None:
            kms_constraints["EncryptionContextEquals"] = dict(constraints.equals)
        arguments: dict[str, Any] = {
            "KeyId": self.key_arn(),
            "GranteePrincipal": self._grantee_principal,
            "Operations": sorted(_OPERATIONS[op] for op in operations),
            "Name": name,
        }
        if kms_constraints:
            arguments["Constraints"] = kms_constraints
        response = self._call("CreateGrant", lambda: self.client.create_grant(**arguments))
        return response["GrantId"]

    def revoke_grant(self, kms_grant_id: str) -> None:
        try:
            self.client.revoke_grant(KeyId=self.key_arn(), GrantId=kms_grant_id)
        except ClientError as err:
            # Already gone is the state we want.
            if err.response.get("Error", {}).get("Code") == "NotFoundException":
                return
            raise _translate("RevokeGrant", err) from None
        except BotoCoreError as err:
            raise _translate("RevokeGrant", err) from None
