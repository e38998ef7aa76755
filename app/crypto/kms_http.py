"""A small keep-alive HTTP/1.1 client that carries KMS's signed requests to one origin.

Why not the boto3 client's own urllib3 session: measured against the bench KMS stand-in, sending
a signed request through it costs about 400-500 us of client CPU, through this about 60-70 us,
and it was the largest part of the lean path's cost. It does only what the KMS hot path
needs: POST a small request, written with one send, and read a small answer (Content-Length,
chunked or close-delimited), over keep-alive connections pooled per event loop, with the boto3
client's connect and read timeouts and TLS verified as botocore verifies it (the CA bundle or
`verify` setting the vault gives both, host name checked). When a proxy applies, the lean
transport is not used at all: boto3's client carries the call.

Failures surface as botocore's own exceptions (EndpointConnectionError, ConnectTimeoutError,
ReadTimeoutError, ConnectionClosedError, SSLError) so botocore's retry policy treats them exactly
as it treats its own transport's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import weakref
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict, TypeVar, Unpack, cast
from urllib.parse import urlsplit

from botocore.awsrequest import AWSPreparedRequest, AWSResponse
from botocore.exceptions import (
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    ReadTimeoutError,
    SSLError,
)

# KMS answers are a few KiB; anything far larger is not KMS and is refused rather than buffered.
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
_RECV_BYTES = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}

SocketOption = tuple[int, int, int]
T = TypeVar("T")


class _PeerClosed(Exception):
    """The server closed the connection before the answer was complete."""


class _Malformed(Exception):
    """The bytes read are not an HTTP/1.x answer this client accepts."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests go: scheme, host and port, and the Host header botocore signs for them."""

    scheme: str
    host: str
    port: int
    host_header: str

    @classmethod
    def from_url(cls, url: str) -> Origin:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        host = parts.hostname
        port = parts.port or _DEFAULT_PORTS[scheme]
        # As botocore's SigV4 signer names the host: brackets for IPv6, the port only if not the default.
        named = f"[{host}]" if ":" in host else host
        host_header = named if port == _DEFAULT_PORTS[scheme] else f"{named}:{port}"
        return cls(scheme, host, port, host_header)


class _BufferedBody:
    """The read answer, shaped as the raw stream AWSResponse reads its content from."""

    __slots__ = ("_payload",)

    def __init__(self, payload: bytes) -> None:
        self._payload = payload

    def stream(self, **_: object) -> Iterator[bytes]:
        yield self._payload


# Reading an answer, without I/O: each reader is a generator that yields when it needs more bytes
# in the buffer, and is thrown _PeerClosed when there are none to come (_LoopConnection drives it).
_Reader = Generator[None, None, T]


def _read_until(buffer: bytearray, delimiter: bytes, limit: int) -> _Reader[bytes]:
    start = 0
    while True:
        end = buffer.find(delimiter, start)
        if end >= 0:
            data = bytes(buffer[:end])
            del buffer[: end + len(delimiter)]
            return data
        if len(buffer) > limit:
            raise _Malformed("response head or chunk line too long")
        start = max(0, len(buffer) - len(delimiter) + 1)
        yield


def _read_exact(buffer: bytearray, size: int) -> _Reader[bytes]:
    while len(buffer) < size:
        yield
    data = bytes(buffer[:size])
    del buffer[:size]
    return data


def _read_to_close(buffer: bytearray) -> _Reader[bytes]:
    while True:
        if len(buffer) > MAX_BODY_BYTES:
            raise _Malformed("response body too large")
        try:
            yield
        except _PeerClosed:
            break
    data = bytes(buffer)
    buffer.clear()
    return data


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    reusable: bool


