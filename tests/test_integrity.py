"""A record opens only as itself: moved ciphertexts, edited rows and foreign contexts fail closed."""

from __future__ import annotations

from typing import Any

import boto3
import psycopg
import pytest
from botocore.exceptions import ClientError
from fastapi.testclient import TestClient

from tests.conftest import Actors, bearer, tokenize

ALICE = {"customer_id": "12345", "data_type": "DriverLicense", "value": "ALICE-LICENCE-1"}
BOB = {"customer_id": "67890", "data_type": "DriverLicense", "value": "BOB-LICENCE-2"}


def assert_opaque_integrity_failure(response: Any) -> None:
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "record_integrity"
    for value in ("ALICE-LICENCE-1", "BOB-LICENCE-2"):
        assert value not in response.text
    assert "Traceback" not in response.text


def test_ciphertext_copied_onto_another_row_fails(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    alice, bob = tokenize(client, actors.onboarding, ALICE), tokenize(client, actors.onboarding, BOB)
    db.execute(
        "UPDATE records SET ciphertext = (SELECT ciphertext FROM records WHERE token = %s) WHERE token = %s",
        (alice, bob),
    )
    assert_opaque_integrity_failure(client.get(f"/v1/tokens/{bob}", headers=bearer(actors.kyc)))


def test_ciphertext_and_wrapped_key_copied_together_fail(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    alice, bob = tokenize(client, actors.onboarding, ALICE), tokenize(client, actors.onboarding, BOB)
    db.execute(
        """UPDATE records SET (ciphertext, wrapped_key) =
               (SELECT ciphertext, wrapped_key FROM records WHERE token = %s) WHERE token = %s""",
        (alice, bob),
    )
    # KMS refuses Alice's wrapped key under Bob's context before the ciphertext is even tried.
    assert_opaque_integrity_failure(client.get(f"/v1/tokens/{bob}", headers=bearer(actors.kyc)))


def test_row_whose_customer_id_is_edited_fails(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    alice = tokenize(client, actors.onboarding, ALICE)
    db.execute("UPDATE records SET customer_id = '67890' WHERE token = %s", (alice,))
    assert_opaque_integrity_failure(client.get(f"/v1/tokens/{alice}", headers=bearer(actors.kyc)))


def test_row_whose_token_is_edited_fails(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    alice = tokenize(client, actors.onboarding, ALICE)
    forged = "tok_" + "Z" * 32
    db.execute("UPDATE records SET token = %s WHERE token = %s", (forged, alice))
    assert_opaque_integrity_failure(client.get(f"/v1/tokens/{forged}", headers=bearer(actors.kyc)))


def test_flipped_ciphertext_bit_fails_in_a_batch_without_sinking_the_rest(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    alice, bob = tokenize(client, actors.onboarding, ALICE), tokenize(client, actors.onboarding, BOB)
    db.execute(
        "UPDATE records SET ciphertext = overlay(ciphertext placing '\\xff'::bytea from 20 for 1)"
        " WHERE token = %s",
        (alice,),
    )
    response = client.post("/v1/tokens/detokenize", json={"tokens": [alice, bob]}, headers=bearer(actors.kyc))
    assert response.status_code == 200
    first, second = response.json()["results"]
    assert first["error"]["code"] == "record_integrity"
    assert "ALICE" not in response.text
    assert second["value"] == "BOB-LICENCE-2"


def test_stored_row_holds_no_plaintext_and_a_versioned_format(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any]
) -> None:
    alice = tokenize(client, actors.onboarding, ALICE)
    row = db.execute(
        "SELECT ciphertext, wrapped_key, format_version, kms_key_id FROM records WHERE token = %s", (alice,)
    ).fetchone()
    assert row is not None
    ciphertext, wrapped, version, key_id = row
    assert version == 1 and bytes(ciphertext)[0] == 1
    assert b"ALICE-LICENCE-1" not in bytes(ciphertext) + bytes(wrapped)
    assert key_id.startswith("arn:aws:kms:")


def test_wrapped_key_opens_only_under_its_exact_context(
    client: TestClient, actors: Actors, db: psycopg.Connection[Any], kms_key_id: str
) -> None:
    alice = tokenize(client, actors.onboarding, ALICE)
    row = db.execute("SELECT wrapped_key FROM records WHERE token = %s", (alice,)).fetchone()
    assert row is not None
    wrapped = bytes(row[0])
    kms = boto3.client("kms")
    opened = kms.decrypt(
        CiphertextBlob=wrapped,
        KeyId=kms_key_id,
        EncryptionContext={"customerID": "12345", "dataType": "DriverLicense"},
    )
    assert len(opened["Plaintext"]) == 32
    for wrong in (
        {"customerID": "67890", "dataType": "DriverLicense"},
        {"customerID": "12345", "dataType": "SSN"},
        {"customerID": "12345"},
        {"dataType": "DriverLicense"},
        {},
        {"customerID": "12345", "dataType": "DriverLicense", "extra": "x"},
    ):
        with pytest.raises(ClientError) as refused:
            kms.decrypt(CiphertextBlob=wrapped, KeyId=kms_key_id, EncryptionContext=wrong)
        assert refused.value.response["Error"]["Code"] == "InvalidCiphertextException"


def test_every_kms_call_carries_exactly_the_record_context(
    client: TestClient, actors: Actors, vault: Any
) -> None:
    seen: list[tuple[str, dict[str, str]]] = []

    def spy(params: dict[str, Any], model: Any, **_: Any) -> None:
        seen.append((model.name, dict(params.get("EncryptionContext", {}))))

    vault.keys.client.meta.events.register("provide-client-params.kms", spy)
    token = tokenize(client, actors.onboarding, ALICE)
    assert client.get(f"/v1/tokens/{token}", headers=bearer(actors.kyc)).status_code == 200
    expected = {"customerID": "12345", "dataType": "DriverLicense"}
    assert seen == [("GenerateDataKey", expected), ("Decrypt", expected)]
