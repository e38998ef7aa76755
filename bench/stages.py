"""The bench's stages: which servers run, and which rows each is measured for."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
from harness import (
    BENCH,
    BIN,
    DATABASE,
    FLOOR_DATABASE,
    PIIVAULT,
    ROOT,
    KmsStandIn,
    RssSampler,
    Vault,
    add_filler_records,
    free_port,
    fresh_database,
    log,
    measure,
    started,
    vault,
    vault_env,
    wrk,
)
from kms_standin import ALIAS, ALIAS_2, KEY_ARN, KEY_ARN_2, wrap
from report import Report


def esdk(kms: KmsStandIn, suite: str, processes: int, concurrency: int, seconds: float) -> dict[str, Any]:
    kms.reset()
    args = [
        str(BIN / "python"), str(BENCH / "esdk_baseline.py"), "--kms-endpoint", kms.url, "--key-id", "alias/bench",
        "--processes", str(processes), "--concurrency", str(concurrency), "--duration", str(seconds), "--suite", suite,
    ]  # fmt: skip
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    result = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"esdk baseline failed: {result.stdout}\n{result.stderr}")
    out: dict[str, Any] = json.loads(lines[-1])
    ops = out.get("ops") or 0
    out["kms_calls_per_op"] = round(kms.stats()["total_calls"] / ops, 3) if ops else None
    log(f"esdk {suite:<17} c={concurrency:<3} {out['ops_per_s']:>8.1f} ops/s p50={out['p50_ms']}ms")
    return out


def audit_cost(report: Report, levels: list[int], seconds: float, workdir: Path) -> None:
    """Tokenize with and without the audit, both vaults up at once and measured in turn (A, B, A,
    B, ...), so that neither gets a quieter machine than the other."""
    with (
        vault("vault-local", fresh_database(DATABASE), None, report.workers, workdir, 0) as audited,
        vault("vault-local-noaudit", fresh_database(DATABASE + "_quiet"), None, report.workers, workdir, 0,
              audit=False) as quiet,
    ):  # fmt: skip
        for _ in range(3):
            for level in levels:
                for name, v in (("vault-local", audited), ("vault-local-noaudit", quiet)):
                    report.rows.append(measure(name, v.process, v.base_url, "tokenize", level, seconds,
                                               report.workers, api_key=v.api_key))  # fmt: skip
    summary = []
    for level in levels:
        on = [r.items_per_s for r in report.rows if r.target == "vault-local" and r.concurrency == level]
        off = [
            r.items_per_s for r in report.rows if r.target == "vault-local-noaudit" and r.concurrency == level
        ]
        cost = round(1 - sum(on) / sum(off), 3)
        summary.append({"target": f"audit cost (1 - with/without), c={level}", "value": cost, "goal": 0.15,
                        "met": cost <= 0.15, "detail": f"with {on} / without {off} items/s"})  # fmt: skip
        log(f"audit cost at c={level}: {cost:.1%} (with {on}, without {off})")
    report.targets = summary


def scale_stage(url: str, v: Vault, args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    """Detokenize and lookup p50 with 10,000 records stored, then with --scale-records."""
    out: dict[str, Any] = {}
    for total in (10_000, args.scale_records):
        add_filler_records(url, total)
        with psycopg.connect(url, autocommit=True) as connection:
            row = connection.execute("SELECT count(*) FROM records").fetchone()
        log(f"scale: {row[0] if row else '?'} records stored")
        measured = measure("vault-local", v.process, v.base_url, "detokenize", 8, seconds, args.workers,
                           api_key=v.api_key, tokens=v.tokens)  # fmt: skip
        found = measure("vault-local", v.process, v.base_url, "lookup", 8, seconds, args.workers,
                        api_key=v.api_key)  # fmt: skip
        out[str(total)] = {"records": total, "p50_ms": measured.p50_ms, "p99_ms": measured.p99_ms,
                           "requests_per_s": measured.requests_per_s, "lookup_p50_ms": found.p50_ms,
                           "lookup_p99_ms": found.p99_ms, "lookup_requests_per_s": found.requests_per_s}  # fmt: skip
    return out


def add_wrapped_records(url: str, total: int) -> None:
    """`total` records whose data keys the stand-in's first key wraps under each record's context
    (made here, not by `total` GenerateDataKey calls), by COPY. The values are random bytes: a
    rewrap never opens them."""
    with psycopg.connect(url, autocommit=True) as connection:
        creator = connection.execute("SELECT id FROM principals LIMIT 1").fetchone()
        assert creator is not None  # noqa: S101
        columns = (
            "token, customer_id, data_type, format_version, ciphertext, wrapped_key, kms_key_id, created_by"
        )
        with connection.cursor().copy(f"COPY records ({columns}) FROM STDIN") as copy:
            for n in range(total):
                customer = f"rewrap-{n}"
                context = {"customerID": customer, "dataType": "DriverLicense"}
                wrapped = wrap(os.urandom(32), context, KEY_ARN)
                copy.write_row((f"tok_rewrap{n:022d}", customer, "DriverLicense", 1, os.urandom(45), wrapped,
                                KEY_ARN, creator[0]))  # fmt: skip
        connection.execute("ANALYZE records")


def rewrap_stage(kms: KmsStandIn, latency_ms: int, workers: int, workdir: Path, total: int) -> dict[str, Any]:
    """`piivault keys rewrap` of `total` records from the stand-in's first key to its second."""
    url = fresh_database(DATABASE)
    with vault("vault-kms-rewrap", url, kms, workers, workdir, 0):
        pass  # migrated, with an admin and the audit key under the first key
    add_wrapped_records(url, total)
    env = {
        **vault_env(url, kms, workdir),
        "PIIVAULT_KMS_KEY_ID": ALIAS_2,
        "PIIVAULT_KMS_DECRYPT_KEY_IDS": ALIAS,
    }
    kms.reset()
    args = [str(PIIVAULT), "keys", "rewrap", "--to", ALIAS_2, "--batch", "500"]
    result = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT, check=False)
    calls = kms.stats()["total_calls"]
    if result.returncode != 0:
        raise RuntimeError(f"rewrap failed: {result.stdout}\n{result.stderr}")
    progress = [line for line in result.stdout.splitlines() if line.startswith("rewrap: ")]
    # The CLI's own rate (from its first batch, without the process's start-up): "...; N/s, eta 0s)".
    rate = float(progress[-1].rsplit("; ", 1)[1].split("/s")[0])
    with psycopg.connect(url, autocommit=True) as connection:
        left = connection.execute(
            "SELECT count(*) FROM records WHERE kms_key_id <> %s", (KEY_ARN_2,)
        ).fetchone()
    out = {"operation": "rewrap", "records": total, "kms_latency_ms": latency_ms, "items_per_s": rate,
           "kms_calls_per_item": round(calls / (total + 1), 3), "left_unmoved": left[0] if left else None}  # fmt: skip
    log(f"rewrap: {total} records at {rate:.0f}/s, {out['kms_calls_per_item']} KMS calls each")
    return out


