"""A KMS stand-in for load tests: the KMS JSON 1.1 wire protocol as boto3 speaks it, doing real work.

    python bench/kms_standin.py --host 127.0.0.1 --port 4599 [--latency-ms 10]

Serves until SIGTERM/SIGINT. Ready once `GET /_stats` answers 200.

- POST / with `X-Amz-Target: TrentService.<Operation>` and a JSON body; answers
  `application/x-amz-json-1.1` with `x-amzn-RequestId`, errors as HTTP 400 `{"__type", "message"}`.
- Operations: GenerateDataKey, GenerateDataKeyWithoutPlaintext, Encrypt, Decrypt, DescribeKey,
  CreateGrant, RevokeGrant, RetireGrant, ListGrants, GenerateRandom, ReEncrypt.
- Two symmetric keys: `KEY_ID` / `KEY_ARN` / `alias/bench`, and `alias/bench-2` to rotate to (the
  rewrap bench). Wrapping is AES-256-GCM under the key's master key,
  96-bit random nonce, associated data = blob header + canonical encryption context, so a blob opened
  under any other context fails with InvalidCiphertextException, as with KMS.
- SigV4 signatures are not checked (the client still computes them: that cost is what we measure).
- `GET /_stats` → call counters and this process's CPU since the last `POST /_reset`.
- `--latency-ms N` adds N ms (asyncio.sleep, so other requests proceed) to every KMS call.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import importlib.util
import json
import os
import resource
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_ID = "11111111-2222-3333-4444-555555555555"
REGION = "us-east-1"
ACCOUNT = "111122223333"
KEY_ARN = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{KEY_ID}"
ALIAS = "alias/bench"
ALIAS_ARN = f"arn:aws:kms:{REGION}:{ACCOUNT}:{ALIAS}"
KEY_ID_2 = "66666666-7777-8888-9999-000000000000"
KEY_ARN_2 = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{KEY_ID_2}"
ALIAS_2 = "alias/bench-2"


def _names(key_id: str, arn: str, alias: str) -> set[str]:
    return {key_id, arn, alias, f"arn:aws:kms:{REGION}:{ACCOUNT}:{alias}"}


# Every name of a key -> its ARN.
_KEY_NAMES = {name: KEY_ARN for name in _names(KEY_ID, KEY_ARN, ALIAS)} | {
    name: KEY_ARN_2 for name in _names(KEY_ID_2, KEY_ARN_2, ALIAS_2)
}

# Fixed, not random: like a real KMS key it survives a restart, so a harness that restarts the
# stand-in (e.g. to change --latency-ms) can still open data keys wrapped by an earlier run.
_MASTER_KEY = hashlib.sha256(b"pii-vault bench KMS stand-in master key, not a secret").digest()
_AEADS = {
    KEY_ARN: AESGCM(_MASTER_KEY),
    KEY_ARN_2: AESGCM(hashlib.sha256(b"pii-vault bench KMS stand-in second key, not a secret").digest()),
}

# Blob = version byte + 16-byte key id + 12-byte nonce + ciphertext||tag.
_VERSION = b"\x01"
_HEADERS = {KEY_ARN: _VERSION + uuid.UUID(KEY_ID).bytes, KEY_ARN_2: _VERSION + uuid.UUID(KEY_ID_2).bytes}
_KEY_OF_HEADER = {header: arn for arn, header in _HEADERS.items()}
_HEADER_BYTES = 17
_NONCE_BYTES = 12
_TAG_BYTES = 16
_KEY_SPECS = {"AES_256": 32, "AES_128": 16}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class KmsError(Exception):
    """A KMS client error: becomes HTTP 400 `{"__type": code, "message": ...}`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- the cryptography -------------------------------------------------------------------------


def canonical_context(context: object) -> bytes:
    """Pairs sorted by key, each string length-prefixed: no two contexts share an encoding."""
    if context is None:
        return b""
    if not isinstance(context, dict):
        raise KmsError("ValidationException", "EncryptionContext must be a map of strings")
    out = bytearray()
    for key in sorted(context):
        value = context[key]
        if not isinstance(key, str) or not isinstance(value, str):
            raise KmsError("ValidationException", "EncryptionContext must be a map of strings")
        for part in (key.encode(), value.encode()):
            out += len(part).to_bytes(4, "big") + part
    return bytes(out)


