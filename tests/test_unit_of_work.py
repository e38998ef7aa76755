"""The data path takes a database connection per statement, never across a key-service call: a
stalled KMS cannot drain the pool and starve unrelated requests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

from app.container import Vault, build_key_provider, build_vault
from app.crypto.keys import DataKey, EncryptionContext, KeyProvider
from app.main import create_app
from tests.conftest import bearer, create_admin, create_grant, create_principal, make_settings

LICENCE = {"customer_id": "12345", "data_type": "DriverLicense", "value": "D1234-56789-01234"}
STALLED_REQUESTS = 6


class StalledKeys:
    """A key provider whose GenerateDataKey waits until released, as a KMS brownout does."""

    def __init__(self, inner: KeyProvider) -> None:
        self.inner = inner
        self.waiting = 0
        self.release: asyncio.Event | None = None

    @property
    def key_id(self) -> str:
        return self.inner.key_id

    async def generate_data_key(self, context: EncryptionContext) -> DataKey:
        if self.release is not None:
            self.waiting += 1
            await self.release.wait()
        return await self.inner.generate_data_key(context)

    async def decrypt_data_key(self, wrapped: bytes, context: EncryptionContext, *, key_id: str) -> DataKey:
        return await self.inner.decrypt_data_key(wrapped, context, key_id=key_id)

    async def reencrypt_data_key(
        self, wrapped: bytes, context: EncryptionContext, *, key_id: str, to_key_id: str
    ) -> DataKey:
        return await self.inner.reencrypt_data_key(wrapped, context, key_id=key_id, to_key_id=to_key_id)

    def check(self) -> None:
        self.inner.check()

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def stalled_vault(database_url: str, kms_key_id: str, db: psycopg.Connection[Any]) -> Iterator[Vault]:
    # A data-path pool of two connections, far fewer than the requests that will stall.
    settings = make_settings(database_url, kms_key_id, db_pool_size=1, db_max_overflow=1)
    inner, mirror = build_key_provider(settings)
    vault = build_vault(settings, keys=StalledKeys(inner), mirror=mirror)
    yield vault
    vault.close()


def test_a_stalled_key_service_holds_no_database_connection(stalled_vault: Vault) -> None:
    vault = stalled_vault
    keys = vault.keys
    assert isinstance(keys, StalledKeys)
    # Seed through the API (its own event loop, so the data pool is closed again afterwards).
    with TestClient(create_app(vault), raise_server_exceptions=False) as client:
        admin = create_admin(vault)
        onboarding = create_principal(client, admin, "onboarding-app")["api_key"]
        kyc = create_principal(client, admin, "kyc-app")["api_key"]
        create_grant(client, admin, grantee="onboarding-app", operations=["Encrypt"])
        create_grant(client, admin, grantee="kyc-app", operations=["Decrypt"])
        known = client.post("/v1/tokens", json=LICENCE, headers=bearer(onboarding)).json()["token"]

    async def scenario() -> None:
        keys.release = asyncio.Event()
        transport = httpx.ASGITransport(app=create_app(vault))
        async with httpx.AsyncClient(transport=transport, base_url="http://vault") as http:
            stalled = [
                asyncio.create_task(http.post("/v1/tokens", json=LICENCE, headers=bearer(onboarding)))
                for _ in range(STALLED_REQUESTS)
            ]
            while keys.waiting < STALLED_REQUESTS:
                await asyncio.sleep(0.01)
            pool = vault.database._data_pool
            assert pool is not None
            stats = pool.get_stats()
            in_use = stats.get("pool_size", 0) - stats.get("pool_available", 0)
            # Every stalled request is waiting on the key service, none on a statement.
            assert in_use == 0, stats
            assert stats.get("requests_waiting", 0) == 0, stats

            # Other callers' data-path requests and the admin routes still get connections.
            other = await http.get(f"/v1/tokens/{known}", headers=bearer(kyc))
            assert other.status_code == 200, other.text
            assert other.json()["value"] == LICENCE["value"]
            admin_list = await http.get("/v1/principals", headers=bearer(admin))
            assert admin_list.status_code == 200, admin_list.text

            keys.release.set()
            answers = await asyncio.gather(*stalled)
            assert [answer.status_code for answer in answers] == [201] * STALLED_REQUESTS
        await vault.database.close_data_path()

    asyncio.run(scenario())
