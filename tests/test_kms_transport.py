"""The KMS transports, one suite for both: every test runs with the lean transport (GenerateDataKey /
Decrypt without boto3's per-call machinery) and with boto3's, against moto.

In-process tests use moto's `mock_aws`, which answers the lean path's `before-send` event exactly
as it answers boto3's; the transport tests run moto's real server (plain HTTP and TLS) in a thread,
so the bytes cross a socket. Faults KMS can produce but moto does not (throttling, a disabled key
refusing crypto) are injected as KMS's own JSON error answers on `before-send`, as in
test_failures.py.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import re
import socket
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import boto3
import botocore
import botocore.endpoint
import botocore.session
import pytest
from botocore import UNSIGNED
from botocore.awsrequest import AWSPreparedRequest, AWSResponse
from botocore.compat import HTTPHeaders
from botocore.config import Config
from botocore.credentials import RefreshableCredentials
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from pydantic import ValidationError
from werkzeug.serving import BaseWSGIServer, make_server

from app.container import build_key_provider
from app.crypto.keys import DataKey
from app.crypto.kms import KmsKeyProvider
from app.crypto.kms_transport import (
    BOTOCORE_TESTED_BELOW,
    BOTOCORE_TESTED_FROM,
    Boto3Transport,
    TransportKind,
    botocore_is_tested,
)
from app.crypto.kms_wire import LeanTransport
from app.errors import IntegrityFailure, KeyAccessDenied, KeyServiceUnavailable
from tests.conftest import LoopThread, make_settings

if TYPE_CHECKING:
    from mypy_boto3_kms.client import KMSClient

CONTEXT = {"customerID": "12345", "dataType": "DriverLicense"}
OTHER_CONTEXT = {"customerID": "67890", "dataType": "DriverLicense"}
HOT_OPERATIONS = ("GenerateDataKey", "Decrypt")
MAX_ATTEMPTS = 3
ACCESS_KEY_ID = "AKIALEANPATHTEST0001"
SECRET_ACCESS_KEY = "lean-path-test-secret-key"
SESSION_TOKEN = "lean-path-test-session-token"
# A key named by its ARN needs no DescribeKey: calls to an endpoint that never answers reach the
# transport itself.
UNREACHABLE_KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/0000aaaa-0000-4000-8000-000000000000"


# Helpers


class _Body:
    """Just enough of a urllib3 response for AWSResponse to read an injected body."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.payload


def kms_answer(status: int, document: dict[str, Any]) -> AWSResponse:
    """An answer in KMS's JSON 1.1 shape (errors are `{"__type", "message"}`)."""
    headers = HTTPHeaders()
    headers["content-type"] = "application/x-amz-json-1.1"
    headers["x-amzn-requestid"] = "injected-request-id"
    payload = json.dumps(document).encode()
    return AWSResponse("https://kms.us-east-1.amazonaws.com/", status, headers, _Body(payload))


def kms_error(code: str, message: str = "injected") -> AWSResponse:
    return kms_answer(400, {"__type": code, "message": message})


def events(provider: KmsKeyProvider) -> Any:
    """The provider's client's event hooks (handlers may answer, which the stubs do not allow for)."""
    return provider.client.meta.events


def header(request: AWSPreparedRequest, name: str) -> str:
    """A request header as text (boto3's prepared requests hold some as bytes)."""
    value = request.headers[name]
    return value.decode() if isinstance(value, bytes) else str(value)


def body_of(request: AWSPreparedRequest) -> bytes:
    assert isinstance(request.body, bytes)
    return request.body


def sent_requests(provider: KmsKeyProvider, operation: str) -> list[AWSPreparedRequest]:
    """Every request `operation` puts on the wire from now on (moto or the network still answers)."""
    sent: list[AWSPreparedRequest] = []

    def capture(request: AWSPreparedRequest, **_: Any) -> None:
        sent.append(request)

    events(provider).register(f"before-send.kms.{operation}", capture)
    return sent


def answer_always(provider: KmsKeyProvider, operation: str, answer: Callable[[], AWSResponse]) -> list[int]:
    """Make every `operation` request get `answer()`; returns a list with one entry per request."""
    calls: list[int] = []

    def handler(**_: Any) -> AWSResponse:
        calls.append(1)
        return answer()

    events(provider).register(f"before-send.kms.{operation}", handler)
    return calls


