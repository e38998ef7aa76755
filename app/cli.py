"""The `piivault` command: serve, migrate, admin."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, Protocol

import typer
from pydantic import ValidationError

from app.settings import Settings, UnsafeSettings, get_settings

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from app.container import Vault

log = logging.getLogger("piivault")

cli = typer.Typer(help="pii-vault: a PII tokenization vault.", no_args_is_help=True, add_completion=False)


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        typer.echo(f"piivault {version('pii-vault')}")
        raise typer.Exit()


@cli.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """pii-vault: a PII tokenization vault."""


admin_cli = typer.Typer(help="Manage admins.", no_args_is_help=True)
cli.add_typer(admin_cli, name="admin")


# Exit codes: 2 for a configuration an operator must fix, 3 for a dependency not reachable now.
EXIT_CONFIG = 2
EXIT_UNREACHABLE = 3


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"piivault: {message}", err=True)
    raise typer.Exit(code)


def _settings() -> Settings:
    try:
        settings = get_settings()
    except ValidationError as err:
        for problem in err.errors():
            location = problem.get("loc") or ()
            variable = f"PIIVAULT_{str(location[0]).upper()}: " if location else ""
            message = str(problem["msg"]).removeprefix("Value error, ")
            typer.echo(f"piivault: {variable}{message}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    except UnsafeSettings as err:
        _fail(str(err), EXIT_CONFIG)
    if settings.effective_key_provider == "kms" and not _aws_region(settings):
        _fail(
            "no AWS region for the key service: set PIIVAULT_KMS_REGION (or AWS_DEFAULT_REGION)",
            EXIT_CONFIG,
        )
    return settings


def _aws_region(settings: Settings) -> str | None:
    """The region the KMS client will use: the setting, else botocore's own (environment, profile)."""
    if settings.kms_region:
        return settings.kms_region
    from app.crypto.kms import shared_session

    region = shared_session().get_config_variable("region")
    return region if isinstance(region, str) and region else None


def _database_failure(err: Exception) -> NoReturn:
    """One line for a database that cannot be used, never a traceback (which could quote the URL)."""
    from sqlalchemy.exc import ArgumentError

    if isinstance(err, ArgumentError | ValueError):
        _fail(
            "PIIVAULT_DATABASE_URL is not a PostgreSQL URL (postgresql://user:password@host:5432/db)",
            EXIT_CONFIG,
        )
    reason = str(getattr(err, "orig", None) or err).strip().splitlines()
    _fail(
        f"cannot reach the database (PIIVAULT_DATABASE_URL): {reason[0] if reason else type(err).__name__}",
        EXIT_UNREACHABLE,
    )


def _migrated(url: str) -> None:
    import psycopg
    from sqlalchemy.exc import ArgumentError, OperationalError

    from app.migrate import upgrade

    try:
        upgrade(url)
    except (ArgumentError, OperationalError, psycopg.OperationalError, ValueError) as err:
        _database_failure(err)


def _key_service_ready(settings: Settings) -> None:
    """The current key is usable (a missing or disabled KMS key refuses start-up: exit 2; the key
    service not answering: exit 3). What is wrong, KmsKeyProvider.check() has logged with the key."""
    from app.container import build_key_provider
    from app.crypto.kms import KmsKeyProvider
    from app.errors import DependencyUnavailable, Misconfigured

    keys, _ = build_key_provider(settings)
    try:
        keys.check()
        if isinstance(keys, KmsKeyProvider):
            for key in keys.disabled_decrypt_keys():
                log.warning(
                    "PIIVAULT_KMS_DECRYPT_KEY_IDS: key %s is not enabled; records still under it cannot "
                    "be read (enable it, or finish `piivault keys rewrap` and drop it from the list)",
                    key,
                )
    except Misconfigured as err:
        _fail(f"the key service refuses the vault's key ({err.code}); check PIIVAULT_KMS_KEY_ID", EXIT_CONFIG)
    except DependencyUnavailable as err:
        _fail(f"cannot reach the key service ({err.code}); check PIIVAULT_KMS_ENDPOINT_URL", EXIT_UNREACHABLE)
    finally:
        keys.close()