ERASED_CUSTOMER = "erase-bench"


def add_customer_records(url: str, customer: str, total: int) -> None:
    """`total` live DriverLicense records of one customer, by COPY, with the key id, format and
    creator of the record the vault already holds. Ciphertext, wrapped key and fingerprint are
    random bytes: an erasure never opens them."""
    with psycopg.connect(url, autocommit=True) as connection:
        model = connection.execute(
            "SELECT kms_key_id, format_version, created_by FROM records LIMIT 1"
        ).fetchone()
        assert model is not None  # noqa: S101
        columns = "token, customer_id, data_type, format_version, ciphertext, wrapped_key, kms_key_id, created_by, fingerprint"
        with connection.cursor().copy(f"COPY records ({columns}) FROM STDIN") as copy:
            for n in range(total):
                copy.write_row((f"tok_erase{n:027d}", customer, "DriverLicense", model[1], os.urandom(45),
                                os.urandom(120), model[0], model[2], os.urandom(32)))  # fmt: skip
        connection.execute("ANALYZE records")


def erase_stage(workers: int, workdir: Path, total: int) -> dict[str, Any]:
    """POST /v1/customers/{id}/erase of one customer's `total` records (local key provider, the
    service principal holding Erase beside Encrypt and Decrypt), end to end over HTTP."""
    url = fresh_database(DATABASE)
    with vault("vault-local-erase", url, None, workers, workdir, 1, extra_operations=("Erase",)) as v:
        add_customer_records(url, ERASED_CUSTOMER, total)
        headers = {"Authorization": f"Bearer {v.api_key}"}
        body = {"reason": "bench: customer erasure"}
        with RssSampler(v.process) as rss:
            started_at = time.perf_counter()
            response = httpx.post(f"{v.base_url}/v1/customers/{ERASED_CUSTOMER}/erase", json=body,
                                  headers=headers, timeout=600)  # fmt: skip
            elapsed = time.perf_counter() - started_at
        response.raise_for_status()
        erased = response.json()["erased"]
    with psycopg.connect(url, autocommit=True) as connection:
        counted = connection.execute(
            """SELECT count(*) FILTER (WHERE erased_at IS NOT NULL AND ciphertext IS NULL AND wrapped_key IS NULL
                                        AND kms_key_id IS NULL AND fingerprint IS NULL),
                      count(*) FILTER (WHERE erased_at IS NULL)
                 FROM records WHERE customer_id = %s""",
            (ERASED_CUSTOMER,),
        ).fetchone()
    tombstones, live = counted if counted else (None, None)
    out = {"operation": "customer erasure", "records": total, "kms_latency_ms": None,
           "items_per_s": round(erased / elapsed, 1), "seconds": round(elapsed, 2), "kms_calls_per_item": None,
           "peak_rss_mb_per_worker": round(rss.peak_mb, 1), "erased": erased, "tombstones": tombstones,
           "left_live": live}  # fmt: skip
    log(f"customer erasure: {erased} of {total} records in {elapsed:.2f} s ({out['items_per_s']:.0f}/s), "
        f"{tombstones} tombstones, {live} live, peak worker RSS {out['peak_rss_mb_per_worker']} MB")  # fmt: skip
    return out


