"""The engine and the one place where a transaction commits or rolls back."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool
from psycopg_pool import PoolTimeout as DataPoolTimeout
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from app.errors import Conflict, DatabaseUnavailable, InvalidInput, VaultError

log = logging.getLogger(__name__)

_ROLLBACK_HOOKS = "piivault.on_rollback"
_COMMIT_HOOKS = "piivault.on_commit"


def normalise_url(url: str) -> str:
    """Accept plain postgresql:// URLs and use the psycopg 3 driver for them."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def on_rollback(session: Session, compensate: Callable[[], None]) -> None:
    """Undo an outside side effect (a KMS grant, say) if this transaction does not commit."""
    session.info.setdefault(_ROLLBACK_HOOKS, []).append(compensate)


def on_commit(session: Session, then: Callable[[], None]) -> None:
    """Run `then` once this transaction has committed (to drop a cache of what it changed, say)."""
    session.info.setdefault(_COMMIT_HOOKS, []).append(then)


def database_error(err: Exception) -> VaultError | None:
    """The vault's own error for a database failure, from SQLAlchemy or psycopg alike; None for
    anything else (a bug, which stays itself). The one place database errors are mapped."""
    if isinstance(err, IntegrityError | psycopg.IntegrityError):
        # A unique constraint lost to a concurrent request (two principals of one name, say).
        return Conflict("the request conflicts with a concurrent change; retry it")
    if isinstance(err, DataError | psycopg.DataError):
        # A value the database cannot hold (a NUL byte, a number or a time out of range) that the
        # API's own checks, which name the field, let through. Logged by its SQLSTATE only.
        refused = err.orig if isinstance(err, DataError) else err
        log.warning(
            "database refused a value: %s", getattr(refused, "sqlstate", None) or type(refused).__name__
        )
        return InvalidInput(
            "a value in the request is out of range or holds a character the database cannot store"
        )
    if isinstance(err, DBAPIError):
        if not (isinstance(err, OperationalError) or err.connection_invalidated):
            return None
        cause: object = err.orig
    elif isinstance(err, psycopg.OperationalError):
        cause = err
    elif isinstance(err, PoolTimeout | DataPoolTimeout):
        # The connection pool is exhausted: the database is too slow for the load.
        return DatabaseUnavailable()
    else:
        return None
    log.warning("database unavailable: %s", type(cause).__name__)
    return DatabaseUnavailable()


class Database:
    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        max_overflow: int = 10,
        statement_timeout_ms: int = 5000,
    ) -> None:
        def engine(size: int, overflow: int) -> Engine:
            return create_engine(
                normalise_url(url),
                pool_size=size,
                max_overflow=overflow,
                # No pre-ping (a round trip per request): a dead connection fails its request with
                # a 503 and is discarded; recycling bounds how stale a pooled connection gets.
                pool_recycle=1800,
                pool_timeout=5,
                # SQL errors (and tracebacks) never show the statement's parameters.
                hide_parameters=True,
                connect_args={
                    "connect_timeout": 3,
                    "options": f"-c statement_timeout={statement_timeout_ms}",
                },
            )

        self.engine = engine(pool_size, max_overflow)
        # Work a request does beside its own transaction (a denial's audit event, loading the
        # audit key) uses its own pool, as large as the main one can grow: a request holding a
        # main connection always gets a side one, so a burst of denials cannot deadlock the pool.
        self.side_engine = engine(pool_size + max_overflow, 0)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._side_sessions = sessionmaker(self.side_engine, expire_on_commit=False)
        # The data path (tokenize, detokenize) skips the ORM, the transaction block and the thread
        # pool: its connections are asynchronous and in autocommit, and each write it makes is one
        # statement, atomic on its own. Two round trips a request instead of six (BEGIN, reads,
        # two INSERTs, COMMIT), and no hop to a worker thread. The pool belongs to an event loop,
        # so it opens with the app (open_data_path) and closes with it.
        self._data_pool_size = (min(2, pool_size), pool_size + max_overflow)
        self._data_conninfo = (
            make_url(normalise_url(url)).set(drivername="postgresql").render_as_string(hide_password=False)
        )
        self._data_kwargs = {
            "autocommit": True,
            "connect_timeout": 3,
            "options": f"-c statement_timeout={statement_timeout_ms}",
        }
        self._data_pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None

    def __repr__(self) -> str:
        return f"Database({self.engine.url.render_as_string(hide_password=True)!r})"

    @contextmanager
    def transaction(self, *, side: bool = False) -> Iterator[Session]:
        """One unit of work: commits if the block completes, rolls back (and compensates) if not.

        A lost or refused connection becomes DatabaseUnavailable (503), never a traceback.
        side=True: a transaction beside the request's own, from the side pool.
        """
        session = self._side_sessions() if side else self._sessions()
        committed: list[Callable[[], None]] = []
        try:
            try:
                yield session
                session.commit()
                committed = session.info.pop(_COMMIT_HOOKS, [])
            except BaseException:
                session.info.pop(_COMMIT_HOOKS, None)
                session.rollback()
                for compensate in reversed(session.info.pop(_ROLLBACK_HOOKS, [])):
                    try:
                        compensate()
                    except Exception:
                        log.exception("compensation after rollback failed")
                raise
        except (DBAPIError, PoolTimeout) as err:
            mapped = database_error(err)
            if mapped is None:
                raise
            raise mapped from None
        finally:
            session.close()
        for then in committed:
            then()

    async def open_data_path(self) -> None:
        """Open the data path's pool in the running event loop."""
        if self._data_pool is None:
            low, high = self._data_pool_size
            self._data_pool = AsyncConnectionPool(
                self._data_conninfo,
                min_size=low,
                max_size=high,
                timeout=5,
                max_lifetime=1800,
                kwargs=self._data_kwargs,
                name="piivault-data",
                open=False,
            )
            await self._data_pool.open()

    async def close_data_path(self) -> None:
        if self._data_pool is not None:
            pool, self._data_pool = self._data_pool, None
            await pool.close()

    @asynccontextmanager
    async def data_connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """An autocommit connection for the data path's single-statement units of work.

        Each write is one statement, so it commits or fails whole; failures become the vault's
        own errors here, as in transaction().
        """
        if self._data_pool is None:
            await self.open_data_path()
        assert self._data_pool is not None  # noqa: S101 (just opened)
        try:
            async with self._data_pool.connection() as connection:
                yield connection
        except (psycopg.Error, DataPoolTimeout) as err:
            mapped = database_error(err)
            if mapped is None:
                raise
            raise mapped from None

    @contextmanager
    def raw_transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """A plain psycopg connection from the main pool in a transaction of its own, for
        background work of many rows (the audit sealer); commits if the block completes."""
        try:
            pooled = self.engine.raw_connection()
        except (PoolTimeout, OperationalError) as err:
            raise (database_error(err) or DatabaseUnavailable()) from None
        connection: psycopg.Connection[Any] = pooled.driver_connection  # type: ignore[assignment]
        try:
            try:
                yield connection
                connection.commit()
            except BaseException:
                if not connection.closed:
                    connection.rollback()
                raise
        except psycopg.OperationalError as err:
            pooled.invalidate()
            raise (database_error(err) or DatabaseUnavailable()) from None
        finally:
            pooled.close()

    def ping(self) -> None:
        with self.transaction() as session:
            session.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
        self.side_engine.dispose()
