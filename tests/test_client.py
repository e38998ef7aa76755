"""piivault.client against the real app in this process (its TestClient as the client's httpx
transport): typed errors, retries honouring Retry-After with one Idempotency-Key per call, batches
split at the server's maximum, retryable items sent again as a new batch under a new key."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

import app.errors as server_errors
import piivault.client as client_module
from app.api.errors import status_of
from app.container import Vault
from app.crypto.keys import DataKey, EncryptionContext
from app.errors import KeyAccessDenied, KeyServiceUnavailable
from piivault.client import (
    BY_CODE,
    ERROR_TABLE,
    GrantRequired,
    Tokenized,
    TokenizeItem,
    Unauthenticated,
    VaultClient,
    VaultError,
)
from piivault.client import (
    KeyServiceUnavailable as ClientKeyServiceUnavailable,
)
from tests.conftest import Actors, ClientFactory, build_seed

LICENCE: dict[str, Any] = {"customer_id": "12345", "data_type": "DriverLicense", "value": "D1234-56789-01234"}


class Recorder:
    """The requests the client sent (method, path, Idempotency-Key, body) and the pauses it took."""

    def __init__(self, test_client: TestClient, vault_client: VaultClient) -> None:
        self.sent: list[tuple[str, str, str | None, bytes]] = []
        self.pauses: list[float] = []
        test_client.event_hooks["request"].append(self._request)
        vault_client._sleep = self.pauses.append

    def _request(self, request: httpx.Request) -> None:
        self.sent.append(
            (request.method, request.url.path, request.headers.get("Idempotency-Key"), request.content)
        )

    def posts(self, path: str) -> list[tuple[str, str, str | None, bytes]]:
        return [sent for sent in self.sent if sent[:2] == ("POST", path)]


@pytest.fixture
def vault_client(client: TestClient, actors: Actors) -> Iterator[VaultClient]:
    with VaultClient("http://testserver", api_key=actors.onboarding, http_client=client) as vault:
        yield vault


def records(db: psycopg.Connection[Any]) -> int:
    row = db.execute("SELECT count(*) FROM records").fetchone()
    assert row is not None
    return int(row[0])


def failing_once(
    vault: Vault, monkeypatch: pytest.MonkeyPatch, error: Exception, customer: str | None = None
) -> list[str]:
    """GenerateDataKey fails once (for this customer, or the first call), then works."""
    failed: list[str] = []
    inner = vault.keys.generate_data_key

    async def flaky(context: EncryptionContext) -> DataKey:
        if not failed and customer in (None, context["customerID"]):
            failed.append(context["customerID"])
            raise error
        return await inner(context)

    monkeypatch.setattr(vault.keys, "generate_data_key", flaky)
    return failed


def test_tokenize_and_detokenize_give_typed_results(
    client: TestClient, actors: Actors, vault_client: VaultClient
) -> None:
    result = vault_client.tokenize(**LICENCE)
    assert isinstance(result, Tokenized) and result.token.startswith("tok_") and result.created_at is not None
    with VaultClient("http://testserver", api_key=actors.kyc, http_client=client) as kyc:
        revealed = kyc.detokenize(result.token, reason="loan 991")
    assert (revealed.value, revealed.customer_id, revealed.data_type) == (
        LICENCE["value"],
        "12345",
        "DriverLicense",
    )
    assert LICENCE["value"] not in repr(revealed) and actors.kyc not in repr(kyc)
    assert vault_client.limits().max_batch_items == 1000


def test_errors_are_typed_with_code_status_and_request_id(
    client: TestClient, actors: Actors, vault_client: VaultClient
) -> None:
    token = vault_client.tokenize(**LICENCE).token
    with pytest.raises(GrantRequired) as refused:
        vault_client.detokenize(token)
    error = refused.value
    assert isinstance(error, VaultError)
    assert (error.code, error.status, error.retryable) == ("grant_required", 403, False)
    assert error.request_id
    with (
        pytest.raises(Unauthenticated),
        VaultClient("http://testserver", api_key="pv_nope", http_client=client) as bad,
    ):
        bad.tokenize(**LICENCE)


def test_every_server_error_code_has_its_class() -> None:
    def subclasses(cls: type[server_errors.VaultError]) -> Iterator[type[server_errors.VaultError]]:
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    every: set[type[server_errors.VaultError]] = {
        server_errors.VaultError,
        *subclasses(server_errors.VaultError),
    }
    for server_class in every:
        if server_class.__dict__.get("code") is None and server_class is not server_errors.VaultError:
            continue  # an abstract grouping (DependencyUnavailable, Misconfigured)
        client_class = BY_CODE[server_class.code]
        assert client_class.retryable == server_class.retryable, server_class
        assert client_class.status == status_of(server_class.__new__(server_class)), server_class
    for name, code, *_ in ERROR_TABLE:
        assert getattr(client_module, name) is BY_CODE[code]
        assert issubclass(BY_CODE[code], VaultError)


def test_a_503_is_retried_after_retry_after_under_the_same_key(
    client: TestClient,
    vault: Vault,
    vault_client: VaultClient,
    db: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = Recorder(client, vault_client)
    failed = failing_once(vault, monkeypatch, KeyServiceUnavailable())
    result = vault_client.tokenize(**LICENCE)
    assert failed and records(db) == 1
    tries = recorder.posts("/v1/tokens")
    assert len(tries) == 2 and tries[0][2] is not None and tries[0][2] == tries[1][2]
    assert recorder.pauses == [float(vault.settings.retry_after_s)]
    # Another logical call, another key.
    vault_client.tokenize(**LICENCE)
    assert recorder.posts("/v1/tokens")[-1][2] not in (None, tries[0][2])
    assert result.token


def test_a_503_an_operator_must_fix_is_not_retried(
    client: TestClient, vault: Vault, vault_client: VaultClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder(client, vault_client)
    failing_once(vault, monkeypatch, KeyAccessDenied())
    with pytest.raises(VaultError) as refused:
        vault_client.tokenize(**LICENCE)
    assert refused.value.code == "key_access_denied" and not refused.value.retryable
    assert len(recorder.posts("/v1/tokens")) == 1 and recorder.pauses == []


def test_retries_stop_after_max_retries(
    client: TestClient, vault: Vault, actors: Actors, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def down(context: EncryptionContext) -> DataKey:
        raise KeyServiceUnavailable()

    monkeypatch.setattr(vault.keys, "generate_data_key", down)
    with VaultClient(
        "http://testserver", api_key=actors.onboarding, http_client=client, max_retries=2
    ) as vault_client:
        recorder = Recorder(client, vault_client)
        with pytest.raises(ClientKeyServiceUnavailable):
            vault_client.tokenize(**LICENCE)
    assert len(recorder.posts("/v1/tokens")) == 3 and len(recorder.pauses) == 2


def test_retryable_items_are_sent_again_as_a_new_batch_under_a_new_key(
    client: TestClient,
    vault: Vault,
    vault_client: VaultClient,
    db: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = Recorder(client, vault_client)
    failing_once(vault, monkeypatch, KeyServiceUnavailable(), customer="flaky")
    items: list[TokenizeItem | dict[str, str]] = [
        TokenizeItem("steady", "DriverLicense", "D1"),
        {"customer_id": "flaky", "data_type": "DriverLicense", "value": "D2"},
    ]
    results = vault_client.tokenize_batch(items)
    assert [r.customer_id for r in results if isinstance(r, Tokenized)] == ["steady", "flaky"]
    batches = recorder.posts("/v1/tokens/batch")
    assert len(batches) == 2 and batches[0][2] != batches[1][2]
    assert b"steady" in batches[0][3] and b"steady" not in batches[1][3] and b"flaky" in batches[1][3]
    assert records(db) == 2
    # An item that fails for good comes back as its error, in its place; it is not retried.
    mixed = vault_client.tokenize_batch([LICENCE, {**LICENCE, "data_type": "SSN"}])
    assert isinstance(mixed[0], Tokenized) and isinstance(mixed[1], GrantRequired)
    assert len(recorder.posts("/v1/tokens/batch")) == 3


def test_batches_are_split_at_the_servers_maximum(
    make_client: ClientFactory, kms_key_id: str, db: psycopg.Connection[Any]
) -> None:
    vault, test_client = make_client(kms_key_id, max_batch_items=2)
    actors = build_seed(test_client, vault)
    items = [{"customer_id": f"c{n}", "data_type": "DriverLicense", "value": f"D{n}"} for n in range(5)]
    with VaultClient("http://testserver", api_key=actors.onboarding, http_client=test_client) as onboarding:
        recorder = Recorder(test_client, onboarding)
        results = onboarding.tokenize_batch(items)
    assert [r.customer_id for r in results if isinstance(r, Tokenized)] == [f"c{n}" for n in range(5)]
    batches = recorder.posts("/v1/tokens/batch")
    assert len(batches) == 3 and len({key for _, _, key, _ in batches}) == 3
    tokens = [r.token for r in results if isinstance(r, Tokenized)]
    with VaultClient("http://testserver", api_key=actors.kyc, http_client=test_client) as kyc:
        recorder = Recorder(test_client, kyc)
        revealed = kyc.detokenize_batch(tokens)
    assert [r.value for r in revealed if not isinstance(r, VaultError)] == [f"D{n}" for n in range(5)]
    assert len(recorder.posts("/v1/tokens/detokenize")) == 3
