"""Two `piivault serve` processes on one database: requests with one Idempotency-Key racing on
both store one record (the claim is an INSERT ... ON CONFLICT on the entry's primary key, so the
database, not a process, decides who owns the key)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import bearer
from tests.local_stack import PIIVAULT, create_admin_key, local_env, served

pytestmark = pytest.mark.skipif(not PIIVAULT.exists(), reason="the piivault console script is not installed")

RACES = 16


def test_one_key_racing_on_two_servers_stores_one_record(
    database_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    env = local_env(database_url, tmp_path / "data")
    with ExitStack() as stack:
        first = stack.enter_context(served("vault-a", env, tmp_path / "a"))
        second = stack.enter_context(served("vault-b", env, tmp_path / "b"))
        admin = create_admin_key(env, "race-admin", tmp_path)
        with httpx.Client(timeout=30) as http:
            made = http.post(
                f"{first}/v1/principals", json={"name": "racer", "role": "service"}, headers=bearer(admin)
            )
            assert made.status_code == 201, made.text
            racer = made.json()["api_key"]
            grant = {"grantee": "racer", "operations": ["Encrypt"]}
            assert http.post(f"{second}/v1/grants", json=grant, headers=bearer(admin)).status_code == 201

        def race(index: int, path: str, body: dict[str, Any]) -> list[httpx.Response]:
            start = threading.Barrier(2)
            headers = {**bearer(racer), "Idempotency-Key": f"race-{path}-{index}"}

            def send(base_url: str) -> httpx.Response:
                with httpx.Client(timeout=30) as client:
                    start.wait(timeout=30)
                    return client.post(f"{base_url}{path}", json=body, headers=headers)

            with ThreadPoolExecutor(2) as pool:
                return list(pool.map(send, (first, second)))

        created_tokens: set[str] = set()
        for index in range(RACES):
            licence = {"customer_id": f"c{index}", "data_type": "DriverLicense", "value": f"D{index:04d}-000"}
            for path, body in (("/v1/tokens", licence), ("/v1/tokens/batch", {"items": [licence, licence]})):
                answers = race(index, path, body)
                statuses = sorted(answer.status_code for answer in answers)
                assert statuses in ([200, 200], [200, 409], [201, 201], [201, 409]), [a.text for a in answers]
                done = [answer for answer in answers if answer.status_code in (200, 201)]
                # Both answered: one ran, the other replayed its answer.
                if len(done) == 2:
                    assert done[0].json() == done[1].json()
                    assert sorted(a.headers.get("Idempotent-Replayed", "") for a in done) == ["", "true"]
                body_out = done[0].json()
                created_tokens |= {r["token"] for r in body_out.get("results", [body_out])}
    stored = db.execute("SELECT token FROM records").fetchall()
    assert {row[0] for row in stored} == created_tokens
    assert len(stored) == RACES * 3
