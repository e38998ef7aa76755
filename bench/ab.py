"""A/B: this checkout's vault against another checkout's, side by side, rows alternating.

    python bench/ab.py --base ../other-checkout [--seconds 6] [--rounds 3] [--concurrency 8,32]
                       [--workers 2]

The other checkout needs its own `.venv` (`make install` there). For each key provider (local,
and KMS through bench/kms_standin.py) both vaults run at once, each on a database of its own, and
every row (tokenize, detokenize at each concurrency) is measured on one then the other, the order
swapped each round, so that whatever else the machine does falls on both alike. Prints the median
items/s of each side, the ratio, the spread of each side across rounds (the noise to hold the
ratio against) and the median CPU per item of each side's vault and of PostgreSQL; writes
bench/results/ab.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import harness
from harness import (
    BENCH,
    BIN,
    DATABASE,
    KmsStandIn,
    Row,
    free_port,
    fresh_database,
    git_commit,
    measure,
    started,
)

RESULTS = BENCH / "results"


def _vault(root: Path, side: str, provider: str, kms: KmsStandIn | None, workdir: Path, workers: int) -> Any:
    # harness.vault() runs the piivault of harness.ROOT: point it at this side's checkout.
    harness.ROOT = root
    harness.PIIVAULT = root / ".venv" / "bin" / "piivault"
    url = fresh_database(f"{DATABASE}_ab_{side}")
    return harness.vault(f"{provider}-{side}", url, kms, workers, workdir, 3000)


def _median(rows: list[Row], column: str) -> float | None:
    values = [getattr(row, column) for row in rows if getattr(row, column) is not None]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=Path, required=True, help="the other checkout (with its .venv)")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="8,32")
    parser.add_argument("--workers", type=int, default=2, help="workers per vault")
    args = parser.parse_args()
    roots = {"base": args.base.resolve(), "new": harness.ROOT}
    levels = [int(c) for c in args.concurrency.split(",")]
    workdir = RESULTS / "tmp-ab"
    workdir.mkdir(parents=True, exist_ok=True)
    rows: dict[tuple[str, str, int, str], list[Row]] = {}
    standin_port = free_port()
    standin = [
        str(BIN / "python"),
        str(BENCH / "kms_standin.py"),
        "--host",
        "127.0.0.1",
        "--port",
        str(standin_port),
    ]
    with started(
        "kms-standin", standin, dict(os.environ), f"http://127.0.0.1:{standin_port}/_stats", workdir
    ):
        kms = KmsStandIn(standin_port)
        for provider, provider_kms in (("local", None), ("kms", kms)):
            with ExitStack() as stack:
                vaults = {
                    side: stack.enter_context(
                        _vault(roots[side], side, provider, provider_kms, workdir, args.workers)
                    )
                    for side in roots
                }
                for level in levels:
                    for round_ in range(args.rounds):
                        for side in ("base", "new") if round_ % 2 == 0 else ("new", "base"):
                            v = vaults[side]
                            for operation in ("tokenize", "detokenize"):
                                row = measure(
                                    f"vault-{provider}-{side}",
                                    v.process,
                                    v.base_url,
                                    operation,
                                    level,
                                    args.seconds,
                                    args.workers,
                                    api_key=v.api_key,
                                    tokens=v.tokens,
                                    kms=provider_kms,
                                )
                                rows.setdefault((provider, operation, level, side), []).append(row)
    lines = [
        "# A/B of two checkouts",
        "",
        f"Run {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}: new = `{git_commit(roots['new'])}`, "
        f"base = `{git_commit(roots['base'])}`; {args.workers} workers each; {args.rounds} rounds of "
        f"{args.seconds:g} s per row, sides alternating. CPU: median ms per item of the vault's processes "
        "and of PostgreSQL's, base / new (less noisy than items/s on a shared machine).",
        "",
        "| target | operation | conc. | base items/s | new items/s | new / base | base spread | new spread "
        "| vault CPU ms/item | PostgreSQL CPU ms/item | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for provider in ("local", "kms"):
        for level in levels:
            for operation in ("tokenize", "detokenize"):
                base = [r.items_per_s for r in rows[(provider, operation, level, "base")]]
                new = [r.items_per_s for r in rows[(provider, operation, level, "new")]]
                errors = sum(
                    r.errors for side in ("base", "new") for r in rows[(provider, operation, level, side)]
                )
                mb, mn = statistics.median(base), statistics.median(new)
                sides = [rows[(provider, operation, level, side)] for side in ("base", "new")]
                cpu = " / ".join(f"{_median(side, 'cpu_ms_per_item')}" for side in sides)
                pg = " / ".join(f"{_median(side, 'pg_cpu_ms_per_item')}" for side in sides)
                lines.append(
                    f"| vault-{provider} | {operation} | {level} | {mb:.1f} | {mn:.1f} | {mn / mb:.3f} "
                    f"| {(max(base) - min(base)) / mb:.0%} | {(max(new) - min(new)) / mn:.0%} "
                    f"| {cpu} | {pg} | {errors} |"
                )
    text = "\n".join(lines) + "\n"
    (RESULTS / "ab.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
