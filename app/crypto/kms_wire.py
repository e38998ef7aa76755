"""GenerateDataKey and Decrypt over KMS's JSON 1.1 protocol, without botocore's per-call machinery.

A boto3 call spends well over 1 ms of client CPU on parameter validation, endpoint ruleset
resolution, a dozen event emissions, response parsing and urllib3. On the vault's hot path (one
GenerateDataKey per tokenize, one Decrypt per detokenize) that is most of the request's CPU, so
these two operations take this path instead. What stays botocore's own:

- credentials: the client's credential chain, frozen per request so refreshable ones refresh;
- signing: botocore's SigV4Auth, on a botocore AWSRequest;
- retries: the client's own retry handler decides (`needs-retry`), so the policy, max attempts,
  backoff with jitter and the retry quota are exactly the client's ("standard" as the vault
  configures it) and attempts are counted as boto3 counts them;
- errors: HTTP errors are raised as botocore's ClientError, transport failures as botocore's
  exceptions, so callers map both exactly as they map boto3's;
- hooks: `provide-client-params`, `before-send` (a handler's AWSResponse answers instead of the
  network: moto's mock_aws and fault injectors rely on it), `needs-retry`, `after-call` and
  `after-call-error` are emitted on the client's event system as botocore emits them.

A call is written once, without I/O (`_steps`), and driven two ways: `call` blocks a thread,
`call_async` waits on the event loop, so a request waiting for KMS holds no thread and pays no
thread hand-off. The bytes go through HttpCarrier or LoopHttpCarrier (app/crypto/kms_http.py),
or through the client's own HTTP session (in a thread) when a proxy applies to the endpoint.
Nothing here logs; payloads hold data keys.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os.path
import ssl
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast
from urllib.parse import urlsplit

import botocore
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSPreparedRequest, AWSRequest, AWSResponse
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from botocore.hooks import first_non_none_response
from botocore.httpsession import create_urllib3_context, get_cert_path
from botocore.model import OperationModel

from app.crypto.kms_http import CarrierSettings, HttpCarrier, LoopHttpCarrier, Origin, SocketOption

if TYPE_CHECKING:
    from mypy_boto3_kms.client import KMSClient

_CONTENT_TYPE = "application/x-amz-json-1.1"
_TARGET_PREFIX = "TrentService."
_USER_AGENT = f"pii-vault-lean-kms Botocore/{botocore.__version__}"
# Members the JSON protocol carries as base64 (blobs), for the operations this path serves.
_BLOB_MEMBERS = frozenset({"CiphertextBlob", "Plaintext"})
LEAN_OPERATIONS = ("GenerateDataKey", "Decrypt")
# The pause between attempts; module attributes so tests can record it instead of waiting.
_sleep = time.sleep
_sleep_async = asyncio.sleep


class MalformedKmsResponse(BotoCoreError):
    """A 2xx answer that is not the JSON document the operation returns (never quotes the body)."""

    fmt = "KMS answered {operation} with a response that could not be read"


class _Sender(Protocol):
    def __call__(self, request: AWSPreparedRequest) -> AWSResponse: ...


@dataclass(frozen=True, slots=True)
class _Pause:
    """A step of a call: wait this long before the next attempt."""

    seconds: float


class _Credentials:
    """A step of a call: freeze the client's credentials for signing (refreshing them when due,
    which blocks on STS or instance metadata) and send them back."""


_CREDENTIALS = _Credentials()
# A step of a call is a request to send, a pause, or credentials to fetch.
_Step = AWSPreparedRequest | _Pause | _Credentials


def _attempt(send: _Sender, request: AWSPreparedRequest) -> tuple[AWSResponse | None, Exception | None]:
    try:
        return send(request), None
    except Exception as err:
        return None, err


@dataclass(frozen=True, slots=True)
class _Operation:
    name: str
    model: OperationModel
    target: str
    provide_params_event: str
    before_send_event: str
    needs_retry_event: str
    after_call_event: str
    after_call_error_event: str


def _json_body(params: Mapping[str, Any]) -> bytes:
    # Top-level blobs (CiphertextBlob) travel as base64, as the JSON protocol serialises them.
    document = {
        name: base64.b64encode(value).decode("ascii") if isinstance(value, bytes | bytearray) else value
        for name, value in params.items()
    }
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def _decoded_document(content: bytes) -> dict[str, Any] | None:
    """The answer's members with blobs decoded, or None if it is not such a document."""
    try:
        document = json.loads(content)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    parsed: dict[str, Any] = {}
    for name, value in document.items():
        if name in _BLOB_MEMBERS:
            if not isinstance(value, str):
                return None
            try:
                value = base64.b64decode(value, validate=True)
            except binascii.Error:
                return None
        parsed[name] = value
    return parsed


