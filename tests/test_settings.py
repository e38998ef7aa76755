"""The settings refuse unsafe combinations and say why."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from app.settings import Settings


def test_defaults_are_production_and_refuse_to_start_without_a_database_or_key() -> None:
    with pytest.raises(ValidationError) as refused:
        Settings()
    message = str(refused.value)
    assert "local development key provider is refused in production" in message
    assert "embedded database is refused in production" in message


def test_development_allows_the_embedded_default() -> None:
    settings = Settings(environment="development")
    assert settings.uses_embedded_database
    assert settings.effective_key_provider == "local"


def test_production_refuses_the_local_provider_even_when_asked() -> None:
    with pytest.raises(ValidationError, match="local development key provider"):
        Settings(database_url="postgresql://db/x", key_provider="local", kms_key_id="alias/k")


def test_kms_provider_needs_a_key_and_mirroring_needs_a_grantee() -> None:
    with pytest.raises(ValidationError, match="KMS_KEY_ID is required"):
        Settings(environment="development", key_provider="kms")
    with pytest.raises(ValidationError, match="GRANTEE_PRINCIPAL"):
        Settings(database_url="postgresql://db/x", kms_key_id="alias/k")
    ok = Settings(database_url="postgresql://db/x", kms_key_id="alias/k", kms_mirror_grants=False)
    assert ok.effective_key_provider == "kms"


def test_production_refuses_a_plain_http_kms_endpoint_unless_told_it_is_an_emulator() -> None:
    base: dict[str, Any] = {
        "database_url": "postgresql://db/x",
        "kms_key_id": "alias/k",
        "kms_mirror_grants": False,
    }
    with pytest.raises(ValidationError, match="must be https"):
        Settings(**base, kms_endpoint_url="http://kms:5000")
    assert Settings(**base, kms_endpoint_url="https://kms.internal").kms_endpoint_url
    assert Settings(**base, kms_endpoint_url="http://kms:5000", kms_allow_insecure_endpoint=True)


def test_settings_read_the_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIIVAULT_DATABASE_URL", "postgresql://user:hunter2@db/x")
    monkeypatch.setenv("PIIVAULT_KMS_KEY_ID", "alias/piivault")
    monkeypatch.setenv("PIIVAULT_KMS_GRANTEE_PRINCIPAL", "arn:aws:iam::1:role/v")
    monkeypatch.setenv("PIIVAULT_MAX_VALUE_BYTES", "100")
    settings = Settings()
    assert settings.max_value_bytes == 100
    assert "hunter2" not in repr(settings)


def test_limits_are_bounded() -> None:
    with pytest.raises(ValidationError):
        Settings(environment="development", max_value_bytes=0)
    with pytest.raises(ValidationError):
        Settings(environment="development", max_batch_items=100000)


def test_admin_create_refuses_a_bad_name_without_a_traceback() -> None:
    from typer.testing import CliRunner

    from app.cli import cli

    result = CliRunner().invoke(cli, ["admin", "create", "x" * 129])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
