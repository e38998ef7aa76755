"""`make bench`: the vault against its floor and the AWS Encryption SDK, in one run, on this machine.

Writes bench/results/latest.json and latest.md. Every server runs as its own process on 127.0.0.1
and is loaded by wrk (bench/load.lua); every request names a distinct customer or token.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil

import stages
from harness import RESULTS, git_commit
from report import Report, evaluate, write, write_audit_cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each measured row")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--concurrency", default="1,8,32,128")
    parser.add_argument("--quick", action="store_true", help="short rows, no scale or leak stage")
    parser.add_argument("--leak-requests", type=int, default=100_000)
    parser.add_argument("--scale-records", type=int, default=1_000_000)
    parser.add_argument("--rewrap-records", type=int, default=20_000)
    parser.add_argument("--erase-records", type=int, default=10_000)
    parser.add_argument(
        "--audit-cost",
        action="store_true",
        help="only the audit's cost: tokenize with and without the audit, alternating, three rounds",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk (make bench does this)")
    seconds = 3.0 if args.quick else args.seconds
    levels = [int(c) for c in args.concurrency.split(",")]
    workdir = RESULTS / "tmp"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    report = Report(
        started=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        commit=git_commit(),
        nproc=os.cpu_count() or 0,
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
        python=platform.python_version(),
        workers=args.workers,
        seconds_per_row=seconds,
    )
    if args.audit_cost:
        stages.audit_cost(report, levels, seconds, workdir)
        write_audit_cost(report)
        return
    stages.floors(report, args, levels, seconds, workdir)
    stages.vaults(report, args, levels, seconds, workdir)
    report.targets = evaluate(report, levels)
    write(report)


if __name__ == "__main__":
    main()
