"""Input rules: every bad request is a 4xx in the one error shape, and `error.field` names the problem."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from app.container import Vault, build_vault
from app.main import create_app
from tests.conftest import (
    Actors,
    assert_error,
    bearer,
    create_admin,
    create_grant,
    create_principal,
    make_settings,
)

LICENCE = {"customer_id": "12345", "data_type": "DriverLicense", "value": "D1234-56789-01234"}
JSON = {"content-type": "application/json"}


def each_case(cases: Any, check: Callable[[Any], None]) -> None:
    """Run check on every case and report every failing case at once (one vault set-up for all)."""
    failures = []
    for case in cases:
        try:
            check(case)
        except AssertionError as err:
            failures.append(f"{case!r}: {err}")
    assert not failures, "\n".join(failures)


@pytest.fixture
def vault_with(
    database_url: str, kms_key_id: str, db: psycopg.Connection[Any]
) -> Iterator[Callable[..., tuple[TestClient, Actors]]]:
    """A vault built with make_settings overrides, and the seed scenario's cast on it."""
    opened: list[tuple[Vault, TestClient]] = []

    def factory(**overrides: Any) -> tuple[TestClient, Actors]:
        vault = build_vault(make_settings(database_url, kms_key_id, **overrides))
        client = TestClient(create_app(vault), raise_server_exceptions=False)
        client.__enter__()
        opened.append((vault, client))
        admin = create_admin(vault)
        onboarding = create_principal(client, admin, "onboarding-app")
        kyc = create_principal(client, admin, "kyc-app")
        create_grant(client, admin, grantee="onboarding-app", operations=["Encrypt"])
        create_grant(client, admin, grantee="kyc-app", operations=["Decrypt"])
        return client, Actors(admin, onboarding["api_key"], kyc["api_key"], onboarding["id"], kyc["id"])

    yield factory
    for vault, client in reversed(opened):
        client.__exit__(None, None, None)
        vault.close()


# Tokenize: body and fields


def test_malformed_json_is_422_naming_the_body(client: TestClient, actors: Actors) -> None:
    def check(content: bytes) -> None:
        response = client.post("/v1/tokens", content=content, headers={**bearer(actors.onboarding), **JSON})
        assert_error(response, 422, "invalid_input", "body")

    each_case([b"{", b'{"customer_id": "12345",}', b"not json", b'{"value": "x"', b"\xff\xfe"], check)


def test_a_body_that_is_not_an_object_is_422(client: TestClient, actors: Actors) -> None:
    def check(body: Any) -> None:
        response = client.post("/v1/tokens", json=body, headers=bearer(actors.onboarding))
        assert_error(response, 422, "invalid_input")

    each_case([[LICENCE], "text", 12, None], check)


def test_missing_field_is_422_naming_it(client: TestClient, actors: Actors) -> None:
    def check(missing: str) -> None:
        body = {k: v for k, v in LICENCE.items() if k != missing}
        response = client.post("/v1/tokens", json=body, headers=bearer(actors.onboarding))
        assert_error(response, 422, "invalid_input", missing)

    each_case(["customer_id", "data_type", "value"], check)


def test_unknown_field_is_422_naming_it(client: TestClient, actors: Actors) -> None:
    response = client.post("/v1/tokens", json={**LICENCE, "extra": 1}, headers=bearer(actors.onboarding))
    assert_error(response, 422, "invalid_input", "extra")


def test_bad_customer_id_is_422(client: TestClient, actors: Actors) -> None:
    def check(customer_id: Any) -> None:
        response = client.post(
            "/v1/tokens", json={**LICENCE, "customer_id": customer_id}, headers=bearer(actors.onboarding)
        )
        assert_error(response, 422, "invalid_input", "customer_id")

    each_case(["12 345", "a/b", "x" * 129, "", "ab\u00e9", "12345\n", 12345, None], check)


def test_good_customer_ids_are_accepted(client: TestClient, actors: Actors) -> None:
    def check(customer_id: str) -> None:
        response = client.post(
            "/v1/tokens", json={**LICENCE, "customer_id": customer_id}, headers=bearer(actors.onboarding)
        )
        assert response.status_code == 201, response.text
        assert response.json()["customer_id"] == customer_id

    each_case(["a", "x" * 128, "A-z_0.9:z"], check)


def test_bad_data_type_is_422(client: TestClient, actors: Actors) -> None:
    def check(data_type: Any) -> None:
        response = client.post(
            "/v1/tokens", json={**LICENCE, "data_type": data_type}, headers=bearer(actors.onboarding)
        )
        assert_error(response, 422, "invalid_input", "data_type")

    each_case(["1Licence", "Driver-License", "D" * 65, "", "_SSN", "SSN ", 7], check)