def wrap(plaintext: bytes, context: object, key_arn: str = KEY_ARN) -> bytes:
    header = _HEADERS[key_arn]
    nonce = os.urandom(_NONCE_BYTES)
    return header + nonce + _AEADS[key_arn].encrypt(nonce, plaintext, header + canonical_context(context))


def unwrap(blob: bytes, context: object, *, pinned_arn: str | None) -> tuple[bytes, str]:
    """The plaintext and the ARN of the key that wrapped it."""
    aad = canonical_context(context)
    if len(blob) < _HEADER_BYTES + _NONCE_BYTES + _TAG_BYTES or blob[:1] != _VERSION:
        raise KmsError("InvalidCiphertextException", "The ciphertext is invalid.")
    header = blob[:_HEADER_BYTES]
    arn = _KEY_OF_HEADER.get(header)
    if arn is None or (pinned_arn is not None and arn != pinned_arn):
        # Well-formed, but made under a key this KMS does not hold (or not the one the caller named).
        if pinned_arn is not None:
            raise KmsError("IncorrectKeyException", "The key ID in the request does not identify the key.")
        raise KmsError("InvalidCiphertextException", "The ciphertext refers to an unknown key.")
    nonce = blob[_HEADER_BYTES : _HEADER_BYTES + _NONCE_BYTES]
    try:
        return _AEADS[arn].decrypt(nonce, blob[_HEADER_BYTES + _NONCE_BYTES :], header + aad), arn
    except InvalidTag:
        raise KmsError("InvalidCiphertextException", "The ciphertext is invalid.") from None


# --- request helpers --------------------------------------------------------------------------


def resolve_key(key_id: object) -> str:
    """KeyId may be the key id, its ARN, the alias or the alias ARN; returns the key ARN."""
    if not isinstance(key_id, str) or not key_id:
        raise KmsError("ValidationException", "KeyId is required")
    arn = _KEY_NAMES.get(key_id)
    if arn is None:
        raise KmsError("NotFoundException", f"Key '{key_id}' does not exist")
    return arn


def blob_param(body: dict[str, Any], name: str) -> bytes:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise KmsError("ValidationException", f"{name} is required")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise KmsError("SerializationException", f"{name} is not valid base64") from None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def check_algorithm(body: dict[str, Any]) -> None:
    algorithm = body.get("EncryptionAlgorithm", "SYMMETRIC_DEFAULT")
    if algorithm != "SYMMETRIC_DEFAULT":
        raise KmsError("InvalidKeyUsageException", f"{algorithm} is not supported by a symmetric key")


# --- operations -------------------------------------------------------------------------------


def _data_key_length(body: dict[str, Any]) -> int:
    spec, count = body.get("KeySpec"), body.get("NumberOfBytes")
    if (spec is None) == (count is None):
        raise KmsError("ValidationException", "Specify exactly one of KeySpec and NumberOfBytes")
    if spec is not None:
        if spec not in _KEY_SPECS:
            raise KmsError("ValidationException", f"KeySpec {spec!r} is not supported")
        return _KEY_SPECS[spec]
    if not isinstance(count, int) or not 1 <= count <= 1024:
        raise KmsError("ValidationException", "NumberOfBytes must be between 1 and 1024")
    return count


def generate_data_key(body: dict[str, Any]) -> dict[str, Any]:
    arn = resolve_key(body.get("KeyId"))
    data_key = os.urandom(_data_key_length(body))
    blob = wrap(data_key, body.get("EncryptionContext"), arn)
    return {"CiphertextBlob": b64(blob), "Plaintext": b64(data_key), "KeyId": arn}


def generate_data_key_without_plaintext(body: dict[str, Any]) -> dict[str, Any]:
    answer = generate_data_key(body)
    del answer["Plaintext"]
    return answer


def encrypt(body: dict[str, Any]) -> dict[str, Any]:
    arn = resolve_key(body.get("KeyId"))
    check_algorithm(body)
    plaintext = blob_param(body, "Plaintext")
    if len(plaintext) > 4096:
        raise KmsError("ValidationException", "Plaintext must be at most 4096 bytes")
    blob = wrap(plaintext, body.get("EncryptionContext"), arn)
    return {"CiphertextBlob": b64(blob), "KeyId": arn, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}


