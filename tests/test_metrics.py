"""The metrics an on-call engineer needs: each present on /metrics and moving when what it counts
happens; label values from bounded sets, never a value, token, key or principal id."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from app import metrics
from app.container import Vault
from tests.conftest import Actors, ClientFactory, bearer, create_admin, tokenize
from tests.test_batch_retryable import (
    TRANSIENT,
    detokenize_batch,
    fail_for_customers,
    licences,
    tokenize_batch,
)
from tests.test_failures import LICENCE


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def scrape(client: TestClient) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200
    text: str = response.text
    return text


def test_kms_calls_are_counted_by_operation_and_outcome_with_latency(
    client: TestClient, vault: Vault, actors: Actors
) -> None:
    ok_before = value("piivault_kms_calls_total", operation="GenerateDataKey", outcome="ok")
    timed_before = value("piivault_kms_call_duration_seconds_count", operation="GenerateDataKey")
    failed_before = value(
        "piivault_kms_calls_total", operation="GenerateDataKey", outcome="key_service_unavailable"
    )
    decrypt_before = value("piivault_kms_calls_total", operation="Decrypt", outcome="ok")

    token = tokenize(client, actors.onboarding, LICENCE)
    assert client.get(f"/v1/tokens/{token}", headers=bearer(actors.kyc)).status_code == 200
    fail_for_customers(vault, "GenerateDataKey", TRANSIENT, {"c-down"})
    assert tokenize_batch(client, actors.onboarding, licences("c-down")).status_code == 503

    assert value("piivault_kms_calls_total", operation="GenerateDataKey", outcome="ok") == ok_before + 1
    assert value("piivault_kms_calls_total", operation="Decrypt", outcome="ok") == decrypt_before + 1
    assert (
        value("piivault_kms_calls_total", operation="GenerateDataKey", outcome="key_service_unavailable")
        == failed_before + 1
    )
    assert value("piivault_kms_call_duration_seconds_count", operation="GenerateDataKey") == timed_before + 2
    text = scrape(client)
    assert 'piivault_kms_calls_total{operation="GenerateDataKey",outcome="ok"}' in text
    assert "piivault_kms_call_duration_seconds_bucket" in text


def test_batch_items_are_counted_by_outcome(client: TestClient, actors: Actors) -> None:
    ok_before = value("piivault_batch_items_total", operation="tokenize", outcome="ok")
    denied_before = value("piivault_batch_items_total", operation="tokenize", outcome="grant_required")
    items = [*licences("b-1", "b-2"), {**LICENCE, "data_type": "SSN"}]
    response = tokenize_batch(client, actors.onboarding, items)
    assert response.status_code == 200
    assert value("piivault_batch_items_total", operation="tokenize", outcome="ok") == ok_before + 2
    assert (
        value("piivault_batch_items_total", operation="tokenize", outcome="grant_required")
        == denied_before + 1
    )

    tokens = [result["token"] for result in response.json()["results"] if "token" in result]
    revealed_before = value("piivault_batch_items_total", operation="detokenize", outcome="ok")
    assert detokenize_batch(client, actors.kyc, tokens).status_code == 200
    assert value("piivault_batch_items_total", operation="detokenize", outcome="ok") == revealed_before + 2


def test_database_pools_are_reported_on_each_scrape(client: TestClient, vault: Vault) -> None:
    text = scrape(client)
    settings = vault.settings
    capacity = settings.db_pool_size + settings.db_max_overflow
    assert value("piivault_db_pool_size", pool="orm") == capacity
    assert value("piivault_db_pool_size", pool="data") == capacity
    for pool in ("orm", "side", "data"):
        assert f'piivault_db_pool_in_use{{pool="{pool}"}}' in text
        assert f'piivault_db_pool_waiting{{pool="{pool}"}}' in text
    # A connection held by someone shows as in use on the next scrape.
    held = vault.database.engine.connect()
    try:
        scrape(client)
        assert value("piivault_db_pool_in_use", pool="orm") >= 1
    finally:
        held.close()
    scrape(client)
    assert value("piivault_db_pool_in_use", pool="orm") == 0


def test_the_sealer_lag_is_the_oldest_unsealed_events_age(client: TestClient, vault: Vault) -> None:
    vault.auditor.seal()
    assert vault.auditor.unsealed_age_s() == 0
    create_admin(vault, "lagging-admin")  # an audit event, not sealed yet
    waiting = vault.auditor.unsealed_age_s()
    assert waiting > 0
    vault.auditor.seal()
    assert vault.auditor.unsealed_age_s() == 0

    metrics.sealed(waiting, at=1_700_000_000.0)
    assert value("piivault_audit_seal_lag_seconds") == waiting
    assert value("piivault_audit_last_seal_timestamp_seconds") == 1_700_000_000.0
    text = scrape(client)
    assert "piivault_audit_seal_lag_seconds" in text and "piivault_audit_last_seal_timestamp_seconds" in text


def wait_for(changed: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Poll until `changed()` (the background loops run on their own timers); bounded."""
    done = threading.Event()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if changed():
            return
        done.wait(0.02)
    pytest.fail(f"{what} did not happen within {timeout_s:.0f} s")