def _database_url(settings: Settings) -> str:
    """The configured URL, or the embedded server's (started or joined) in development."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    from app.embedded import start_embedded_postgres

    try:
        url = start_embedded_postgres(settings.data_dir)
    except ModuleNotFoundError:
        typer.echo(
            "piivault: no PIIVAULT_DATABASE_URL, and the embedded database is not installed "
            "(pip install 'pii-vault[embedded]')",
            err=True,
        )
        raise typer.Exit(2) from None
    # Workers and later settings reads see the same database.
    os.environ["PIIVAULT_DATABASE_URL"] = url
    get_settings.cache_clear()
    return url


@cli.command()
def migrate() -> None:
    """Apply the database migrations."""
    _migrated(_database_url(_settings()))
    typer.echo("migrations applied")


@cli.command()
def check() -> None:
    """Run every start-up check (settings, database and its migrations, the current key) and
    exit: 0 ready, 2 a configuration to fix, 3 a dependency not reachable now."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine
    from sqlalchemy.exc import ArgumentError, OperationalError

    from app.db.session import normalise_url
    from app.migrate import alembic_config

    settings = _settings()
    url = _database_url(settings)
    try:
        engine = create_engine(normalise_url(url), connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
        engine.dispose()
    except (ArgumentError, OperationalError, ValueError) as err:
        _database_failure(err)
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    if current != head:
        _fail(f"the database is at migration {current}, not {head}: run `piivault migrate`", EXIT_CONFIG)
    _key_service_ready(settings)
    typer.echo(f"ready: database at migration {head}, key provider {settings.effective_key_provider}")


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    migrate_first: Annotated[bool, typer.Option("--migrate/--no-migrate", help="Apply migrations.")] = True,
    access_log: Annotated[
        bool,
        typer.Option(
            "--access-log/--no-access-log",
            help="Log every request: method, route template, status, latency, request and principal id.",
        ),
    ] = False,
) -> None:
    """Serve the vault's HTTP API."""
    import uvicorn

    from app import logs
    from app.api.server import VaultHttpProtocol
    from app.crypto.local import WARNING

    # Before anything logs: the format is validated with the other settings just below (an
    # unknown value is refused there; until then it means JSON).
    log_config = logs.configure(os.environ.get("PIIVAULT_LOG_FORMAT", "json"), access_log=access_log)
    settings = _settings()
    url = _database_url(settings)
    if migrate_first:
        _migrated(url)
    if settings.environment == "production":
        _key_service_ready(settings)
    if workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="piivault-metrics-")
    base = f"http://{host}:{port}"
    banner = [
        f"pii-vault serving on {base} (docs: {base}/docs, environment: {settings.environment})",
    ]
    if settings.uses_embedded_database:
        banner.append(f"database: embedded PostgreSQL under {settings.data_dir}/pgdata")
    if settings.effective_key_provider == "local":
        banner.append(f"WARNING: {WARNING}")
    command = os.path.relpath(sys.argv[0]) if sys.argv[0].endswith("piivault") else "piivault"
    banner.append(f"first admin key: {command} admin create NAME   (the key is the last line it prints)")
    for line in banner:
        if line.startswith("WARNING: "):
            log.warning(line.removeprefix("WARNING: "))
        else:
            log.info(line)
    # uvicorn re-raises SIGTERM once it has shut down; exiting through Python instead lets the
    # embedded PostgreSQL (an atexit handler) stop with the vault.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        proxy_headers=False,
        # httptools with the vault's bounds on the request head and its read deadlines.
        http=VaultHttpProtocol,
        log_level="info",
        # Ours, not uvicorn's: the route template instead of the path (tokens are in paths).
        access_log=False,
        log_config=log_config,
    )


