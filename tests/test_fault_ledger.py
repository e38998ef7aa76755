"""The fault ledger: a few hundred tokenizes from concurrent clients while the database's
backends are terminated and KMS stalls, then the books must balance.

- every 201 token reads back its exact value;
- no record exists without a 201 (and every 201 has its record);
- the allowed Tokenize events are exactly the records, one each;
- the audit trail verifies.

The database faults are real (pg_terminate_backend on the test database's connections, the
vault's pools included). The KMS stall is a stand-in on the vault's own client that holds
GenerateDataKey calls for a while; the vault uses boto3's transport so that a held call holds a
thread, not the event loop, and PIIVAULT_KMS_CALL_DEADLINE_S turns it into a 503. Bounded: a few
hundred requests, a few seconds of faults.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from app.container import Vault
from app.crypto.kms import KmsKeyProvider
from app.settings import Settings
from tests.conftest import Actors, bearer, make_settings

CLIENTS = 8
PER_CLIENT = 40
ROUND_S = 0.2
# The faults, by round: backends killed alone, then KMS stalled alone, then both at once; after
# that, a kill every few rounds until the clients are done.
KILL_ROUNDS = {1, 2, 3, 4, 10, 11, 12, 13}
STALL_ROUNDS = (5, 14)  # KMS held from the 5th round to the 14th
KILL_AFTER_EVERY = 4
# What a request may answer under these faults: created, or a dependency down (retry later).
FAULT_CODES = {"database_unavailable", "audit_unavailable", "key_service_unavailable"}


@pytest.fixture
def settings(database_url: str, kms_key_id: str) -> Settings:
    return make_settings(
        database_url,
        kms_key_id,
        kms_transport="boto3",
        kms_read_timeout_s=0.5,
        kms_call_deadline_s=0.5,
        kms_mirror_grants=False,
    )


class StalledKms:
    """Holds every GenerateDataKey call while `stalled` is set (up to a few seconds)."""

    def __init__(self, vault: Vault) -> None:
        assert isinstance(vault.keys, KmsKeyProvider)
        self.stalled = threading.Event()
        self.resumed = threading.Event()
        self.held = 0
        vault.keys.client.meta.events.register("before-send.kms.GenerateDataKey", self)

    def __call__(self, **_: Any) -> None:
        if self.stalled.is_set():
            self.held += 1
            self.resumed.wait(5)

    def stall(self) -> None:
        self.resumed.clear()
        self.stalled.set()

    def resume(self) -> None:
        self.stalled.clear()
        self.resumed.set()


@dataclass
class Answer:
    value: str
    status: int
    token: str | None = None
    code: str | None = None


def terminate_backends(database_url: str, keep: set[int]) -> int:
    """pg_terminate_backend on every other connection to the test database; how many."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid() AND NOT (pid = ANY(%s))",
            (list(keep),),
        ).fetchall()
    return sum(1 for (terminated,) in rows if terminated)


def settled(client: TestClient, method: str, url: str, **kwargs: Any) -> Any:
    """A request after the faults: the pools may still hand out a connection killed meanwhile,
    so a 503 (and a retryable batch item) is tried again, a few times."""
    for _ in range(10):
        response = client.request(method, url, **kwargs)
        body = response.json() if response.status_code in (200, 503) else None
        retry = response.status_code == 503 or (
            isinstance(body, dict)
            and any(r.get("error", {}).get("retryable") for r in body.get("results", []))
        )
        if not retry:
            return response
        time.sleep(0.1)
    return response


def test_tokenizes_under_killed_backends_and_a_stalled_kms_balance(
    client: TestClient, vault: Vault, actors: Actors, db: psycopg.Connection[Any], database_url: str
) -> None:
    kms = StalledKms(vault)
    run = uuid.uuid4().hex[:8]
    answers: list[Answer] = []
    answers_lock = threading.Lock()
    clients_done = threading.Event()
    kills: list[int] = []

    def one_client(n: int) -> None:
        for i in range(PER_CLIENT):
            value = f"L{run}-{n:02d}-{i:03d}"
            item = {"customer_id": f"c{n}-{i}", "data_type": "DriverLicense", "value": value}
            response = client.post("/v1/tokens", json=item, headers=bearer(actors.onboarding))
            body = response.json()
            answer = Answer(value, response.status_code)
            if response.status_code == 201:
                answer.token = body["token"]
            else:
                answer.code = body.get("error", {}).get("code")
            with answers_lock:
                answers.append(answer)

    def chaos() -> None:
        rounds = 0
        while not clients_done.is_set():
            rounds += 1
            if rounds == STALL_ROUNDS[0]:
                kms.stall()
            if rounds == STALL_ROUNDS[1]:
                kms.resume()
            if rounds in KILL_ROUNDS or (rounds > STALL_ROUNDS[1] and rounds % KILL_AFTER_EVERY == 0):
                kills.append(terminate_backends(database_url, keep={db.info.backend_pid}))
            clients_done.wait(ROUND_S)
        kms.resume()

    with ThreadPoolExecutor(max_workers=CLIENTS + 1) as pool:
        faults = pool.submit(chaos)
        workers = [pool.submit(one_client, n) for n in range(CLIENTS)]
        try:
            for worker in workers:
                worker.result(timeout=120)
        finally:
            clients_done.set()
            kms.resume()
        faults.result(timeout=30)

    # The run was what it claims: every request answered, some under each kind of fault.
    assert len(answers) == CLIENTS * PER_CLIENT
    statuses = Counter(a.status for a in answers)
    assert set(statuses) <= {201, 503}, statuses  # never a 500, never another refusal
    codes = Counter(a.code for a in answers if a.status == 503)
    assert set(codes) <= FAULT_CODES, codes
    assert codes["key_service_unavailable"] >= 1 and kms.held >= 1, (codes, kms.held)
    assert codes["database_unavailable"] + codes["audit_unavailable"] >= 1, (codes, kills)
    assert statuses[201] >= 1, statuses

    # The tokens the vault acknowledged. IDEMPOTENCY HOOK: once tokenize takes an Idempotency-Key,
    # a request that answered 503 but whose replay with the same key answers 201 (the replayable
    # idempotent answer) counts as acknowledged too: replay each 503 here and add its token.
    acknowledged = {a.token: a.value for a in answers if a.token is not None}
    assert len(acknowledged) == statuses[201]  # no token handed out twice

    # Every 201 reads back its exact value.
    read = settled(
        client,
        "POST",
        "/v1/tokens/detokenize",
        json={"tokens": list(acknowledged)},
        headers=bearer(actors.kyc),
    )
    assert read.status_code == 200, read.text
    assert {r["token"]: r.get("value") for r in read.json()["results"]} == acknowledged

    # No record without a 201, and none missing.
    records = {row[0] for row in db.execute("SELECT token FROM records").fetchall()}
    assert records == set(acknowledged)

    # The allowed Tokenize events are the records, one each.
    allowed = Counter(
        row[0]
        for row in db.execute(
            "SELECT token FROM audit_events WHERE action = 'Tokenize' AND outcome = 'allowed'"
        ).fetchall()
    )
    assert allowed == Counter(records)

    # And the trail verifies.
    verified = settled(client, "GET", "/v1/audit/verify", headers=bearer(actors.admin))
    assert verified.status_code == 200, verified.text
    assert verified.json()["ok"] is True, verified.json()
