"""AWS KMS key provider: GenerateDataKey / Decrypt with the record's encryption context.

The two hot-path calls (one per tokenize, one per detokenize) go through KmsWire, a lean JSON 1.1
path that keeps botocore's credentials, SigV4 signing, retry policy and exceptions but not its
per-call CPU, and that the data path awaits on its event loop (`*_async`); everything else
(DescribeKey, grants, readiness) uses the boto3 client.

boto and KMS errors stop here and become the vault's own: KeyServiceUnavailable (retry later),
KeyAccessDenied (an operator must act), IntegrityFailure (the wrapped key does not open under
this context).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from app.crypto.envelope import DATA_KEY_BYTES
from app.crypto.keys import DataKey, EncryptionContext, GrantConstraints
from app.crypto.kms_wire import KmsWire
from app.errors import IntegrityFailure, KeyAccessDenied, KeyServiceUnavailable, VaultError

if TYPE_CHECKING:
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
_BOTO3_METHODS = {"GenerateDataKey": "generate_data_key", "Decrypt": "decrypt"}


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
        client: KMSClient | None = None,
    ) -> None:
        self._key_id = key_id
        self._grantee_principal = grantee_principal
        # "standard" retries back off on throttling and transient errors, within max_attempts.
        config = Config(
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            max_pool_connections=max_pool_connections,
        )
        self.client: KMSClient = client or boto3.client(
            "kms", endpoint_url=endpoint_url, region_name=region, config=config
        )
        # None when the client cannot be served the lean way (not SigV4, say): boto3 carries all.
        self._wire = KmsWire.for_client(self.client)
        self._key_arn: str | None = None
        self._arn_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"KmsKeyProvider(key_id={self._key_id!r})"

    @property
    def key_id(self) -> str:
        return self._key_id

    def close(self) -> None:
        """Close the lean path's pooled connections (the boto3 client keeps its own)."""
        if self._wire is not None:
            self._wire.close()

    def _call(self, operation: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (ClientError, BotoCoreError) as err:
            raise _translate(operation, err) from None

    def _hot_call(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        """GenerateDataKey / Decrypt by the lean path if there is one, else by boto3: same answers, errors."""
        wire = self._wire
        if wire is not None:
            return self._call(operation, lambda: wire.call(operation, params))
        boto_call: Callable[..., Any] = getattr(self.client, _BOTO3_METHODS[operation])
        return cast(dict[str, Any], self._call(operation, lambda: boto_call(**params)))

    async def _hot_call_async(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        """_hot_call on the event loop (the lean path's own), else in a thread (boto3 blocks)."""
        wire = self._wire
        if wire is None:
            return await asyncio.to_thread(self._hot_call, operation, params)
        try:
            return await wire.call_async(operation, params)
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
