"""AWS KMS key provider: GenerateDataKey / Decrypt / ReEncrypt with the record's encryption context.

The data-key calls are awaited and go through a KmsTransport (app/crypto/kms_transport.py): the
lean one by default, on the event loop, or boto3's own. DescribeKey, grants and readiness call the
boto3 client directly. Every answer is checked in one place
(validated_data_key), and boto and KMS errors stop here and become the vault's own:
KeyServiceUnavailable (transient: retry later), KeyAccessDenied / KeyNotAllowed /
KeyServiceInvalidResponse (permanent: an operator must act), IntegrityFailure (the wrapped key
does not open under this context).

Every KMS operation, on either transport, has an overall deadline (PIIVAULT_KMS_CALL_DEADLINE_S),
retries included: socket timeouts bound each wait for bytes, not a call, and a server dripping
bytes (or `100 Continue` lines) would otherwise hold it for as long as it likes. A call past its
deadline is KeyServiceUnavailable (retry later).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from app.crypto.envelope import DATA_KEY_BYTES
from app.crypto.keys import DataKey, EncryptionContext, GrantConstraints, KmsGrant, called_outside_loop
from app.crypto.kms_transport import Boto3Transport, KmsTransport, TransportKind, build_transport
from app.crypto.kms_wire import resolved_verify
from app.errors import (
    IntegrityFailure,
    KeyAccessDenied,
    KeyNotAllowed,
    KeyServiceInvalidResponse,
    KeyServiceUnavailable,
    VaultError,
)
from app.logs import repeated_failure
from app.metrics import observe_kms_call

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
# A key's ARN (not an alias's): what KMS names the key in its answers, so it needs no DescribeKey.
_KEY_ARN = re.compile(r"arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:key/[A-Za-z0-9-]+")
_default_session: Session | None = None
_default_session_lock = threading.Lock()


def shared_session() -> Session:
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
        # Once per request with a count: an outage during a batch fails every item the same way.
        repeated_failure(log, logging.WARNING, "kms %s failed: %s (HTTP %s)", operation, code, status)
        return _vault_error_for(code, status)
    if isinstance(err, NoCredentialsError):
        repeated_failure(log, logging.ERROR, "kms %s failed: no AWS credentials found", operation)
        return KeyAccessDenied("the vault has no AWS credentials for the key service")
    repeated_failure(log, logging.WARNING, "kms %s failed: %s", operation, type(err).__name__)
    return KeyServiceUnavailable()


def _outcome(failure: Exception) -> str:
    """A failed call's metric label: the vault's error code (a bounded set)."""
    return failure.code if isinstance(failure, VaultError) else type(failure).__name__


class _Invalid(Exception):
    """What is wrong with a key service's answer (never quoting it)."""


def _blob(response: Mapping[str, Any], name: str, size: int | None = None) -> bytes:
    value = response.get(name)
    if not isinstance(value, bytes) or not value:
        raise _Invalid(f"{name} missing or not bytes")
    if size is not None and len(value) != size:
        raise _Invalid(f"{name} is {len(value)} bytes, not {size}")
    return value


def _request_id(response: Mapping[str, Any]) -> str | None:
    metadata = response.get("ResponseMetadata")
    request_id = metadata.get("RequestId") if isinstance(metadata, Mapping) else None
    return request_id if isinstance(request_id, str) else None


def validated_data_key(
    operation: str, response: Mapping[str, Any], *, key_arn: str, wrapped: bytes | None = None
) -> DataKey:
    """The one check of every GenerateDataKey / Decrypt / ReEncrypt answer: the fields the
    operation returns are there and well formed, the data key is 256 bits, and the master key
    that did the work is the one asked for. Anything else is KeyServiceInvalidResponse."""
    try:
        key_id = response.get("KeyId")
        if key_id != key_arn:
            raise _Invalid("KeyId is not the key asked for")
        plaintext = b"" if operation == "ReEncrypt" else _blob(response, "Plaintext", DATA_KEY_BYTES)
        if wrapped is None:
            wrapped = _blob(response, "CiphertextBlob")
    except _Invalid as problem:
        repeated_failure(log, logging.ERROR, "kms %s answer refused: %s", operation, str(problem))
        raise KeyServiceInvalidResponse() from None
    return DataKey(plaintext=plaintext, wrapped=wrapped, key_id=key_arn, request_id=_request_id(response))