def boto3_path_calls(provider: KmsKeyProvider) -> list[str]:
    """Operations that went through boto3's own call path (it alone builds parameters)."""
    calls: list[str] = []

    def record(model: Any, **_: Any) -> None:
        calls.append(model.name)

    events(provider).register("before-parameter-build.kms", record)
    return calls


def by_boto3_if(kind: str, *operations: str) -> list[str]:
    """What boto3_path_calls records: nothing on the lean path, each operation on boto3's."""
    return [] if kind == "lean" else list(operations)


def run_hot_operation(provider: KmsKeyProvider, operation: str, wrapped: bytes) -> DataKey:
    if operation == "GenerateDataKey":
        return generate(provider, CONTEXT)
    return decrypt(provider, wrapped, CONTEXT)


def exception_chain_text(err: BaseException) -> str:
    """str, repr and args of an exception and of everything chained to it."""
    texts: list[str] = []
    seen: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and not any(current is s for s in seen):
        seen.append(current)
        texts += [str(current), repr(current), repr(current.args), repr(vars(current))]
        current = current.__cause__ or current.__context__
    return "\n".join(texts)


def forms_of(key: bytes) -> list[str]:
    return [repr(key), base64.b64encode(key).decode(), key.hex(), key.decode("latin-1")]


def expected_sigv4_signature(request: AWSPreparedRequest, secret_key: str, region: str) -> str:
    """SigV4 worked out here from the request as sent, independently of botocore."""
    headers = {name.lower(): " ".join(header(request, name).split()) for name in request.headers}
    headers.setdefault("host", urlsplit(request.url).netloc)  # signed from the URL when not sent
    match = re.search(r"SignedHeaders=([^,]+)", headers["authorization"])
    assert match, headers["authorization"]
    signed = match.group(1).split(";")
    amz_date = headers["x-amz-date"]
    body = request.body if isinstance(request.body, bytes) else str(request.body).encode()
    canonical_request = "\n".join(
        [
            request.method,
            urlsplit(request.url).path or "/",
            "",
            "".join(f"{name}:{headers[name]}\n" for name in signed),
            ";".join(signed),
            hashlib.sha256(body).hexdigest(),
        ]
    )
    scope = f"{amz_date[:8]}/{region}/kms/aws4_request"
    string_to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = f"AWS4{secret_key}".encode()
    for part in (amz_date[:8], region, "kms", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


_loop: list[LoopThread] = []


def generate(provider: KmsKeyProvider, context: dict[str, str]) -> DataKey:
    """The provider's awaited GenerateDataKey, as the data path makes it, on the test's one loop."""
    return _loop[0].run(provider.generate_data_key(context))


def decrypt(provider: KmsKeyProvider, wrapped: bytes, context: dict[str, str]) -> DataKey:
    """The provider's awaited Decrypt under its current key (the key these tests' records name)."""
    return _loop[0].run(provider.decrypt_data_key(wrapped, context, key_id=provider.key_arn()))


@pytest.fixture(autouse=True, params=["lean", "boto3"])
def kind(request: pytest.FixtureRequest, loop_thread: LoopThread) -> Iterator[str]:
    """Every test runs once per transport, its calls awaited on one event loop."""
    _loop[:] = [loop_thread]
    yield str(request.param)
    _loop.clear()


def transport_kind(kind: str) -> TransportKind:
    assert kind in ("lean", "boto3")
    return "lean" if kind == "lean" else "boto3"


def assert_transport(provider: KmsKeyProvider, kind: str) -> None:
    """The provider carries its calls by the transport the test asked for."""
    expected = LeanTransport if kind == "lean" else Boto3Transport
    assert type(provider.transport) is expected, provider.transport


class _RecordingTime:
    """botocore.endpoint's `time`, but its pause between attempts is recorded, not waited."""

    def __init__(self, recorded: list[float]) -> None:
        self.sleep = recorded.append

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The pauses between attempts, recorded instead of waited, on either transport."""
    recorded: list[float] = []

    async def record(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr("app.crypto.kms_wire._sleep", record)
    monkeypatch.setattr(botocore.endpoint, "time", _RecordingTime(recorded))
    return recorded


@pytest.fixture
def provider(kms_key_id: str, kind: str) -> Iterator[KmsKeyProvider]:
    keys = KmsKeyProvider(kms_key_id, max_attempts=MAX_ATTEMPTS, transport=transport_kind(kind))
    assert_transport(keys, kind)
    keys.resolve()  # its DescribeKey now, before a test counts or answers the calls
    yield keys
    keys.close()


# Through the lean path, in process


def test_round_trip_goes_through_the_transport_and_interoperates_with_boto3(
    provider: KmsKeyProvider, kms_key_id: str, kind: str
) -> None:
    by_boto3 = boto3_path_calls(provider)
    generated = sent_requests(provider, "GenerateDataKey")
    decrypted = sent_requests(provider, "Decrypt")

    made = generate(provider, CONTEXT)
    opened = decrypt(provider, made.wrapped, CONTEXT)

    assert len(made.plaintext) == 32
    assert opened.plaintext == made.plaintext
    assert made.key_id == opened.key_id
    assert made.key_id.startswith("arn:aws:kms:us-east-1:") and made.key_id.endswith(kms_key_id)
    assert made.request_id and opened.request_id
    assert by_boto3 == by_boto3_if(kind, "GenerateDataKey", "Decrypt")  # lean: neither took boto3's path
    assert len(generated) == len(decrypted) == 1  # each sent exactly one request
    assert header(generated[0], "X-Amz-Target") == "TrentService.GenerateDataKey"
    assert header(decrypted[0], "X-Amz-Target") == "TrentService.Decrypt"
    assert header(generated[0], "Content-Type") == "application/x-amz-json-1.1"
    # The key is named by its ARN, resolved once: the form KMS names it in its answers.
    assert json.loads(body_of(generated[0])) == {
        "KeyId": made.key_id,
        "KeySpec": "AES_256",
        "EncryptionContext": CONTEXT,
    }
    assert json.loads(body_of(decrypted[0])) == {
        "CiphertextBlob": base64.b64encode(made.wrapped).decode(),
        "KeyId": made.key_id,
        "EncryptionContext": CONTEXT,
    }

    # What the lean path wraps, KMS opens for anyone else, and the other way round.
    kms = boto3.client("kms")
    assert kms.decrypt(CiphertextBlob=made.wrapped, EncryptionContext=CONTEXT)["Plaintext"] == made.plaintext
    theirs = kms.generate_data_key(KeyId=kms_key_id, KeySpec="AES_256", EncryptionContext=CONTEXT)
    assert decrypt(provider, theirs["CiphertextBlob"], CONTEXT).plaintext == theirs["Plaintext"]


def test_a_client_the_lean_path_cannot_sign_for_keeps_boto3s_path(
    aws: None, kms_key_id: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.crypto.kms_transport")
    session = botocore.session.get_session()
    unsigned = session.create_client(
        "kms", region_name="us-east-1", config=Config(signature_version=UNSIGNED)
    )
    provider = KmsKeyProvider(
        kms_key_id, client=cast("KMSClient", unsigned), session=session, transport=transport_kind(kind)
    )
    assert type(provider.transport) is Boto3Transport
    chosen = [r.getMessage() for r in caplog.records if r.name == "app.crypto.kms_transport"]
    declined = ["kms transport: boto3 (the client does not sign with SigV4)"]
    assert chosen == (declined if kind == "lean" else [])
    provider.resolve()
    by_boto3 = boto3_path_calls(provider)

    made = generate(provider, CONTEXT)
    assert decrypt(provider, made.wrapped, CONTEXT).plaintext == made.plaintext
    with pytest.raises(IntegrityFailure):
        decrypt(provider, made.wrapped, OTHER_CONTEXT)
    assert by_boto3 == ["GenerateDataKey", "Decrypt", "Decrypt"]


def test_decrypt_under_another_context_is_an_integrity_failure(provider: KmsKeyProvider) -> None:
    made = generate(provider, CONTEXT)
    for wrong in (OTHER_CONTEXT, {"customerID": "12345"}, {}, {**CONTEXT, "extra": "x"}):
        with pytest.raises(IntegrityFailure):
            decrypt(provider, made.wrapped, wrong)
    assert decrypt(provider, made.wrapped, CONTEXT).plaintext == made.plaintext


@pytest.mark.parametrize("tamper", ["swapped", "garbled", "flipped_bit", "truncated"])
def test_a_swapped_or_garbled_wrapped_key_is_an_integrity_failure(
    provider: KmsKeyProvider, tamper: str
) -> None:
    mine = generate(provider, CONTEXT)
    theirs = generate(provider, OTHER_CONTEXT)
    wrapped = {
        "swapped": theirs.wrapped,  # another record's wrapped key, under this record's context
        "garbled": mine.wrapped[:-8] + bytes(8),
        "flipped_bit": mine.wrapped[:40] + bytes([mine.wrapped[40] ^ 1]) + mine.wrapped[41:],
        "truncated": mine.wrapped[:20],
    }[tamper]
    calls = sent_requests(provider, "Decrypt")

    with pytest.raises(IntegrityFailure):
        decrypt(provider, wrapped, CONTEXT)
    assert len(calls) == 1  # a refusal is final: never retried


@pytest.mark.fresh_kms_key  # disabled for a while: no other test may see it so
def test_a_disabled_key_is_key_access_denied_until_enabled_again(
    provider: KmsKeyProvider, kms_key_id: str
) -> None:
    """moto keeps the key's state (DisableKey) but does not refuse crypto with a disabled key as KMS
    does, so KMS's refusal (DisabledException) is answered whenever moto reports the key disabled."""
    kms = boto3.client("kms")
    made = generate(provider, CONTEXT)

    def refuse_while_disabled(**_: Any) -> AWSResponse | None:
        if kms.describe_key(KeyId=kms_key_id)["KeyMetadata"]["KeyState"] == "Disabled":
            return kms_error("DisabledException", f"{kms_key_id} is disabled.")
        return None

    for operation in HOT_OPERATIONS:
        events(provider).register(f"before-send.kms.{operation}", refuse_while_disabled)
    calls = sent_requests(provider, "GenerateDataKey")

    kms.disable_key(KeyId=kms_key_id)
    with pytest.raises(KeyAccessDenied):
        generate(provider, CONTEXT)
    with pytest.raises(KeyAccessDenied):
        decrypt(provider, made.wrapped, CONTEXT)
    assert len(calls) == 1  # an operator must act: not retried

    kms.enable_key(KeyId=kms_key_id)
    assert decrypt(provider, made.wrapped, CONTEXT).plaintext == made.plaintext
    generate(provider, CONTEXT)


@pytest.mark.parametrize("operation", HOT_OPERATIONS)
def test_throttling_is_retried_with_backoff_then_unavailable_after_exactly_max_attempts(
    provider: KmsKeyProvider, pauses: list[float], operation: str, caplog: pytest.LogCaptureFixture
) -> None:
    wrapped = generate(provider, CONTEXT).wrapped
    caplog.set_level(logging.DEBUG)
    calls = answer_always(provider, operation, lambda: kms_error("ThrottlingException", "Rate exceeded"))

    with pytest.raises(KeyServiceUnavailable):
        run_hot_operation(provider, operation, wrapped)

    assert len(calls) == MAX_ATTEMPTS
    # botocore's standard policy: full jitter under a ceiling that doubles from 1 s for throttling.
    assert len(pauses) == MAX_ATTEMPTS - 1
    assert all(0 <= pause <= 2**attempt for attempt, pause in enumerate(pauses))
    # Only the error code and status are logged.
    ours = [r.getMessage() for r in caplog.records if r.name == "app.crypto.kms"]
    assert ours == [f"kms {operation} failed: ThrottlingException (HTTP 400)"]


def test_a_throttled_attempt_then_an_answer_succeeds(provider: KmsKeyProvider, pauses: list[float]) -> None:
    throttled: list[int] = []

    def throttle_once(**_: Any) -> AWSResponse | None:
        if throttled:
            return None
        throttled.append(1)
        return kms_error("ThrottlingException", "Rate exceeded")

    events(provider).register("before-send.kms.GenerateDataKey", throttle_once)
    calls = sent_requests(provider, "GenerateDataKey")

    made = generate(provider, CONTEXT)

    assert throttled == [1] and len(calls) == 2 and len(pauses) == 1
    assert decrypt(provider, made.wrapped, CONTEXT).plaintext == made.plaintext


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors_are_retried_then_unavailable(
    provider: KmsKeyProvider, pauses: list[float], status: int
) -> None:
    calls = answer_always(
        provider, "GenerateDataKey", lambda: kms_answer(status, {"__type": "KMSInternalException"})
    )
    with pytest.raises(KeyServiceUnavailable):
        generate(provider, CONTEXT)
    assert len(calls) == MAX_ATTEMPTS


def test_requests_are_sigv4_signed_with_the_sessions_credentials(aws: None, kind: str) -> None:
    session = botocore.session.get_session()
    session.set_credentials(ACCESS_KEY_ID, SECRET_ACCESS_KEY, SESSION_TOKEN)
    key_id = boto3.client("kms").create_key()["KeyMetadata"]["Arn"]
    provider = KmsKeyProvider(key_id, region="us-east-1", session=session, transport=transport_kind(kind))
    assert_transport(provider, kind)
    requests = sent_requests(provider, "GenerateDataKey")
    decrypts = sent_requests(provider, "Decrypt")

    made = generate(provider, CONTEXT)
    decrypt(provider, made.wrapped, CONTEXT)

    for request in (*requests, *decrypts):
        authorization = header(request, "Authorization")
        amz_date = header(request, "X-Amz-Date")
        assert authorization.startswith("AWS4-HMAC-SHA256 ")
        assert f"Credential={ACCESS_KEY_ID}/{amz_date[:8]}/us-east-1/kms/aws4_request" in authorization
        assert re.fullmatch(r"\d{8}T\d{6}Z", amz_date)
        assert header(request, "X-Amz-Security-Token") == SESSION_TOKEN
        signed = re.search(r"SignedHeaders=([^,]+)", authorization)
        assert signed
        # The operation, the host and the date are covered by the signature.
        covered = set(signed.group(1).split(";"))
        assert {"host", "x-amz-date", "x-amz-target", "x-amz-security-token"} <= covered
        signature = authorization.rsplit("Signature=", 1)[1]
        assert signature == expected_sigv4_signature(request, SECRET_ACCESS_KEY, "us-east-1")
    provider.close()


def test_refreshable_credentials_are_read_again_for_each_request(
    aws: None, kind: str, loop_thread: LoopThread
) -> None:
    issued: list[str] = []
    refreshed_on: list[threading.Thread] = []

    def refresh() -> dict[str, str]:
        refreshed_on.append(threading.current_thread())
        issued.append(f"AKIAREFRESHED{len(issued):07d}")
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)  # due again at once
        return {"access_key": issued[-1], "secret_key": "s", "token": "t", "expiry_time": expiry.isoformat()}

    session = botocore.session.get_session()
    cast(Any, session)._credentials = RefreshableCredentials.create_from_metadata(refresh(), refresh, "test")
    key_id = boto3.client("kms").create_key()["KeyMetadata"]["Arn"]
    provider = KmsKeyProvider(key_id, region="us-east-1", session=session, transport=transport_kind(kind))
    assert_transport(provider, kind)
    requests = sent_requests(provider, "GenerateDataKey")

    generate(provider, CONTEXT)
    generate(provider, CONTEXT)

    named = [header(r, "Authorization").split("Credential=")[1].split("/")[0] for r in requests]
    assert len(set(named)) == 2, named
    assert set(named) <= set(issued)
    # A refresh is a blocking call (STS, instance metadata): never made on the event loop.
    assert len(refreshed_on) >= 3
    assert loop_thread.thread not in refreshed_on
    provider.close()


