"""The key boundary: each record is opened under the KMS key that wrapped it, if that key is on
this vault's allow-list (PIIVAULT_KMS_KEY_ID plus PIIVAULT_KMS_DECRYPT_KEY_IDS); every key-service
answer is checked in one place; permanent refusals are not presented as retryable."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import boto3
import psycopg
import pytest
from fastapi.testclient import TestClient

from app.container import Vault
from app.crypto.kms import KmsKeyProvider, validated_data_key
from app.errors import IntegrityFailure, KeyNotAllowed, KeyServiceInvalidResponse
from tests.conftest import (
    Actors,
    ClientFactory,
    assert_error,
    bearer,
    create_admin,
    create_grant,
    create_principal,
    make_settings,
    tokenize,
)
from tests.test_failures import kms_error_response

LICENCE = {"customer_id": "12345", "data_type": "DriverLicense", "value": "D1234-56789-01234"}
ARN_PREFIX = "arn:aws:kms:us-east-1:"


def new_key(alias: str | None = None) -> tuple[str, str]:
    kms = boto3.client("kms")
    meta = kms.create_key(Description="piivault key boundary test")["KeyMetadata"]
    if alias:
        kms.create_alias(AliasName=alias, TargetKeyId=meta["KeyId"])
    return meta["KeyId"], meta["Arn"]


def seed(client: TestClient, vault: Vault) -> Actors:
    admin = create_admin(vault)
    onboarding = create_principal(client, admin, "onboarding-app")
    kyc = create_principal(client, admin, "kyc-app")
    create_grant(client, admin, grantee="onboarding-app", operations=["Encrypt"])
    create_grant(client, admin, grantee="kyc-app", operations=["Decrypt"])
    # The vault's fingerprint key, under this first key (as its first licence would make it).
    vault.fingerprint_key.key()
    return Actors(admin, onboarding["api_key"], kyc["api_key"], onboarding["id"], kyc["id"])


def reveal(client: TestClient, key: str, token: str) -> Any:
    return client.get(f"/v1/tokens/{token}", headers={**bearer(key), "X-Access-Reason": "test"})


def stored_key_ids(db: psycopg.Connection[Any]) -> dict[str, str]:
    return dict(db.execute("SELECT token, kms_key_id FROM records").fetchall())


def test_records_stay_readable_under_the_key_they_name_after_the_current_key_changes(
    serve: ClientFactory, db: psycopg.Connection[Any]
) -> None:
    _, arn_a = new_key("alias/piivault-a")
    key_b, arn_b = new_key()
    vault, client = serve("alias/piivault-a")
    actors = seed(client, vault)
    under_a = tokenize(client, actors.onboarding, LICENCE)
    # Records name their key by ARN, whatever form the setting used.
    assert stored_key_ids(db) == {under_a: arn_a}

    # The current key becomes B; A stays allowed for decryption, by its alias.
    _, client = serve(key_b, kms_decrypt_key_ids="alias/piivault-a")
    under_b = tokenize(client, actors.onboarding, {**LICENCE, "value": "B-VALUE-2"})
    assert stored_key_ids(db) == {under_a: arn_a, under_b: arn_b}
    assert reveal(client, actors.kyc, under_a).json()["value"] == LICENCE["value"]
    assert reveal(client, actors.kyc, under_b).json()["value"] == "B-VALUE-2"
    batch = client.post(
        "/v1/tokens/detokenize", json={"tokens": [under_a, under_b]}, headers=bearer(actors.kyc)
    )
    assert [r["value"] for r in batch.json()["results"]] == [LICENCE["value"], "B-VALUE-2"]


def test_a_key_off_the_allow_list_is_refused_clearly_and_is_no_integrity_alarm(
    serve: ClientFactory, db: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    _, arn_a = new_key()
    key_b, _ = new_key()
    # The vault starts on key B (its audit key is wrapped under B), then writes one record under A.
    vault, client = serve(key_b)
    actors = seed(client, vault)
    _, client = serve(arn_a, kms_decrypt_key_ids=key_b)
    under_a = tokenize(client, actors.onboarding, LICENCE)

    # Back on B alone, key A is no longer listed: its records are refused before any KMS call.
    vault, client = serve(key_b)
    assert isinstance(vault.keys, KmsKeyProvider)
    decrypts: list[Any] = []
    vault.keys.client.meta.events.register("before-send.kms.Decrypt", lambda **kw: decrypts.append(kw))

    def decrypts_under_a() -> list[Any]:
        return [kw for kw in decrypts if arn_a.encode() in kw["request"].body]

    under_b = tokenize(client, actors.onboarding, {**LICENCE, "value": "B-VALUE-2"})
    caplog.clear()

    refused = reveal(client, actors.kyc, under_a)

    assert_error(refused, 503, "key_not_allowed")
    assert "Retry-After" not in refused.headers  # an operator must act; retrying will not help
    assert LICENCE["value"] not in refused.text
    assert arn_a in caplog.text and "PIIVAULT_KMS_DECRYPT_KEY_IDS" in caplog.text
    assert decrypts_under_a() == []
    batch = client.post(
        "/v1/tokens/detokenize", json={"tokens": [under_a, under_b]}, headers=bearer(actors.kyc)
    ).json()["results"]
    assert batch[0]["error"]["code"] == "key_not_allowed" and "value" not in batch[0]
    assert batch[1]["value"] == "B-VALUE-2"
    outcomes = db.execute(
        "SELECT outcome, reason FROM audit_events WHERE token = %s AND action = 'Detokenize'", (under_a,)
    ).fetchall()
    assert outcomes == [("error", "key_not_allowed")] * 2


def test_the_audit_chain_verifies_after_the_current_key_changes(
    serve: ClientFactory, db: psycopg.Connection[Any]
) -> None:
    key_a, _ = new_key()
    key_b, _ = new_key()
    vault, client = serve(key_a)
    actors = seed(client, vault)
    tokenize(client, actors.onboarding, LICENCE)
    assert client.get("/v1/audit/verify", headers=bearer(actors.admin)).json()["ok"] is True

    # A new process, current key B: the audit key, wrapped under A, is opened under A.
    vault, client = serve(key_b, kms_decrypt_key_ids=key_a)
    tokenize(client, actors.onboarding, {**LICENCE, "value": "B-VALUE-2"})
    report = client.get("/v1/audit/verify", headers=bearer(actors.admin)).json()
    assert report["ok"] is True and report["events_checked"] > 0


def test_an_unknown_or_disabled_current_key_is_named_in_one_line_at_start_up(
    serve: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    key_id, _ = new_key()
    boto3.client("kms").disable_key(KeyId=key_id)
    with caplog.at_level(logging.WARNING):
        serve(key_id)
    named = [r for r in caplog.records if key_id in r.getMessage()]
    assert len(named) == 1 and "Disabled" in named[0].getMessage()

    caplog.clear()
    missing = "alias/piivault-nobody-made-this"
    with caplog.at_level(logging.WARNING):
        _, client = serve(missing)
    named = [r for r in caplog.records if missing in r.getMessage()]
    assert len(named) == 1 and named[0].levelno == logging.ERROR
    assert client.get("/readyz").status_code == 503


def test_a_disabled_decrypt_key_is_access_denied_not_retryable(
    serve: ClientFactory, db: psycopg.Connection[Any]
) -> None:
    key_a, arn_a = new_key()
    key_b, _ = new_key()
    vault, client = serve(key_b)
    actors = seed(client, vault)
    _, client = serve(key_a, kms_decrypt_key_ids=key_b)
    under_a = tokenize(client, actors.onboarding, LICENCE)
    vault, client = serve(key_b, kms_decrypt_key_ids=key_a)
    assert isinstance(vault.keys, KmsKeyProvider)
    # moto keeps a key's state but still decrypts with a disabled key; KMS answers DisabledException.
    boto3.client("kms").disable_key(KeyId=key_a)

    def refuse_disabled(request: Any, **_: Any) -> Any:
        return kms_error_response("DisabledException", "disabled") if arn_a.encode() in request.body else None

    vault.keys.client.meta.events.register("before-send.kms.Decrypt", refuse_disabled)

    refused = reveal(client, actors.kyc, under_a)

    assert_error(refused, 503, "key_access_denied")
    assert "Retry-After" not in refused.headers
    assert LICENCE["value"] not in refused.text


GOOD_ARN = ARN_PREFIX + "123456789012:key/good"


def good_answer(**changes: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "Plaintext": b"k" * 32,
        "CiphertextBlob": b"wrapped",
        "KeyId": GOOD_ARN,
        "ResponseMetadata": {"RequestId": "r-1"},
    }
    answer.update(changes)
    return {name: value for name, value in answer.items() if value is not None}


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(good_answer(Plaintext=None), id="no-plaintext"),
        pytest.param(good_answer(Plaintext=b"k" * 16), id="short-data-key"),
        pytest.param(good_answer(Plaintext="k" * 32), id="plaintext-not-bytes"),
        pytest.param(good_answer(CiphertextBlob=None), id="no-wrapped-key"),
        pytest.param(good_answer(CiphertextBlob=b""), id="empty-wrapped-key"),
        pytest.param(good_answer(KeyId=None), id="no-key-id"),
        pytest.param(good_answer(KeyId=ARN_PREFIX + "123456789012:key/other"), id="another-key"),
    ],
)
def test_every_malformed_key_service_answer_is_one_clear_error(answer: dict[str, Any]) -> None:
    with pytest.raises(KeyServiceInvalidResponse) as raised:
        validated_data_key("GenerateDataKey", answer, key_arn=GOOD_ARN)
    assert "k" * 16 not in str(raised.value)


def test_a_well_formed_answer_is_a_data_key() -> None:
    data_key = validated_data_key("GenerateDataKey", good_answer(), key_arn=GOOD_ARN)
    assert (data_key.plaintext, data_key.wrapped, data_key.key_id) == (b"k" * 32, b"wrapped", GOOD_ARN)
    assert data_key.request_id == "r-1"
    no_metadata = validated_data_key("Decrypt", good_answer(ResponseMetadata=None), key_arn=GOOD_ARN)
    assert no_metadata.request_id is None


def test_a_short_data_key_from_kms_fails_tokenize_cleanly(
    serve: ClientFactory, db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    key_id, _ = new_key()
    vault, client = serve(key_id)
    actors = seed(client, vault)
    assert isinstance(vault.keys, KmsKeyProvider)
    real_call = vault.keys._hot_call

    async def short_key(operation: str, params: dict[str, Any]) -> dict[str, Any]:
        answer = await real_call(operation, params)
        return {**answer, "Plaintext": answer["Plaintext"][:16]}

    monkeypatch.setattr(vault.keys, "_hot_call", short_key)
    response = client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding))

    assert_error(response, 503, "key_service_invalid_response")
    assert "Retry-After" not in response.headers
    assert db.execute("SELECT count(*) FROM records").fetchone() == (0,)


def test_decrypt_key_ids_need_the_kms_provider(database_url: str) -> None:
    with pytest.raises(ValueError, match="PIIVAULT_KMS_DECRYPT_KEY_IDS"):
        make_settings(database_url, None, kms_decrypt_key_ids="alias/old")


def test_decrypt_key_ids_are_read_comma_separated(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIIVAULT_KMS_DECRYPT_KEY_IDS", " alias/old , arn:aws:kms:us-east-1:1:key/k,")
    settings = make_settings(database_url, "alias/new")
    assert settings.kms_decrypt_key_ids == ("alias/old", "arn:aws:kms:us-east-1:1:key/k")


def test_reencrypt_moves_a_data_key_to_another_key_without_revealing_it(aws: None) -> None:
    key_a, arn_a = new_key()
    key_b, arn_b = new_key()
    provider = KmsKeyProvider(key_b, decrypt_key_ids=[key_a])
    old = KmsKeyProvider(key_a)
    context = {"customerID": "12345", "dataType": "DriverLicense"}
    made = asyncio.run(old.generate_data_key(context))

    moved = asyncio.run(provider.reencrypt_data_key(made.wrapped, context, key_id=arn_a, to_key_id=arn_b))

    assert moved.plaintext == b"" and moved.key_id == arn_b
    opened = asyncio.run(provider.decrypt_data_key(moved.wrapped, context, key_id=arn_b))
    assert opened.plaintext == made.plaintext
    other_context = {"customerID": "67890", "dataType": "DriverLicense"}
    with pytest.raises(IntegrityFailure):
        asyncio.run(provider.decrypt_data_key(moved.wrapped, other_context, key_id=arn_b))
    with pytest.raises(KeyNotAllowed):
        asyncio.run(old.decrypt_data_key(moved.wrapped, context, key_id=arn_b))


def kms_grant_ids(key_id: str) -> set[str]:
    return {g["GrantId"] for g in boto3.client("kms").list_grants(KeyId=key_id)["Grants"]}


def test_revoking_a_grant_revokes_its_mirror_on_the_key_it_was_made_on(
    make_client: ClientFactory, aws: None
) -> None:
    key_a, _ = new_key()
    key_b, _ = new_key()
    vault, client = make_client(key_a)
    actors = seed(client, vault)
    kyc_grant = client.get("/v1/grants", params={"grantee": "kyc-app"}, headers=bearer(actors.admin)).json()
    (grant,) = kyc_grant["grants"]
    assert grant["kms_grant_id"] in kms_grant_ids(key_a)

    # The current key becomes B; the grant's mirror stays on A, where it was made.
    _, client = make_client(key_b, kms_decrypt_key_ids=key_a)
    newer = create_grant(client, actors.admin, grantee="kyc-app", operations=["Decrypt"])
    assert newer["kms_grant_id"] in kms_grant_ids(key_b)

    for made in (grant, newer):
        assert client.delete(f"/v1/grants/{made['id']}", headers=bearer(actors.admin)).status_code == 200
    assert grant["kms_grant_id"] not in kms_grant_ids(key_a)
    assert newer["kms_grant_id"] not in kms_grant_ids(key_b)
