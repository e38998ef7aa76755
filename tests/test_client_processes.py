"""piivault.client against a served vault (a real process, real sockets), including retries after
a connection dropped once the server had done the work: each stores exactly one record."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest

from piivault.client import AsyncVaultClient, GrantRequired, Tokenized, VaultClient, VaultError
from tests.conftest import bearer, empty_tables
from tests.dropping_proxy import dropping_proxy
from tests.local_stack import PIIVAULT, create_admin_key, local_env, served

pytestmark = pytest.mark.skipif(not PIIVAULT.exists(), reason="the piivault console script is not installed")


@dataclass(frozen=True)
class Served:
    base_url: str
    onboarding: str
    kyc: str


@pytest.fixture(scope="module")
def vault_process(
    database_url: str, table_sequences: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """One served vault for the module (local key provider; Retry-After 1 s), with onboarding and
    KYC apps that may Encrypt and Decrypt driver's licences. The tests count records as they go
    (not with `db`, which would empty the tables under the server)."""
    tmp_path = tmp_path_factory.mktemp("client-processes")
    with psycopg.connect(database_url, autocommit=True) as connection:
        empty_tables(connection, table_sequences)
    env = local_env(database_url, tmp_path / "data") | {"PIIVAULT_RETRY_AFTER_S": "1"}
    with served("vault", env, tmp_path / "logs") as base_url:
        admin = create_admin_key(env, "client-admin", tmp_path)
        keys = {}
        with httpx.Client(base_url=base_url, headers=bearer(admin), timeout=30) as http:
            for name, operation in (("onboarding", "Encrypt"), ("kyc", "Decrypt")):
                made = http.post("/v1/principals", json={"name": name, "role": "service"})
                assert made.status_code == 201, made.text
                keys[name] = made.json()["api_key"]
                grant = {"grantee": name, "operations": [operation]}
                assert http.post("/v1/grants", json=grant).status_code == 201
        yield Served(base_url, keys["onboarding"], keys["kyc"])


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection to inspect rows with (the tables are left as they are)."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


def records(db: psycopg.Connection[Any], *tokens: str) -> int:
    row = db.execute("SELECT count(*) FROM records WHERE token = ANY(%s)", (list(tokens),)).fetchone()
    assert row is not None
    return int(row[0])


def customers(db: psycopg.Connection[Any], prefix: str) -> int:
    row = db.execute("SELECT count(*) FROM records WHERE customer_id LIKE %s", (prefix + "%",)).fetchone()
    assert row is not None
    return int(row[0])


def test_a_tokenize_whose_answer_was_lost_is_retried_and_stores_once(
    vault_process: Served, db: psycopg.Connection[Any]
) -> None:
    with dropping_proxy(vault_process.base_url, drop=1, match=b"POST /v1/tokens ") as proxy:
        with VaultClient(proxy.base_url, api_key=vault_process.onboarding) as vault:
            result = vault.tokenize(customer_id="12345", data_type="DriverLicense", value="D1234-56789-01234")
        assert proxy.dropped == 1
    assert customers(db, "12345") == 1 and records(db, result.token) == 1
    with VaultClient(vault_process.base_url, api_key=vault_process.kyc) as kyc:
        revealed = kyc.detokenize(result.token, reason="loan 991")
        assert revealed.value == "D1234-56789-01234"
        assert "D1234" not in repr(revealed)
        with pytest.raises(GrantRequired) as refused:
            VaultClient(vault_process.base_url, api_key=vault_process.onboarding).detokenize(result.token)
        assert refused.value.status == 403 and refused.value.request_id and not refused.value.retryable


def test_a_batch_whose_answer_was_lost_is_retried_and_stores_once(
    vault_process: Served, db: psycopg.Connection[Any]
) -> None:
    items = [
        {"customer_id": f"batch-{n}", "data_type": "DriverLicense", "value": f"D{n:05d}"} for n in range(5)
    ]
    with (
        dropping_proxy(vault_process.base_url, drop=2, match=b"POST /v1/tokens/batch ") as proxy,
        VaultClient(proxy.base_url, api_key=vault_process.onboarding) as vault,
    ):
        results = vault.tokenize_batch(items)
        assert proxy.dropped == 2  # the first answer, and the first retry's
    assert all(isinstance(result, Tokenized) for result in results)
    assert [r.customer_id for r in results if isinstance(r, Tokenized)] == [f"batch-{n}" for n in range(5)]
    assert customers(db, "batch-") == 5
    with VaultClient(vault_process.base_url, api_key=vault_process.kyc) as kyc:
        tokens = [r.token for r in results if isinstance(r, Tokenized)]
        revealed = kyc.detokenize_batch([*tokens, "tok_" + "x" * 32])
        assert [r.value for r in revealed[:5] if not isinstance(r, VaultError)] == [i["value"] for i in items]
        assert isinstance(revealed[5], VaultError) and revealed[5].code == "not_found"


def test_the_async_client_retries_a_lost_answer_and_stores_once(
    vault_process: Served, db: psycopg.Connection[Any]
) -> None:
    async def scenario(base_url: str) -> tuple[Tokenized, list[Any]]:
        async with AsyncVaultClient(base_url, api_key=vault_process.onboarding) as vault:
            one = await vault.tokenize(customer_id="async-1", data_type="DriverLicense", value="D9")
            many = await vault.tokenize_batch(
                [{"customer_id": "async-2", "data_type": "DriverLicense", "value": "D10"}]
            )
        return one, many

    with dropping_proxy(vault_process.base_url, drop=1, match=b"POST /v1/tokens ") as proxy:
        one, many = asyncio.run(scenario(proxy.base_url))
        assert proxy.dropped == 1
    assert customers(db, "async-") == 2

    async def read(tokens: list[str]) -> list[str | None]:
        async with AsyncVaultClient(vault_process.base_url, api_key=vault_process.kyc) as kyc:
            single = await kyc.detokenize(tokens[0])
            batch = await kyc.detokenize_batch(tokens[1:])
        return [single.value] + [r.value for r in batch if not isinstance(r, VaultError)]

    assert isinstance(many[0], Tokenized)
    assert asyncio.run(read([one.token, many[0].token])) == ["D9", "D10"]
