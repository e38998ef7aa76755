"""Start-up failures are a line or two naming the setting, with exit code 2 for a configuration to
fix and 3 for a dependency not reachable now; `piivault check` runs the same checks and exits."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from typer.testing import CliRunner

from app.cli import EXIT_CONFIG, EXIT_UNREACHABLE, cli
from app.settings import get_settings

runner = CliRunner()


@pytest.fixture(autouse=True)
def fresh_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each invocation reads the environment this test sets, and nothing the suite left behind."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def invoke(monkeypatch: pytest.MonkeyPatch, args: list[str], **env: str) -> Any:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # `serve` configures the process's logging (a handler on the root logger) before anything else:
    # not pytest's, which captures it. tests/test_logs.py tests that configuration.
    monkeypatch.setattr("app.logs.configure", lambda *_, **__: {})
    result = runner.invoke(cli, args)
    assert "Traceback" not in result.output
    return result


def closed_port() -> int:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port: int = placeholder.getsockname()[1]
        return port


DEV = {"PIIVAULT_ENVIRONMENT": "development"}


def test_version(monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke(monkeypatch, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("piivault ")


def test_a_bad_type_names_the_variable(monkeypatch: pytest.MonkeyPatch, database_url: str) -> None:
    result = invoke(
        monkeypatch, ["check"], PIIVAULT_MAX_BATCH_ITEMS="lots", PIIVAULT_DATABASE_URL=database_url, **DEV
    )
    assert result.exit_code == EXIT_CONFIG
    assert "PIIVAULT_MAX_BATCH_ITEMS" in result.output and len(result.output.strip().splitlines()) <= 2


def test_a_misspelled_variable_is_refused_in_production_with_a_suggestion(
    monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    result = invoke(
        monkeypatch,
        ["check"],
        PIIVAULT_MAX_BATCH_ITEM="5",
        PIIVAULT_DATABASE_URL=database_url,
        PIIVAULT_KMS_KEY_ID="alias/anything",
        PIIVAULT_KMS_MIRROR_GRANTS="false",
    )
    assert result.exit_code == EXIT_CONFIG
    assert "PIIVAULT_MAX_BATCH_ITEM (did you mean PIIVAULT_MAX_BATCH_ITEMS?)" in result.output


def test_a_misspelled_variable_is_a_warning_in_development(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PIIVAULT_ENVIRONMENT", "development")
    monkeypatch.setenv("PIIVAULT_REQUIRE_ACCESS_REASONS", "true")
    with caplog.at_level(logging.WARNING, logger="app.settings"):
        settings = get_settings()
    assert settings.environment == "development"
    assert "PIIVAULT_REQUIRE_ACCESS_REASONS (did you mean PIIVAULT_REQUIRE_ACCESS_REASON?)" in caplog.text


def test_an_unreachable_database_is_one_line_and_exit_3(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"postgresql://vault:secret-password@127.0.0.1:{closed_port()}/vault"
    for command in (["migrate"], ["check"]):
        result = invoke(monkeypatch, command, PIIVAULT_DATABASE_URL=url, **DEV)
        assert result.exit_code == EXIT_UNREACHABLE, result.output
        assert "cannot reach the database (PIIVAULT_DATABASE_URL)" in result.output
        assert "secret-password" not in result.output
        assert len(result.output.strip().splitlines()) <= 2


def test_a_malformed_database_url_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke(monkeypatch, ["migrate"], PIIVAULT_DATABASE_URL="not a url", **DEV)
    assert result.exit_code == EXIT_CONFIG
    assert "PIIVAULT_DATABASE_URL is not a PostgreSQL URL" in result.output


def test_check_passes_on_a_migrated_database_and_refuses_an_unmigrated_one(
    monkeypatch: pytest.MonkeyPatch, database_url: str, tmp_path: Any
) -> None:
    ready = invoke(
        monkeypatch, ["check"], PIIVAULT_DATABASE_URL=database_url, PIIVAULT_DATA_DIR=str(tmp_path), **DEV
    )
    assert ready.exit_code == 0, ready.output
    assert "ready" in ready.output

    server = database_url.rsplit("/", 1)[0] + "/postgres"  # a database with no vault tables
    get_settings.cache_clear()
    bare = invoke(monkeypatch, ["check"], PIIVAULT_DATABASE_URL=server)
    assert bare.exit_code == EXIT_CONFIG
    assert "run `piivault migrate`" in bare.output


@pytest.mark.parametrize("problem", ["disabled", "missing"])
def test_production_refuses_to_start_on_a_disabled_or_missing_key(
    monkeypatch: pytest.MonkeyPatch, database_url: str, aws: None, problem: str
) -> None:
    kms = boto3.client("kms")
    key_id = kms.create_key(Description="piivault start-up test")["KeyMetadata"]["KeyId"]
    if problem == "disabled":
        kms.disable_key(KeyId=key_id)
    else:
        key_id = "alias/piivault-nobody-made-this"
    production = {
        "PIIVAULT_DATABASE_URL": database_url,
        "PIIVAULT_KMS_KEY_ID": key_id,
        "PIIVAULT_KMS_MIRROR_GRANTS": "false",
    }
    for command in (["check"], ["serve", "--no-migrate"]):
        get_settings.cache_clear()
        result = invoke(monkeypatch, command, **production)
        assert result.exit_code == EXIT_CONFIG, result.output
        assert "PIIVAULT_KMS_KEY_ID" in result.output


def test_an_unreachable_key_service_is_exit_3(monkeypatch: pytest.MonkeyPatch, database_url: str) -> None:
    result = invoke(
        monkeypatch,
        ["check"],
        PIIVAULT_DATABASE_URL=database_url,
        PIIVAULT_KMS_KEY_ID="alias/piivault",
        PIIVAULT_KMS_ENDPOINT_URL=f"http://127.0.0.1:{closed_port()}",
        PIIVAULT_KMS_ALLOW_INSECURE_ENDPOINT="true",
        PIIVAULT_KMS_MIRROR_GRANTS="false",
        PIIVAULT_KMS_MAX_ATTEMPTS="1",
        PIIVAULT_KMS_CONNECT_TIMEOUT_S="0.5",
    )
    assert result.exit_code == EXIT_UNREACHABLE, result.output
    assert "PIIVAULT_KMS_ENDPOINT_URL" in result.output


def test_a_secret_can_come_from_a_file(
    monkeypatch: pytest.MonkeyPatch, database_url: str, tmp_path: Any
) -> None:
    secret = tmp_path / "database_url"
    secret.write_text(database_url + "\n")
    settings = {"PIIVAULT_DATABASE_URL_FILE": str(secret), "PIIVAULT_DATA_DIR": str(tmp_path), **DEV}
    ready = invoke(monkeypatch, ["check"], **settings)
    assert ready.exit_code == 0, ready.output
    read = get_settings().database_url
    assert read is not None and read.get_secret_value() == database_url


def test_a_secret_file_that_cannot_be_read_or_doubles_the_variable_is_refused(
    monkeypatch: pytest.MonkeyPatch, database_url: str, tmp_path: Any
) -> None:
    missing = invoke(monkeypatch, ["check"], PIIVAULT_DATABASE_URL_FILE=str(tmp_path / "absent"), **DEV)
    assert missing.exit_code == EXIT_CONFIG
    assert missing.output.startswith("piivault: PIIVAULT_DATABASE_URL_FILE: cannot read")

    secret = tmp_path / "database_url"
    secret.write_text(database_url)
    get_settings.cache_clear()
    both = invoke(
        monkeypatch, ["check"], PIIVAULT_DATABASE_URL=database_url, PIIVAULT_DATABASE_URL_FILE=str(secret)
    )
    assert both.exit_code == EXIT_CONFIG
    assert "not both" in both.output and database_url not in both.output


def test_a_missing_aws_region_is_one_line_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, database_url: str, tmp_path: Any
) -> None:
    for variable in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    for command in (["check"], ["serve", "--no-migrate"], ["migrate"]):
        get_settings.cache_clear()
        result = invoke(
            monkeypatch,
            command,
            PIIVAULT_DATABASE_URL=database_url,
            PIIVAULT_KMS_KEY_ID="alias/piivault",
            PIIVAULT_KMS_MIRROR_GRANTS="false",
        )
        assert result.exit_code == EXIT_CONFIG, result.output
        assert "PIIVAULT_KMS_REGION" in result.output
        assert len(result.output.strip().splitlines()) == 1
    # The setting itself is enough.
    get_settings.cache_clear()
    result = invoke(monkeypatch, ["check"], PIIVAULT_KMS_REGION="us-east-1", PIIVAULT_KMS_KEY_ID="x")
    assert "PIIVAULT_KMS_REGION" not in result.output


def test_a_disabled_decrypt_only_key_is_a_warning_not_a_refusal(
    monkeypatch: pytest.MonkeyPatch, database_url: str, aws: None, caplog: pytest.LogCaptureFixture
) -> None:
    kms = boto3.client("kms")
    current = kms.create_key(Description="piivault current key")["KeyMetadata"]["KeyId"]
    retired = kms.create_key(Description="piivault retired key")["KeyMetadata"]["KeyId"]
    kms.disable_key(KeyId=retired)
    with caplog.at_level(logging.WARNING, logger="piivault"):
        result = invoke(
            monkeypatch,
            ["check"],
            PIIVAULT_DATABASE_URL=database_url,
            PIIVAULT_KMS_KEY_ID=current,
            PIIVAULT_KMS_DECRYPT_KEY_IDS=retired,
            PIIVAULT_KMS_MIRROR_GRANTS="false",
        )
    assert result.exit_code == 0, result.output
    warned = [r.getMessage() for r in caplog.records if r.name == "piivault"]
    assert len(warned) == 1 and retired in warned[0] and "PIIVAULT_KMS_DECRYPT_KEY_IDS" in warned[0]
    assert "Disabled" in warned[0]

    # Enabled again: no warning.
    kms.enable_key(KeyId=retired)
    caplog.clear()
    get_settings.cache_clear()
    with caplog.at_level(logging.WARNING, logger="piivault"):
        again = invoke(monkeypatch, ["check"])
    assert again.exit_code == 0, again.output
    assert not [r for r in caplog.records if r.name == "piivault"]