@admin_cli.command("create")
def admin_create(name: Annotated[str, typer.Argument(help="The admin's unique name.")]) -> None:
    """Create an admin and print its API key (shown once) as the last line. For bootstrap and
    break-glass: it needs database credentials, stands outside dual control, is audited and
    raises an alert."""
    from sqlalchemy.exc import ProgrammingError

    from app.api.schemas import PRINCIPAL_NAME_PATTERN
    from app.container import build_vault
    from app.errors import VaultError
    from app.services.context import RequestContext

    if not re.fullmatch(PRINCIPAL_NAME_PATTERN, name):
        typer.echo("piivault: NAME must be 1 to 128 characters of [A-Za-z0-9._@-]", err=True)
        raise typer.Exit(2)
    settings = _settings()
    url = _database_url(settings)
    vault = build_vault(settings, url=url)
    ctx = RequestContext(request_id="cli", user_agent="piivault-cli")
    try:
        # Outside dual control (database credentials): audited, and it raises a break_glass alert.
        principal, issued = vault.principals.create_break_glass_admin(name, ctx)
    except VaultError as err:
        typer.echo(f"piivault: {err.message}", err=True)
        raise typer.Exit(1) from None
    except ProgrammingError:
        typer.echo("piivault: the database has no vault tables; run `piivault migrate` first", err=True)
        raise typer.Exit(1) from None
    finally:
        vault.close()
    typer.echo(f"created admin {principal.name} ({principal.id}); its API key, shown only this once:")
    typer.echo(issued.secret_key)


audit_cli = typer.Typer(help="Check and export the audit trail.", no_args_is_help=True)
cli.add_typer(audit_cli, name="audit")

Since = Annotated[str | None, typer.Option(help="From this time (RFC 3339, e.g. 2026-11-28T00:00:00Z).")]
Until = Annotated[str | None, typer.Option(help="Before this time (RFC 3339).")]


def _vault_for_cli() -> Vault:
    from app.container import build_vault

    settings = _settings()
    return build_vault(settings, url=_database_url(settings))


@audit_cli.command("verify")
def audit_verify(
    since: Since = None,
    until: Until = None,
    anchor: Annotated[
        str | None, typer.Option(help="SEQ:MAC from an earlier verify's head_seq and head_mac.")
    ] = None,
) -> None:
    """Check the audit chain; exit 1 and name the first bad event if it was tampered with."""
    anchored: tuple[int, bytes] | None = None
    if anchor:
        seq, _, mac = anchor.partition(":")
        try:
            anchored = (int(seq), bytes.fromhex(mac))
        except ValueError:
            raise typer.BadParameter("--anchor takes SEQ:MAC (hex)") from None
    from app.errors import VaultError

    vault = _vault_for_cli()
    try:
        report = vault.auditor.verify(_aware(since), _aware(until), anchored)
    except VaultError as err:
        # Not a verdict on the trail: the chain's MAC key cannot be unwrapped (a restore served
        # with another KMS key, or without the old one on the allow-list) or a dependency is down.
        _fail(err.message, EXIT_UNREACHABLE if err.retryable else EXIT_CONFIG)
    finally:
        vault.close()
    typer.echo(json.dumps(dataclasses.asdict(report), default=str))
    if not report.ok:
        raise typer.Exit(1)


@audit_cli.command("export")
def audit_export(
    since: Since = None,
    until: Until = None,
    output: Annotated[Path | None, typer.Option(help="Write here instead of standard output.")] = None,
) -> None:
    """Write events as JSON lines, oldest first, for a SIEM."""
    from app.services.alerts import event_fields

    vault = _vault_for_cli()
    handle = output.open("w", encoding="utf-8") if output else sys.stdout
    count = 0
    try:
        for event in vault.auditor.export(_aware(since), _aware(until)):
            handle.write(json.dumps(event_fields(event), sort_keys=True) + "\n")
            count += 1
    finally:
        vault.close()
        if output:
            handle.close()
    typer.echo(f"exported {count} events", err=True)


customer_cli = typer.Typer(help="A customer's data: the subject-access report.", no_args_is_help=True)
cli.add_typer(customer_cli, name="customer")