def _parse_head(head: bytes) -> tuple[bool, int, dict[str, str]]:
    """(is HTTP/1.1, status, headers with lower-case names) of a response head."""
    lines = head.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    status_text = rest[:3]
    if not version.startswith(b"HTTP/1.") or len(status_text) != 3 or not status_text.isdigit():
        raise _Malformed("not an HTTP/1.x status line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name[:1] in (b" ", b"\t"):
            raise _Malformed("malformed header line")
        key = name.strip().decode("latin-1").lower()
        text = value.strip().decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return version == b"HTTP/1.1", int(status_text), headers


def _read_chunked(buffer: bytearray) -> _Reader[bytes]:
    body = bytearray()
    while True:
        size_line = yield from _read_until(buffer, b"\r\n", MAX_HEAD_BYTES)
        size_text = size_line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _Malformed("malformed chunk size") from None
        if size < 0 or len(body) + size > MAX_BODY_BYTES:
            raise _Malformed("response body too large")
        if size == 0:
            while (yield from _read_until(buffer, b"\r\n", MAX_HEAD_BYTES)):  # trailers, up to the empty line
                pass
            return bytes(body)
        body += yield from _read_exact(buffer, size)
        if (yield from _read_exact(buffer, 2)) != b"\r\n":
            raise _Malformed("malformed chunk")


def _read_answer(buffer: bytearray) -> _Reader[_Answer]:
    while True:
        head = yield from _read_until(buffer, b"\r\n\r\n", MAX_HEAD_BYTES)
        is_http11, status, headers = _parse_head(head)
        if not 100 <= status < 200 or status == 101:
            break  # interim 1xx answers (100 Continue, 103) precede the real one
    tokens = {token.strip().lower() for token in headers.get("connection", "").split(",")}
    reusable = "keep-alive" in tokens if not is_http11 else "close" not in tokens
    transfer_encoding = headers.get("transfer-encoding", "").lower()
    if status in (204, 304):
        body = b""
    elif transfer_encoding:
        if transfer_encoding.rsplit(",", 1)[-1].strip() == "chunked":
            body = yield from _read_chunked(buffer)
        else:
            body, reusable = (yield from _read_to_close(buffer)), False
    elif "content-length" in headers:
        lengths = {part.strip() for part in headers["content-length"].split(",")}
        if len(lengths) != 1 or not next(iter(lengths)).isdigit():
            raise _Malformed("malformed Content-Length")
        length = int(lengths.pop())
        if length > MAX_BODY_BYTES:
            raise _Malformed("response body too large")
        body = yield from _read_exact(buffer, length)
    else:
        body, reusable = (yield from _read_to_close(buffer)), False
    # Bytes beyond the answer mean the stream is out of step: never reuse it.
    return _Answer(status, headers, body, reusable and not buffer)


class _LoopConnection(asyncio.Protocol):
    """A connection on the event loop: what arrives is buffered, and wakes the one reader waiting."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        # Resolved with False when bytes arrive or the peer closes, True when the read times out.
        self._waiter: asyncio.Future[bool] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(False)

    # Ours

    def is_dropped(self) -> bool:
        """Idle, it should have had nothing to say: closed, or bytes out of turn, means drop it."""
        return self.closed or bool(self.buffer) or self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _expire(self, waiter: asyncio.Future[bool]) -> None:
        if self._waiter is waiter:
            self._waiter = None
        if not waiter.done():
            waiter.set_result(True)

    async def read_answer(self, timeout_s: float) -> _Answer:
        """The next answer; TimeoutError if nothing arrives for timeout_s at any point, as a
        socket's read timeout. Bytes that came in while the loop was busy count as arrived."""
        reader = _read_answer(self.buffer)
        loop = asyncio.get_running_loop()
        try:
            reader.send(None)
            while True:
                if self.closed:
                    reader.throw(_PeerClosed())
                    continue
                start = len(self.buffer)
                waiter = self._waiter = loop.create_future()
                timer = loop.call_later(timeout_s, self._expire, waiter)
                try:
                    expired = await waiter
                finally:
                    timer.cancel()
                if len(self.buffer) > start:
                    reader.send(None)
                elif expired and not self.closed:
                    raise TimeoutError("no answer within the read timeout")
        except StopIteration as done:
            answer: _Answer = done.value
            return answer


def _transport_error(url: str, err: BaseException) -> Exception | None:
    """botocore's exception for a failure while sending or reading, as its urllib3 session raises it."""
    if isinstance(err, TimeoutError):
        return ReadTimeoutError(endpoint_url=url, error=err)
    if isinstance(err, ssl.SSLError):
        return SSLError(endpoint_url=url, error=err)
    if isinstance(err, _PeerClosed | _Malformed | ConnectionError):
        return ConnectionClosedError(endpoint_url=url, error=err)
    if isinstance(err, OSError):
        return HTTPClientError(error=err)
    return None


def _has_line_break(text: str) -> bool:
    return "\r" in text or "\n" in text


class CarrierSettings(TypedDict):
    """How a carrier connects: the boto3 client's timeouts, pool size and TLS settings."""

    connect_timeout_s: float
    read_timeout_s: float
    pool_size: int
    ssl_context: NotRequired[ssl.SSLContext | None]
    socket_options: NotRequired[Sequence[SocketOption]]


def _response(url: str, answer: _Answer) -> AWSResponse:
    # AWSResponse keeps any mapping as a case-insensitive HeadersDict; the stubs ask for more.
    return AWSResponse(url, answer.status, cast(Any, answer.headers), _BufferedBody(answer.body))


@dataclass(slots=True)
class _LoopPool:
    """One event loop's connections: the idle ones, and a slot for each one open or in use."""

    idle: list[_LoopConnection]
    slots: asyncio.Semaphore


def _close_idle(pool: _LoopPool) -> None:
    idle, pool.idle = pool.idle, []
    for connection in idle:
        connection.close()


class LoopHttpCarrier:
    """Sends prepared (signed) requests to one origin over keep-alive connections, on the event
    loop: a request waits for KMS without holding a thread.

    Connections belong to the loop that opened them, so each loop has its own pool (a uvicorn
    worker has one loop; tests may run several). A request waits for a free connection once
    `pool_size` are in use: a burst on the event loop (batches of hundreds) then reuses
    connections instead of opening and dropping one per call. The read timeout applies to each
    wait for bytes, as a socket's does.
    """

    def __init__(self, origin: Origin, **settings: Unpack[CarrierSettings]) -> None:
        ssl_context = settings.get("ssl_context")
        if origin.scheme == "https" and ssl_context is None:
            raise ValueError("an https origin needs an SSL context")
        self._origin = origin
        self._connect_timeout_s = settings["connect_timeout_s"]
        self._read_timeout_s = settings["read_timeout_s"]
        self._pool_size = settings["pool_size"]
        self._ssl_context = ssl_context if origin.scheme == "https" else None
        self._socket_options = list(settings.get("socket_options", ()))
        self._lock = threading.Lock()
        self._closed = False
        self._pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopPool]
        self._pools = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._origin.scheme}://{self._origin.host_header})"

    @property
    def origin(self) -> Origin:
        return self._origin

    def _serialize(self, request: AWSPreparedRequest) -> bytes:
        parts = urlsplit(request.url)
        if (parts.scheme.lower(), parts.hostname, parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())) != (
            self._origin.scheme,
            self._origin.host,
            self._origin.port,
        ):
            raise HTTPClientError(error=ValueError("request URL is not this carrier's origin"))
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        body = request.body if request.body is not None else b""
        if isinstance(body, str):
            body = body.encode("utf-8")
        if not isinstance(body, bytes | bytearray):
            raise HTTPClientError(error=TypeError("only a bytes body can be sent"))
        lines = [f"{request.method} {target} HTTP/1.1", f"Host: {self._origin.host_header}"]
        for name, value in request.headers.items():
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            if name.lower() in ("host", "content-length", "transfer-encoding"):
                continue  # written here, from the origin and the body
            if _has_line_break(name) or _has_line_break(text):
                raise HTTPClientError(error=ValueError("line break in a header"))
            lines.append(f"{name}: {text}")
        lines.append(f"Content-Length: {len(body)}")
        head = "\r\n".join(lines) + "\r\n\r\n"
        # One send for head and body: one syscall, and no Nagle/delayed-ACK stall between them.
        return head.encode("latin-1") + bytes(body)

    def _configure(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for level, option, value in self._socket_options:
            sock.setsockopt(level, option, value)

    def close(self) -> None:
        """Close the idle connections; ones in use are closed when their request ends. Each
        loop's pool is emptied by that loop itself, so no other thread touches its list."""
        with self._lock:
            self._closed = True
            pools = list(self._pools.items())
            self._pools.clear()
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop, pool in pools:
            if loop is running:
                _close_idle(pool)
            elif not loop.is_closed():
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(_close_idle, pool)

    def _pool(self, loop: asyncio.AbstractEventLoop) -> _LoopPool:
        with self._lock:
            pool = self._pools.get(loop)
            if pool is None:
                # A new loop: forget the pools of loops that have closed (their connections
                # hold their loop, so it would never be collected).
                for gone in [other for other in self._pools if other.is_closed()]:
                    del self._pools[gone]
                pool = self._pools[loop] = _LoopPool([], asyncio.Semaphore(self._pool_size))
            return pool

    async def send(self, request: AWSPreparedRequest) -> AWSResponse:
        url = request.url
        message = self._serialize(request)
        pool = self._pool(asyncio.get_running_loop())
        async with pool.slots:
            connection = await self._checkout(pool, url)
            try:
                cast(asyncio.Transport, connection.transport).write(message)
                answer = await connection.read_answer(self._read_timeout_s)
            except BaseException as err:
                connection.close()
                mapped = _transport_error(url, err)
                if mapped is None:
                    raise  # cancelled, say: the connection is closed, the cancellation goes on
                raise mapped from err
            if answer.reusable and not self._closed:
                pool.idle.append(connection)
            else:
                connection.close()
        return _response(url, answer)

    async def _checkout(self, pool: _LoopPool, url: str) -> _LoopConnection:
        # Only this loop touches its pool's idle list, so no lock is needed here.
        while pool.idle:
            connection = pool.idle.pop()
            if not connection.is_dropped():
                return connection
            connection.close()
        return await self._connect(url)

    async def _connect(self, url: str) -> _LoopConnection:
        origin = self._origin
        tls = self._ssl_context
        loop = asyncio.get_running_loop()
        try:
            # The TLS handshake runs under the connect timeout, as with urllib3.
            async with asyncio.timeout(self._connect_timeout_s):
                transport, connection = await loop.create_connection(
                    _LoopConnection,
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls is not None else None,
                )
        except TimeoutError as err:
            raise ConnectTimeoutError(endpoint_url=url, error=err) from err
        except ssl.SSLError as err:
            raise SSLError(endpoint_url=url, error=err) from err
        except OSError as err:
            raise EndpointConnectionError(endpoint_url=url, error=err) from err
        sock = transport.get_extra_info("socket")
        try:
            if sock is not None:
                self._configure(sock)
        except OSError as err:
            transport.close()
            raise EndpointConnectionError(endpoint_url=url, error=err) from err
        return connection
