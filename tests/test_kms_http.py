"""LoopHttpCarrier, the lean KMS path's HTTP/1.1 client, against a scripted socket server.

Only HTTP is exercised here (framing, keep-alive, timeouts and failures); KMS itself is in
test_kms_transport.py against moto.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import pytest
from botocore.awsrequest import AWSPreparedRequest, AWSRequest, AWSResponse
from botocore.exceptions import ConnectionClosedError, HTTPClientError, ReadTimeoutError

from app.crypto.kms_http import MAX_BODY_BYTES, LoopHttpCarrier, Origin
from tests.conftest import LoopThread

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: 2\r\n\r\n{}"


@dataclass
class ScriptedServer:
    """Answers each request it reads with the next scripted answer; `None` closes without answering.
    An answer ending in `CLOSE` is followed by closing the connection."""

    answers: list[bytes | None]
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)
    connections: int = 0

    CLOSE = b"<close>"

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self._stopping = threading.Event()
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._listener.close()
        for connection in self._held:
            connection.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            self._held.append(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                data = connection.recv(65536)
                if not data:
                    return
                buffer += data
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            match = re.search(rb"(?im)^content-length: *(\d+)", head)
            length = int(match.group(1)) if match else 0
            while len(buffer) < length:
                buffer += connection.recv(65536)
            self.requests.append((head, buffer[:length]))
            buffer = buffer[length:]
            answer = self.answers.pop(0) if self.answers else None
            if answer is None:
                connection.close()
                return
            closing = answer.endswith(self.CLOSE)
            connection.sendall(answer.removesuffix(self.CLOSE))
            if closing:
                connection.close()
                return


@pytest.fixture
def serve() -> Iterator[list[ScriptedServer]]:
    started: list[ScriptedServer] = []
    yield started
    for server in started:
        server.stop()


def scripted(started: list[ScriptedServer], *answers: bytes | None) -> ScriptedServer:
    server = ScriptedServer(list(answers))
    started.append(server)
    return server


class CarrierOnLoop:
    """LoopHttpCarrier driven from the test's thread: each send runs on the test's one event loop."""

    def __init__(self, carrier: LoopHttpCarrier, loop_thread: LoopThread) -> None:
        self.carrier = carrier
        self._loop_thread = loop_thread

    def send(self, prepared: AWSPreparedRequest) -> AWSResponse:
        return self._loop_thread.run(self.carrier.send(prepared))

    def close(self) -> None:
        self.carrier.close()


class MakeCarrier(Protocol):
    def __call__(self, url: str, *, read_timeout_s: float = ..., pool_size: int = ...) -> CarrierOnLoop: ...


@pytest.fixture
def carrier_for(loop_thread: LoopThread) -> MakeCarrier:
    def make(url: str, *, read_timeout_s: float = 2.0, pool_size: int = 4) -> CarrierOnLoop:
        carrier = LoopHttpCarrier(
            Origin.from_url(url), connect_timeout_s=2.0, read_timeout_s=read_timeout_s, pool_size=pool_size
        )
        return CarrierOnLoop(carrier, loop_thread)

    return make


def request(url: str, body: bytes = b'{"KeyId":"k"}') -> AWSPreparedRequest:
    prepared: AWSPreparedRequest = AWSRequest(
        method="POST", url=url + "/", data=body, headers={"X-Amz-Target": "TrentService.Decrypt"}
    ).prepare()
    return prepared


def test_requests_are_framed_with_host_and_length_and_connections_are_kept_alive(
    serve: list[ScriptedServer],
    carrier_for: MakeCarrier,
) -> None:
    server = scripted(serve, OK, OK, OK)
    carrier = carrier_for(server.url)
    for _ in range(3):
        response = carrier.send(request(server.url))
        assert response.status_code == 200
        assert response.content == b"{}"
        assert response.headers["content-type"] == "application/x-amz-json-1.1"
    assert server.connections == 1
    head, body = server.requests[0]
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST / HTTP/1.1"
    assert lines.count(f"Host: {server.url.removeprefix('http://')}") == 1
    assert "Content-Length: 13" in lines and "X-Amz-Target: TrentService.Decrypt" in lines
    assert body == b'{"KeyId":"k"}'
    carrier.close()


def test_threads_share_the_pool_without_mixing_answers(
    serve: list[ScriptedServer], carrier_for: MakeCarrier
) -> None:
    threads, rounds = 8, 25
    answers = [
        f"HTTP/1.1 200 OK\r\nContent-Length: {len(str(n))}\r\n\r\n{n}".encode()
        for n in range(threads * rounds)
    ]
    server = scripted(serve, *answers)
    # Room to keep every thread's connection idle: a new one is then opened only while all the
    # others are in use, so there are never more connections than threads. (With fewer idle
    # slots, a connection returned while the slots are full is closed and later replaced.)
    carrier = carrier_for(server.url, pool_size=threads)
    seen: list[bytes] = []
    failures: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(rounds):
                seen.append(carrier.send(request(server.url)).content)
        except BaseException as err:  # reported below, in the test's thread
            failures.append(err)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    assert failures == []
    assert sorted(seen, key=int) == [str(n).encode() for n in range(threads * rounds)]  # each answer once
    assert server.connections <= threads
    carrier.close()


def test_a_chunked_answer_is_decoded(serve: list[ScriptedServer], carrier_for: MakeCarrier) -> None:
    chunked = (
        b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'7\r\n{"__typ\r\n12;ext=1\r\ne":"Throttling"}  \r\n0\r\nTrailer: x\r\n\r\n'
    )
    server = scripted(serve, chunked, OK)
    carrier = carrier_for(server.url)
    response = carrier.send(request(server.url))
    assert response.status_code == 400
    assert response.content == b'{"__type":"Throttling"}  '
    assert carrier.send(request(server.url)).status_code == 200
    assert server.connections == 1  # still in step after the chunked answer
    carrier.close()


def test_an_answer_delimited_by_close_is_read_and_its_connection_dropped(
    serve: list[ScriptedServer], carrier_for: MakeCarrier
) -> None:
    server = scripted(serve, b'HTTP/1.1 200 OK\r\n\r\n{"a":1}' + ScriptedServer.CLOSE, OK)
    carrier = carrier_for(server.url)
    assert carrier.send(request(server.url)).content == b'{"a":1}'
    assert carrier.send(request(server.url)).content == b"{}"
    assert server.connections == 2
    carrier.close()


@pytest.mark.parametrize(
    "first",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    ],
)
def test_a_connection_the_server_will_close_is_not_reused(
    serve: list[ScriptedServer], carrier_for: MakeCarrier, first: bytes
) -> None:
    server = scripted(serve, first, OK)
    carrier = carrier_for(server.url)
    carrier.send(request(server.url))
    carrier.send(request(server.url))
    assert server.connections == 2
    carrier.close()


def test_interim_answers_are_skipped(serve: list[ScriptedServer], carrier_for: MakeCarrier) -> None:
    server = scripted(serve, b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
    carrier = carrier_for(server.url)
    assert carrier.send(request(server.url)).status_code == 200
    carrier.close()


def test_an_idle_connection_the_server_closed_is_replaced_without_an_error(
    serve: list[ScriptedServer],
    carrier_for: MakeCarrier,
) -> None:
    server = scripted(serve, OK + ScriptedServer.CLOSE, OK)  # keeps alive by its headers, then closes
    carrier = carrier_for(server.url)
    carrier.send(request(server.url))
    threading.Event().wait(0.2)  # let the close arrive
    assert carrier.send(request(server.url)).status_code == 200
    assert server.connections == 2
    carrier.close()


@pytest.mark.parametrize(
    "answer",
    [
        None,  # closed without a byte
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}" + ScriptedServer.CLOSE,  # cut short
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\n{}",
        f"HTTP/1.1 200 OK\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode(),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_a_broken_answer_is_a_closed_connection_error(
    serve: list[ScriptedServer], carrier_for: MakeCarrier, answer: bytes | None
) -> None:
    server = scripted(serve, answer)
    carrier = carrier_for(server.url)
    with pytest.raises(ConnectionClosedError):
        carrier.send(request(server.url))
    carrier.close()


def test_no_answer_within_the_read_timeout_is_a_read_timeout(
    serve: list[ScriptedServer], carrier_for: MakeCarrier
) -> None:
    server = scripted(serve, b"HTTP/1.1 200 OK\r\n")  # a head that never ends
    carrier = carrier_for(server.url, read_timeout_s=0.2)
    with pytest.raises(ReadTimeoutError):
        carrier.send(request(server.url))
    carrier.close()


def test_a_request_for_another_origin_is_refused(
    serve: list[ScriptedServer], carrier_for: MakeCarrier
) -> None:
    server = scripted(serve)
    carrier = carrier_for(server.url)
    with pytest.raises(HTTPClientError):
        carrier.send(request("http://127.0.0.2:1"))
    assert server.requests == []
    carrier.close()


def test_on_the_event_loop_a_burst_waits_for_the_pools_connections_instead_of_opening_more(
    serve: list[ScriptedServer], loop_thread: LoopThread
) -> None:
    burst, pool_size = 24, 3
    answers = [f"HTTP/1.1 200 OK\r\nContent-Length: {len(str(n))}\r\n\r\n{n}".encode() for n in range(burst)]
    server = scripted(serve, *answers)
    carrier = LoopHttpCarrier(
        Origin.from_url(server.url), connect_timeout_s=2.0, read_timeout_s=5.0, pool_size=pool_size
    )

    async def send_all() -> list[bytes]:
        responses = await asyncio.gather(*(carrier.send(request(server.url)) for _ in range(burst)))
        return [response.content for response in responses]

    seen = loop_thread.run(send_all())
    assert sorted(seen, key=int) == [str(n).encode() for n in range(burst)]  # each answer once
    assert server.connections == pool_size
    carrier.close()


def test_on_the_event_loop_a_cancelled_request_never_leaves_its_connection_for_the_next(
    serve: list[ScriptedServer], loop_thread: LoopThread
) -> None:
    server = scripted(serve, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", OK)  # the first head never ends
    carrier = LoopHttpCarrier(
        Origin.from_url(server.url), connect_timeout_s=2.0, read_timeout_s=5.0, pool_size=4
    )

    async def cancel_then_send() -> bytes:
        waiting = asyncio.ensure_future(carrier.send(request(server.url)))
        while not server.requests:
            await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return (await carrier.send(request(server.url))).content

    # Were the first connection reused, the rest of its answer would be read as the second's.
    assert loop_thread.run(cancel_then_send()) == b"{}"
    assert server.connections == 2
    carrier.close()


def test_on_the_event_loop_an_answer_that_came_while_the_loop_was_busy_is_no_timeout(
    loop_thread: LoopThread,
) -> None:
    """The read timeout is a socket's: time without bytes, not a stall of the loop itself."""
    listener = socket.create_server(("127.0.0.1", 0))
    received = threading.Event()

    def answer_late() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            received.set()
            time.sleep(0.1)  # the answer comes 0.1 s into the loop's 0.5 s stall
            connection.sendall(OK)
            connection.recv(1)  # until the client closes

    server = threading.Thread(target=answer_late, daemon=True)
    server.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    carrier = LoopHttpCarrier(Origin.from_url(url), connect_timeout_s=2.0, read_timeout_s=0.3, pool_size=4)

    async def send_while_the_loop_stalls() -> bytes:
        sending = asyncio.ensure_future(carrier.send(request(url)))
        while not received.is_set():
            await asyncio.sleep(0.002)
        time.sleep(0.5)  # the loop blocked past the read timeout, the answer arriving meanwhile
        return (await sending).content

    try:
        assert loop_thread.run(send_while_the_loop_stalls()) == b"{}"
    finally:
        carrier.close()
        loop_thread.run(asyncio.sleep(0))
        server.join(timeout=5)
        listener.close()