def _error_response(http_response: AWSResponse) -> dict[str, Any]:
    """The parsed error as botocore's JSON parser builds it (the code from `__type`, else the status)."""
    try:
        document = json.loads(http_response.content or b"{}")
    except ValueError:
        document = {}
    if not isinstance(document, dict):
        document = {}
    code = str(document.get("__type") or http_response.status_code)
    code = code.split(":", 1)[0].rsplit("#", 1)[-1]
    message = document.get("message", document.get("Message", ""))
    headers = {name.lower(): value for name, value in http_response.headers.items()}
    metadata: dict[str, Any] = {"HTTPStatusCode": http_response.status_code, "HTTPHeaders": headers}
    if "x-amzn-requestid" in headers:
        metadata["RequestId"] = headers["x-amzn-requestid"]
    return {"Error": {"Code": code, "Message": str(message)}, "ResponseMetadata": metadata}


def _request_url(endpoint_url: str) -> str:
    """The URL botocore posts JSON operations to: the endpoint, with "/" as its path if it has none."""
    return endpoint_url if urlsplit(endpoint_url).path else endpoint_url + "/"


def _ssl_context(verify: bool | str, client_cert: object) -> ssl.SSLContext:
    """TLS as botocore's urllib3 session sets it up: its context, its CA bundle, the host name checked."""
    context: ssl.SSLContext = create_urllib3_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.verify_mode = ssl.CERT_REQUIRED
        context.check_hostname = True
        # `verify` is True (botocore's default bundle) or the path of a CA bundle.
        location = verify if isinstance(verify, str) else str(get_cert_path(True))
        if os.path.isdir(location):
            context.load_verify_locations(capath=location)
        else:
            context.load_verify_locations(cafile=location)
    if isinstance(client_cert, str):
        context.load_cert_chain(client_cert)
    elif isinstance(client_cert, tuple):
        context.load_cert_chain(client_cert[0], keyfile=client_cert[1])
    return context


def _carriers_for(client: Any, url: str, origin: Origin) -> tuple[HttpCarrier, LoopHttpCarrier] | None:
    """Carriers (threads', event loop's) with the client's HTTP settings, or None when the client's
    own session must carry the bytes (a proxy applies, or its settings are not the ones this module
    knows how to read)."""
    http_session = client._endpoint.http_session
    proxy_config = getattr(http_session, "_proxy_config", None)
    verify = getattr(http_session, "_verify", None)
    if proxy_config is None or verify is None or proxy_config.proxy_url_for(url):
        return None
    config = client.meta.config
    socket_options: list[SocketOption] = list(getattr(http_session, "_socket_options", None) or [])
    settings: CarrierSettings = {
        "connect_timeout_s": float(config.connect_timeout),
        "read_timeout_s": float(config.read_timeout),
        "pool_size": int(config.max_pool_connections),
        "ssl_context": _ssl_context(verify, config.client_cert) if origin.scheme == "https" else None,
        "socket_options": socket_options,
    }
    return HttpCarrier(origin, **settings), LoopHttpCarrier(origin, **settings)


