"""Every KMS call has an overall deadline (PIIVAULT_KMS_CALL_DEADLINE_S), on either transport.

A server that drips `100 Continue` lines (or any bytes) never trips a socket's read timeout,
which bounds each wait for bytes, not the call: without the deadline it held a call for as long
as it kept dripping. Past the deadline a call is key_service_unavailable, retryable: 503 with
Retry-After, or a retryable item in a batch. The only timing asserted is a generous bound (five
times the deadline) showing that the call did not hang.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.container import Vault
from app.crypto.kms import KmsKeyProvider
from app.errors import KeyServiceUnavailable
from app.settings import Settings
from tests.conftest import Actors, ClientFactory, LoopThread, assert_error, bearer, make_settings
from tests.test_failures import assert_retry_after, record_count

DEADLINE_S = 1.0
HANG_BOUND_S = 5 * DEADLINE_S
KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555"
LICENCE = {"customer_id": "12345", "data_type": "DriverLicense", "value": "D1234-56789-01234"}


class DrippingServer:
    """Reads each request, then answers `100 Continue` again and again, a line at a time, and
    never a final answer: every read gets bytes well within any read timeout."""

    INTERIM = b"HTTP/1.1 100 Continue\r\n\r\n"

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.requests = 0
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
            worker = threading.Thread(target=self._drip, args=(connection,), daemon=True)
            self._threads.append(worker)
            worker.start()

    def _drip(self, connection: socket.socket) -> None:
        with connection:
            connection.settimeout(5)
            try:
                if not connection.recv(65536):
                    return
                self.requests += 1
                while not self._stopping.is_set():
                    for byte in self.INTERIM:  # one byte at a time, as a slow drip
                        connection.sendall(bytes([byte]))
                        time.sleep(self.interval_s / len(self.INTERIM))
            except OSError:
                return  # the client gave up and closed: what the deadline is for

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self.listener.close()


@pytest.fixture
def dripping() -> Iterator[DrippingServer]:
    server = DrippingServer()
    yield server
    server.stop()


def provider(url: str, transport: str) -> KmsKeyProvider:
    return KmsKeyProvider(
        KEY_ARN,  # an ARN: no DescribeKey first
        endpoint_url=url,
        region="us-east-1",
        read_timeout_s=0.5,
        max_attempts=2,
        call_deadline_s=DEADLINE_S,
        transport=transport,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("transport", ["lean", "boto3"])
@pytest.mark.parametrize("operation", ["GenerateDataKey", "Decrypt"])
def test_a_data_key_call_to_a_dripping_server_fails_retryably_at_its_deadline(
    dripping: DrippingServer, loop_thread: LoopThread, transport: str, operation: str
) -> None:
    keys = provider(dripping.url, transport)
    context = {"customerID": "12345", "dataType": "DriverLicense"}
    try:
        started = time.monotonic()
        with pytest.raises(KeyServiceUnavailable) as raised:
            if operation == "GenerateDataKey":
                loop_thread.run(keys.generate_data_key(context))
            else:
                loop_thread.run(keys.decrypt_data_key(b"wrapped", context, key_id=KEY_ARN))
        elapsed = time.monotonic() - started
    finally:
        keys.close()
    assert raised.value.retryable
    assert raised.value.code == "key_service_unavailable"
    assert dripping.requests >= 1  # it was the server's drip that held the call, not a refusal
    assert elapsed < HANG_BOUND_S, f"the call took {elapsed:.1f} s"


def test_a_blocking_call_to_a_dripping_server_fails_retryably_at_its_deadline(
    dripping: DrippingServer,
) -> None:
    """DescribeKey (start-up and /readyz), CreateGrant and RevokeGrant go by boto3's client in a
    thread; the caller stops waiting at the deadline too."""
    keys = provider(dripping.url, "boto3")
    try:
        started = time.monotonic()
        with pytest.raises(KeyServiceUnavailable) as raised:
            keys.check()
        elapsed = time.monotonic() - started
    finally:
        keys.close()
    assert raised.value.retryable
    assert dripping.requests >= 1
    assert elapsed < HANG_BOUND_S, f"the call took {elapsed:.1f} s"


def test_readyz_with_a_dripping_kms_is_503_with_retry_after(
    dripping: DrippingServer, make_client: ClientFactory
) -> None:
    _, client = make_client(
        KEY_ARN,
        kms_endpoint_url=dripping.url,
        kms_read_timeout_s=0.5,
        kms_call_deadline_s=DEADLINE_S,
        kms_mirror_grants=False,
        ready_cache_s=0,
    )
    started = time.monotonic()
    response = client.get("/readyz")
    assert time.monotonic() - started < HANG_BOUND_S
    assert_error(response, 503, "key_service_unavailable")
    assert_retry_after(response)


class HeldKms:
    """A KMS stand-in on the vault's own client: holds every `operation` call until released."""

    def __init__(self, vault: Vault, operation: str) -> None:
        assert isinstance(vault.keys, KmsKeyProvider)
        self.released = threading.Event()
        self.calls = 0
        vault.keys.client.meta.events.register(f"before-send.kms.{operation}", self)

    def __call__(self, **_: Any) -> None:
        self.calls += 1
        self.released.wait(30)


@pytest.fixture
def settings(database_url: str, kms_key_id: str) -> Settings:
    # boto3's transport: a held call holds a thread, not the event loop (see HeldKms).
    return make_settings(
        database_url,
        kms_key_id,
        kms_transport="boto3",
        kms_read_timeout_s=0.5,
        kms_call_deadline_s=DEADLINE_S,
    )


def test_a_tokenize_held_past_the_deadline_is_503_with_retry_after_and_stores_nothing(
    client: TestClient, vault: Vault, actors: Actors, db: Any
) -> None:
    held = HeldKms(vault, "GenerateDataKey")
    try:
        started = time.monotonic()
        response = client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding))
        assert time.monotonic() - started < HANG_BOUND_S
    finally:
        held.released.set()
    assert_error(response, 503, "key_service_unavailable")
    assert_retry_after(response)
    assert held.calls >= 1
    assert record_count(db) == 0


def test_a_batch_item_held_past_the_deadline_is_retryable(
    client: TestClient, vault: Vault, actors: Actors
) -> None:
    token = client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding)).json()["token"]
    held = HeldKms(vault, "Decrypt")
    try:
        response = client.post(
            "/v1/tokens/detokenize", json={"tokens": [token, "tok_" + "A" * 32]}, headers=bearer(actors.kyc)
        )
    finally:
        held.released.set()
    assert response.status_code == 200, response.text
    held_item, unknown = response.json()["results"]
    assert held_item["error"]["code"] == "key_service_unavailable"
    assert held_item["error"]["retryable"] is True
    assert unknown["error"]["code"] == "not_found"
    assert LICENCE["value"] not in response.text


@pytest.mark.parametrize("deadline", [0, -1, 121])
def test_a_deadline_out_of_range_is_refused(deadline: float) -> None:
    with pytest.raises(ValidationError):
        make_settings("postgresql://unused/unused", None, kms_call_deadline_s=deadline)


def test_a_deadline_shorter_than_the_read_timeout_is_refused() -> None:
    with pytest.raises(ValidationError, match="PIIVAULT_KMS_CALL_DEADLINE_S"):
        make_settings("postgresql://unused/unused", None, kms_read_timeout_s=5, kms_call_deadline_s=2)
    assert make_settings("postgresql://unused/unused", None).kms_call_deadline_s >= 1
