"""The audit sealer's CPU per event: this process's and PostgreSQL's.

    python bench/seal_cpu.py [--events 20000] [--rounds 2]

Each round migrates a fresh database on the bench's PostgreSQL server (VAULT_BENCH_SERVER_URL,
default the local one), writes `--events` stamped audit events in transactions of 1,000 through
the vault's own Auditor (local development key provider), and then times one `Auditor.seal()`:
time.process_time() for this process, and the CPU of every PostgreSQL process on the machine
(so run it on an idle machine, with the server local).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import harness  # noqa: E402  (fresh databases, PostgreSQL's CPU)

DATABASE = "piivault_bench_seal"


def one_round(events: int) -> tuple[float, float]:
    from app.container import build_vault
    from app.services.audit import Subject, build_event
    from app.services.context import Caller, RequestContext
    from app.settings import Settings

    url = harness.fresh_database(DATABASE)
    data_dir = tempfile.mkdtemp(prefix="piivault-seal-")
    env = {
        **os.environ,
        "PIIVAULT_DATABASE_URL": url,
        "PIIVAULT_ENVIRONMENT": "development",
        "PIIVAULT_DATA_DIR": data_dir,
    }
    subprocess.run([str(harness.PIIVAULT), "migrate"], env=env, check=True, capture_output=True)
    os.environ.update({k: v for k, v in env.items() if k.startswith("PIIVAULT_")})
    vault = build_vault(Settings())
    try:
        ctx = RequestContext(request_id="bench-seal", source_ip="127.0.0.1", user_agent="bench")
        caller = Caller(uuid.uuid4(), "bench-app", "service", "0123456789abcdef")
        for start in range(0, events, 1000):
            batch = [
                build_event(
                    "Tokenize", "allowed", ctx, caller,
                    Subject(token="tok_" + "x" * 32, customer_id=f"c{start + n}", data_type="SSN",
                            grant_id=uuid.uuid4()),
                )
                for n in range(min(1000, events - start))
            ]  # fmt: skip
            with vault.database.transaction() as session:
                vault.auditor.record(session, batch)
        time.sleep(1.0)  # let the writers' connections settle before measuring
        process_before, postgres_before = time.process_time(), harness.postgres_cpu_seconds() or 0.0
        sealed = vault.auditor.seal()
        process_after, postgres_after = time.process_time(), harness.postgres_cpu_seconds() or 0.0
    finally:
        vault.close()
    if sealed != events:
        raise SystemExit(f"sealed {sealed} of {events} events")
    return (process_after - process_before) / sealed * 1e6, (postgres_after - postgres_before) / sealed * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    for _ in range(args.rounds):
        process_us, postgres_us = one_round(args.events)
        print(
            f"sealed {args.events} events: {process_us:.1f} us/event here, {postgres_us:.1f} us/event PostgreSQL"
        )


if __name__ == "__main__":
    main()
