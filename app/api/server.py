"""The HTTP/1.1 connection as `piivault serve` runs it: uvicorn's httptools protocol with the
limits it lacks. uvicorn bounds neither the size of a request's head on httptools (h11's
`h11_max_incomplete_event_size` answers 400, not 431) nor the time a client may take to send its
head or body (its keep-alive timeout only runs between requests), so one slow client could hold
a connection for ever (slowloris) and one large head could take any amount of memory.

- The request line and headers together: above `max_header_bytes`, 431 and the connection closed.
- The head must arrive within `header_read_timeout_s` of the connection opening or of the
  request's first byte, the body within `body_read_timeout_s` of the head: else 408 (or, once a
  response has started, just the close).
- A refusal closes lingering: the write side first, input dropped for LINGER_S, then the close.
"""

from __future__ import annotations

import asyncio
import json
import logging
from functools import lru_cache

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app import errors
from app.api.errors import status_of
from app.settings import get_settings

log = logging.getLogger("piivault.server")

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
# How long a refused connection keeps reading (and dropping) before it closes.
LINGER_S = 2.0


@lru_cache(maxsize=1)
def _limits() -> tuple[int, float, float]:
    settings = get_settings()
    return settings.max_header_bytes, settings.header_read_timeout_s, settings.body_read_timeout_s


def error_response(err: errors.VaultError) -> bytes:
    """A whole HTTP/1.1 response in the vault's one error shape, closing the connection. (No
    request id: the request was never whole.)"""
    status = status_of(err)
    body = json.dumps({"error": {"code": err.code, "message": err.message, "request_id": None}}).encode()
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"cache-control: no-store\r\nx-content-type-options: nosniff\r\nconnection: close\r\n\r\n"
    ) % (status, _REASONS.get(status, b"Error"), len(body))
    return head + body


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a request already answered."""


class VaultHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bound on the request head and read deadlines."""

    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.max_header_bytes, self.header_timeout_s, self.body_timeout_s = _limits()
        self._reading_head = True
        self._head_bytes = 0
        self._head_size = 0
        # One timer per connection, moved lazily: arming and disarming on every request only set
        # the deadline (loop time) and what it is for; the timer, when it fires, either refuses
        # the request or sleeps until the deadline that stands then. (A timer per phase cost two
        # call_later and two cancels per request.)
        self._deadline: float | None = None
        self._waiting_for = ""
        self._timer: asyncio.TimerHandle | None = None
        # Answered and closing: what the client still sends is read and dropped (see _refuse).
        self._lingering = False

    def _arm(self, seconds: float, what: str) -> None:
        self._deadline = self.loop.time() + seconds
        self._waiting_for = what
        if self._timer is not None and self._timer.when() > self._deadline:
            self._timer.cancel()  # set for a later deadline: this one comes first
            self._timer = None
        if self._timer is None:
            self._timer = self.loop.call_at(self._deadline, self._check_deadline)

    def _disarm(self) -> None:
        self._deadline = None

    def _check_deadline(self) -> None:
        self._timer = None
        if self._deadline is None:
            return  # disarmed; the next _arm starts a timer again
        if self._deadline > self.loop.time():
            self._timer = self.loop.call_at(self._deadline, self._check_deadline)
            return
        self._timed_out(self._waiting_for)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A connection that never sends a byte is held to the header deadline too.
        self._arm(self.header_timeout_s, "headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        if self._reading_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # Still no end of the head after this much: refuse before httptools buffers more.
        too_large = self._reading_head and self._head_bytes > self.max_header_bytes
        if too_large and not self.transport.is_closing():
            self._refuse(self._too_large())

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_head = True
        self._head_size = 0
        if self._deadline is None:  # not already running since the connection opened
            self._arm(self.header_timeout_s, "headers")

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._head_bytes = 0
        if self._head_size > self.max_header_bytes:
            # The whole head came in one read: refused before the application sees it, and the
            # parser stopped (uvicorn's 400 for the parser error is not sent on a closed transport).
            self._refuse(self._too_large())
            raise _Refused
        self._arm(self.body_timeout_s, "body")
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if not self._lingering and not self.transport.is_closing():
            super().send_400_response(msg)

    def _too_large(self) -> errors.HeadersTooLarge:
        return errors.HeadersTooLarge(f"the request line and headers exceed {self.max_header_bytes} bytes")

    def on_message_complete(self) -> None:
        self._disarm()
        self._reading_head = True
        super().on_message_complete()

    def _timed_out(self, what: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        client = self.client[0] if self.client else "-"
        log.info("connection from %s closed: the request %s did not arrive in time (408)", client, what)
        if self.cycle is not None and not self.cycle.response_complete and self.cycle.response_started:
            self.transport.close()  # a response is under way: it cannot become a 408 any more
            return
        self._refuse(errors.RequestTimeout(f"the request {what} did not arrive in time"))

    def _refuse(self, err: errors.VaultError) -> None:
        self._disarm()
        if isinstance(err, errors.HeadersTooLarge):
            client = self.client[0] if self.client else "-"
            log.info(
                "connection from %s closed: request head over %d bytes (431)", client, self.max_header_bytes
            )
        if self.cycle is not None and not self.cycle.response_complete:
            # The application's answer, if it ever comes, goes nowhere.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.write(error_response(err))
        # A lingering close: closing at once with the client still sending makes the kernel reset
        # the connection, and the client may lose the answer. So the write side is shut (the
        # client reads the answer, then the end), input is dropped a moment longer, then close.
        self._lingering = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)