def test_data_type_of_64_chars_is_accepted(client: TestClient, actors: Actors) -> None:
    data_type = "D" + "x_9" * 21
    assert len(data_type) == 64
    subset = {"encryption_context_subset": {"dataType": data_type}}
    registered = client.put(f"/v1/data-types/{data_type}", json={}, headers=bearer(actors.admin))
    assert registered.status_code == 201, registered.text
    create_grant(client, actors.admin, grantee="onboarding-app", operations=["Encrypt"], constraints=subset)
    response = client.post(
        "/v1/tokens", json={**LICENCE, "data_type": data_type}, headers=bearer(actors.onboarding)
    )
    assert response.status_code == 201, response.text


def test_value_not_a_string_is_422(client: TestClient, actors: Actors) -> None:
    def check(value: Any) -> None:
        response = client.post(
            "/v1/tokens", json={**LICENCE, "value": value}, headers=bearer(actors.onboarding)
        )
        assert_error(response, 422, "invalid_input", "value")

    each_case([12345, 1.5, True, ["x"], {"v": "x"}, None], check)


def test_empty_value_is_422(client: TestClient, actors: Actors) -> None:
    response = client.post("/v1/tokens", json={**LICENCE, "value": ""}, headers=bearer(actors.onboarding))
    assert_error(response, 422, "invalid_input", "value")


# Sizes


def free_text(client: TestClient, actors: Actors) -> dict[str, str]:
    """An item of a custom type with no pattern (any text is one), which the seed's services may
    Encrypt and Decrypt: for values a licence number's pattern would refuse."""
    registered = client.put("/v1/data-types/Note", json={}, headers=bearer(actors.admin))
    assert registered.status_code == 201, registered.text
    notes = {"encryption_context_subset": {"dataType": "Note"}}
    create_grant(client, actors.admin, grantee="onboarding-app", operations=["Encrypt"], constraints=notes)
    create_grant(client, actors.admin, grantee="kyc-app", operations=["Decrypt"], constraints=notes)
    return {**LICENCE, "data_type": "Note"}


