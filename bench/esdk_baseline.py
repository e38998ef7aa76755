"""Baseline: the AWS Encryption SDK encrypting values in-process against the KMS stand-in.

    python bench/esdk_baseline.py --kms-endpoint http://127.0.0.1:4599 --key-id alias/bench \\
        --processes 2 --concurrency 8 --duration 5 --suite default [--value-bytes 17]

P processes, each running max(1, C/P) threads (the remainder of C/P goes to the first processes),
encrypt in a loop for S seconds with `EncryptionSDKClient` and a `StrictAwsKmsMasterKeyProvider`
whose botocore session points at the stand-in. No caching CMM, and every encrypt carries its own
encryption context {"customerID": <unique>, "dataType": "DriverLicense"}, so each one costs exactly
one KMS GenerateDataKey, as a vault tokenize does.

Suites: `default` is the SDK's default (AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384, signs every
message); `committing-nosign` is AES_256_GCM_HKDF_SHA512_COMMIT_KEY.

Prints one JSON line on stdout: suite, processes, concurrency, ops, seconds, ops_per_s, p50_ms,
p99_ms, cpu_ms_per_op (all workers' CPU during the timed window), peak_rss_mb (largest worker), plus
errors, effective_concurrency, algorithm and esdk_version. Exit status 1 if any encrypt failed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import multiprocessing as mp
import os
import queue
import resource
import sys
import threading
import time
import uuid
from array import array
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier
from typing import Any

SUITES = {
    "default": "AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384",
    "committing-nosign": "AES_256_GCM_HKDF_SHA512_COMMIT_KEY",
}
SETUP_TIMEOUT_S = 120.0


@dataclass
class WorkerResult:
    ops: int = 0
    errors: int = 0
    first_error: str | None = None
    start: float = 0.0
    end: float = 0.0
    cpu_seconds: float = 0.0
    max_rss_kb: int = 0
    latencies: bytes = b""  # array("d") of seconds: compact to ship back through the queue
    algorithm: str = ""
    esdk_version: str = ""
    setup_error: str | None = None


@dataclass
class ThreadTally:
    ops: int = 0
    errors: int = 0
    first_error: str | None = None
    latencies: array[float] = field(default_factory=lambda: array("d"))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _value(size: int) -> bytes:
    # A fresh printable value each time, like a licence number; the content does not change the cost.
    return base64.b32encode(os.urandom(size))[:size]


def worker(
    index: int, threads: int, args: argparse.Namespace, run_id: str, barrier: Barrier, results: Any
) -> None:
    """One process: build the SDK client once, then `threads` threads encrypt until the deadline."""
    result = WorkerResult()
    try:
        # The ESDK builds its KMS clients itself from a botocore session and takes no endpoint_url;
        # botocore's service-specific endpoint variable is the supported way to point it elsewhere.
        os.environ["AWS_ENDPOINT_URL_KMS"] = args.kms_endpoint
        import aws_encryption_sdk
        import botocore.session
        from aws_encryption_sdk.identifiers import Algorithm, CommitmentPolicy
        from botocore.config import Config

        session = botocore.session.Session()
        session.set_credentials("bench-access-key", "bench-secret-key")  # the stand-in checks no signature
        session.set_config_variable("region", args.region)
        # Merged into the client config the ESDK passes: one pooled connection per thread, so no
        # request pays for a new TCP connection (urllib3's default pool holds 10).
        session.set_default_client_config(Config(max_pool_connections=max(10, threads)))
        provider = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(
            key_ids=[args.key_id], botocore_session=session
        )
        client = aws_encryption_sdk.EncryptionSDKClient(
            commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
        )
        expected = Algorithm[SUITES[args.suite]]
        # None = the SDK's own default, which is what "default" is meant to measure.
        algorithm = expected if args.suite != "default" else None
        result.esdk_version = aws_encryption_sdk.__version__

        def encrypt(customer_id: str) -> Any:
            _, header = client.encrypt(
                source=_value(args.value_bytes),
                key_provider=provider,
                encryption_context={"customerID": customer_id, "dataType": "DriverLicense"},
                algorithm=algorithm,
            )
            return header

        # Warm-up outside the timed window (service model load, first connection), and a check that
        # "default" really is the suite we say it is.
        header = encrypt(f"{run_id}-warmup-{index}")
        if header.algorithm != expected:
            raise RuntimeError(f"expected {expected.name}, the SDK used {header.algorithm.name}")
        result.algorithm = header.algorithm.name
    except Exception as err:
        result.setup_error = f"{type(err).__name__}: {err}"
        barrier.abort()
        results.put(result)
        return

    tallies = [ThreadTally() for _ in range(threads)]

    def loop(number: int, deadline: float) -> None:
        tally = tallies[number]
        prefix = f"{run_id}-{index}-{number}-"
        clock = time.perf_counter
        while clock() < deadline:
            started = clock()
            try:
                encrypt(prefix + str(tally.ops + tally.errors))
            except Exception as err:
                tally.errors += 1
                tally.first_error = tally.first_error or f"{type(err).__name__}: {err}"
                continue
            tally.latencies.append(clock() - started)
            tally.ops += 1

    try:
        barrier.wait(timeout=SETUP_TIMEOUT_S)  # every process starts its clock together
    except threading.BrokenBarrierError:
        result.setup_error = "another worker failed to set up"
        results.put(result)
        return
    cpu_before = _cpu_seconds()
    result.start = time.perf_counter()
    deadline = result.start + args.duration
    pool = [threading.Thread(target=loop, args=(n, deadline)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    result.end = time.perf_counter()
    result.cpu_seconds = _cpu_seconds() - cpu_before
    result.max_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    merged: array[float] = array("d")
    for tally in tallies:
        result.ops += tally.ops
        result.errors += tally.errors
        result.first_error = result.first_error or tally.first_error
        merged.extend(tally.latencies)
    result.latencies = merged.tobytes()
    results.put(result)


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def threads_per_process(processes: int, concurrency: int) -> list[int]:
    share, rest = divmod(concurrency, processes)
    return [max(1, share + (1 if i < rest else 0)) for i in range(processes)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--kms-endpoint", required=True, help="the KMS stand-in, e.g. http://127.0.0.1:4599")
    parser.add_argument("--key-id", default="alias/bench")
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True, help="seconds")
    parser.add_argument("--suite", choices=sorted(SUITES), required=True)
    parser.add_argument("--value-bytes", type=int, default=17)
    args = parser.parse_args()
    if args.processes < 1 or args.concurrency < 1 or args.duration <= 0 or args.value_bytes < 1:
        parser.error("--processes, --concurrency, --duration and --value-bytes must be positive")
    return args


def main() -> int:
    args = parse_args()
    plan = threads_per_process(args.processes, args.concurrency)
    if sum(plan) != args.concurrency:
        print(f"esdk_baseline: {sum(plan)} threads run, not {args.concurrency}", file=sys.stderr)
    run_id = uuid.uuid4().hex[:12]

    # spawn, not fork: each worker starts clean, with no threads or sockets copied from this one.
    context = mp.get_context("spawn")
    barrier = context.Barrier(args.processes + 1)
    results = context.Queue()
    workers = [
        context.Process(target=worker, args=(i, plan[i], args, run_id, barrier, results))
        for i in range(args.processes)
    ]
    for process in workers:
        process.start()
    # Broken = a worker failed to set up: its result says why.
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait(timeout=SETUP_TIMEOUT_S)
    # Drain before join: a child blocks on exit until its queued result is read.
    try:
        collected = [results.get(timeout=SETUP_TIMEOUT_S + args.duration + 60) for _ in workers]
    except queue.Empty:
        print("esdk_baseline: a worker died without a result", file=sys.stderr)
        for process in workers:
            process.kill()
        return 2
    for process in workers:
        process.join()

    # The worker that failed first says why; the others only say they were stopped.
    failed = sorted(
        (r.setup_error for r in collected if r.setup_error), key=lambda e: e.startswith("another")
    )
    if failed:
        print(f"esdk_baseline: worker setup failed: {failed[0]}", file=sys.stderr)
        return 2

    latencies: list[float] = []
    for r in collected:
        chunk: array[float] = array("d")
        chunk.frombytes(r.latencies)
        latencies.extend(chunk)
    latencies.sort()
    ops = sum(r.ops for r in collected)
    errors = sum(r.errors for r in collected)
    seconds = max(r.end for r in collected) - min(r.start for r in collected)
    cpu = sum(r.cpu_seconds for r in collected)
    report: dict[str, Any] = {
        "suite": args.suite,
        "processes": args.processes,
        "concurrency": args.concurrency,
        "ops": ops,
        "seconds": round(seconds, 3),
        "ops_per_s": round(ops / seconds, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 3) if latencies else None,
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3) if latencies else None,
        "cpu_ms_per_op": round(cpu * 1000 / ops, 3) if ops else None,
        "peak_rss_mb": round(max(r.max_rss_kb for r in collected) / 1024, 1),
        "errors": errors,
        "effective_concurrency": sum(plan),
        "algorithm": collected[0].algorithm,
        "esdk_version": collected[0].esdk_version,
    }
    print(json.dumps(report), flush=True)
    first_error = next((r.first_error for r in collected if r.first_error), None)
    if first_error:
        print(f"esdk_baseline: {errors} encrypts failed; first: {first_error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
