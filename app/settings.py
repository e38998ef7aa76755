"""The vault's one settings class. Every variable is `PIIVAULT_`-prefixed except AWS's own."""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

log = logging.getLogger(__name__)


class UnsafeSettings(ValueError):
    """Raised when the settings would run the vault unsafely; the message says why and how to fix it."""


# Secrets that may come from a file named by PIIVAULT_<NAME>_FILE.
SECRET_FILE_SETTINGS = ("database_url", "alert_webhook_url", "redis_url")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PIIVAULT_", extra="ignore", frozen=True)

    # Production is the default so that a forgotten setting never silently weakens a deployment.
    environment: Literal["development", "production"] = "production"

    # Empty database URL means "use the embedded PostgreSQL", allowed only in development.
    database_url: SecretStr | None = None
    data_dir: Path = Path(".piivault")
    # Per worker and per pool: the admin routes' pool (worker threads match it), its side pool for
    # denials' audit, and the data path's async pool each grow to db_pool_size + db_max_overflow.
    db_pool_size: int = Field(default=12, ge=1, le=200)
    db_max_overflow: int = Field(default=12, ge=0, le=200)
    db_statement_timeout_ms: int = Field(default=5000, ge=100)

    key_provider: Literal["kms", "local"] | None = None
    kms_key_id: str | None = None
    # Older keys the vault may still decrypt with (ids, ARNs or aliases, comma-separated): records
    # name the key that wrapped them, and any key outside this list and kms_key_id is refused.
    kms_decrypt_key_ids: Annotated[tuple[str, ...], NoDecode] = ()
    kms_endpoint_url: str | None = None
    # Data keys cross this connection: plain http only for an emulator, and only when said so.
    kms_allow_insecure_endpoint: bool = False
    kms_region: str | None = None
    kms_connect_timeout_s: float = Field(default=2.0, gt=0, le=30)
    kms_read_timeout_s: float = Field(default=5.0, gt=0, le=60)
    kms_max_attempts: int = Field(default=3, ge=1, le=10)
    # The most one KMS operation may take, retries included, whatever the server does: socket
    # timeouts bound each wait for bytes, and a server dripping bytes would never trip them.
    kms_call_deadline_s: float = Field(default=6.0, gt=0, le=120)
    kms_mirror_grants: bool = True
    # How GenerateDataKey/Decrypt reach KMS: the lean path (signed and sent on the event loop) or
    # boto3's own client in a thread. The lean path falls back to boto3 when it cannot serve.
    kms_transport: Literal["lean", "boto3"] = "lean"
    # A CA bundle (file or directory) to verify KMS's TLS certificate with, for boto3 and the
    # lean path alike; unset: botocore's default (AWS_CA_BUNDLE, the profile's ca_bundle, its own).
    kms_ca_bundle: str | None = None
    kms_grantee_principal: str | None = None

    max_value_bytes: int = Field(default=4096, ge=1, le=1024 * 1024)
    max_batch_items: int = Field(default=1000, ge=1, le=10000)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    require_access_reason: bool = False

    # How often a replica revokes the KMS mirrors of grants that have expired.
    grant_sweep_interval_s: float = Field(default=60.0, ge=0)
    # How often a replica erases expired records (one sweeper at a time runs, cluster-wide); 0: never.
    retention_sweep_interval_s: float = Field(default=60.0, ge=0)
    # Records per erasure transaction (customer erasure, retention sweep): bounds each
    # transaction's time and memory whatever the customer holds.
    erasure_batch_size: int = Field(default=500, ge=1, le=10000)
    # How often a replica chains new audit events (one sealer at a time runs, cluster-wide).
    audit_seal_interval_s: float = Field(default=0.5, ge=0)
    # An Idempotency-Key's in-flight lease: a request holding it longer (a crashed one) loses the
    # key to the next request with the same body. Longer than the slowest request must be.
    idempotency_lease_s: float = Field(default=120.0, ge=5, le=3600)
    # How often a replica deletes Idempotency-Key entries older than 24 hours (0: never).
    idempotency_sweep_interval_s: float = Field(default=300.0, ge=0)
    retry_after_s: int = Field(default=5, ge=1, le=3600)
    # /readyz checks the database and KMS at most this often per process and answers from the last
    # check in between, so probes (or anyone) polling it cannot multiply KMS calls; 0: every time.
    ready_cache_s: float = Field(default=5.0, ge=0, le=300)
    # Log lines: one JSON object each (for a log pipeline), or readable lines (make run).
    log_format: Literal["json", "console"] = "json"
    # Dual control (four eyes): data grants, new admins, disabling an admin and revoking another
    # admin's key wait for a second admin. Unset: on in production, off in development (so that
    # one person can try the vault). Turned off in production, start-up says so loudly.
    dual_control: bool | None = None
    # How long a four-eyes request waits for its second admin before it expires (72 h).
    approval_ttl_s: float = Field(default=72 * 3600, gt=0, le=90 * 24 * 3600)
    # The console (/console): a session ends after this long without a request, and after
    # console_session_s whatever happens.
    console_idle_s: int = Field(default=900, ge=60, le=86400)
    console_session_s: int = Field(default=8 * 3600, ge=300, le=7 * 86400)
    # Denials and failed authentications are POSTed here (JSON) in the background.
    alert_webhook_url: str | None = None
    # /docs and /openapi.json: unset, on in development and off in production (the document maps
    # every endpoint and error for whoever can reach the port); true or false decides either way.
    docs_enabled: bool | None = None

    # What `piivault serve` enforces on each connection (app/api/server.py): the request line and
    # headers together (431 above it), and how long a client may take to send them, and its body
    # (408 and the connection closed), so slow clients cannot hold connections for ever.
    max_header_bytes: int = Field(default=16 * 1024, ge=1024, le=1024 * 1024)
    header_read_timeout_s: float = Field(default=10.0, gt=0, le=300)
    body_read_timeout_s: float = Field(default=30.0, gt=0, le=600)

    # Per-principal request rate (429 rate_limited): `rate_limit_burst` requests in any window of
    # burst / rps seconds (whole seconds, rounded up); an admin may set other values per principal.
    rate_limit_rps: int = Field(default=500, ge=1, le=1_000_000)
    rate_limit_burst: int = Field(default=1000, ge=1, le=10_000_000)
    # Lookups by value (POST /v1/tokens/lookup) per principal per second (429 rate_limited): a
    # lookup is an equality oracle, so it is held far below the general rate.
    lookup_rate_per_s: int = Field(default=10, ge=1, le=1_000_000)
    # Failed authentications per source address in auth_failure_window_s before the source is
    # refused (429) without a lookup; repeats of one failure (key id, source, reason) within the
    # window are audited as one event with a count.
    auth_failure_limit: int = Field(default=20, ge=1, le=100_000)
    auth_failure_window_s: int = Field(default=60, ge=1, le=3600)
    # Rate-limit counters shared by every replica (redis:// or rediss://); unset: per process.
    redis_url: SecretStr | None = None
    # A Redis call that takes longer fails; the vault then limits per process for a while.
    redis_timeout_s: float = Field(default=0.1, gt=0, le=5)

    @field_validator("kms_decrypt_key_ids", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @property
    def effective_key_provider(self) -> Literal["kms", "local"]:
        if self.key_provider is not None:
            return self.key_provider
        return "kms" if self.kms_key_id else "local"

    @property
    def serves_docs(self) -> bool:
        if self.docs_enabled is not None:
            return self.docs_enabled
        return self.environment == "development"

    @property
    def dual_control_on(self) -> bool:
        return self.dual_control if self.dual_control is not None else self.environment == "production"

    @property
    def uses_embedded_database(self) -> bool:
        return self.database_url is None

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, data: object) -> object:
        """PIIVAULT_<SECRET>_FILE names a file holding the secret (as Docker and Kubernetes mount
        secrets), instead of the secret itself in the environment."""
        if not isinstance(data, dict):
            return data
        for name in SECRET_FILE_SETTINGS:
            variable = f"PIIVAULT_{name.upper()}_FILE"
            path = os.environ.get(variable)
            if not path:
                continue
            if data.get(name) is not None:
                raise UnsafeSettings(f"set PIIVAULT_{name.upper()} or {variable}, not both")
            try:
                data[name] = Path(path).read_text(encoding="utf-8").strip()
            except OSError as err:
                raise UnsafeSettings(f"{variable}: cannot read {path} ({err.strerror})") from None
        return data

    @model_validator(mode="after")
    def _refuse_unsafe_combinations(self) -> Settings:
        problems: list[str] = []
        if self.effective_key_provider == "kms" and not self.kms_key_id:
            problems.append("PIIVAULT_KMS_KEY_ID is required with the kms key provider")
        if self.effective_key_provider == "kms" and self.kms_mirror_grants and not self.kms_grantee_principal:
            problems.append(
                "PIIVAULT_KMS_MIRROR_GRANTS needs PIIVAULT_KMS_GRANTEE_PRINCIPAL "
                "(the vault role's ARN); or set PIIVAULT_KMS_MIRROR_GRANTS=false"
            )
        if self.kms_decrypt_key_ids and self.effective_key_provider != "kms":
            problems.append("PIIVAULT_KMS_DECRYPT_KEY_IDS needs the kms key provider (PIIVAULT_KMS_KEY_ID)")
        if self.kms_call_deadline_s < self.kms_read_timeout_s:
            problems.append(
                f"PIIVAULT_KMS_CALL_DEADLINE_S ({self.kms_call_deadline_s:g}) must be at least "
                f"PIIVAULT_KMS_READ_TIMEOUT_S ({self.kms_read_timeout_s:g}): a call would be cut "
                "off before one read could time out"
            )
        if self.kms_ca_bundle and not Path(self.kms_ca_bundle).exists():
            problems.append(f"PIIVAULT_KMS_CA_BUNDLE names no file or directory: {self.kms_ca_bundle}")
        if self.rate_limit_burst < self.rate_limit_rps:
            problems.append("PIIVAULT_RATE_LIMIT_BURST must be at least PIIVAULT_RATE_LIMIT_RPS")
        if self.redis_url is not None and not self.redis_url.get_secret_value().startswith(
            ("redis://", "rediss://", "unix://")
        ):
            problems.append("PIIVAULT_REDIS_URL must be a redis://, rediss:// or unix:// URL")
        if self.alert_webhook_url and not self.alert_webhook_url.startswith(("https://", "http://")):
            problems.append("PIIVAULT_ALERT_WEBHOOK_URL must be an http(s) URL")
        if self.environment == "production":
            if (
                self.kms_endpoint_url
                and not self.kms_endpoint_url.startswith("https://")
                and not self.kms_allow_insecure_endpoint
            ):
                problems.append(
                    "PIIVAULT_KMS_ENDPOINT_URL must be https in production (data keys cross it); "
                    "for an emulator set PIIVAULT_KMS_ALLOW_INSECURE_ENDPOINT=true"
                )
            if self.alert_webhook_url and not self.alert_webhook_url.startswith(
                ("https://", "http://127.0.0.1", "http://localhost")
            ):
                problems.append(
                    "PIIVAULT_ALERT_WEBHOOK_URL must use https in production (events are sensitive)"
                )
            if self.effective_key_provider == "local":
                problems.append(
                    "the local development key provider is refused in production: "
                    "set PIIVAULT_KMS_KEY_ID (or PIIVAULT_ENVIRONMENT=development to try the vault)"
                )
            if self.uses_embedded_database:
                problems.append("the embedded database is refused in production: set PIIVAULT_DATABASE_URL")

        if problems:
            raise UnsafeSettings("refusing to start: " + "; ".join(problems))
        return self


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """`PIIVAULT_` variables that name no setting (a misspelling is otherwise ignored silently),
    each with the setting it most resembles, if any."""
    known = {f"PIIVAULT_{name.upper()}" for name in Settings.model_fields}
    known |= {f"PIIVAULT_{name.upper()}_FILE" for name in SECRET_FILE_SETTINGS}
    found = []
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith("PIIVAULT_") and upper not in known:
            close = difflib.get_close_matches(upper, known, n=1)
            found.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return found


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    settings = Settings()
    if settings.environment == "production" and not settings.dual_control_on:
        log.warning("PIIVAULT_DUAL_CONTROL is off in production: one admin alone can grant itself PII access")
    unknown = unknown_variables(os.environ)
    if unknown:
        message = "unknown settings: " + ", ".join(unknown)
        if settings.environment == "production":
            raise UnsafeSettings(f"refusing to start: {message}")
        log.warning(message)
    return settings