@customer_cli.command("report")
def customer_report(
    customer_id: Annotated[str, typer.Argument(help="The customer's id.")],
    output: Annotated[Path | None, typer.Option(help="Write here instead of standard output.")] = None,
) -> None:
    """The subject-access report (GDPR Art. 15) as JSON, as GET /v1/customers/ID/report answers:
    every record of the customer and every access to them. Never a value. Audited."""
    from app.api.schemas import CUSTOMER_ID_PATTERN, CustomerReportOut
    from app.services.context import RequestContext

    if not re.fullmatch(CUSTOMER_ID_PATTERN, customer_id):
        typer.echo("piivault: ID must be 1 to 128 characters of [A-Za-z0-9._:-]", err=True)
        raise typer.Exit(2)
    vault = _vault_for_cli()
    ctx = RequestContext(request_id=f"cli-{uuid.uuid4().hex[:16]}", user_agent="piivault-cli")
    try:
        with vault.database.transaction() as session:
            report = vault.reports.customer_report(session, None, customer_id, ctx)
    finally:
        vault.close()
    document = CustomerReportOut.model_validate(report, from_attributes=True).model_dump_json(indent=2)
    if output:
        # The report names the customer's tokens and who read them: readable by the owner only.
        output.touch(mode=0o600, exist_ok=True)
        output.write_text(document + "\n", encoding="utf-8")
        typer.echo(
            f"wrote the report on {customer_id}: {len(report.records)} records, "
            f"{len(report.accesses)} events",
            err=True,
        )
    else:
        typer.echo(document)


keys_cli = typer.Typer(
    help="Rotate master keys: move wrapped data keys to another key.", no_args_is_help=True
)
cli.add_typer(keys_cli, name="keys")


@keys_cli.command("rewrap")
def keys_rewrap(
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="The key to move to (id, ARN or alias): PIIVAULT_KMS_KEY_ID or one of "
            "PIIVAULT_KMS_DECRYPT_KEY_IDS; with the local development provider, local:N.",
        ),
    ],
    from_key: Annotated[
        str | None,
        typer.Option("--from", help="Only what this key wraps (default: everything not under --to)."),
    ] = None,
    batch: Annotated[
        int, typer.Option(min=1, max=10000, help="Wrapped keys per batch: one transaction, one audit event.")
    ] = 500,
) -> None:
    """Re-wrap every data key (records and the vault's audit keys) under KEY with KMS ReEncrypt.

    The data keys never leave KMS in clear. Each batch commits on its own: killed at any point,
    run the same command again and it finishes what is left; run once more, it does nothing."""
    from app.errors import KeyNotAllowed
    from app.services.context import RequestContext

    vault = _vault_for_cli()
    ctx = RequestContext(request_id=f"rewrap-{uuid.uuid4().hex[:16]}", user_agent="piivault-cli")
    progress = _RewrapProgress()
    with _batched_job(vault, progress):
        try:
            to_arn = vault.rotation.target(to, ctx)
            from_arn = vault.rotation.target(from_key, ctx) if from_key else None
        except KeyNotAllowed:
            typer.echo(
                "piivault: --to and --from must each be PIIVAULT_KMS_KEY_ID or in "
                "PIIVAULT_KMS_DECRYPT_KEY_IDS (local:N with the local development provider)",
                err=True,
            )
            raise typer.Exit(2) from None
        report = vault.rotation.run(to_arn, from_key=from_arn, batch=batch, ctx=ctx, on_progress=progress)
        left = vault.rotation.left(to_arn, from_arn)
    _summarize(
        f"rewrapped {report.rewrapped} data keys to {to_arn}",
        [
            (report.mirrors, "mirrored {n} active grants there (KMS grants)"),
            (report.skipped, "{n} changed meanwhile (erased or moved) and were left as they are"),
            (report.failed, "{n} failed (RewrapKeys error events in the audit trail)"),
        ],
        f"{left} left under other keys",
        failed=report.failed,
    )


fingerprints_cli = typer.Typer(help="Keyed fingerprints for lookup by value.", no_args_is_help=True)
cli.add_typer(fingerprints_cli, name="fingerprints")


