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
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from pydantic import ValidationError

from app.settings import Settings, UnsafeSettings, get_settings

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from app.container import Vault
    from app.services.keys import RewrapReport

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
        return get_settings()
    except ValidationError as err:
        for problem in err.errors():
            location = problem.get("loc") or ()
            variable = f"PIIVAULT_{str(location[0]).upper()}: " if location else ""
            message = str(problem["msg"]).removeprefix("Value error, ")
            typer.echo(f"piivault: {variable}{message}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    except UnsafeSettings as err:
        _fail(str(err), EXIT_CONFIG)


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
    from app.errors import DependencyUnavailable, Misconfigured

    keys, _ = build_key_provider(settings)
    try:
        keys.check()
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
        bool, typer.Option("--access-log/--no-access-log", help="Log every request.")
    ] = False,
) -> None:
    """Serve the vault's HTTP API."""
    import uvicorn

    from app.api.server import VaultHttpProtocol
    from app.crypto.local import WARNING

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
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
        typer.echo(line, err=True)
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
        access_log=access_log,
    )


@admin_cli.command("create")
def admin_create(name: Annotated[str, typer.Argument(help="The admin's unique name.")]) -> None:
    """Create an admin and print its API key (shown once) as the last line."""
    from sqlalchemy.exc import ProgrammingError

    from app.access import Role
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
        with vault.database.transaction() as session:
            principal, issued = vault.principals.create(session, None, name, Role.ADMIN, ctx)
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
    vault = _vault_for_cli()
    try:
        report = vault.auditor.verify(_aware(since), _aware(until), anchored)
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
            "PIIVAULT_KMS_DECRYPT_KEY_IDS.",
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
    from app.errors import KeyNotAllowed, VaultError
    from app.services.context import RequestContext

    vault = _vault_for_cli()
    ctx = RequestContext(request_id=f"rewrap-{uuid.uuid4().hex[:16]}", user_agent="piivault-cli")
    progress = _RewrapProgress()
    try:
        try:
            to_arn = vault.rotation.target(to, ctx)
            from_arn = vault.rotation.target(from_key, ctx) if from_key else None
        except KeyNotAllowed:
            typer.echo(
                "piivault: --to and --from must each be PIIVAULT_KMS_KEY_ID or in "
                "PIIVAULT_KMS_DECRYPT_KEY_IDS",
                err=True,
            )
            raise typer.Exit(2) from None
        report = vault.rotation.run(to_arn, from_key=from_arn, batch=batch, ctx=ctx, on_progress=progress)
        left = vault.rotation.left(to_arn, from_arn)
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
    summary = f"rewrapped {report.rewrapped} data keys to {to_arn}"
    if report.skipped:
        summary += f"; {report.skipped} changed meanwhile (erased or moved) and were left as they are"
    if report.failed:
        summary += f"; {report.failed} failed (RewrapKeys error events in the audit trail)"
    typer.echo(f"{summary}; {left} left under other keys")
    if report.failed:
        raise typer.Exit(1)


class _RewrapProgress:
    """A progress bar (items, rate, ETA) on a terminal; plain lines otherwise (logs, CI)."""

    def __init__(self) -> None:
        self._started = time.monotonic()
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __call__(self, report: RewrapReport) -> None:
        if report.total == 0:
            return
        if not sys.stdout.isatty():
            if report.batches:
                elapsed = max(time.monotonic() - self._started, 1e-6)
                rate = report.done / elapsed
                eta = (report.total - report.done) / rate if rate else 0.0
                typer.echo(
                    f"rewrap: {report.done}/{report.total} (rewrapped {report.rewrapped}, skipped "
                    f"{report.skipped}, failed {report.failed}; {rate:.0f}/s, eta {eta:.0f}s)"
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
                TextColumn("rewrap"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}/s"),
                TextColumn("eta"),
                TimeRemainingColumn(),
            )
            self._bar.start()
            self._task = self._bar.add_task("rewrap", total=report.total, rate="-")
        assert self._task is not None  # noqa: S101 (added with the bar)
        elapsed = max(time.monotonic() - self._started, 1e-6)
        self._bar.update(self._task, completed=report.done, rate=f"{report.done / elapsed:.0f}")

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


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