class KmsKeyProvider:
    """Data keys from AWS KMS. New ones under the current key (PIIVAULT_KMS_KEY_ID); wrapped ones
    opened under the key their record names, if it is on the allow-list: the current key and
    PIIVAULT_KMS_DECRYPT_KEY_IDS, each resolved to its ARN (the form KMS names keys in answers)."""

    def __init__(
        self,
        key_id: str,
        *,
        decrypt_key_ids: Sequence[str] = (),
        endpoint_url: str | None = None,
        region: str | None = None,
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 5.0,
        max_attempts: int = 3,
        call_deadline_s: float = 6.0,
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
        self._call_deadline_s = call_deadline_s
        # Blocking calls (DescribeKey, grants, the audit key's unwrap) run here so that their
        # caller can stop waiting at the deadline; a call held by its server keeps its thread
        # until the socket gives up, and the few threads bound how many can pile up.
        self._blocking = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kms-call")
        self._decrypt_key_ids = tuple(dict.fromkeys(k for k in decrypt_key_ids if k != key_id))
        self._grantee_principal = grantee_principal
        # "standard" retries back off on throttling and transient errors, within max_attempts.
        config = Config(
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            max_pool_connections=max_pool_connections,
        )
        if client is None:
            session = session or shared_session()
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
        # Configured name (id, ARN or alias) -> ARN; filled by resolve(), at start-up or first use.
        self._arns: dict[str, str] = {}
        self._allowed: frozenset[str] = frozenset()
        self._resolve_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"KmsKeyProvider(key_id={self._key_id!r})"

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def transport(self) -> KmsTransport:
        return self._transport

    @property
    def call_deadline_s(self) -> float:
        return self._call_deadline_s

    def close(self) -> None:
        """Close the transport's pooled connections (the boto3 client keeps its own)."""
        self._transport.close()
        self._blocking.shutdown(wait=False, cancel_futures=True)

    def _past_deadline(self, operation: str) -> KeyServiceUnavailable:
        log.warning("kms %s failed: no answer within its %ss deadline", operation, self._call_deadline_s)
        return KeyServiceUnavailable("the key service did not answer in time; retry later")

    def _bounded(self, operation: str, fn: Callable[[], T]) -> T:
        """A blocking call, waited for until the deadline and no longer."""
        future = self._blocking.submit(fn)
        try:
            return future.result(timeout=self._call_deadline_s)
        except FutureTimeout:
            future.cancel()  # not started yet (every thread held): it never will be
            raise self._past_deadline(operation) from None

    def _call(self, operation: str, fn: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            result = self._bounded(operation, fn)
        except (ClientError, BotoCoreError) as err:
            failure = _translate(operation, err)
            observe_kms_call(operation, _outcome(failure), time.perf_counter() - started)
            raise failure from None
        except VaultError as err:  # past its deadline
            observe_kms_call(operation, err.code, time.perf_counter() - started)
            raise
        observe_kms_call(operation, "ok", time.perf_counter() - started)
        return result

    async def _hot_call(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        """A data-key call by the transport, awaited. A caller outside the event loop (the audit
        key's one-time unwrap) goes by the boto3 client in its own thread instead: no lean
        connection is opened on a loop that is about to close."""
        started = time.perf_counter()
        try:
            if called_outside_loop():
                response = self._bounded(operation, lambda: self._boto3.call_blocking(operation, params))
            else:
                deadline = asyncio.timeout(self._call_deadline_s)
                try:
                    async with deadline:
                        response = await self._transport.call(operation, params)
                except TimeoutError:
                    if not deadline.expired():
                        raise
                    raise self._past_deadline(operation) from None
        except (ClientError, BotoCoreError) as err:
            failure = _translate(operation, err)
            observe_kms_call(operation, _outcome(failure), time.perf_counter() - started)
            raise failure from None
        except VaultError as err:
            observe_kms_call(operation, err.code, time.perf_counter() - started)
            raise
        observe_kms_call(operation, "ok", time.perf_counter() - started)
        return response

    # The allow-list

    def _describe(self, key_id: str) -> Any:
        return self._call("DescribeKey", lambda: self.client.describe_key(KeyId=key_id))

    def resolve(self) -> None:
        """Resolve the current key and every decrypt key to its ARN (DescribeKey), once.

        Blocking: start-up runs it in a thread; a data-key call that finds it not yet done (the
        key service was down at start-up) runs it then. A key that does not exist, or cannot be
        described, is refused here with its name."""
        with self._resolve_lock:
            if self._allowed:
                return
            arns: dict[str, str] = {}
            for name in (self._key_id, *self._decrypt_key_ids):
                if _KEY_ARN.fullmatch(name):
                    arns[name] = name  # already the name KMS answers with
                    continue
                try:
                    meta = self._describe(name)
                except KeyAccessDenied:
                    log.error("KMS key %s cannot be described (missing, or the key policy refuses it)", name)
                    raise
                arn = meta.get("KeyMetadata", {}).get("Arn")
                if not isinstance(arn, str) or not arn:
                    raise KeyServiceInvalidResponse()
                arns[name] = arn
            self._arns = arns
            self._allowed = frozenset(arns.values())

    async def _resolved(self) -> frozenset[str]:
        if not self._allowed:
            await asyncio.to_thread(self.resolve)
        return self._allowed

    async def current_key_arn(self) -> str:
        await self._resolved()
        return self._arns[self._key_id]

    async def _allowed_arn(self, key_id: str) -> str:
        if key_id not in await self._resolved():
            # Once per request with a count: every record of a batch may name the same key.
            repeated_failure(
                log,
                logging.ERROR,
                "refused to use KMS key %s: not PIIVAULT_KMS_KEY_ID nor in PIIVAULT_KMS_DECRYPT_KEY_IDS",
                key_id,
            )
            raise KeyNotAllowed()
        return key_id

    # KeyProvider

    async def generate_data_key(self, context: EncryptionContext) -> DataKey:
        arn = await self.current_key_arn()
        params = {"KeyId": arn, "KeySpec": "AES_256", "EncryptionContext": dict(context)}
        return validated_data_key(
            "GenerateDataKey", await self._hot_call("GenerateDataKey", params), key_arn=arn
        )

    async def decrypt_data_key(self, wrapped: bytes, context: EncryptionContext, *, key_id: str) -> DataKey:
        # KeyId pins the master key: a wrapped key from another key is refused, not silently used.
        arn = await self._allowed_arn(key_id)
        params = {"CiphertextBlob": wrapped, "KeyId": arn, "EncryptionContext": dict(context)}
        response = await self._hot_call("Decrypt", params)
        return validated_data_key("Decrypt", response, key_arn=arn, wrapped=wrapped)

    async def reencrypt_data_key(
        self, wrapped: bytes, context: EncryptionContext, *, key_id: str, to_key_id: str
    ) -> DataKey:
        source = await self._allowed_arn(key_id)
        destination = await self._allowed_arn(to_key_id)
        params = {
            "CiphertextBlob": wrapped,
            "SourceKeyId": source,
            "SourceEncryptionContext": dict(context),
            "DestinationKeyId": destination,
            "DestinationEncryptionContext": dict(context),
        }
        response = await self._hot_call("ReEncrypt", params)
        return validated_data_key("ReEncrypt", response, key_arn=destination)

    def key_arn(self) -> str:
        """The current key's ARN (CreateGrant takes no alias)."""
        self.resolve()
        return self._arns[self._key_id]

    def allowed_arns(self) -> frozenset[str]:
        self.resolve()
        return self._allowed

    def allowed_arn_for(self, name: str) -> str:
        """`name` (an id, ARN or alias) as its ARN, if that key is on the allow-list; a name the
        settings do not spell is described (one DescribeKey) to find its ARN."""
        self.resolve()
        arn = name if name in self._allowed else self._arns.get(name)
        if arn is None and not _KEY_ARN.fullmatch(name):
            try:
                described = self._describe(name).get("KeyMetadata", {}).get("Arn")
            except KeyAccessDenied:
                described = None  # no such key, or not the vault's to use: not on the list either
            arn = described if isinstance(described, str) else None
        if arn is None or arn not in self._allowed:
            log.error(
                "refused to use KMS key %s: not PIIVAULT_KMS_KEY_ID nor in PIIVAULT_KMS_DECRYPT_KEY_IDS",
                name,
            )
            raise KeyNotAllowed()
        return arn

    def check(self) -> None:
        """The current key exists and is enabled, and the allow-list resolves; a key that is
        missing, disabled or refused is named in one log line."""
        try:
            meta = self._call("DescribeKey", lambda: self.client.describe_key(KeyId=self._key_id))
        except KeyAccessDenied:
            log.error(
                "KMS key %s cannot be used: it is missing, or the key policy refuses the vault", self._key_id
            )
            raise
        state = meta["KeyMetadata"].get("KeyState")
        if state != "Enabled":
            log.error("KMS key %s is %s, not Enabled: tokenize and detokenize will fail", self._key_id, state)
            raise KeyAccessDenied(f"the vault's KMS key is {state}, not Enabled")
        self.resolve()

    def disabled_decrypt_keys(self) -> list[str]:
        """The older, decrypt-only keys (PIIVAULT_KMS_DECRYPT_KEY_IDS) that KMS says are not
        Enabled: a warning, not a refusal (retiring a key disables it), but records still under
        such a key cannot be read until it is enabled again or they are rewrapped."""
        disabled = []
        for name in self._decrypt_key_ids:
            try:
                state = self._describe(name).get("KeyMetadata", {}).get("KeyState")
            except VaultError:
                continue  # resolve() has refused or will refuse it, by name
            if state != "Enabled":
                disabled.append(f"{name} ({state})")
        return disabled

    # GrantMirror
    def create_grant(
        self,
        *,
        name: str,
        operations: list[str],
        constraints: GrantConstraints,
        key_arn: str | None = None,
    ) -> KmsGrant | None:
        # Only operations that make a KMS call are mirrored (Lookup and Erase make none): nothing to mirror,
        # no grant.
        mirrored = sorted({_OPERATIONS[op] for op in operations if op in _OPERATIONS})
        if not mirrored:
            return None
        if not self._grantee_principal:
            raise KeyAccessDenied("grant mirroring needs PIIVAULT_KMS_GRANTEE_PRINCIPAL")
        kms_constraints: dict[str, Any] = {}
        if constraints.subset is not None:
            kms_constraints["EncryptionContextSubset"] = dict(constraints.subset)
        if constraints.equals is not None:
            kms_constraints["EncryptionContextEquals"] = dict(constraints.equals)
        # Another key than the current one: a rewrap's target, which rotation checked is allowed.
        key = key_arn or self.key_arn()
        arguments: dict[str, Any] = {
            "KeyId": key,
            "GranteePrincipal": self._grantee_principal,
            "Operations": mirrored,
            "Name": name,
        }
        if kms_constraints:
            arguments["Constraints"] = kms_constraints
        response = self._call("CreateGrant", lambda: self.client.create_grant(**arguments))
        return KmsGrant(key_arn=key, grant_id=response["GrantId"])

    def revoke_grant(self, kms_grant_id: str, key_arn: str | None = None) -> None:
        """Revoke a mirror on the key that holds it, or, its key not recorded (a mirror made
        before keys were), on whichever allowed key does: the current key, or an older one that
        was current when the grant was made. KMS answers NotFound on any other key; not found is
        gone already, the state we want."""
        if key_arn is not None:
            keys: tuple[str, ...] = (key_arn,)
        else:
            current = self.key_arn()
            keys = (current, *sorted(self.allowed_arns() - {current}))
        for key in keys:
            started = time.perf_counter()
            try:
                self._bounded(
                    "RevokeGrant", partial(self.client.revoke_grant, KeyId=key, GrantId=kms_grant_id)
                )
                observe_kms_call("RevokeGrant", "ok", time.perf_counter() - started)
                return
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") == "NotFoundException":
                    observe_kms_call("RevokeGrant", "not_found", time.perf_counter() - started)
                    continue
                failure = _translate("RevokeGrant", err)
            except BotoCoreError as err:
                failure = _translate("RevokeGrant", err)
            observe_kms_call("RevokeGrant", _outcome(failure), time.perf_counter() - started)
            raise failure from None