@fingerprints_cli.command("backfill")
def fingerprints_backfill(
    batch: Annotated[
        int, typer.Option(min=1, max=10000, help="Records per batch: one transaction, one audit event.")
    ] = 500,
) -> None:
    """Fill in the fingerprint of every live record of a lookup-enabled type that has none
    (stored before lookup existed, or before its type's lookup flag was turned on).

    One KMS Decrypt per record; the value stays in this process and is never logged. Each batch
    commits on its own: killed at any point, run it again to finish; run once more, it fills 0."""
    from app.services.context import RequestContext

    vault = _vault_for_cli()
    ctx = RequestContext(request_id=f"backfill-{uuid.uuid4().hex[:16]}", user_agent="piivault-cli")
    progress = _RewrapProgress("backfill")
    with _batched_job(vault, progress):
        report = vault.fingerprints.run(batch=batch, ctx=ctx, on_progress=progress)
        left = vault.fingerprints.left()
    _summarize(
        f"filled {report.filled} fingerprints",
        [
            (report.skipped, "{n} changed meanwhile (erased, rewrapped or filled) and were left"),
            (report.failed, "{n} failed (BackfillFingerprints error events in the audit trail)"),
        ],
        f"{left} left",
        failed=report.failed,
    )


@keys_cli.command("new-local")
def keys_new_local() -> None:
    """Add a version to the local development provider's master key (development only).

    Processes started afterwards wrap new data keys under it; move the existing ones with
    `piivault keys rewrap --to local:N`. Older versions stay readable while their files exist."""
    from app.crypto.local import create_local_key_version
    from app.errors import VaultError

    settings = _settings()
    if settings.effective_key_provider != "local":
        _fail("keys new-local rotates the local development key only; with KMS, create a key in KMS", 2)
    try:
        version, key_id = create_local_key_version(settings.data_dir)
    except VaultError as err:
        _fail(err.message, 1)
    typer.echo(f"created local:{version} ({key_id}); restart the vault to wrap new records under it, then")
    typer.echo(f"move the existing ones with: piivault keys rewrap --to local:{version}")


class _Counts(Protocol):
    """What a progress line shows: a long job's counts so far."""

    @property
    def total(self) -> int: ...

    @property
    def done(self) -> int: ...

    @property
    def batches(self) -> int: ...

    def counts(self) -> str: ...


class _RewrapProgress:
    """A progress bar (items, rate, ETA) on a terminal; plain lines otherwise (logs, CI). For any
    batched job (rewrap, fingerprint backfill): `label` starts each line."""

    def __init__(self, label: str = "rewrap") -> None:
        self._label = label
        self._started = time.monotonic()
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __call__(self, report: _Counts) -> None:
        if report.total == 0:
            return
        if not sys.stdout.isatty():
            if report.batches:
                elapsed = max(time.monotonic() - self._started, 1e-6)
                rate = report.done / elapsed
                eta = (report.total - report.done) / rate if rate else 0.0
                typer.echo(
                    f"{self._label}: {report.done}/{report.total} ({report.counts()}; "
                    f"{rate:.0f}/s, eta {eta:.0f}s)"
                )
            return
        if self._bar is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn(self._label),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}/s"),
                TextColumn("eta"),
                TimeRemainingColumn(),
            )
            self._bar.start()
            self._task = self._bar.add_task(self._label, total=report.total, rate="-")
        assert self._task is not None  # noqa: S101 (added with the bar)
        elapsed = max(time.monotonic() - self._started, 1e-6)
        self._bar.update(self._task, completed=report.done, rate=f"{report.done / elapsed:.0f}")

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@contextmanager
def _batched_job(vault: Vault, progress: _RewrapProgress) -> Iterator[None]:
    """Around a batched job (rewrap, backfill): a VaultError ends it with exit 1 (the batches
    committed stand); the progress bar stops and the vault closes however it ends."""
    from app.errors import VaultError

    try:
        yield
    except VaultError as err:
        progress.stop()
        typer.echo(f"piivault: {err.message}", err=True)
        typer.echo(
            "piivault: every batch done so far is kept; run the same command again to finish", err=True
        )
        raise typer.Exit(1) from None
    finally:
        progress.stop()
        vault.close()


def _summarize(done: str, counts: Sequence[tuple[int, str]], left: str, *, failed: int) -> None:
    """A batched job's last line: what it did, each count that is not 0 (in its words, `{n}` for
    the count), what is left. Exit 1 when any failed."""
    clauses = [words.format(n=n) for n, words in counts if n]
    typer.echo("; ".join([done, *clauses, left]))
    if failed:
        raise typer.Exit(1)


def _aware(text: str | None) -> datetime | None:
    """An RFC 3339 time; one without an offset is taken as UTC."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an RFC 3339 time") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def main() -> None:
    sys.exit(cli())
