"""The floor: a minimal FastAPI app that validates the same body and does one INSERT into an
equivalent table, with no crypto, no auth and no audit. What the vault is measured against."""

from __future__ import annotations

import os
import secrets
from typing import Annotated

from fastapi import FastAPI
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, ConfigDict, Field, StrictStr

DATABASE_URL = os.environ["FLOOR_DATABASE_URL"]
POOL = ConnectionPool(DATABASE_URL, min_size=4, max_size=20, open=True)

with POOL.connection() as connection:
    connection.execute(
        """CREATE TABLE IF NOT EXISTS floor_records (
               token text PRIMARY KEY, customer_id text NOT NULL, data_type text NOT NULL,
               value bytea NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"""
    )


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    customer_id: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]
    data_type: Annotated[StrictStr, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$")]
    value: Annotated[StrictStr, Field(min_length=1, max_length=4096)]


app = FastAPI()


@app.post("/v1/tokens", status_code=201)
def tokenize(body: TokenizeRequest) -> dict[str, str]:
    token = "tok_" + secrets.token_urlsafe(24)
    with POOL.connection() as connection:
        connection.execute(
            "INSERT INTO floor_records (token, customer_id, data_type, value) VALUES (%s, %s, %s, %s)",
            (token, body.customer_id, body.data_type, body.value.encode()),
        )
    return {"token": token, "customer_id": body.customer_id, "data_type": body.data_type}
