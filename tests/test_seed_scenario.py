"""The seed scenario, end to end over HTTP on real PostgreSQL with moto KMS."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.conftest import Actors, bearer

LICENCE = {"customer_id": "12345", "data_type": "DriverLicense", "value": "D1234-56789-01234"}


def test_onboarding_tokenizes_and_kyc_reads_back(client: TestClient, actors: Actors) -> None:
    created = client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding))
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["token"].startswith("tok_")
    assert body["customer_id"] == "12345"
    assert body["data_type"] == "DriverLicense"
    assert "value" not in body
    assert created.headers["X-Request-ID"]

    revealed = client.get(
        f"/v1/tokens/{body['token']}",
        headers={**bearer(actors.kyc), "X-Access-Reason": "loan application 991"},
    )
    assert revealed.status_code == 200, revealed.text
    assert revealed.json() == {
        "token": body["token"],
        "customer_id": "12345",
        "data_type": "DriverLicense",
        "value": "D1234-56789-01234",
    }


def test_tokens_are_random_not_derived_from_the_value(client: TestClient, actors: Actors) -> None:
    tokens = {
        client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding)).json()["token"]
        for _ in range(3)
    }
    assert len(tokens) == 3
    for token in tokens:
        assert len(token) >= len("tok_") + 22  # at least 128 random bits, URL-safe
        assert LICENCE["value"] not in token


def test_batch_tokenize_and_batch_detokenize_keep_order(client: TestClient, actors: Actors) -> None:
    items = [
        {"customer_id": f"cust-{n}", "data_type": "DriverLicense", "value": f"L-{n:04d}"} for n in range(5)
    ]
    items.insert(2, {"customer_id": "cust-x", "data_type": "SSN", "value": "078-05-1120"})
    items.insert(4, {"customer_id": "bad id!", "data_type": "DriverLicense", "value": "x"})
    response = client.post("/v1/tokens/batch", json={"items": items}, headers=bearer(actors.onboarding))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(items)
    assert results[2]["error"]["code"] == "grant_required"  # no Encrypt grant on SSN
    assert results[4]["error"]["code"] == "invalid_input"
    assert results[4]["error"]["field"] == "items[4].customer_id"
    good = [
        (item, result)
        for item, result in zip(items, results, strict=True)
        if "error" not in result or not result["error"]
    ]
    assert len(good) == 5
    for item, result in good:
        assert result["customer_id"] == item["customer_id"]

    tokens = [result["token"] for _, result in good]
    tokens.insert(1, "tok_doesnotexistdoesnotexist00000000")
    revealed = client.post("/v1/tokens/detokenize", json={"tokens": tokens}, headers=bearer(actors.kyc))
    assert revealed.status_code == 200, revealed.text
    out = revealed.json()["results"]
    assert [r["token"] for r in out] == tokens
    assert out[1]["error"]["code"] == "not_found"
    values = [r["value"] for r in out if r.get("value")]
    assert values == [item["value"] for item, _ in good]