class KmsWire:
    """Calls GenerateDataKey and Decrypt for a boto3 KMS client, returning what boto3 would return.

    Use `for_client`: it declines (None) a client whose requests it cannot sign as botocore would.
    """

    def __init__(
        self,
        client: KMSClient,
        *,
        url: str,
        origin: Origin,
        carriers: tuple[HttpCarrier, LoopHttpCarrier] | None,
    ) -> None:
        raw: Any = client
        signer = raw._request_signer
        self._client: Any = raw
        self._events = raw.meta.events
        self._endpoint = raw._endpoint
        self._url = url
        # Sent and signed as given, so SigV4Auth need not work it out from the URL on every request.
        self._host_header = origin.host_header
        self._region: str = signer.region_name
        self._signing_name: str = signer.signing_name
        self._credentials = signer._credentials  # the client's chain; None if it found none
        self._carrier: HttpCarrier | None = carriers[0] if carriers is not None else None
        self._loop_carrier: LoopHttpCarrier | None = carriers[1] if carriers is not None else None
        self._send: _Sender = carriers[0].send if carriers is not None else raw._endpoint.http_session.send
        service_id = raw.meta.service_model.service_id.hyphenize()
        self._operations = {
            name: _Operation(
                name=name,
                model=raw.meta.service_model.operation_model(name),
                target=_TARGET_PREFIX + name,
                provide_params_event=f"provide-client-params.{service_id}.{name}",
                before_send_event=f"before-send.{service_id}.{name}",
                needs_retry_event=f"needs-retry.{service_id}.{name}",
                after_call_event=f"after-call.{service_id}.{name}",
                after_call_error_event=f"after-call-error.{service_id}.{name}",
            )
            for name in LEAN_OPERATIONS
        }

    @classmethod
    def for_client(cls, client: KMSClient) -> KmsWire | None:
        raw = cast(Any, client)
        signer = getattr(raw, "_request_signer", None)
        endpoint = getattr(raw, "_endpoint", None)
        if (
            signer is None
            or endpoint is None
            or getattr(signer, "signature_version", None) != "v4"
            or not hasattr(signer, "_credentials")
            or not signer.region_name
            or raw.meta.service_model.protocol != "json"
        ):
            return None
        url = _request_url(raw.meta.endpoint_url)
        try:
            origin = Origin.from_url(url)
        except ValueError:
            return None
        return cls(client, url=url, origin=origin, carriers=_carriers_for(raw, url, origin))

    def __repr__(self) -> str:
        return f"KmsWire({self._url!r})"

    def close(self) -> None:
        if self._carrier is not None:
            self._carrier.close()
        if self._loop_carrier is not None:
            self._loop_carrier.close()

    def call(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        """Run `operation` with boto3-style params; returns boto3's response shape or raises as boto3."""
        steps = self._steps(operation, params)
        try:
            step = next(steps)
            while True:
                if isinstance(step, _Pause):
                    _sleep(step.seconds)
                    step = steps.send(None)
                elif isinstance(step, _Credentials):
                    step = steps.send(self._freeze_credentials())
                else:
                    step = steps.send(_attempt(self._send, step))
        except StopIteration as done:
            result: dict[str, Any] = done.value
            return result

    async def call_async(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        """`call` on the event loop: the request waits for KMS (and for a retry's pause) without
        holding a thread. Through a proxy the client's own session carries it, in a thread."""
        carrier = self._loop_carrier
        if carrier is None:
            return await asyncio.to_thread(self.call, operation, params)
        steps = self._steps(operation, params)
        try:
            step = next(steps)
            while True:
                if isinstance(step, _Pause):
                    await _sleep_async(step.seconds)
                    step = steps.send(None)
                elif isinstance(step, _Credentials):
                    # A refresh blocks (STS, instance metadata): then in a thread, never on the loop.
                    if self._refresh_due():
                        step = steps.send(await asyncio.to_thread(self._freeze_credentials))
                    else:
                        step = steps.send(self._freeze_credentials())
                else:
                    try:
                        sent: tuple[AWSResponse | None, Exception | None] = (await carrier.send(step), None)
                    except Exception as err:
                        sent = (None, err)
                    step = steps.send(sent)
        except StopIteration as done:
            result: dict[str, Any] = done.value
            return result

    def _steps(self, operation: str, params: dict[str, Any]) -> Generator[_Step, Any, dict[str, Any]]:
        """The call without its I/O: yields for the credentials to sign each attempt with, each
        request to send (and is sent back the response or the exception) and each pause between
        attempts; returns boto3's response shape or raises."""
        op = self._operations[operation]
        context: dict[str, Any] = {
            "client_region": self._region,
            "client_config": self._client.meta.config,
            "has_streaming_input": False,
            "auth_type": "v4",
        }
        responses = self._events.emit(op.provide_params_event, params=params, model=op.model, context=context)
        params = first_non_none_response(responses, default=params)
        body = _json_body(params)

        attempts = 0
        while True:
            attempts += 1
            context.setdefault("retries", {})["attempt"] = attempts
            # Signed per attempt (a fresh X-Amz-Date), as botocore re-signs each retry. A missing
            # credential raises NoCredentialsError here, outside the retried part, as in botocore.
            credentials = yield _CREDENTIALS
            request = self._signed_request(op, body, credentials)
            http_response: AWSResponse | None = None
            parsed_error: dict[str, Any] | None = None
            caught: Exception | None = None
            try:
                answered = first_non_none_response(self._events.emit(op.before_send_event, request=request))
            except Exception as err:
                answered, caught = None, err
            if answered is not None:
                http_response = answered
            elif caught is None:
                http_response, caught = yield request
            if http_response is not None and http_response.status_code < 300:
                break
            if http_response is not None:
                parsed_error = _error_response(http_response)
            delay = self._retry_delay(op, attempts, http_response, parsed_error, caught, context)
            if delay is None:
                break
            yield _Pause(delay)

        if http_response is None:
            self._events.emit(op.after_call_error_event, exception=caught, context=context)
            raise caught if caught is not None else RuntimeError("KMS call ended without a response")
        if http_response.status_code >= 300:
            error = parsed_error or _error_response(http_response)
            error["ResponseMetadata"]["RetryAttempts"] = attempts - 1
            self._after_call(op, http_response, error, context)
            raise ClientError(cast(Any, error), operation)

        parsed = _decoded_document(http_response.content)
        if parsed is None:
            # Raised outside any handler, so no exception chain keeps the body (data keys) alive.
            raise MalformedKmsResponse(operation=operation)
        metadata: dict[str, Any] = {
            "HTTPStatusCode": http_response.status_code,
            "RetryAttempts": attempts - 1,
        }
        request_id = http_response.headers.get("x-amzn-requestid")
        if request_id is not None:
            metadata["RequestId"] = request_id
        parsed["ResponseMetadata"] = metadata
        self._after_call(op, http_response, parsed, context)
        return parsed

    def _refresh_due(self) -> bool:
        """Whether freezing the credentials now would refresh them (refreshable ones only)."""
        refresh_needed = getattr(self._credentials, "refresh_needed", None)
        return bool(refresh_needed()) if refresh_needed is not None else False

    def _freeze_credentials(self) -> Any:
        if self._credentials is None:
            raise NoCredentialsError()
        # Frozen per request: refreshable credentials (roles, SSO) refresh here when due.
        return self._credentials.get_frozen_credentials()

    def _signed_request(self, op: _Operation, body: bytes, credentials: Any) -> AWSPreparedRequest:
        request = AWSRequest(
            method="POST",
            url=self._url,
            data=body,
            headers={
                "Host": self._host_header,
                "X-Amz-Target": op.target,
                "Content-Type": _CONTENT_TYPE,
                "User-Agent": _USER_AGENT,
            },
        )
        SigV4Auth(credentials, self._signing_name, self._region).add_auth(request)
        # What request.prepare() makes of a bytes body and no query, without copying the headers.
        headers = request.headers
        headers["Content-Length"] = str(len(body))
        return AWSPreparedRequest("POST", self._url, headers, body, False, request.context)

    def _retry_delay(
        self,
        op: _Operation,
        attempts: int,
        http_response: AWSResponse | None,
        parsed_error: dict[str, Any] | None,
        caught: Exception | None,
        context: dict[str, Any],
    ) -> float | None:
        """Seconds to wait before another attempt, as the client's retry handler decides; None: stop."""
        responses = self._events.emit(
            op.needs_retry_event,
            response=(http_response, parsed_error) if http_response is not None else None,
            endpoint=self._endpoint,
            operation=op.model,
            attempts=attempts,
            caught_exception=caught,
            request_dict={"context": context},
        )
        delay = first_non_none_response(responses)
        if delay is None or delay is False:
            return None
        return float(delay)

    def _after_call(
        self, op: _Operation, http_response: AWSResponse, parsed: dict[str, Any], context: dict[str, Any]
    ) -> None:
        self._events.emit(
            op.after_call_event, http_response=http_response, parsed=parsed, model=op.model, context=context
        )
