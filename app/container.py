"""Builds the vault's parts from the settings, once per process."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from app.crypto.keys import GrantMirror, KeyProvider, NoGrantMirror
from app.crypto.kms import KmsKeyProvider
from app.crypto.local import LocalKeyProvider
from app.db.session import Database
from app.services.alerts import Alerter, Webhook
from app.services.audit import AuditKeyring, Auditor
from app.services.data_types import DataTypeService
from app.services.grants import GrantService
from app.services.keys import KeyRotation, allow_list_of
from app.services.principals import PrincipalService
from app.services.tokens import TokenService
from app.services.vault_keys import FINGERPRINT, VaultKeyring
from app.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Vault:
    settings: Settings
    database: Database
    keys: KeyProvider
    auditor: Auditor
    principals: PrincipalService
    grants: GrantService
    tokens: TokenService
    rotation: KeyRotation
    data_types: DataTypeService
    # The key of lookup fingerprints (made on first use, through the key provider).
    fingerprint_key: VaultKeyring

    def close(self) -> None:
        self.auditor.close()
        self.database.dispose()
        self.keys.close()


def database_url(settings: Settings) -> str:
    if settings.database_url is None:
        # The embedded server is started by `piivault serve` / the CLI, which export its URL.
        raise RuntimeError("no database URL: start through `piivault serve` for the embedded default")
    return settings.database_url.get_secret_value()


def build_key_provider(settings: Settings) -> tuple[KeyProvider, GrantMirror]:
    if settings.effective_key_provider == "local":
        return LocalKeyProvider.from_directory(settings.data_dir), NoGrantMirror()
    kms = KmsKeyProvider(
        settings.kms_key_id or "",  # required by Settings validation for the kms provider
        decrypt_key_ids=settings.kms_decrypt_key_ids,
        endpoint_url=settings.kms_endpoint_url,
        region=settings.kms_region,
        connect_timeout_s=settings.kms_connect_timeout_s,
        read_timeout_s=settings.kms_read_timeout_s,
        max_attempts=settings.kms_max_attempts,
        grantee_principal=settings.kms_grantee_principal,
        verify=settings.kms_ca_bundle,
        transport=settings.kms_transport,
    )
    return kms, (kms if settings.kms_mirror_grants else NoGrantMirror())


def build_vault(
    settings: Settings,
    *,
    url: str | None = None,
    keys: KeyProvider | None = None,
    mirror: GrantMirror | None = None,
) -> Vault:
    database = Database(
        url or database_url(settings),
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        statement_timeout_ms=settings.db_statement_timeout_ms,
    )
    if keys is None:
        keys, default_mirror = build_key_provider(settings)
        mirror = mirror or default_mirror
    webhook = Webhook(settings.alert_webhook_url) if settings.alert_webhook_url else None
    auditor = Auditor(database, AuditKeyring(database, keys), Alerter(webhook))
    principals = PrincipalService(auditor)
    data_types = DataTypeService(database, auditor)
    grants = GrantService(database, auditor, principals, mirror or NoGrantMirror(), data_types)
    tokens = TokenService(
        keys=keys,
        database=database,
        principals=principals,
        auditor=auditor,
        data_types=data_types,
        max_value_bytes=settings.max_value_bytes,
        require_access_reason=settings.require_access_reason,
    )
    rotation = KeyRotation(database, auditor, keys, allow_list_of(keys))
    fingerprint_key = VaultKeyring(database, keys, FINGERPRINT)
    return Vault(
        settings, database, keys, auditor, principals, grants, tokens, rotation, data_types, fingerprint_key
    )
