"""GenerateDataKey and Decrypt over KMS's JSON 1.1 protocol, without botocore's per-call machinery.

A boto3 call spends well over 1 ms of client CPU on parameter validation, endpoint ruleset
resolution, a dozen event emissions, response parsing and urllib3. On the vault's hot path (one
GenerateDataKey per tokenize, one Decrypt per detokenize) that is most of the request's CPU, so
LeanTransport serves these two operations itself, awaited on the event loop (a request waiting
for KMS holds no thread). It stands on botocore's public API only:

- credentials: the session's `get_credentials()`, frozen per attempt so refreshable ones refresh
  (in a thread when a refresh is due: it blocks on STS or instance metadata);
- signing: `botocore.auth.SigV4Auth` on a botocore AWSRequest, for `client.meta.region_name` and
  the service model's signing name, to `client.meta.endpoint_url`;
- retries: the client's own `needs-retry` handler decides, so the policy, max attempts, backoff
  with jitter and the retry quota are the client's ("standard" as the vault configures it);
- errors: HTTP errors are raised as botocore's ClientError, transport failures as botocore's
  exceptions, so callers map both exactly as they map boto3's;
- hooks: `provide-client-params`, `before-send` (a handler's AWSResponse answers instead of the
  network: moto's mock_aws and fault injectors rely on it), `needs-retry`, `after-call` and
  `after-call-error` are emitted on `client.meta.events` as botocore emits them.

TLS is verified with the `verify` value the vault gives the boto3 client too. A client this
path cannot serve exactly as boto3 would (a proxy applies, not SigV4, not JSON) is refused by
`LeanTransport.for_client` with the reason, and boto3's client carries every call instead.
Nothing here logs; payloads hold data keys.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os.path
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import botocore
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSPreparedRequest, AWSRequest, AWSResponse
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from botocore.hooks import first_non_none_response
from botocore.httpsession import create_urllib3_context, get_cert_path
from botocore.model import OperationModel
from botocore.utils import get_environ_proxies

from app.crypto.kms_http import LoopHttpCarrier, Origin, SocketOption

if TYPE_CHECKING:
    from botocore.credentials import Credentials
    from botocore.session import Session
    from mypy_boto3_kms.client import KMSClient

    from app.crypto.kms_transport import KmsTransport

_CONTENT_TYPE = "application/x-amz-json-1.1"
_TARGET_PREFIX = "TrentService."
_USER_AGENT = f"pii-vault-lean-kms Botocore/{botocore.__version__}"
# Members the JSON protocol carries as base64 (blobs), for the operations this path serves.
_BLOB_MEMBERS = frozenset({"CiphertextBlob", "Plaintext"})
LEAN_OPERATIONS = ("GenerateDataKey", "Decrypt")
# The pause between attempts; a module attribute so tests can record it instead of waiting.
_sleep = asyncio.sleep


class MalformedKmsResponse(BotoCoreError):
    """A 2xx answer that is not the JSON document the operation returns (never quotes the body)."""

    fmt = "KMS answered {operation} with a response that could not be read"


class LeanPathUnavailable(Exception):
    """The lean path cannot serve this client exactly as boto3 would; the message says why."""


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


def _socket_options(client: Any, session: Session) -> list[SocketOption]:
    """Beyond TCP_NODELAY (the carrier sets it): keep-alive probes if the client's config or the
    profile asks for them, as botocore adds them."""
    keepalive = client.meta.config.tcp_keepalive
    if keepalive is None:
        keepalive = str(session.get_scoped_config().get("tcp_keepalive", "")).lower() == "true"
    return [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)] if keepalive else []


def resolved_verify(verify: bool | str | None, session: Session) -> bool | str:
    """TLS verification as botocore resolves an unset `verify`: the profile's or AWS_CA_BUNDLE's
    `ca_bundle`, else REQUESTS_CA_BUNDLE, else its own bundle. The vault passes the result to the
    boto3 client and to the lean path alike, so both verify the same way."""
    if verify is not None:
        return verify
    configured = session.get_config_variable("ca_bundle")
    if configured:
        return str(configured)
    return os.environ.get("REQUESTS_CA_BUNDLE") or True


class LeanTransport:
    """Calls GenerateDataKey and Decrypt for a boto3 KMS client, returning what boto3 would return
    and raising what it would raise; any other operation goes to `fallback`.

    Use `for_client`: it refuses a client whose calls it cannot make exactly as boto3 would.
    """

    def __init__(
        self,
        client: KMSClient,
        *,
        credentials: Credentials | None,
        url: str,
        origin: Origin,
        carrier: LoopHttpCarrier,
        fallback: KmsTransport,
    ) -> None:
        meta = cast(Any, client).meta
        self._config = meta.config
        self._events = meta.events
        self._region: str = meta.region_name
        self._signing_name: str = meta.service_model.signing_name
        self._credentials = credentials  # the session's chain; None if it found none
        self._url = url
        # Sent and signed as given, so SigV4Auth need not work it out from the URL on every request.
        self._host_header = origin.host_header
        self._carrier = carrier
        self._fallback = fallback
        service_id = meta.service_model.service_id.hyphenize()
        self._operations = {
            name: _Operation(
                name=name,
                model=meta.service_model.operation_model(name),
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
    def for_client(
        cls, client: KMSClient, *, session: Session, verify: bool | str, fallback: KmsTransport
    ) -> LeanTransport:
        """The lean path for `client`, made by `session`, whose TLS verification is `verify`
        (give both the same value). Raises LeanPathUnavailable with the reason if it cannot
        serve the client exactly as boto3 would."""
        meta = cast(Any, client).meta
        config = meta.config
        if config.signature_version not in (None, "v4") or meta.service_model.signature_version != "v4":
            raise LeanPathUnavailable("the client does not sign with SigV4")
        if meta.service_model.protocol != "json":
            raise LeanPathUnavailable(f"the client speaks {meta.service_model.protocol}, not JSON 1.1")
        if not meta.region_name:
            raise LeanPathUnavailable("the client has no region")
        url = _request_url(meta.endpoint_url)
        try:
            origin = Origin.from_url(url)
        except ValueError:
            raise LeanPathUnavailable("the endpoint is not an http(s) URL") from None
        if (config.proxies or {}).get(origin.scheme) or get_environ_proxies(url).get(origin.scheme):
            raise LeanPathUnavailable("a proxy applies to the endpoint")
        carrier = LoopHttpCarrier(
            origin,
            connect_timeout_s=float(config.connect_timeout),
            read_timeout_s=float(config.read_timeout),
            pool_size=int(config.max_pool_connections),
            ssl_context=_ssl_context(verify, config.client_cert) if origin.scheme == "https" else None,
            socket_options=_socket_options(client, session),
        )
        return cls(
            client,
            credentials=session.get_credentials(),
            url=url,
            origin=origin,
            carrier=carrier,
            fallback=fallback,
        )

    def __repr__(self) -> str:
        return f"LeanTransport({self._url!r})"

    def close(self) -> None:
        self._carrier.close()
        self._fallback.close()

    async def call(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        """Run `operation` with boto3-style params; returns boto3's response shape or raises as boto3."""
        op = self._operations.get(operation)
        if op is None:
            return await self._fallback.call(operation, params)
        context: dict[str, Any] = {
            "client_region": self._region,
            "client_config": self._config,
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
            request = self._signed_request(op, body, await self._frozen_credentials())
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
                try:
                    http_response = await self._carrier.send(request)
                except Exception as err:
                    caught = err
            if http_response is not None and http_response.status_code < 300:
                break
            if http_response is not None:
                parsed_error = _error_response(http_response)
            delay = self._retry_delay(op, attempts, http_response, parsed_error, caught, context)
            if delay is None:
                break
            await _sleep(delay)

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

    async def _frozen_credentials(self) -> Any:
        credentials = self._credentials
        if credentials is None:
            raise NoCredentialsError()
        # Frozen per request: refreshable credentials (roles, SSO) refresh here when due, and a
        # refresh blocks (STS, instance metadata), so then it runs in a thread, never on the loop.
        refresh_needed = getattr(credentials, "refresh_needed", None)
        if refresh_needed is not None and refresh_needed():
            return await asyncio.to_thread(credentials.get_frozen_credentials)
        return credentials.get_frozen_credentials()

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
        """Seconds to wait before another attempt, as the client's retry handler decides; None: stop.
        The event carries what botocore's endpoint emits, but no endpoint: the retry handlers a
        KMS client registers (standard and legacy modes) do not read it."""
        responses = self._events.emit(
            op.needs_retry_event,
            response=(http_response, parsed_error) if http_response is not None else None,
            endpoint=None,
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
