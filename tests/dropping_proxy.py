"""A TCP proxy that forwards requests and, for the first few that match, drops the connection
once the server has started answering: the server did the work, the client never hears of it
(a load balancer's idle timeout, a pod killed mid-response, a flaky network)."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress


class DroppingProxy:
    def __init__(self, upstream: tuple[str, int], *, drop: int, match: bytes) -> None:
        self._upstream = upstream
        self._match = match
        self._lock = threading.Lock()
        self.to_drop = drop
        self.dropped = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=10)

    def _accept(self) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select([self._listener], [], [], 0.1)
            if not readable:
                continue
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._pipe, args=(client,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _claim_drop(self, request: bytes) -> bool:
        with self._lock:
            if self.to_drop > 0 and request.startswith(self._match):
                self.to_drop -= 1
                return True
            return False

    def _pipe(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self._upstream)
        dropping = False
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select([client, upstream], [], [], 0.1)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client:
                        # A request's first bytes start with its request line.
                        dropping = dropping or self._claim_drop(data)
                        upstream.sendall(data)
                    elif dropping:
                        # The server answered (its work is committed): the client never sees it.
                        with self._lock:
                            self.dropped += 1
                        return
                    else:
                        client.sendall(data)
        finally:
            for sock in (client, upstream):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


@contextmanager
def dropping_proxy(upstream_url: str, *, drop: int, match: bytes) -> Iterator[DroppingProxy]:
    host, port = upstream_url.removeprefix("http://").split(":")
    proxy = DroppingProxy((host, int(port)), drop=drop, match=match)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