def test_no_credentials_is_key_access_denied_and_nothing_is_sent(
    aws: None, kms_key_id: str, kind: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # A session of its own: a session caches the credentials it found.
    session = botocore.session.get_session()
    provider = KmsKeyProvider(kms_key_id, region="us-east-1", session=session, transport=transport_kind(kind))
    assert_transport(provider, kind)
    calls = sent_requests(provider, "GenerateDataKey")

    with pytest.raises(KeyAccessDenied):
        generate(provider, CONTEXT)
    assert calls == []


def test_data_keys_reach_no_log_record_and_no_exception(
    provider: KmsKeyProvider, pauses: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    """Every logger at DEBUG; successes, refusals, throttling and a garbled answer carrying a key."""
    caplog.set_level(logging.DEBUG)
    keys: list[bytes] = []
    raised: list[BaseException] = []

    def capture(parsed: dict[str, Any] | None = None, **_: Any) -> None:
        if parsed and "Plaintext" in parsed:
            keys.append(parsed["Plaintext"])

    events(provider).register("after-call.kms", capture)
    made = generate(provider, CONTEXT)
    decrypt(provider, made.wrapped, CONTEXT)
    with pytest.raises(IntegrityFailure) as wrong_context:
        decrypt(provider, made.wrapped, OTHER_CONTEXT)
    raised.append(wrong_context.value)

    # A 200 answer that carries a data key but is not a valid answer (CiphertextBlob is no blob).
    carried = bytes(range(100, 132))
    keys.append(carried)
    garbled = {"Plaintext": base64.b64encode(carried).decode(), "CiphertextBlob": 42, "KeyId": "k"}
    answer_always(provider, "GenerateDataKey", lambda: kms_answer(200, garbled))
    with pytest.raises(KeyServiceUnavailable) as unreadable:
        generate(provider, CONTEXT)
    raised.append(unreadable.value)

    answer_always(provider, "Decrypt", lambda: kms_error("ThrottlingException", "Rate exceeded"))
    with pytest.raises(KeyServiceUnavailable) as throttled:
        decrypt(provider, made.wrapped, CONTEXT)
    raised.append(throttled.value)

    assert len(keys) == 3 and made.plaintext in keys
    texts = [exception_chain_text(err) for err in raised] + [repr(made), str(made), repr(provider)]
    for key in keys:
        for form in forms_of(key):
            assert form not in caplog.text
            for record in caplog.records:
                assert form not in record.getMessage()
                assert form not in repr(record.args)
            for text in texts:
                assert form not in text


# Over a socket: moto's real server in a thread, in plain HTTP and in TLS


def serve_moto(ssl_files: tuple[str, str] | None = None) -> tuple[BaseWSGIServer, threading.Thread]:
    server = make_server(
        "127.0.0.1",
        0,
        DomainDispatcherApplication(create_backend_app),
        threaded=True,
        request_handler=MotoRequestHandler,
        ssl_context=ssl_files,
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def stop(server: BaseWSGIServer, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture
def moto_http() -> Iterator[str]:
    server, thread = serve_moto()
    yield f"http://127.0.0.1:{server.server_port}"
    stop(server, thread)


def self_signed_certificate(
    directory: Path, *, dns_names: list[str], ip_addresses: list[str]
) -> tuple[str, str]:
    """A self-signed certificate and its key, as PEM files; the certificate is its own CA bundle."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pii-vault test KMS")])
    now = datetime.datetime.now(datetime.UTC)
    alternative_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    alternative_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "kms-cert.pem", directory / "kms-key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_file), str(key_file)


def http_kms_client(endpoint_url: str, **overrides: Any) -> KMSClient:
    config = Config(
        connect_timeout=overrides.pop("connect_timeout", 2),
        read_timeout=overrides.pop("read_timeout", 5),
        retries={"total_max_attempts": overrides.pop("max_attempts", MAX_ATTEMPTS), "mode": "standard"},
    )
    return boto3.client("kms", endpoint_url=endpoint_url, region_name="us-east-1", config=config, **overrides)


def test_round_trips_over_http_to_moto_server(moto_http: str, kind: str) -> None:
    key_id = http_kms_client(moto_http).create_key()["KeyMetadata"]["Arn"]
    provider = KmsKeyProvider(
        key_id, endpoint_url=moto_http, max_attempts=MAX_ATTEMPTS, transport=transport_kind(kind)
    )
    assert_transport(provider, kind)
    by_boto3 = boto3_path_calls(provider)
    sent = sent_requests(provider, "GenerateDataKey")

    for n in range(5):
        context = {"customerID": f"c-{n}", "dataType": "DriverLicense"}
        made = generate(provider, context)
        assert decrypt(provider, made.wrapped, context).plaintext == made.plaintext
        with pytest.raises(IntegrityFailure):
            decrypt(provider, made.wrapped, OTHER_CONTEXT)

    assert len(sent) == 5
    assert by_boto3 == by_boto3_if(kind, *["GenerateDataKey", "Decrypt", "Decrypt"] * 5)
    assert sent[0].url == f"{moto_http}/"
    provider.close()


def test_a_refused_connection_is_unavailable_after_exactly_max_attempts(
    pauses: list[float], kind: str
) -> None:
    with socket.socket() as placeholder:  # a port nothing listens on
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    provider = KmsKeyProvider(
        UNREACHABLE_KEY_ARN,
        endpoint_url=f"http://127.0.0.1:{port}",
        max_attempts=MAX_ATTEMPTS,
        transport=transport_kind(kind),
    )
    assert_transport(provider, kind)
    sent = sent_requests(provider, "GenerateDataKey")

    with pytest.raises(KeyServiceUnavailable):
        generate(provider, CONTEXT)
    assert len(sent) == MAX_ATTEMPTS and len(pauses) == MAX_ATTEMPTS - 1
    assert all(0 <= pause <= 1 for pause in pauses)  # transient errors back off from 50 ms


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """Accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    held: list[socket.socket] = []
    stopping = threading.Event()

    def accept() -> None:
        while not stopping.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stopping.set()
    thread.join(timeout=5)
    listener.close()
    for connection in held:
        connection.close()


def test_an_endpoint_that_never_answers_times_out_and_is_unavailable(
    silent_endpoint: str, pauses: list[float], kind: str
) -> None:
    provider = KmsKeyProvider(
        UNREACHABLE_KEY_ARN,
        endpoint_url=silent_endpoint,
        read_timeout_s=0.3,
        connect_timeout_s=0.3,
        max_attempts=2,
        transport=transport_kind(kind),
    )
    assert_transport(provider, kind)
    sent = sent_requests(provider, "Decrypt")

    started = time.monotonic()
    with pytest.raises(KeyServiceUnavailable):
        decrypt(provider, b"\x01" * 64, CONTEXT)
    elapsed = time.monotonic() - started

    assert len(sent) == 2  # a read timeout is transient: retried, within max_attempts
    assert 0.6 <= elapsed < 3, elapsed  # each attempt waited for the read timeout, no longer
    provider.close()


def test_tls_is_verified_against_the_configured_ca_bundle_and_host_name(
    tmp_path: Path, pauses: list[float], kind: str
) -> None:
    cert_file, key_file = self_signed_certificate(
        tmp_path, dns_names=["localhost"], ip_addresses=["127.0.0.1"]
    )
    server, thread = serve_moto((cert_file, key_file))
    endpoint = f"https://127.0.0.1:{server.server_port}"
    try:
        key_id = http_kms_client(endpoint, verify=cert_file).create_key()["KeyMetadata"]["Arn"]
        # PIIVAULT_KMS_CA_BUNDLE reaches the transport the container builds.
        settings = make_settings(
            "postgresql://unused/none",
            key_id,
            kms_endpoint_url=endpoint,
            kms_ca_bundle=cert_file,
            kms_transport=kind,
        )
        provider, _ = build_key_provider(settings)
        assert isinstance(provider, KmsKeyProvider)
        assert_transport(provider, kind)
        by_boto3 = boto3_path_calls(provider)
        made = generate(provider, CONTEXT)
        assert decrypt(provider, made.wrapped, CONTEXT).plaintext == made.plaintext
        assert by_boto3 == by_boto3_if(kind, "GenerateDataKey", "Decrypt")
        provider.close()

        # The default CA bundle does not know this certificate: refused.
        untrusting = KmsKeyProvider(
            key_id, endpoint_url=endpoint, max_attempts=1, transport=transport_kind(kind)
        )
        assert_transport(untrusting, kind)
        with pytest.raises(KeyServiceUnavailable):
            generate(untrusting, CONTEXT)
        untrusting.close()
    finally:
        stop(server, thread)

    # A trusted certificate for another host name is refused too.
    other_cert, other_key = self_signed_certificate(tmp_path, dns_names=["kms.example.test"], ip_addresses=[])
    server, thread = serve_moto((other_cert, other_key))
    try:
        endpoint = f"https://127.0.0.1:{server.server_port}"
        wrong_host = KmsKeyProvider(
            key_id, endpoint_url=endpoint, verify=other_cert, max_attempts=1, transport=transport_kind(kind)
        )
        assert_transport(wrong_host, kind)
        with pytest.raises(KeyServiceUnavailable):
            generate(wrong_host, CONTEXT)
        wrong_host.close()
    finally:
        stop(server, thread)


class ForwardingProxy:
    """A plain-HTTP forward proxy: relays each absolute-URI request to its origin and counts them."""

    def __init__(self) -> None:
        relayed = self.relayed = []  # type: list[str]

        class Relay(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                relayed.append(self.path)
                target = urlsplit(self.path)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection", "host")
                }
                upstream = http.client.HTTPConnection(target.hostname or "", target.port, timeout=10)
                try:
                    upstream.request("POST", target.path or "/", body=body, headers=headers)
                    answer = upstream.getresponse()
                    payload = answer.read()
                finally:
                    upstream.close()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Relay)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def test_behind_a_proxy_every_call_goes_by_boto3_through_the_proxy(
    moto_http: str, kind: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The old fallback sent the lean path's unprepared request through botocore's session, and
    urllib3 raised; now a client a proxy applies to is served by boto3 from end to end."""
    key_id = http_kms_client(moto_http).create_key()["KeyMetadata"]["Arn"]
    proxy = ForwardingProxy()
    try:
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        caplog.set_level(logging.INFO, logger="app.crypto.kms_transport")
        provider = KmsKeyProvider(key_id, endpoint_url=moto_http, transport=transport_kind(kind))
        assert type(provider.transport) is Boto3Transport
        chosen = [r.getMessage() for r in caplog.records if r.name == "app.crypto.kms_transport"]
        assert chosen == (
            ["kms transport: boto3 (a proxy applies to the endpoint)"] if kind == "lean" else []
        )

        made = generate(provider, CONTEXT)
        assert decrypt(provider, made.wrapped, CONTEXT).plaintext == made.plaintext
        with pytest.raises(IntegrityFailure):
            decrypt(provider, made.wrapped, OTHER_CONTEXT)
        assert proxy.relayed == [f"{moto_http}/"] * 3  # each call crossed the proxy
        provider.close()
    finally:
        proxy.stop()


def test_other_operations_go_by_boto3_on_either_transport(
    provider: KmsKeyProvider, kms_key_id: str, loop_thread: LoopThread
) -> None:
    made = generate(provider, CONTEXT)
    by_boto3 = boto3_path_calls(provider)
    params = {
        "CiphertextBlob": made.wrapped,
        "SourceEncryptionContext": CONTEXT,
        "DestinationKeyId": kms_key_id,
        "DestinationEncryptionContext": OTHER_CONTEXT,
    }
    answer = loop_thread.run(provider.transport.call("ReEncrypt", params))
    assert by_boto3 == ["ReEncrypt"]
    assert answer["ResponseMetadata"]["RequestId"]
    assert decrypt(provider, answer["CiphertextBlob"], OTHER_CONTEXT).plaintext == made.plaintext


def test_the_installed_botocore_is_in_the_range_pinned_and_tested() -> None:
    assert botocore_is_tested()
    tested = ">={}.{},<{}.{}".format(*BOTOCORE_TESTED_FROM, *BOTOCORE_TESTED_BELOW)
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert f"botocore{tested}" in project["project"]["dependencies"]
    assert f"boto3{tested}" in project["project"]["dependencies"]


@pytest.mark.parametrize("version", ["1.45.0", "2.0.0", "1.43.99"])
def test_an_untested_botocore_gets_boto3s_transport_with_one_log_line(
    kms_key_id: str,
    kind: str,
    version: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(botocore, "__version__", version)
    caplog.set_level(logging.INFO, logger="app.crypto.kms_transport")
    provider = KmsKeyProvider(kms_key_id, transport=transport_kind(kind))
    assert type(provider.transport) is Boto3Transport
    chosen = [r.getMessage() for r in caplog.records if r.name == "app.crypto.kms_transport"]
    expected = f"kms transport: boto3 (the lean path is tested with botocore >=1.44,<1.45, not {version})"
    assert chosen == ([expected] if kind == "lean" else [])
    made = generate(provider, CONTEXT)
    assert decrypt(provider, made.wrapped, CONTEXT).plaintext == made.plaintext


def test_the_transport_setting_defaults_to_lean_and_refuses_other_values(kms_key_id: str, kind: str) -> None:
    assert make_settings("postgresql://unused/none", kms_key_id).kms_transport == "lean"
    provider, _ = build_key_provider(
        make_settings("postgresql://unused/none", kms_key_id, kms_transport=kind)
    )
    assert isinstance(provider, KmsKeyProvider)
    assert_transport(provider, kind)
    provider.close()
    with pytest.raises(ValidationError):
        make_settings("postgresql://unused/none", kms_key_id, kms_transport="aws-crt")
    with pytest.raises(ValidationError, match="PIIVAULT_KMS_CA_BUNDLE"):
        make_settings("postgresql://unused/none", kms_key_id, kms_ca_bundle="/nonexistent/ca.pem")