def decrypt(body: dict[str, Any]) -> dict[str, Any]:
    check_algorithm(body)
    blob = blob_param(body, "CiphertextBlob")
    # A caller may pin the key; KMS answers IncorrectKeyException if the blob is another key's.
    pinned = resolve_key(body["KeyId"]) if "KeyId" in body else None
    plaintext, arn = unwrap(blob, body.get("EncryptionContext"), pinned_arn=pinned)
    return {"Plaintext": b64(plaintext), "KeyId": arn, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}


def reencrypt(body: dict[str, Any]) -> dict[str, Any]:
    """Opens under the source key and context, seals under the destination's: no plaintext out."""
    blob = blob_param(body, "CiphertextBlob")
    pinned = resolve_key(body["SourceKeyId"]) if "SourceKeyId" in body else None
    destination = resolve_key(body.get("DestinationKeyId"))
    plaintext, source = unwrap(blob, body.get("SourceEncryptionContext"), pinned_arn=pinned)
    rewrapped = wrap(plaintext, body.get("DestinationEncryptionContext"), destination)
    return {
        "CiphertextBlob": b64(rewrapped),
        "SourceKeyId": source,
        "KeyId": destination,
        "SourceEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
        "DestinationEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
    }


def generate_random(body: dict[str, Any]) -> dict[str, Any]:
    count = body.get("NumberOfBytes")
    if not isinstance(count, int) or not 1 <= count <= 1024:
        raise KmsError("ValidationException", "NumberOfBytes must be between 1 and 1024")
    return {"Plaintext": b64(os.urandom(count))}


_CREATED = time.time()


def describe_key(body: dict[str, Any]) -> dict[str, Any]:
    arn = resolve_key(body.get("KeyId"))
    return {
        "KeyMetadata": {
            "AWSAccountId": ACCOUNT,
            "KeyId": arn.rsplit("/", 1)[-1],
            "Arn": arn,
            "CreationDate": _CREATED,
            "Enabled": True,
            "Description": "pii-vault bench stand-in key",
            "KeyUsage": "ENCRYPT_DECRYPT",
            "KeyState": "Enabled",
            "Origin": "AWS_KMS",
            "KeyManager": "CUSTOMER",
            "CustomerMasterKeySpec": "SYMMETRIC_DEFAULT",
            "KeySpec": "SYMMETRIC_DEFAULT",
            "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"],
            "MultiRegion": False,
        }
    }


# Grants are bookkeeping only (not enforced): the vault mirrors its grants here and revokes them.
_GRANTS: dict[str, dict[str, Any]] = {}


def create_grant(body: dict[str, Any]) -> dict[str, Any]:
    arn = resolve_key(body.get("KeyId"))
    grantee, operations = body.get("GranteePrincipal"), body.get("Operations")
    if not isinstance(grantee, str) or not grantee or not isinstance(operations, list) or not operations:
        raise KmsError("ValidationException", "GranteePrincipal and Operations are required")
    grant_id = hashlib.sha256(os.urandom(32)).hexdigest()
    grant: dict[str, Any] = {
        "KeyId": arn,
        "GrantId": grant_id,
        "Name": body.get("Name", ""),
        "CreationDate": time.time(),
        "GranteePrincipal": grantee,
        "IssuingAccount": f"arn:aws:iam::{ACCOUNT}:root",
        "Operations": operations,
    }
    if "RetiringPrincipal" in body:
        grant["RetiringPrincipal"] = body["RetiringPrincipal"]
    if "Constraints" in body:
        grant["Constraints"] = body["Constraints"]
    _GRANTS[grant_id] = grant
    return {"GrantId": grant_id, "GrantToken": b64(os.urandom(32))}


def revoke_grant(body: dict[str, Any]) -> dict[str, Any]:
    resolve_key(body.get("KeyId"))
    if _GRANTS.pop(str(body.get("GrantId")), None) is None:
        raise KmsError("NotFoundException", "Grant not found")
    return {}


def retire_grant(body: dict[str, Any]) -> dict[str, Any]:
    # Only the KeyId + GrantId form: grant tokens are opaque and not tracked.
    return revoke_grant(body)