class GatedServer:
    """Answers every request with OK (keep-alive), but only once the gate is open."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.gate = threading.Event()
        self.received = 0
        self.connections = 0
        self.closed_by_client = 0
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            worker = threading.Thread(target=self._serve, args=(connection,), daemon=True)
            self._threads.append(worker)
            worker.start()

    def _serve(self, connection: socket.socket) -> None:
        connection.settimeout(5)
        with connection:
            try:
                while connection.recv(65536):  # each request is small enough for one read
                    self.received += 1
                    self.gate.wait(10)
                    connection.sendall(OK)
            except TimeoutError:
                return  # the client kept it open
            self.closed_by_client += 1

    @staticmethod
    def _until(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 3
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert condition()

    def wait_for(self, requests: int) -> None:
        self._until(lambda: self.received >= requests)

    def wait_for_closed(self, connections: int) -> None:
        self._until(lambda: self.closed_by_client >= connections)

    def stop(self) -> None:
        self.gate.set()
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self.listener.close()


@pytest.fixture
def gated() -> Iterator[GatedServer]:
    server = GatedServer()
    yield server
    server.stop()


def test_on_the_event_loop_closing_from_another_thread_lets_requests_in_flight_finish_and_keeps_none(
    gated: GatedServer, loop_thread: LoopThread
) -> None:
    carrier = LoopHttpCarrier(
        Origin.from_url(gated.url), connect_timeout_s=2.0, read_timeout_s=5.0, pool_size=4
    )
    in_flight = [
        asyncio.run_coroutine_threadsafe(carrier.send(request(gated.url)), loop_thread.loop) for _ in range(2)
    ]
    gated.wait_for(2)

    carrier.close()  # from the test's thread, while both wait for their answers
    gated.gate.set()

    assert [future.result(timeout=5).content for future in in_flight] == [b"{}", b"{}"]
    gated.wait_for_closed(2)  # closed once answered, not kept for a pool that is gone
    assert loop_thread.run(carrier.send(request(gated.url))).content == b"{}"
    assert gated.connections == 3


def test_on_the_event_loop_a_request_cancelled_while_waiting_for_a_connection_frees_nothing_it_never_held(
    gated: GatedServer, loop_thread: LoopThread
) -> None:
    carrier = LoopHttpCarrier(
        Origin.from_url(gated.url), connect_timeout_s=2.0, read_timeout_s=5.0, pool_size=1
    )

    async def cancel_a_waiter_then_send() -> list[bytes]:
        holding = asyncio.ensure_future(carrier.send(request(gated.url)))
        while gated.received < 1:
            await asyncio.sleep(0.005)
        waiting = asyncio.ensure_future(carrier.send(request(gated.url)))  # no free connection
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        gated.gate.set()
        first = (await holding).content
        again = await asyncio.wait_for(carrier.send(request(gated.url)), 5)  # the one slot is free
        return [first, again.content]

    assert loop_thread.run(cancel_a_waiter_then_send()) == [b"{}", b"{}"]
    assert gated.connections == 1 and gated.received == 2
    carrier.close()


@pytest.mark.parametrize(
    ("url", "host_header"),
    [
        ("https://kms.eu-west-1.amazonaws.com/", "kms.eu-west-1.amazonaws.com"),
        ("https://kms.eu-west-1.amazonaws.com:443/", "kms.eu-west-1.amazonaws.com"),
        ("http://127.0.0.1:4599/", "127.0.0.1:4599"),
        ("http://[::1]:8080/", "[::1]:8080"),
        ("HTTPS://KMS.example.com:8443", "kms.example.com:8443"),
    ],
)
def test_the_host_header_is_named_as_botocore_signs_it(url: str, host_header: str) -> None:
    assert Origin.from_url(url).host_header == host_header
