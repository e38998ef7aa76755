"""The seed scenario once more, with the vault and moto's KMS server as separate processes.

Everything goes over real HTTP on 127.0.0.1: the test talks to `piivault serve` with httpx, the vault
talks to `python -m moto.server` with boto3, and the test inspects KMS itself (grants, wrapped keys)
through the same moto endpoint. The first admin comes from the `piivault admin create` CLI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import httpx
import psycopg
import pytest

from tests.conftest import GRANTEE_ARN, bearer
from tests.processes import ServerProcess, free_port, json_log_lines, running, wait_for_http

if TYPE_CHECKING:
    from mypy_boto3_kms.client import KMSClient

BIN = Path(sys.executable).parent
PIIVAULT = BIN / "piivault"
KEY_ALIAS = "alias/piivault-e2e"
REGION = "us-east-1"
LICENCE_ONLY = {"encryption_context_subset": {"dataType": "DriverLicense"}}
LICENCE = {"customer_id": "12345", "data_type": "DriverLicense", "value": "D1234-56789-01234"}
SSN = {"customer_id": "12345", "data_type": "SSN", "value": "078-05-1120"}

pytestmark = [
    pytest.mark.skipif(
        not PIIVAULT.exists(), reason=f"the piivault console script is not installed at {PIIVAULT}"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("flask") is None, reason="moto's server needs moto[server] (flask)"
    ),
]


@dataclass
class Kms:
    endpoint_url: str
    client: KMSClient
    key_id: str
    key_arn: str


@dataclass
class Stack:
    base_url: str
    kms: Kms
    admin_key: str
    vault: ServerProcess


def kms_client(endpoint_url: str) -> KMSClient:
    return boto3.client(
        "kms",
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def base_env() -> dict[str, str]:
    """The test's environment without any PIIVAULT_ or AWS profile setting that could leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIIVAULT_") and k != "AWS_PROFILE"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def kms(tmp_path: Path) -> Iterator[Kms]:
    """moto's server in its own process, with the vault's key and alias created over HTTP."""
    port = free_port()
    endpoint_url = f"http://127.0.0.1:{port}"
    args = [str(BIN / "python"), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with running("moto", args, env=base_env(), log_dir=tmp_path / "logs", cwd=tmp_path) as moto:
        wait_for_http(moto, f"{endpoint_url}/moto-api/", timeout_s=20)
        client = kms_client(endpoint_url)
        meta = client.create_key(Description="piivault e2e key")["KeyMetadata"]
        client.create_alias(AliasName=KEY_ALIAS, TargetKeyId=meta["KeyId"])
        yield Kms(endpoint_url, client, meta["KeyId"], meta["Arn"])


@pytest.fixture
def stack(kms: Kms, database_url: str, db: psycopg.Connection[Any], tmp_path: Path) -> Iterator[Stack]:
    """`piivault serve` in its own process (production settings, tables emptied by `db`), plus the
    first admin's key from `piivault admin create`."""
    env = base_env() | {
        "PIIVAULT_ENVIRONMENT": "production",
        # One admin runs the seed scenario here; tests/test_dual_control.py covers four eyes.
        "PIIVAULT_DUAL_CONTROL": "false",
        "PIIVAULT_DATABASE_URL": database_url,
        "PIIVAULT_KMS_KEY_ID": KEY_ALIAS,
        "PIIVAULT_KMS_ENDPOINT_URL": kms.endpoint_url,
        "PIIVAULT_KMS_ALLOW_INSECURE_ENDPOINT": "true",
        "PIIVAULT_KMS_MIRROR_GRANTS": "true",
        "PIIVAULT_KMS_GRANTEE_PRINCIPAL": GRANTEE_ARN,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    args = [str(PIIVAULT), "serve", "--host", "127.0.0.1", "--port", str(port), "--access-log"]
    logs = tmp_path / "logs"
    with running("piivault", args, env=env, log_dir=logs, cwd=tmp_path, json_logs=True) as vault:
        wait_for_http(vault, f"{base_url}/readyz", timeout_s=30)
        created = subprocess.run(
            [str(PIIVAULT), "admin", "create", "e2e-admin"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert created.returncode == 0, f"admin create failed:\n{created.stderr}\n{created.stdout}"
        admin_key = created.stdout.strip().splitlines()[-1].strip()
        assert admin_key, created.stdout
        vault.secrets.add(admin_key)
        yield Stack(base_url, kms, admin_key, vault)
        assert vault.running(), f"the vault died during the test\n{vault.output()}"


def mirrors(kms: Kms) -> dict[str, dict[str, Any]]:
    """The KMS grants on the vault's key, by grant id, as ListGrants shows them."""
    grants = kms.client.list_grants(KeyId=kms.key_arn)["Grants"]
    return {grant["GrantId"]: dict(grant) for grant in grants if "GrantId" in grant}


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


def assert_refused(response: httpx.Response, hidden: dict[str, str]) -> None:
    """403 grant_required, revealing neither the value nor the customer or data type behind the token."""
    assert response.status_code == 403, response.text
    assert error_code(response) == "grant_required", response.text
    assert response.headers.get("X-Request-ID")
    body = response.json()
    assert {"value", "customer_id", "data_type"}.isdisjoint(body), body
    assert hidden["value"] not in response.text


def test_seed_scenario_with_vault_and_kms_as_separate_processes(
    stack: Stack, db: psycopg.Connection[Any]
) -> None:
    kms = stack.kms
    with httpx.Client(base_url=stack.base_url, timeout=15.0) as http:
        admin = bearer(stack.admin_key)

        # The admin registers the two apps.
        keys: dict[str, str] = {}
        for name in ("onboarding-app", "kyc-app"):
            response = http.post("/v1/principals", json={"name": name, "role": "service"}, headers=admin)
            assert response.status_code == 201, response.text
            assert response.headers.get("X-Request-ID")
            keys[name] = response.json()["api_key"]
        onboarding, kyc = bearer(keys["onboarding-app"]), bearer(keys["kyc-app"])
        # Checked in every line the vault writes, when the stack stops (tests/processes.py).
        stack.vault.secrets |= {*keys.values(), LICENCE["value"], SSN["value"]}

        # Onboarding may Encrypt licences, KYC may Decrypt them; each grant is mirrored in KMS.
        granted: dict[str, dict[str, Any]] = {}
        for grantee, operation in (("onboarding-app", "Encrypt"), ("kyc-app", "Decrypt")):
            body = {"grantee": grantee, "operations": [operation], "constraints": LICENCE_ONLY}
            response = http.post("/v1/grants", json=body, headers=admin)
            assert response.status_code == 201, response.text
            grant = response.json()
            assert grant["kms_grant_id"], grant
            assert grant["constraints"] == LICENCE_ONLY
            granted[grantee] = grant
        in_kms = mirrors(kms)
        for grantee, kms_operation in (("onboarding-app", "GenerateDataKey"), ("kyc-app", "Decrypt")):
            mirror = in_kms.get(granted[grantee]["kms_grant_id"])
            assert mirror is not None, f"no KMS mirror for {grantee}'s grant: {in_kms}"
            assert mirror["Operations"] == [kms_operation]
            assert mirror["Constraints"] == {"EncryptionContextSubset": {"dataType": "DriverLicense"}}
            assert mirror["GranteePrincipal"] == GRANTEE_ARN

        # Onboarding tokenizes customer 12345's licence; KYC reads it back by token.
        response = http.post("/v1/tokens", json=LICENCE, headers=onboarding)
        assert response.status_code == 201, response.text
        token: str = response.json()["token"]
        assert token.startswith("tok_")
        assert LICENCE["value"] not in response.text
        response = http.get(f"/v1/tokens/{token}", headers={**kyc, "X-Access-Reason": "loan application 991"})
        assert response.status_code == 200, response.text
        assert response.json() == {
            "token": token,
            "customer_id": "12345",
            "data_type": "DriverLicense",
            "value": LICENCE["value"],
        }

        # Everyone else is refused.
        response = http.post(
            "/v1/tokens", json={**LICENCE, "customer_id": "12346", "value": "D9999"}, headers=kyc
        )
        assert response.status_code == 403, response.text
        assert error_code(response) == "grant_required"
        assert_refused(http.get(f"/v1/tokens/{token}", headers=onboarding), LICENCE)
        assert_refused(http.get(f"/v1/tokens/{token}", headers=admin), LICENCE)

        # A Decrypt grant on DriverLicense does not open an SSN record.
        body = {
            "grantee": "onboarding-app",
            "operations": ["Encrypt"],
            "constraints": {"encryption_context_subset": {"dataType": "SSN"}},
        }
        response = http.post("/v1/grants", json=body, headers=admin)
        assert response.status_code == 201, response.text
        response = http.post("/v1/tokens", json=SSN, headers=onboarding)
        assert response.status_code == 201, response.text
        ssn_token: str = response.json()["token"]
        assert_refused(http.get(f"/v1/tokens/{ssn_token}", headers=kyc), SSN)

        # The stored wrapped key opens in KMS under exactly the record's context, and no other.
        row = db.execute(
            "SELECT wrapped_key, customer_id, data_type FROM records WHERE token = %s", (token,)
        ).fetchone()
        assert row is not None
        wrapped, customer_id, data_type = bytes(row[0]), row[1], row[2]
        assert (customer_id, data_type) == ("12345", "DriverLicense")
        opened = kms.client.decrypt(
            CiphertextBlob=wrapped,
            KeyId=kms.key_id,
            EncryptionContext={"customerID": "12345", "dataType": "DriverLicense"},
        )
        assert len(opened["Plaintext"]) == 32
        assert opened["KeyId"] == kms.key_arn
        for wrong_context in (
            {"customerID": "67890", "dataType": "DriverLicense"},
            {"customerID": "12345"},
            {"customerID": "12345", "dataType": "SSN"},
            {},
        ):
            with pytest.raises(kms.client.exceptions.InvalidCiphertextException):
                kms.client.decrypt(CiphertextBlob=wrapped, KeyId=kms.key_id, EncryptionContext=wrong_context)

        # The admin revokes KYC's grant: refused at once, and the KMS mirror is gone.
        kyc_grant = granted["kyc-app"]
        response = http.delete(f"/v1/grants/{kyc_grant['id']}", headers=admin)
        assert response.status_code == 200, response.text
        assert response.json()["active"] is False
        assert response.json()["revoked_at"]
        assert_refused(http.get(f"/v1/tokens/{token}", headers=kyc), LICENCE)
        in_kms = mirrors(kms)
        assert kyc_grant["kms_grant_id"] not in in_kms, in_kms
        assert granted["onboarding-app"]["kms_grant_id"] in in_kms, in_kms

    # Its log so far: JSON lines; access lines name the route (not the token) and the caller.
    lines = json_log_lines(stack.vault)
    access = [line for line in lines if line.get("logger") == "piivault.access"]
    reads = [line for line in access if line.get("route") == "/v1/tokens/{token}"]
    assert reads and all(line["method"] == "GET" and line.get("request_id") for line in reads)
    assert {line["status"] for line in reads} == {200, 403}
    assert all(line.get("principal_id") for line in reads)
    assert token not in json.dumps(access) and ssn_token not in json.dumps(access)
    assert any(line.get("logger") == "uvicorn.error" for line in lines)  # uvicorn's own, as JSON