def list_grants(body: dict[str, Any]) -> dict[str, Any]:
    arn = resolve_key(body.get("KeyId"))
    grants = [g for g in _GRANTS.values() if g["KeyId"] == arn]
    if "GrantId" in body:
        grants = [g for g in grants if g["GrantId"] == body["GrantId"]]
    if "GranteePrincipal" in body:
        grants = [g for g in grants if g["GranteePrincipal"] == body["GranteePrincipal"]]
    return {"Grants": grants, "Truncated": False}


OPERATIONS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "GenerateDataKey": generate_data_key,
    "GenerateDataKeyWithoutPlaintext": generate_data_key_without_plaintext,
    "Encrypt": encrypt,
    "Decrypt": decrypt,
    "DescribeKey": describe_key,
    "CreateGrant": create_grant,
    "RevokeGrant": revoke_grant,
    "RetireGrant": retire_grant,
    "ListGrants": list_grants,
    "GenerateRandom": generate_random,
    "ReEncrypt": reencrypt,
}


# --- counters ---------------------------------------------------------------------------------


def _cpu_seconds() -> float:
    # getrusage has microsecond resolution; os.times() only clock ticks (10 ms).
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.cpu_base = _cpu_seconds()
        self.wall_base = time.monotonic()

    def snapshot(self) -> dict[str, Any]:
        total = sum(self.calls.values())
        cpu = _cpu_seconds() - self.cpu_base
        return {
            "calls": dict(self.calls),
            "total_calls": total,
            "errors": dict(self.errors),
            "cpu_seconds": round(cpu, 6),
            "cpu_ms_per_call": round(cpu * 1000 / total, 6) if total else None,
            "wall_seconds": round(time.monotonic() - self.wall_base, 6),
            "pid": os.getpid(),
        }


# --- the ASGI app -----------------------------------------------------------------------------

_TARGET_PREFIX = "TrentService."
_KMS_CONTENT_TYPE = b"application/x-amz-json-1.1"


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(send: Send, status: int, payload: object, content_type: bytes, request_id: str) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"x-amzn-requestid", request_id.encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class KmsStandIn:
    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.stats = Stats()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        body = await _read_body(receive)
        request_id = str(uuid.uuid4())
        if path == "/_stats" and method == "GET":
            await _respond(send, 200, self.stats.snapshot(), b"application/json", request_id)
        elif path == "/_reset" and method == "POST":
            self.stats.reset()
            await _respond(send, 200, self.stats.snapshot(), b"application/json", request_id)
        elif path == "/" and method == "POST":
            status, payload = await self._kms(scope, body)
            await _respond(send, status, payload, _KMS_CONTENT_TYPE, request_id)
        else:
            await _respond(send, 404, {"message": "not found"}, b"application/json", request_id)

    async def _kms(self, scope: Scope, raw: bytes) -> tuple[int, dict[str, Any]]:
        target = next((v.decode() for k, v in scope["headers"] if k == b"x-amz-target"), "")
        operation = target.removeprefix(_TARGET_PREFIX)
        self.stats.calls[operation] += 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        try:
            handler = OPERATIONS.get(operation) if target.startswith(_TARGET_PREFIX) else None
            if handler is None:
                raise KmsError("UnknownOperationException", f"Unknown operation {target!r}")
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                raise KmsError("SerializationException", "The request body is not JSON") from None
            if not isinstance(body, dict):
                raise KmsError("SerializationException", "The request body is not a JSON object")
            return 200, handler(body)
        except KmsError as err:
            self.stats.errors[err.code] += 1
            return 400, {"__type": err.code, "message": err.message}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every KMS call")
    args = parser.parse_args()

    def available(module: str) -> bool:
        return importlib.util.find_spec(module) is not None

    uvicorn.run(
        KmsStandIn(latency_s=args.latency_ms / 1000),
        host=args.host,
        port=args.port,
        loop="uvloop" if available("uvloop") else "asyncio",
        http="httptools" if available("httptools") else "h11",
        interface="asgi3",
        lifespan="off",
        ws="none",
        workers=1,
        access_log=False,
        log_level="warning",
        # Longer than any pause in a bench run, so clients' pooled connections are not closed
        # under them between phases.
        timeout_keep_alive=300,
        timeout_graceful_shutdown=2,
    )


if __name__ == "__main__":
    main()