def test_value_is_measured_in_utf8_bytes(client: TestClient, vault: Vault, actors: Actors) -> None:
    note = free_text(client, actors)
    limit = vault.settings.max_value_bytes
    assert limit % 2 == 0
    exact = "\u00e9" * (limit // 2)  # two bytes each: exactly the limit
    over = exact + "a"  # one byte over, yet far fewer characters than the limit
    assert len(exact.encode()) == limit and len(over.encode()) == limit + 1 and len(over) < limit

    accepted = client.post("/v1/tokens", json={**note, "value": exact}, headers=bearer(actors.onboarding))
    assert accepted.status_code == 201, accepted.text
    refused = client.post("/v1/tokens", json={**note, "value": over}, headers=bearer(actors.onboarding))
    assert_error(refused, 413, "too_large", "value")
    three_byte = "\u20ac" * (limit // 3 + 1)  # the euro sign: 3 bytes each
    refused = client.post("/v1/tokens", json={**note, "value": three_byte}, headers=bearer(actors.onboarding))
    assert_error(refused, 413, "too_large", "value")


def test_exact_max_value_reads_back_whole(client: TestClient, vault: Vault, actors: Actors) -> None:
    value = "\U0001f600" * (vault.settings.max_value_bytes // 4)  # four bytes each
    note = free_text(client, actors)
    created = client.post("/v1/tokens", json={**note, "value": value}, headers=bearer(actors.onboarding))
    assert created.status_code == 201, created.text
    revealed = client.get(f"/v1/tokens/{created.json()['token']}", headers=bearer(actors.kyc))
    assert revealed.status_code == 200, revealed.text
    assert revealed.json()["value"] == value


def test_oversized_value_in_a_batch_fails_alone(client: TestClient, vault: Vault, actors: Actors) -> None:
    over = "x" * (vault.settings.max_value_bytes + 1)
    items = [LICENCE, {**LICENCE, "value": over}, LICENCE]
    response = client.post("/v1/tokens/batch", json={"items": items}, headers=bearer(actors.onboarding))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert results[0]["token"] and results[2]["token"]
    assert results[1]["error"]["code"] == "too_large"
    assert "value" in results[1]["error"]["field"]
    assert not results[1].get("token")


def test_oversized_batches_are_413_naming_the_list(
    vault_with: Callable[..., tuple[TestClient, Actors]],
) -> None:
    client, actors = vault_with(max_batch_items=5)

    items = [{**LICENCE, "customer_id": f"c-{n}"} for n in range(6)]
    response = client.post("/v1/tokens/batch", json={"items": items}, headers=bearer(actors.onboarding))
    assert_error(response, 413, "too_large", "items")
    accepted = client.post("/v1/tokens/batch", json={"items": items[:5]}, headers=bearer(actors.onboarding))
    assert accepted.status_code == 200, accepted.text
    tokens = [result["token"] for result in accepted.json()["results"]]
    assert all(tokens)

    response = client.post(
        "/v1/tokens/detokenize", json={"tokens": [*tokens, tokens[0]]}, headers=bearer(actors.kyc)
    )
    assert_error(response, 413, "too_large", "tokens")
    accepted = client.post("/v1/tokens/detokenize", json={"tokens": tokens}, headers=bearer(actors.kyc))
    assert accepted.status_code == 200, accepted.text
    assert [r["value"] for r in accepted.json()["results"]] == [LICENCE["value"]] * 5


def test_empty_batches_are_422(client: TestClient, actors: Actors) -> None:
    response = client.post("/v1/tokens/batch", json={"items": []}, headers=bearer(actors.onboarding))
    assert_error(response, 422, "invalid_input", "items")
    response = client.post("/v1/tokens/detokenize", json={"tokens": []}, headers=bearer(actors.kyc))
    assert_error(response, 422, "invalid_input", "tokens")


def test_body_larger_than_the_limit_is_413(vault_with: Callable[..., tuple[TestClient, Actors]]) -> None:
    client, actors = vault_with(max_body_bytes=2048)
    body = {**LICENCE, "value": "x" * 3000}
    response = client.post("/v1/tokens", json=body, headers=bearer(actors.onboarding))
    assert_error(response, 413, "too_large")


def test_chunked_body_larger_than_the_limit_is_413(
    vault_with: Callable[..., tuple[TestClient, Actors]],
) -> None:
    """No Content-Length to check up front: the limit must hold while the body streams in."""
    client, actors = vault_with(max_body_bytes=2048)
    payload = (
        '{"customer_id": "12345", "data_type": "DriverLicense", "value": "' + "x" * 3000 + '"}'
    ).encode()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(payload), 512):
            yield payload[start : start + 512]

    response = client.post("/v1/tokens", content=chunks(), headers={**bearer(actors.onboarding), **JSON})
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert_error(response, 413, "too_large")


# Tokens by path


def test_malformed_token_is_422_naming_it(client: TestClient, actors: Actors) -> None:
    def check(token: str) -> None:
        response = client.get(f"/v1/tokens/{token}", headers=bearer(actors.kyc))
        assert_error(response, 422, "invalid_input", "token")

    each_case(["not-a-token", "tok_short", "tok_" + "a" * 22 + "!", "TOK_" + "a" * 30], check)

    overlong = client.get(f"/v1/tokens/tok_{'a' * 200}", headers=bearer(actors.kyc))
    error = assert_error(overlong, 422, "invalid_input")
    assert "token" in error.get("field", ""), error


def test_unknown_well_formed_token_is_404_for_a_decrypt_grantee(client: TestClient, actors: Actors) -> None:
    response = client.get("/v1/tokens/tok_doesnotexistdoesnotexist00000000", headers=bearer(actors.kyc))
    assert_error(response, 404, "not_found")


# Principals


def test_bad_principal_fields_are_422(client: TestClient, actors: Actors) -> None:
    def check(case: tuple[dict[str, Any], str]) -> None:
        body, field = case
        response = client.post("/v1/principals", json=body, headers=bearer(actors.admin))
        assert_error(response, 422, "invalid_input", field)

    roles: list[Any] = ["root", "Admin", "", None, 1]
    names: list[Any] = ["", "has space", "x" * 129, "a/b", 5]
    cases = [({"name": "new-app", "role": role}, "role") for role in roles]
    cases += [({"name": name, "role": "service"}, "name") for name in names]
    cases += [({"name": "new-app", "role": "service", "api_key": "pv_mine"}, "api_key")]
    each_case(cases, check)
    listed = client.get("/v1/principals", headers=bearer(actors.admin)).json()["principals"]
    assert sorted(p["name"] for p in listed) == ["kyc-app", "onboarding-app", "root-admin"]


def test_duplicate_principal_name_is_409(client: TestClient, actors: Actors) -> None:
    response = client.post(
        "/v1/principals", json={"name": "kyc-app", "role": "service"}, headers=bearer(actors.admin)
    )
    assert_error(response, 409, "conflict")
    listed = client.get("/v1/principals", headers=bearer(actors.admin)).json()["principals"]
    assert [p["name"] for p in listed].count("kyc-app") == 1


# Grants


def grant_body(**overrides: Any) -> dict[str, Any]:
    return {"grantee": "kyc-app", "operations": ["Decrypt"], **overrides}


def grant_count(client: TestClient, actors: Actors) -> int:
    response = client.get("/v1/grants", headers=bearer(actors.admin))
    assert response.status_code == 200, response.text
    return len(response.json()["grants"])


def test_bad_grant_fields_are_422(client: TestClient, actors: Actors) -> None:
    before = grant_count(client, actors)

    def check(case: tuple[dict[str, Any], str]) -> None:
        body, field = case
        response = client.post("/v1/grants", json=body, headers=bearer(actors.admin))
        assert_error(response, 422, "invalid_input", field)

    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    each_case(
        [
            (grant_body(operations=[]), "operations"),
            (grant_body(operations=["Sign"]), "operations[0]"),
            (grant_body(operations=["Decrypt", "ReEncrypt"]), "operations[1]"),
            (grant_body(operations="Decrypt"), "operations"),
            ({"operations": ["Decrypt"]}, "grantee"),
            (grant_body(extra=True), "extra"),
            (grant_body(expires_at=past), "expires_at"),
            (grant_body(expires_at="2999-01-01T00:00:00"), "expires_at"),  # no offset
            (grant_body(expires_at="next week"), "expires_at"),
            (grant_body(expires_at="2999-13-01T00:00:00Z"), "expires_at"),
            (grant_body(grantee="nobody"), "grantee"),
            (grant_body(grantee="00000000-0000-0000-0000-000000000000"), "grantee"),
        ],
        check,
    )
    assert grant_count(client, actors) == before


def test_bad_grant_constraints_are_422(client: TestClient, actors: Actors) -> None:
    before = grant_count(client, actors)

    def check(constraints: dict[str, Any]) -> None:
        response = client.post(
            "/v1/grants", json=grant_body(constraints=constraints), headers=bearer(actors.admin)
        )
        error = assert_error(response, 422, "invalid_input")
        assert str(error.get("field", "")).startswith("constraints"), error

    each_case(
        [
            {
                "encryption_context_subset": {"dataType": "SSN"},
                "encryption_context_equals": {"dataType": "SSN"},
            },
            {"encryption_context_subset": {"customerId": "12345"}},
            {"encryption_context_equals": {"purpose": "x"}},
            {"encryption_context_subset": {}},
            {"encryption_context_subset": {"dataType": 5}},
            {"encryption_context_superset": {"dataType": "SSN"}},
            {},
        ],
        check,
    )
    assert grant_count(client, actors) == before


def test_expires_at_in_the_future_with_offset_is_accepted(client: TestClient, actors: Actors) -> None:
    response = client.post(
        "/v1/grants", json=grant_body(expires_at="2999-01-01T00:00:00+02:00"), headers=bearer(actors.admin)
    )
    assert response.status_code == 201, response.text


def test_admin_or_auditor_grantee_is_422(client: TestClient, actors: Actors) -> None:
    create_principal(client, actors.admin, "second-admin", role="admin")
    create_principal(client, actors.admin, "auditor-1", role="auditor")

    def check(grantee: str) -> None:
        response = client.post("/v1/grants", json=grant_body(grantee=grantee), headers=bearer(actors.admin))
        assert_error(response, 422, "invalid_input", "grantee")

    each_case(["root-admin", "second-admin", "auditor-1"], check)


# X-Access-Reason


def test_access_reason_required_when_the_setting_says_so(
    vault_with: Callable[..., tuple[TestClient, Actors]],
) -> None:
    client, actors = vault_with(require_access_reason=True)
    created = client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding))
    assert created.status_code == 201, created.text
    token = created.json()["token"]

    missing = client.get(f"/v1/tokens/{token}", headers=bearer(actors.kyc))
    error = assert_error(missing, 400, "access_reason_required")
    assert LICENCE["value"] not in missing.text
    assert "X-Access-Reason" in (error.get("field") or error["message"])
    blank = client.get(f"/v1/tokens/{token}", headers={**bearer(actors.kyc), "X-Access-Reason": "   "})
    assert_error(blank, 400, "access_reason_required")
    batch = client.post("/v1/tokens/detokenize", json={"tokens": [token]}, headers=bearer(actors.kyc))
    assert_error(batch, 400, "access_reason_required")
    assert LICENCE["value"] not in batch.text

    given = client.get(f"/v1/tokens/{token}", headers={**bearer(actors.kyc), "X-Access-Reason": "loan 991"})
    assert given.status_code == 200, given.text
    assert given.json()["value"] == LICENCE["value"]


def test_access_reason_optional_by_default(client: TestClient, actors: Actors) -> None:
    created = client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding))
    response = client.get(f"/v1/tokens/{created.json()['token']}", headers=bearer(actors.kyc))
    assert response.status_code == 200, response.text


def test_overlong_access_reason_is_422(client: TestClient, actors: Actors) -> None:
    created = client.post("/v1/tokens", json=LICENCE, headers=bearer(actors.onboarding))
    response = client.get(
        f"/v1/tokens/{created.json()['token']}", headers={**bearer(actors.kyc), "X-Access-Reason": "r" * 513}
    )
    error = assert_error(response, 422, "invalid_input")
    assert "X-Access-Reason".lower() in str(error.get("field", "")).lower(), error
