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
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError

from app.settings import Settings, get_settings

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from app.container import Vault
    from app.services.keys import RewrapReport

cli = typer.Typer(help="pii-vault: a PII tokenization vault.", no_args_is_help=True, add_completion=False)
admin_cli = typer.Typer(help="Manage admins.", no_args_is_help=True)
cli.add_typer(admin_cli, name="admin")


def _settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as err:
        for problem in err.errors():
            typer.echo(f"piivault: {problem['msg']}", err=True)
        raise typer.Exit(2) from None


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
    from app.migrate import upgrade

    upgrade(_database_url(_settings()))
    typer.echo("migrations applied")


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

    from app.crypto.local import WARNING
    from app.migrate import upgrade

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    settings = _settings()
    url = _database_url(settings)
    if migrate_first:
        upgrade(url)
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
