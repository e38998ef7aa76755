"""What a detokenize's release statement costs against the plain event insert it replaced.

    python bench/release_cost.py [--statements 3000] [--rounds 2]

A vault (local development key provider) is started on a fresh database to create a principal and
its grant; then, on one connection, the same allowed Detokenize event is written `--statements`
times each way, one statement at a time: the plain insert (`_INSERT_ONE_EVENT`) and the release
(`_RELEASE_ONE_EVENT`: the grant held and re-read by piivault_grants_unchanged, the event
written only if it is still active). Prints this process's and the PostgreSQL backend's CPU per statement.
Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import harness  # noqa: E402  (fresh databases, the vault's processes)
import psutil  # noqa: E402
import psycopg  # noqa: E402

DATABASE = "piivault_bench_release"


async def measure(url: str, statements: int, rounds: int) -> None:
    from app.db.repositories import data_path
    from app.services.audit.events import Subject, build_event
    from app.services.context import RequestContext, utcnow

    connection = await psycopg.AsyncConnection.connect(url.replace("+psycopg", ""), autocommit=True)
    row = await (await connection.execute("SELECT id FROM grants LIMIT 1")).fetchone()
    assert row is not None  # noqa: S101
    grant_id = row[0]
    ctx = RequestContext(request_id="bench-release")
    subject = Subject(token="tok_" + "x" * 32, customer_id="c", data_type="DriverLicense", grant_id=grant_id)

    async def plain() -> None:
        event = build_event("Detokenize", "allowed", ctx, None, subject)
        await connection.execute(data_path._INSERT_ONE_EVENT, data_path._event_values(event))

    async def release() -> None:
        event = build_event("Detokenize", "allowed", ctx, None, subject)
        parameters = (*data_path._event_values(event), data_path.array_literal([grant_id]), utcnow())
        cursor = await connection.execute(data_path._RELEASE_ONE_EVENT, parameters)
        assert cursor.rowcount == 1  # noqa: S101 (the grant is active: the event is written)

    row = await (await connection.execute("SELECT pg_backend_pid()")).fetchone()
    assert row is not None  # noqa: S101
    backend = psutil.Process(row[0])
    ways: tuple[tuple[str, Callable[[], Awaitable[None]]], ...] = (
        ("plain insert", plain),
        ("release", release),
    )
    for _ in range(rounds):
        for name, write in ways:
            for _ in range(300):  # prepared, warm
                await write()
            before, process_before = backend.cpu_times(), time.process_time()
            for _ in range(statements):
                await write()
            after, process_after = backend.cpu_times(), time.process_time()
            backend_ms = ((after.user + after.system) - (before.user + before.system)) * 1e3 / statements
            process_ms = (process_after - process_before) * 1e3 / statements
            print(
                f"{name:<13} this process {process_ms:.3f} ms, PostgreSQL backend {backend_ms:.3f} ms a statement"
            )
    await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--statements", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    url = harness.fresh_database(DATABASE)
    workdir = harness.RESULTS / "tmp-release"
    workdir.mkdir(parents=True, exist_ok=True)
    with harness.vault("vault-local-release", url, None, 1, workdir, 0):
        pass  # migrated, with a service principal and its grant
    os.environ.setdefault("PIIVAULT_ENVIRONMENT", "development")
    asyncio.run(measure(url, args.statements, args.rounds))


if __name__ == "__main__":
    main()
