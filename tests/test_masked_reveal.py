"""Masked reveal: `reveal` on grants and on both detokenize endpoints. A masked grant never
obtains the plain value, by any endpoint or parameter."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import boto3
import psycopg
import pytest
from fastapi.testclient import TestClient

from app.access import SUBSET, Decision, GrantSet
from app.db.repositories import GrantTerms
from app.services.context import context_of
from tests.conftest import Actors, assert_error, bearer, create_grant, create_principal, tokenize

LICENCE_VALUE = "D1234-56789-01234"
LICENCE = {"customer_id": "12345", "data_type": "DriverLicense", "value": LICENCE_VALUE}
LICENCE_ONLY = {"encryption_context_subset": {"dataType": "DriverLicense"}}


def masked_reader(client: TestClient, actors: Actors, **constraints: Any) -> tuple[str, dict[str, Any]]:
    """A service whose only grant is a masked Decrypt (on licences, unless told otherwise)."""
    reader = create_principal(client, actors.admin, "kyc-screen")
    grant = create_grant(
        client,
        actors.admin,
        grantee="kyc-screen",
        operations=["Decrypt"],
        constraints=constraints or LICENCE_ONLY,
        reveal="masked",
    )
    return str(reader["api_key"]), grant


def assert_masked_only(response: Any, masked: str = "****1234") -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    results = body.get("results", [body])
    for result in results:
        assert result["value_masked"] == masked, result
        assert "value" not in result
    assert LICENCE_VALUE not in response.text and "56789" not in response.text


def test_a_masked_grant_never_gets_the_plain_value(client: TestClient, actors: Actors) -> None:
    key, _ = masked_reader(client, actors)
    token = tokenize(client, actors.onboarding, LICENCE)
    headers = bearer(key)
    for query in (
        "",
        "?reveal=plain",
        "?reveal=masked",
        "?reveal=masked&reveal=plain",
        "?reveal=plain&reveal=masked",
    ):
        assert_masked_only(client.get(f"/v1/tokens/{token}{query}", headers=headers))
    for extra in ({}, {"reveal": "plain"}, {"reveal": "masked"}):
        body = {"tokens": [token, token], **extra}
        assert_masked_only(client.post("/v1/tokens/detokenize", json=body, headers=headers))
    # Anything but plain or masked is refused, and reveals nothing.
    for query in ("?reveal=PLAIN", "?reveal=", "?reveal=raw", "?reveal=true"):
        response = client.get(f"/v1/tokens/{token}{query}", headers=headers)
        assert_error(response, 422, "invalid_input", "query.reveal")
        assert LICENCE_VALUE not in response.text
    for reveal in ("raw", None, True, "Plain", ["plain"]):
        response = client.post(
            "/v1/tokens/detokenize", json={"tokens": [token], "reveal": reveal}, headers=headers
        )
        assert_error(response, 422, "invalid_input", "reveal")
        assert LICENCE_VALUE not in response.text


def test_a_plain_grant_may_ask_either_form(client: TestClient, actors: Actors) -> None:
    token = tokenize(client, actors.onboarding, LICENCE)
    plain = client.get(f"/v1/tokens/{token}", headers=bearer(actors.kyc))
    assert plain.status_code == 200 and plain.json()["value"] == LICENCE_VALUE
    assert "value_masked" not in plain.json()
    assert_masked_only(client.get(f"/v1/tokens/{token}?reveal=masked", headers=bearer(actors.kyc)))
    batch = client.post(
        "/v1/tokens/detokenize", json={"tokens": [token], "reveal": "masked"}, headers=bearer(actors.kyc)
    )
    assert_masked_only(batch)
    again = client.post("/v1/tokens/detokenize", json={"tokens": [token]}, headers=bearer(actors.kyc))
    assert again.json()["results"][0]["value"] == LICENCE_VALUE


def test_a_plain_grant_covering_the_record_wins_over_a_masked_one(client: TestClient, actors: Actors) -> None:
    key, masked_everything = masked_reader(client, actors, encryption_context_subset={"customerID": "12345"})
    plain_licences = create_grant(
        client, actors.admin, grantee="kyc-screen", operations=["Decrypt"], constraints=LICENCE_ONLY
    )
    create_grant(client, actors.admin, grantee="onboarding-app", operations=["Encrypt"])
    licence = tokenize(client, actors.onboarding, LICENCE)
    ssn = tokenize(
        client, actors.onboarding, {"customer_id": "12345", "data_type": "SSN", "value": "078-05-1120"}
    )
    response = client.post("/v1/tokens/detokenize", json={"tokens": [licence, ssn]}, headers=bearer(key))
    first, second = response.json()["results"]
    assert first["value"] == LICENCE_VALUE and "value_masked" not in first
    assert second["value_masked"] == "***-**-1120" and "value" not in second
    assert "078-05" not in response.text
    events = client.get("/v1/audit/events", params={"action": "Detokenize"}, headers=bearer(actors.admin))
    used = {(e["token"], e["grant_id"], e["reason"]) for e in events.json()["events"]}
    assert used == {(licence, plain_licences["id"], None), (ssn, masked_everything["id"], "masked")}


def test_each_builtin_mask_over_http(client: TestClient, actors: Actors) -> None:
    key, _ = masked_reader(client, actors, encryption_context_subset={"customerID": "c-9"})
    create_grant(client, actors.admin, grantee="onboarding-app", operations=["Encrypt"])
    cases = {
        "SSN": ("078-05-1120", "***-**-1120"),
        "DriverLicense": ("D1234 56789", "****6789"),
        "Passport": ("X1234567", "****"),
        "Email": ("alice@example.com", "a***@example.com"),
        "Phone": ("+1 (555) 123-4567", "****4567"),
        "DateOfBirth": ("1984-05-12", "1984-**-**"),
        "AccountNumber": ("GB82 WEST 1234 5698 7654 32", "****4 32"),
        "CardNumber": ("4111 1111 1111 1111", "****1111"),
        "Name": ("Ana María", "****"),
        "Address": ("1 Main St", "****"),
    }
    tokens = [
        tokenize(client, actors.onboarding, {"customer_id": "c-9", "data_type": name, "value": value})
        for name, (value, _) in cases.items()
    ]
    response = client.post("/v1/tokens/detokenize", json={"tokens": tokens}, headers=bearer(key))
    assert response.status_code == 200, response.text
    got = {r["data_type"]: r["value_masked"] for r in response.json()["results"]}
    assert got == {name: masked for name, (_, masked) in cases.items()}
    for _, (value, masked) in cases.items():
        if masked != value:
            assert f'"{value}"' not in response.text


def test_a_custom_types_mask_applies(client: TestClient, actors: Actors) -> None:
    put = client.put("/v1/data-types/MemberId", json={"mask": "last4"}, headers=bearer(actors.admin))
    assert put.status_code == 201, put.text
    key, _ = masked_reader(client, actors, encryption_context_subset={"dataType": "MemberId"})
    create_grant(client, actors.admin, grantee="onboarding-app", operations=["Encrypt"])
    token = tokenize(
        client, actors.onboarding, {"customer_id": "1", "data_type": "MemberId", "value": "MEMBER-000042"}
    )
    assert client.get(f"/v1/tokens/{token}", headers=bearer(key)).json()["value_masked"] == "****0042"


def test_the_audit_event_says_which_form_was_revealed(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    key, grant = masked_reader(client, actors)
    token = tokenize(client, actors.onboarding, LICENCE)
    client.get(f"/v1/tokens/{token}", headers=bearer(key))
    client.get(f"/v1/tokens/{token}", headers=bearer(actors.kyc))
    client.get(f"/v1/tokens/{token}?reveal=masked", headers=bearer(actors.kyc))
    rows = db.execute(
        "SELECT principal_name, outcome, reason, grant_id::text FROM audit_events"
        " WHERE action = 'Detokenize' ORDER BY id"
    ).fetchall()
    assert [(name, outcome, reason) for name, outcome, reason, _ in rows] == [
        ("kyc-screen", "allowed", "masked"),
        ("kyc-app", "allowed", None),
        ("kyc-app", "allowed", "masked"),
    ]
    assert rows[0][3] == grant["id"]
    assert db.execute("SELECT count(*) FROM audit_events WHERE reason LIKE '%1234%'").fetchone() == (0,)
    assert client.get("/v1/audit/verify", headers=bearer(actors.admin)).json()["ok"] is True


def test_a_grants_reveal_is_stored_returned_and_validated(client: TestClient, actors: Actors) -> None:
    _, masked = masked_reader(client, actors)
    assert masked["reveal"] == "masked"
    shown = client.get(f"/v1/grants/{masked['id']}", headers=bearer(actors.admin)).json()
    assert shown["reveal"] == "masked"
    listed = client.get("/v1/grants", headers=bearer(actors.admin)).json()["grants"]
    assert {g["reveal"] for g in listed} == {"plain", "masked"}
    plain = create_grant(client, actors.admin, grantee="kyc-screen", operations=["Encrypt"])
    assert plain["reveal"] == "plain"
    for reveal in ("raw", None, "MASKED"):
        response = client.post(
            "/v1/grants",
            json={"grantee": "kyc-screen", "operations": ["Decrypt"], "reveal": reveal},
            headers=bearer(actors.admin),
        )
        assert_error(response, 422, "invalid_input", "reveal")


@pytest.mark.fresh_kms_key
def test_a_masked_grant_is_mirrored_in_kms_as_decrypt(
    client: TestClient, actors: Actors, kms_key_id: str
) -> None:
    _, grant = masked_reader(client, actors)
    mirrors = {g["GrantId"]: g for g in boto3.client("kms").list_grants(KeyId=kms_key_id)["Grants"]}
    assert mirrors[grant["kms_grant_id"]]["Operations"] == ["Decrypt"]
    assert mirrors[grant["kms_grant_id"]]["Constraints"] == {
        "EncryptionContextSubset": {"dataType": "DriverLicense"}
    }


def test_the_decision_prefers_a_plain_grant_and_treats_any_other_reveal_as_masked() -> None:
    now = datetime.now(UTC)
    plain = GrantTerms(uuid.uuid4(), SUBSET, {"dataType": "SSN"}, None, None, None, "plain")
    masked = GrantTerms(uuid.uuid4(), None, None, None, None, None, "masked")
    odd = GrantTerms(uuid.uuid4(), None, None, None, None, None, "Plain")
    ssn, licence = context_of("1", "SSN"), context_of("1", "DriverLicense")
    both = GrantSet([masked, plain], now)
    assert both.decide(ssn) == Decision(plain.id, masked=False)
    assert both.decide(licence) == Decision(masked.id, masked=True)
    assert GrantSet([odd], now).decide(licence) == Decision(odd.id, masked=True)
