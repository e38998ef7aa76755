"""What `piivault serve` enforces on the connection itself, on a real socket against a served
process (TestClient has no HTTP parser): the size of the request head (431), and deadlines for
the head and the body (408, then the connection closed), so slow clients are dropped."""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.processes import free_port, running, wait_for_http

PIIVAULT = Path(sys.executable).parent / "piivault"
MAX_HEADER_BYTES = 8192
# Generous: the deadlines are 1 s; this only bounds how long a broken server could hang a test.
BOUND_S = 30.0

pytestmark = pytest.mark.skipif(not PIIVAULT.exists(), reason=f"no piivault console script at {PIIVAULT}")


@pytest.fixture(scope="module")
def served(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """The vault served by `piivault serve` (development, the local key provider) with short
    deadlines and a small head limit."""
    tmp = tmp_path_factory.mktemp("served-limits")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIIVAULT_")}
    env.update(
        PIIVAULT_ENVIRONMENT="development",
        PIIVAULT_DATABASE_URL=database_url,
        PIIVAULT_DATA_DIR=str(tmp / "data"),
        PIIVAULT_MAX_HEADER_BYTES=str(MAX_HEADER_BYTES),
        PIIVAULT_HEADER_READ_TIMEOUT_S="1",
        PIIVAULT_BODY_READ_TIMEOUT_S="1",
        PIIVAULT_GRANT_SWEEP_INTERVAL_S="0",
        PIIVAULT_AUDIT_SEAL_INTERVAL_S="0",
        PYTHONUNBUFFERED="1",
    )
    port = free_port()
    args = [str(PIIVAULT), "serve", "--port", str(port), "--no-migrate"]
    with running("vault-limits", args, env=env, log_dir=tmp / "logs") as process:
        wait_for_http(process, f"http://127.0.0.1:{port}/healthz")
        yield "127.0.0.1", port


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (bounded by BOUND_S)."""
    sock.settimeout(BOUND_S)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def read_response(sock: socket.socket) -> bytes:
    """One whole response (by its Content-Length), leaving the connection open."""
    sock.settimeout(BOUND_S)
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def status_and_body(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def test_a_head_over_the_limit_is_431_and_the_connection_closed(served: tuple[str, int]) -> None:
    with socket.create_connection(served, timeout=BOUND_S) as sock:
        pad = b"a" * (MAX_HEADER_BYTES + 100)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: vault\r\nX-Pad: " + pad + b"\r\n\r\n")
        status, body = status_and_body(read_all(sock))
    assert status == 431
    assert body["error"]["code"] == "headers_too_large"  # type: ignore[index]


def test_a_head_that_never_ends_is_431_once_past_the_limit(served: tuple[str, int]) -> None:
    """A head still incomplete past the limit is refused then, not buffered until it ends."""
    with socket.create_connection(served, timeout=BOUND_S) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: vault\r\nX-Pad: " + b"b" * 6000)
        time.sleep(0.2)  # two reads on the server's side, all of it read: a clean close after
        sock.sendall(b"b" * 6000)  # no end of the head, ever
        raw = read_all(sock)
    assert raw.startswith(b"HTTP/1.1 431 ")


def test_a_head_under_the_limit_is_served(served: tuple[str, int]) -> None:
    host, port = served
    response = httpx.get(f"http://{host}:{port}/healthz", headers={"X-Pad": "c" * (MAX_HEADER_BYTES - 1024)})
    assert response.status_code == 200


def test_a_slow_head_is_408_and_the_connection_dropped(served: tuple[str, int]) -> None:
    """Slowloris: a byte now and then, never the end of the head. The deadline is for the whole
    head, not for each read."""
    with socket.create_connection(served, timeout=BOUND_S) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: vault\r\nX-Slow: ")
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < BOUND_S:
            readable, _, _ = select.select([sock], [], [], 0.2)
            if readable:
                closed = True
                break
            try:
                sock.sendall(b"s")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        assert closed, "the server kept a slow head's connection open"
        raw = read_all(sock)
    assert raw.startswith(b"HTTP/1.1 408 ")
    assert status_and_body(raw)[1]["error"]["code"] == "request_timeout"  # type: ignore[index]


def test_a_connection_that_sends_nothing_is_dropped(served: tuple[str, int]) -> None:
    with socket.create_connection(served, timeout=BOUND_S) as sock:
        raw = read_all(sock)  # returns once the server closes
    assert raw == b"" or raw.startswith(b"HTTP/1.1 408 ")


def test_a_slow_body_is_408_and_the_connection_dropped(served: tuple[str, int]) -> None:
    with socket.create_connection(served, timeout=BOUND_S) as sock:
        sock.sendall(
            b"POST /v1/tokens HTTP/1.1\r\nHost: vault\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"customer_id": '
        )
        raw = read_all(sock)
    assert raw.startswith(b"HTTP/1.1 408 ")


def test_requests_on_one_kept_alive_connection_each_get_their_deadline(served: tuple[str, int]) -> None:
    with socket.create_connection(served, timeout=BOUND_S) as sock:
        for _ in range(3):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: vault\r\n\r\n")
            answer = read_response(sock)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
            time.sleep(0.6)  # within keep-alive; longer than half a deadline in total


def test_a_slow_head_after_a_kept_alive_request_gets_its_own_whole_deadline(served: tuple[str, int]) -> None:
    """The connection's timer, set during the first request, must neither cut the second request
    short (its deadline runs from its own first byte) nor forget it."""
    with socket.create_connection(served, timeout=BOUND_S) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: vault\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        time.sleep(0.6)  # the first request's timer is still due, earlier than the next deadline
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: vault\r\nX-Slow: ")
        raw = read_all(sock)
        waited = time.monotonic() - started
    assert raw.startswith(b"HTTP/1.1 408 "), raw[:200]
    assert waited >= 0.9  # the deadline is 1 s from this request's first byte
