"""The floor: a minimal FastAPI app that validates the same body and does one INSERT into an
equivalent table, with no crypto, no auth and no audit. What the vault is measured against.

Two apps, one per concurrency model, both in autocommit (one round trip an insert):
- `floor_app:app`: a sync endpoint on psycopg's pool (FastAPI runs it in its thread pool);
- `floor_app:async_app`: an async endpoint on psycopg's async pool, the model the vault's data
  path uses; the tokenize target is measured against this one.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI
from psycopg_pool import AsyncConnectionPool, ConnectionPool
from pydantic import BaseModel, ConfigDict, Field, StrictStr

DATABASE_URL = os.environ["FLOOR_DATABASE_URL"]
TABLE = """CREATE TABLE IF NOT EXISTS floor_records (
               token text PRIMARY KEY, customer_id text NOT NULL, data_type text NOT NULL,
               value bytea NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"""
# Every worker creates the table at start; CREATE TABLE IF NOT EXISTS is not safe against a
# concurrent one (a unique violation in pg_type), so the workers take turns.
_CREATE_LOCK = "SELECT pg_advisory_xact_lock(7340001)"
INSERT = "INSERT INTO floor_records (token, customer_id, data_type, value) VALUES (%s, %s, %s, %s)"
CONNECTION: dict[str, Any] = {"autocommit": True}


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    customer_id: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]
    data_type: Annotated[StrictStr, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$")]
    value: Annotated[StrictStr, Field(min_length=1, max_length=4096)]


def _token() -> str:
    return "tok_" + secrets.token_urlsafe(24)


# The sync floor: its pool opens at import, in the worker process.
app = FastAPI()
_pool: ConnectionPool[Any] | None = None


def _sync_pool() -> ConnectionPool[Any]:
    global _pool
    if _pool is None:
        _pool = ConnectionPool(DATABASE_URL, min_size=4, max_size=20, kwargs=CONNECTION, open=True)
        with _pool.connection() as connection, connection.transaction():
            connection.execute(_CREATE_LOCK)
            connection.execute(TABLE)
    return _pool


@app.post("/v1/tokens", status_code=201)
def tokenize(body: TokenizeRequest) -> dict[str, str]:
    token = _token()
    with _sync_pool().connection() as connection:
        connection.execute(INSERT, (token, body.customer_id, body.data_type, body.value.encode()))
    return {"token": token, "customer_id": body.customer_id, "data_type": body.data_type}


# The async floor: a pool belongs to its event loop, so it opens with the app.
_async_pool = AsyncConnectionPool(DATABASE_URL, min_size=4, max_size=20, kwargs=CONNECTION, open=False)


@asynccontextmanager
async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
    await _async_pool.open()
    async with _async_pool.connection() as connection, connection.transaction():
        await connection.execute(_CREATE_LOCK)
        await connection.execute(TABLE)
    yield
    await _async_pool.close()


async_app = FastAPI(lifespan=_lifespan)


@async_app.post("/v1/tokens", status_code=201)
async def tokenize_async(body: TokenizeRequest) -> dict[str, str]:
    token = _token()
    async with _async_pool.connection() as connection:
        await connection.execute(INSERT, (token, body.customer_id, body.data_type, body.value.encode()))
    return {"token": token, "customer_id": body.customer_id, "data_type": body.data_type}