def leak_stage(v: Vault, total: int) -> dict[str, Any]:
    """Worker RSS after total/2 and after total tokenize requests."""
    done = 0
    marks: dict[str, Any] = {}
    half = total // 2
    while done < total:
        out = wrk(v.base_url, "tokenize", 32, 10, {"API_KEY": v.api_key})
        done += out["requests"]
        rss = [round(w.memory_info().rss / 2**20, 1) for w in v.process.workers()]
        if done >= half and "half" not in marks:
            marks["half"] = {"requests": done, "rss_mb": rss}
        log(f"leak: {done} requests, worker RSS {rss} MB")
    marks["full"] = {"requests": done, "rss_mb": rss}
    return marks


def floors(
    report: Report, args: argparse.Namespace, levels: list[int], seconds: float, workdir: Path
) -> None:
    """The floors: the same minimal insert endpoint, sync (thread pool) and async (event loop)."""
    base_env = {**os.environ}
    rows = report.rows
    for target, factory in (("floor", "floor_app:app"), ("floor-async", "floor_app:async_app")):
        floor_url = fresh_database(FLOOR_DATABASE)
        port = free_port()
        floor_args = [
            str(BIN / "uvicorn"), factory, "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(args.workers), "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip
        with started(target, floor_args, {**base_env, "FLOOR_DATABASE_URL": floor_url, "PYTHONPATH": str(BENCH)},
                     f"http://127.0.0.1:{port}/docs", workdir) as floor:  # fmt: skip
            for level in levels:
                rows.append(
                    measure(
                        target, floor, f"http://127.0.0.1:{port}", "tokenize", level, seconds, args.workers
                    )
                )


def vaults(
    report: Report, args: argparse.Namespace, levels: list[int], seconds: float, workdir: Path
) -> None:
    """The vault with each key provider beside the KMS stand-in, with the ESDK and no-audit rows
    (and unless --quick the leak and scale stages), then vault-kms with 10 ms of KMS latency, the
    rewrap under it, and a customer's erasure."""
    base_env = {**os.environ}
    rows = report.rows
    kms_port = free_port()
    standin = [
        str(BIN / "python"),
        str(BENCH / "kms_standin.py"),
        "--host",
        "127.0.0.1",
        "--port",
        str(kms_port),
    ]
    with started("kms-standin", standin, base_env, f"http://127.0.0.1:{kms_port}/_stats", workdir):
        kms = KmsStandIn(kms_port)
        for provider, kms_or_none in (("vault-local", None), ("vault-kms", kms)):
            url = fresh_database(DATABASE)
            with vault(provider, url, kms_or_none, args.workers, workdir, 20_000) as v:
                for level in levels:
                    for operation, batch in (("tokenize", 1), ("tokenize_idempotent", 1), ("detokenize", 1)):
                        rows.append(
                            measure(provider, v.process, v.base_url, operation, level, seconds, args.workers,
                                    api_key=v.api_key, tokens=v.tokens, batch=batch, kms=kms_or_none)
                        )  # fmt: skip
                for level in [c for c in levels if c in (8, 32)] or levels[:1]:
                    for operation in ("batch_tokenize", "batch_detokenize"):
                        rows.append(
                            measure(provider, v.process, v.base_url, operation, level, seconds, args.workers,
                                    api_key=v.api_key, tokens=v.tokens, batch=100, kms=kms_or_none)
                        )  # fmt: skip
                if provider == "vault-kms":
                    # The stand-in's own CPU per call over the last vault-kms row (measure() resets
                    # its counters before each row), read before the ESDK rows reset them again.
                    report.kms_standin_cpu_ms_per_call = kms.stats().get("cpu_ms_per_call")
                    kms.reset()
                    for level in levels:
                        for suite in ("default", "committing-nosign"):
                            # No more processes than requests in flight: C=1 is one process.
                            report.esdk.append(esdk(kms, suite, min(args.workers, level), level, seconds))
                if provider == "vault-local" and not args.quick:
                    report.leak = leak_stage(v, args.leak_requests)
            if provider == "vault-local" and not args.quick:
                # Its own database, holding exactly the 10,000 records its tokens name at first.
                url = fresh_database(DATABASE)
                with vault("vault-local-scale", url, None, args.workers, workdir, 10_000) as sized:
                    report.scale = scale_stage(url, sized, args, seconds)
            if provider == "vault-local":
                # What the audit costs: the same tokenize rows with the audit switched off.
                url = fresh_database(DATABASE)
                with vault("vault-local-noaudit", url, None, args.workers, workdir, 0, audit=False) as quiet:
                    for level in [c for c in levels if c in (8, 32)] or levels[:1]:
                        rows.append(
                            measure("vault-local-noaudit", quiet.process, quiet.base_url, "tokenize", level,
                                    seconds, args.workers, api_key=quiet.api_key)
                        )  # fmt: skip

        # 10 ms of KMS latency at the highest concurrency.
        slow_port = free_port()
        slow = [*standin[:-1], str(slow_port), "--latency-ms", "10"]
        with started("kms-standin-slow", slow, base_env, f"http://127.0.0.1:{slow_port}/_stats", workdir):
            slow_kms = KmsStandIn(slow_port)
            url = fresh_database(DATABASE)
            top = max(levels)
            with vault("vault-kms-slow", url, slow_kms, args.workers, workdir, 5_000) as v:
                for operation in ("tokenize", "detokenize"):
                    row = measure("vault-kms", v.process, v.base_url, operation, top, seconds, args.workers,
                                  api_key=v.api_key, tokens=v.tokens, kms=slow_kms, kms_latency_ms=10)  # fmt: skip
                    rows.append(row)
            report.lifecycle.append(rewrap_stage(slow_kms, 10, args.workers, workdir, args.rewrap_records))
    # No KMS: erasure never calls it.
    report.lifecycle.append(erase_stage(args.workers, workdir, args.erase_records))