def test_the_background_loops_report_their_last_run(make_client: ClientFactory, kms_key_id: str) -> None:
    seal_before = value("piivault_audit_last_seal_timestamp_seconds")
    sweep_before = value("piivault_sweeper_last_run_timestamp_seconds", sweeper="grant")
    vault, _ = make_client(kms_key_id, audit_seal_interval_s=0.02, grant_sweep_interval_s=0.02)
    create_admin(vault, "sealed-admin")
    wait_for(lambda: value("piivault_audit_last_seal_timestamp_seconds") > seal_before, "a seal pass")
    wait_for(
        lambda: value("piivault_sweeper_last_run_timestamp_seconds", sweeper="grant") > sweep_before,
        "a grant sweep",
    )
    wait_for(lambda: vault.auditor.unsealed_age_s() == 0, "sealing the new event")


def test_a_sweeper_and_idempotency_replays_have_their_metrics(client: TestClient) -> None:
    metrics.sweeper_ran("retention", at=1_700_000_123.0)
    assert value("piivault_sweeper_last_run_timestamp_seconds", sweeper="retention") == 1_700_000_123.0
    before = value("piivault_idempotency_replays_total", route="/v1/tokens")
    metrics.idempotent_replay("/v1/tokens")
    assert value("piivault_idempotency_replays_total", route="/v1/tokens") == before + 1
    assert 'piivault_idempotency_replays_total{route="/v1/tokens"}' in scrape(client)


def test_docs_and_openapi_are_named_and_unknown_paths_are_not(client: TestClient) -> None:
    counted = {
        route: value("piivault_requests_total", method="GET", route=route, status="200")
        for route in ("/docs", "/openapi.json")
    }
    unmatched = value("piivault_requests_total", method="GET", route="unmatched", status="404")
    assert client.get("/docs").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/no/such/tok_secretish").status_code == 404
    for route, before in counted.items():
        assert value("piivault_requests_total", method="GET", route=route, status="200") == before + 1
    assert value("piivault_requests_total", method="GET", route="unmatched", status="404") == unmatched + 1
    assert "tok_secretish" not in scrape(client)


def test_readiness_is_a_gauge(client: TestClient) -> None:
    assert client.get("/readyz").status_code == 200
    assert value("piivault_ready") == 1


def test_no_value_token_key_or_principal_id_in_any_label(client: TestClient, actors: Actors) -> None:
    token = tokenize(client, actors.onboarding, LICENCE)
    client.get(f"/v1/tokens/{token}", headers=bearer(actors.kyc))
    client.get(f"/v1/tokens/{token}", headers=bearer(actors.onboarding))
    text = scrape(client)
    for secret in (
        LICENCE["value"],
        token,
        actors.onboarding,
        actors.kyc,
        actors.admin,
        actors.onboarding_id,
        actors.kyc_id,
    ):
        assert secret not in text
