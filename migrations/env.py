"""Alembic environment: the URL comes from the caller (piivault migrate, tests) or the settings."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from app.db.models import Base
from app.db.session import normalise_url

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url")
    if url:
        return str(url)
    from app.settings import get_settings

    configured = get_settings().database_url
    if configured is None:
        raise SystemExit("PIIVAULT_DATABASE_URL is not set; use `piivault migrate` for the embedded database")
    return configured.get_secret_value()


def run_migrations_online() -> None:
    connectable = create_engine(normalise_url(_url()), poolclass=pool.NullPool)
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            # Several replicas may start at once: one migrates, the others wait for it.
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(742001)")
            context.run_migrations()
    connectable.dispose()


if context.is_offline_mode():
    context.configure(url=normalise_url(_url()), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
