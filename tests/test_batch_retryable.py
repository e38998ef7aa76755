"""Batch results a client can act on: each item error says whether sending it again later can
succeed, and a batch whose every item failed at the same dependency answers as one request would.

KMS failures are injected per customer on the vault's own KMS client (moto answers the rest), so
which items fail is decided by the test, not by timing.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
from botocore.awsrequest import AWSResponse
from fastapi.testclient import TestClient

from app.container import Vault
from tests.conftest import Actors, assert_error, bearer, tokenize
from tests.test_failures import (
    LICENCE,
    assert_not_retryable,
    assert_retry_after,
    kms_error_response,
    kms_events,
    record_count,
)

TRANSIENT = "ThrottlingException"
PERMANENT = "DisabledException"


def fail_for_customers(vault: Vault, operation: str, code: str, customers: set[str]) -> list[str]:
    """Make KMS answer `code` to every `operation` call whose encryption context names one of
    `customers` (retries included); returns the customers it answered for, once per call."""
    answered: list[str] = []

    def handler(request: Any, **_: Any) -> AWSResponse | None:
        customer = json.loads(request.body).get("EncryptionContext", {}).get("customerID")
        if customer not in customers:
            return None
        answered.append(customer)
        return kms_error_response(code, "injected")

    kms_events(vault).register(f"before-send.kms.{operation}", handler)
    return answered


def licences(*customers: str) -> list[dict[str, str]]:
    return [{**LICENCE, "customer_id": customer} for customer in customers]


def tokenize_batch(client: TestClient, key: str, items: list[dict[str, str]]) -> Any:
    return client.post("/v1/tokens/batch", json={"items": items}, headers=bearer(key))


def detokenize_batch(client: TestClient, key: str, tokens: list[str]) -> Any:
    return client.post("/v1/tokens/detokenize", json={"tokens": tokens}, headers=bearer(key))


def results_of(response: Any) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    results: list[dict[str, Any]] = response.json()["results"]
    return results


def audit_outcomes(db: psycopg.Connection[Any], action: str, outcome: str) -> list[str | None]:
    rows = db.execute(
        "SELECT reason FROM audit_events WHERE action = %s AND outcome = %s ORDER BY id", (action, outcome)
    ).fetchall()
    return [row[0] for row in rows]


# Every item failed at a dependency that is down for now: 503 with Retry-After


def test_a_tokenize_batch_all_throttled_is_503_with_retry_after_and_stores_nothing(
    client: TestClient, vault: Vault, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    customers = {"c-0", "c-1", "c-2"}
    answered = fail_for_customers(vault, "GenerateDataKey", TRANSIENT, customers)

    response = tokenize_batch(client, actors.onboarding, licences(*sorted(customers)))

    assert_error(response, 503, "key_service_unavailable")
    assert_retry_after(response)
    assert response.headers["Retry-After"] == str(vault.settings.retry_after_s)
    assert "results" not in response.json()
    assert set(answered) == customers
    assert record_count(db) == 0
    # Each item's failure is still on record, as in a 200.
    assert audit_outcomes(db, "Tokenize", "error") == ["key_service_unavailable"] * 3


def test_a_detokenize_batch_all_throttled_is_503_with_retry_after_and_reveals_nothing(
    client: TestClient, vault: Vault, actors: Actors
) -> None:
    tokens = [tokenize(client, actors.onboarding, item) for item in licences("c-0", "c-1")]
    fail_for_customers(vault, "Decrypt", TRANSIENT, {"c-0", "c-1"})

    response = detokenize_batch(client, actors.kyc, tokens)

    assert_error(response, 503, "key_service_unavailable")
    assert_retry_after(response)
    assert LICENCE["value"] not in response.text


def test_after_a_503_the_same_batch_succeeds_when_kms_answers_again(
    client: TestClient, vault: Vault, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    down = {"c-0", "c-1"}
    fail_for_customers(vault, "GenerateDataKey", TRANSIENT, down)
    items = licences("c-0", "c-1")
    assert tokenize_batch(client, actors.onboarding, items).status_code == 503
    down.clear()  # KMS is back

    results = results_of(tokenize_batch(client, actors.onboarding, items))

    assert [r["customer_id"] for r in results] == ["c-0", "c-1"]
    assert all(r["token"].startswith("tok_") and "error" not in r for r in results)
    assert record_count(db) == 2  # the 503 stored nothing, so the retry stored each once


# Some items failed at a dependency: 200, and those items say they are retryable


def test_a_tokenize_batch_partly_throttled_is_200_with_the_failed_items_retryable(
    client: TestClient, vault: Vault, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    customers = [f"c-{n}" for n in range(6)]
    down = set(customers[1::2])
    fail_for_customers(vault, "GenerateDataKey", TRANSIENT, down)

    results = results_of(tokenize_batch(client, actors.onboarding, licences(*customers)))

    assert len(results) == 6
    for customer, result in zip(customers, results, strict=True):
        if customer in down:
            assert "token" not in result, result
            assert result["error"]["code"] == "key_service_unavailable"
            assert result["error"]["retryable"] is True
        else:
            assert result["customer_id"] == customer and result["token"].startswith("tok_")
            assert "error" not in result
    assert record_count(db) == 3


def test_a_detokenize_batch_partly_throttled_is_200_with_the_failed_items_retryable(
    client: TestClient, vault: Vault, actors: Actors
) -> None:
    items = licences("c-0", "c-1", "c-2")
    tokens = [tokenize(client, actors.onboarding, item) for item in items]
    fail_for_customers(vault, "Decrypt", TRANSIENT, {"c-1"})

    first, second, third = results_of(detokenize_batch(client, actors.kyc, tokens))

    assert first["value"] == third["value"] == LICENCE["value"]
    assert "value" not in second
    assert second["token"] == tokens[1]
    assert second["error"]["code"] == "key_service_unavailable"
    assert second["error"]["retryable"] is True


# Refusals that the same request would meet again: retryable false


def test_items_refused_by_a_disabled_key_are_not_retryable(
    client: TestClient, vault: Vault, actors: Actors
) -> None:
    tokens = [tokenize(client, actors.onboarding, item) for item in licences("c-0", "c-1")]
    fail_for_customers(vault, "Decrypt", PERMANENT, {"c-0"})
    fail_for_customers(vault, "GenerateDataKey", PERMANENT, {"c-0"})

    revealed = results_of(detokenize_batch(client, actors.kyc, tokens))
    stored = results_of(tokenize_batch(client, actors.onboarding, licences("c-0", "c-1")))

    for refused, served in (revealed, stored):
        assert refused["error"]["code"] == "key_access_denied"
        assert refused["error"]["retryable"] is False
        assert "error" not in served
    assert "value" not in revealed[0]


def test_a_batch_all_refused_by_a_disabled_key_is_503_without_retry_after(
    client: TestClient, vault: Vault, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    """As a single tokenize would answer: an operator must act, and no client should retry for ever."""
    tokens = [tokenize(client, actors.onboarding, item) for item in licences("c-0", "c-1")]
    fail_for_customers(vault, "Decrypt", PERMANENT, {"c-0", "c-1"})
    fail_for_customers(vault, "GenerateDataKey", PERMANENT, {"c-2", "c-3"})

    revealed = detokenize_batch(client, actors.kyc, tokens)
    stored = tokenize_batch(client, actors.onboarding, licences("c-2", "c-3"))

    for response in (revealed, stored):
        assert_error(response, 503, "key_access_denied")
        assert_not_retryable(response)
    assert LICENCE["value"] not in revealed.text
    assert record_count(db) == 2


def test_a_record_under_a_key_outside_the_allow_list_is_not_retryable(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    tokens = [tokenize(client, actors.onboarding, item) for item in licences("c-0", "c-1")]
    foreign = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000"
    db.execute("UPDATE records SET kms_key_id = %s WHERE token = %s", (foreign, tokens[0]))

    refused, served = results_of(detokenize_batch(client, actors.kyc, tokens))
    assert refused["error"]["code"] == "key_not_allowed"
    assert refused["error"]["retryable"] is False
    assert "value" not in refused
    assert served["value"] == LICENCE["value"]

    alone = detokenize_batch(client, actors.kyc, tokens[:1])
    assert_error(alone, 503, "key_not_allowed")
    assert_not_retryable(alone)


def test_access_and_input_errors_are_not_retryable_and_stay_200_even_when_every_item_fails(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    """grant_required, not_found and invalid_input are answers, not outages: a batch of them is 200."""
    ssn = {"customer_id": "c-0", "data_type": "SSN", "value": "078-05-1120"}  # onboarding: licences only
    bad = {"customer_id": "c-1", "data_type": "DriverLicense"}  # no value
    unknown = "tok_" + "A" * 32

    stored = results_of(tokenize_batch(client, actors.onboarding, [ssn, bad]))
    revealed = results_of(detokenize_batch(client, actors.kyc, [unknown, "not-a-token"]))
    stranger = results_of(detokenize_batch(client, actors.onboarding, [unknown]))

    codes = [(r["error"]["code"], r["error"]["retryable"]) for r in (*stored, *revealed, *stranger)]
    assert codes == [
        ("grant_required", False),
        ("invalid_input", False),
        ("not_found", False),
        ("invalid_input", False),
        ("grant_required", False),  # without a Decrypt grant, unknown and refused look alike
    ]
    assert record_count(db) == 0


def test_a_batch_failing_for_different_reasons_is_200_each_item_flagged(
    client: TestClient, vault: Vault, actors: Actors
) -> None:
    """Every item failed, but not for one dependency: there is no one error to answer with."""
    fail_for_customers(vault, "GenerateDataKey", TRANSIENT, {"c-0"})
    fail_for_customers(vault, "GenerateDataKey", PERMANENT, {"c-1"})
    ssn = {"customer_id": "c-2", "data_type": "SSN", "value": "078-05-1120"}

    results = results_of(tokenize_batch(client, actors.onboarding, [*licences("c-0", "c-1"), ssn]))

    assert [(r["error"]["code"], r["error"]["retryable"]) for r in results] == [
        ("key_service_unavailable", True),
        ("key_access_denied", False),
        ("grant_required", False),
    ]


def test_the_openapi_document_describes_retryable_and_the_batch_503(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    item_error = document["components"]["schemas"]["ItemErrorBody"]
    assert item_error["properties"]["retryable"]["type"] == "boolean"
    assert "retryable" in item_error["required"]
    for path in ("/v1/tokens/batch", "/v1/tokens/detokenize"):
        described = document["paths"][path]["post"]["responses"]["503"]["description"]
        assert "every item failed" in described and "Retry-After" in described
