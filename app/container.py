"""Builds the vault's parts from the settings, once per process."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from app.crypto.keys import GrantMirror, KeyProvider, NoGrantMirror
from app.crypto.kms import KmsKeyProvider
from app.crypto.local import LocalKeyProvider
from app.db.session import Database
from app.services.alerts import Alerter, Webhook
from app.services.approvals import ApprovalQueue, ApprovalService
from app.services.audit import AuditKeyring, Auditor
from app.services.console import ConsoleSessions
from app.services.context import RequestContext
from app.services.data_types import DataTypeService
from app.services.erasure import ErasureService, ReportService
from app.services.fingerprints import FingerprintBackfill
from app.services.grants import GrantService
from app.services.idempotency import IdempotencyService
from app.services.keys import KeyRotation, allow_list_of
from app.services.limits import Counters, FailedAuthentications, LookupLimits, PrincipalLimits
from app.services.principals import PrincipalService
from app.services.retention import RetentionSweeper
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
    approvals: ApprovalService

    def sweep(self, ctx: RequestContext) -> None:
        """The periodic sweep: grant expiries and mirrors, then lapsed four-eyes requests."""
        self.grants.sweep(ctx)
        self.approvals.sweep(ctx)

    erasure: ErasureService
    reports: ReportService
    retention: RetentionSweeper
    idempotency: IdempotencyService
    console: ConsoleSessions
    # The key of lookup fingerprints (made on first use, through the key provider).
    fingerprint_key: VaultKeyring
    # `piivault fingerprints backfill`: fingerprints of records stored without one.
    fingerprints: FingerprintBackfill

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
        call_deadline_s=settings.kms_call_deadline_s,
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
    """The vault's parts."""
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
    keyring = AuditKeyring(database, keys)
    auditor = Auditor(database, keyring, Alerter(webhook))
    # Its body MACs use a key derived from the audit key: one keyring, one unwrap per process.
    idempotency = IdempotencyService(database, keyring, lease_s=settings.idempotency_lease_s)
    queue = ApprovalQueue(
        auditor, enabled=settings.dual_control_on, ttl=timedelta(seconds=settings.approval_ttl_s)
    )
    counters = Counters(
        settings.redis_url.get_secret_value() if settings.redis_url else None,
        timeout_s=settings.redis_timeout_s,
    )
    principals = PrincipalService(
        database,
        auditor,
        queue,
        PrincipalLimits(counters, settings.rate_limit_rps, settings.rate_limit_burst),
        FailedAuthentications(counters, settings.auth_failure_limit, settings.auth_failure_window_s),
    )
    data_types = DataTypeService(database, auditor)
    grants = GrantService(database, auditor, principals, mirror or NoGrantMirror(), queue, data_types)
    approvals = ApprovalService(database, auditor, queue, principals, grants)
    fingerprint_key = VaultKeyring(database, keys, FINGERPRINT)
    tokens = TokenService(
        keys=keys,
        database=database,
        principals=principals,
        auditor=auditor,
        data_types=data_types,
        max_value_bytes=settings.max_value_bytes,
        require_access_reason=settings.require_access_reason,
        idempotency=idempotency,
        fingerprint_key=fingerprint_key.key,
        lookup_limits=LookupLimits(counters, settings.lookup_rate_per_s),
    )
    rotation = KeyRotation(database, auditor, keys, allow_list_of(keys), grants=grants)
    erasure = ErasureService(
        database=database,
        tokens=tokens,
        auditor=auditor,
        batch=settings.erasure_batch_size,
        require_reason=settings.require_access_reason,
    )
    retention = RetentionSweeper(database, auditor, batch=settings.erasure_batch_size)
    console = ConsoleSessions(
        principals, auditor, idle_s=settings.console_idle_s, absolute_s=settings.console_session_s
    )
    return Vault(
        settings,
        database,
        keys,
        auditor,
        principals,
        grants,
        tokens,
        rotation,
        data_types,
        approvals,
        erasure,
        ReportService(auditor),
        retention,
        idempotency,
        console,
        fingerprint_key,
        FingerprintBackfill(database, auditor, keys, fingerprint_key.key),
    )
