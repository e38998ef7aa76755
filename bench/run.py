"""`make bench`: the vault against its floor and the AWS Encryption SDK, in one run, on this machine.

Writes bench/results/latest.json and latest.md. Every server runs as its own process on 127.0.0.1
and is loaded by wrk (bench/load.lua); every request names a distinct customer or token.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
from psycopg import sql

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BIN = Path(sys.executable).parent
PIIVAULT = BIN / "piivault"
RESULTS = BENCH / "results"
SERVER = os.environ.get("PIIVAULT_BENCH_SERVER_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DATABASE = "piivault_bench"
FLOOR_DATABASE = "piivault_bench_floor"
GRANTEE_ARN = "arn:aws:iam::111122223333:role/piivault-bench"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def database_url(name: str) -> str:
    return SERVER.rsplit("/", 1)[0] + "/" + name


def postgres_cpu_seconds() -> float | None:
    """CPU of every PostgreSQL process on this machine (backends, WAL writer, autovacuum...), or
    None when the server is elsewhere. Whatever else the server does meanwhile counts too."""
    if psycopg.conninfo.conninfo_to_dict(SERVER).get("host") not in ("127.0.0.1", "localhost", "::1", None):
        return None
    total = 0.0
    for process in psutil.process_iter(["name"]):
        with suppress(psutil.Error):
            if (process.info["name"] or "").startswith("postgres"):
                times = process.cpu_times()
                total += times.user + times.system
    return total


def fresh_database(name: str) -> str:
    with psycopg.connect(SERVER, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return database_url(name)


@dataclass
class Process:
    popen: subprocess.Popen[bytes]
    log_path: Path

    def tree(self) -> list[psutil.Process]:
        try:
            parent = psutil.Process(self.popen.pid)
            return [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def workers(self) -> list[psutil.Process]:
        tree = self.tree()
        return tree[1:] or tree[:1]

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self.tree():
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total


@contextmanager
def started(
    name: str, args: list[str], env: dict[str, str], ready_url: str, workdir: Path
) -> Iterator[Process]:
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as out:
        popen = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    process = Process(popen, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(ready_url, timeout=2).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield process
    finally:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout=10)


class RssSampler:
    """The largest RSS any single worker reached while the block ran."""

    def __init__(self, process: Process) -> None:
        self._process = process
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            for worker in self._process.workers():
                with suppress(psutil.NoSuchProcess):
                    self.peak_mb = max(self.peak_mb, worker.memory_info().rss / 2**20)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Row:
    target: str
    operation: str
    concurrency: int
    workers: int
    kms_latency_ms: int = 0
    requests: int = 0
    items: int = 0
    seconds: float = 0.0
    requests_per_s: float = 0.0
    items_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_ms_per_item: float | None = None
    pg_cpu_ms_per_item: float | None = None
    kms_calls_per_item: float | None = None
    peak_rss_mb_per_worker: float | None = None
    errors: int = 0
    note: str = ""


def wrk(base_url: str, mode: str, concurrency: int, seconds: float, env: dict[str, str]) -> dict[str, Any]:
    threads = max(1, min(2, concurrency))
    args = [
        "wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
        "-s", str(BENCH / "load.lua"), base_url,
    ]  # fmt: skip
    result = subprocess.run(
        args, env={**os.environ, **env, "MODE": mode}, capture_output=True, text=True, check=False
    )
    for line in result.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            parsed: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
            return parsed
    raise RuntimeError(f"wrk gave no result: {result.stdout}\n{result.stderr}")


ROUTES = {
    "tokenize": "/v1/tokens",
    "detokenize": "/v1/tokens/{token}",
    "batch_tokenize": "/v1/tokens/batch",
    "batch_detokenize": "/v1/tokens/detokenize",
}


def served(base_url: str, operation: str) -> float:
    """Requests the vault has answered on this operation's route (from its own /metrics)."""
    total = 0.0
    needle = f'route="{ROUTES[operation]}"'
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith("piivault_requests_total{") and needle in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


class KmsStandIn:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = httpx.get(f"{self.url}/_stats", timeout=5).json()
        return stats

    def reset(self) -> None:
        httpx.post(f"{self.url}/_reset", timeout=5)


def measure(
    target: str,
    process: Process,
    base_url: str,
    operation: str,
    concurrency: int,
    seconds: float,
    workers: int,
    *,
    api_key: str = "",
    tokens: Path | None = None,
    batch: int = 1,
    kms: KmsStandIn | None = None,
    kms_latency_ms: int = 0,
) -> Row:
    env = {"API_KEY": api_key, "TOKENS": str(tokens or ""), "BATCH": str(batch)}
    if kms:
        kms.reset()
        served_before = served(base_url, operation)
    cpu_before, pg_before = process.cpu_seconds(), postgres_cpu_seconds()
    with RssSampler(process) as rss:
        out = wrk(base_url, operation, concurrency, seconds, env)
    cpu = process.cpu_seconds() - cpu_before
    pg_after = postgres_cpu_seconds()
    pg_cpu = pg_after - pg_before if pg_after is not None and pg_before is not None else None
    requests = out["requests"]
    items = requests * batch
    elapsed = out["duration_us"] / 1e6
    row = Row(
        target=target,
        operation=operation,
        concurrency=concurrency,
        workers=workers,
        kms_latency_ms=kms_latency_ms,
        requests=requests,
        items=items,
        seconds=round(elapsed, 2),
        requests_per_s=round(requests / elapsed, 1),
        items_per_s=round(items / elapsed, 1),
        p50_ms=round(out["p50_us"] / 1000, 2),
        p99_ms=round(out["p99_us"] / 1000, 2),
        cpu_ms_per_item=round(cpu * 1000 / items, 3) if items else None,
        pg_cpu_ms_per_item=round(pg_cpu * 1000 / items, 3) if items and pg_cpu is not None else None,
        peak_rss_mb_per_worker=round(rss.peak_mb, 1),
        errors=out["socket_errors"] + out["status_errors"],
    )
    if kms and items:
        # Requests still in flight when wrk stops also call KMS: count what the vault finished.
        time.sleep(1.0)
        finished = (served(base_url, operation) - served_before) * batch
        row.kms_calls_per_item = round(kms.stats()["total_calls"] / finished, 3) if finished else None
    log(
        f"{target:<22} {operation:<17} c={concurrency:<3} {row.items_per_s:>8.1f} items/s "
        f"p50={row.p50_ms}ms p99={row.p99_ms}ms cpu={row.cpu_ms_per_item}ms pg={row.pg_cpu_ms_per_item}ms kms/item={row.kms_calls_per_item} "
        f"errors={row.errors}"
    )
    return row


@dataclass
class Vault:
    process: Process
    base_url: str
    api_key: str
    tokens: Path


def vault_env(url: str, kms: KmsStandIn | None, workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIIVAULT_")}
    env.update({"PIIVAULT_DATABASE_URL": url, "PIIVAULT_DATA_DIR": str(workdir / "data")})
    if kms is None:
        env["PIIVAULT_ENVIRONMENT"] = "development"
    else:
        env.update(
            {
                "PIIVAULT_ENVIRONMENT": "production",
                "PIIVAULT_KMS_KEY_ID": "alias/bench",
                "PIIVAULT_KMS_ENDPOINT_URL": kms.url,
                "PIIVAULT_KMS_ALLOW_INSECURE_ENDPOINT": "true",
                "PIIVAULT_KMS_GRANTEE_PRINCIPAL": GRANTEE_ARN,
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        )
    return env


@contextmanager
def vault(
    name: str,
    url: str,
    kms: KmsStandIn | None,
    workers: int,
    workdir: Path,
    token_count: int,
    audit: bool = True,
) -> Iterator[Vault]:
    env = vault_env(url, kms, workdir)
    subprocess.run([str(PIIVAULT), "migrate"], env=env, check=True, capture_output=True, cwd=ROOT)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = [str(PIIVAULT), "serve", "--port", str(port), "--workers", str(workers), "--no-migrate"]
    if not audit:
        # The same app with the audit switched off (bench/noaudit_app.py), served the same way.
        env["PYTHONPATH"] = str(BENCH)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(workdir / "metrics-noaudit")
        (workdir / "metrics-noaudit").mkdir(exist_ok=True)
        args = [
            str(BIN / "uvicorn"), "noaudit_app:create", "--factory", "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers), "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip
    with started(name, args, env, f"{base}/readyz", workdir) as process:
        created = subprocess.run(
            [str(PIIVAULT), "admin", "create", f"admin-{name}-{port}"],
            env=env, check=True, capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        admin = {"Authorization": f"Bearer {created.stdout.strip().splitlines()[-1]}"}
        with httpx.Client(base_url=base, timeout=60) as http:
            app = http.post("/v1/principals", json={"name": f"app-{port}", "role": "service"}, headers=admin)
            app.raise_for_status()
            grant = {"grantee": app.json()["id"], "operations": ["Encrypt", "Decrypt"]}
            http.post("/v1/grants", json=grant, headers=admin).raise_for_status()
            api_key = app.json()["api_key"]
            tokens = workdir / f"{name}-tokens.txt"
            tokens.write_text("\n".join(make_tokens(http, api_key, token_count)) + "\n")
        yield Vault(process, base, api_key, tokens)


def make_tokens(http: httpx.Client, api_key: str, count: int) -> list[str]:
    tokens: list[str] = []
    while len(tokens) < count:
        items = [
            {"customer_id": f"seed-{len(tokens) + n}", "data_type": "DriverLicense", "value": f"D-{n:05d}"}
            for n in range(min(500, count - len(tokens)))
        ]
        response = http.post(
            "/v1/tokens/batch", json={"items": items}, headers={"Authorization": f"Bearer {api_key}"}
        )
        response.raise_for_status()
        tokens += [r["token"] for r in response.json()["results"]]
    return tokens


def add_filler_records(url: str, total: int) -> None:
    """Pad the records table to `total` rows with well-formed (unreadable) records, fast."""
    with psycopg.connect(url, autocommit=True) as connection:
        row = connection.execute("SELECT count(*) FROM records").fetchone()
        have = row[0] if row else 0
        if have >= total:
            return
        creator = connection.execute("SELECT id FROM principals LIMIT 1").fetchone()
        assert creator is not None  # noqa: S101
        connection.execute(
            """INSERT INTO records (token, customer_id, data_type, format_version, ciphertext, wrapped_key,
                                    kms_key_id, created_at, created_by)
               SELECT 'tok_filler' || lpad(n::text, 24, '0'), 'filler-' || n, 'DriverLicense', 1,
                      gen_random_bytes(45), gen_random_bytes(120), 'filler', now(), %s
               FROM generate_series(%s, %s) AS n""",
            (creator[0], have + 1, total),
        )
        connection.execute("ANALYZE records")


def git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "app"], cwd=ROOT, capture_output=True, text=True
    )
    return result.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


@dataclass
class Report:
    started: str
    commit: str
    nproc: int
    machine: str
    python: str
    workers: int
    seconds_per_row: float
    kms_standin_cpu_ms_per_call: float | None = None
    rows: list[Row] = field(default_factory=list)
    esdk: list[dict[str, Any]] = field(default_factory=list)
    leak: dict[str, Any] = field(default_factory=dict)
    scale: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)


def find(rows: list[Row], target: str, operation: str, concurrency: int, latency: int = 0) -> Row | None:
    for row in rows:
        if (row.target, row.operation, row.concurrency, row.kms_latency_ms) == (
            target,
            operation,
            concurrency,
            latency,
        ):
            return row
    return None


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each measured row")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--concurrency", default="1,8,32,128")
    parser.add_argument("--quick", action="store_true", help="short rows, no scale or leak stage")
    parser.add_argument("--leak-requests", type=int, default=100_000)
    parser.add_argument("--scale-records", type=int, default=1_000_000)
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
    base_env = {**os.environ}
    rows = report.rows
    if args.audit_cost:
        audit_cost(report, levels, seconds, workdir)
        return

    # The floors: the same minimal insert endpoint, sync (thread pool) and async (event loop).
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
                    for operation, batch in (("tokenize", 1), ("detokenize", 1)):
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

    report.targets = evaluate(report, levels)
    write(report)


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
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "audit-cost.json").write_text(json.dumps(asdict(report), indent=2) + "\n")


def scale_stage(url: str, v: Vault, args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    """Detokenize p50 with 10,000 records stored, then with --scale-records."""
    out: dict[str, Any] = {}
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")
    for total in (10_000, args.scale_records):
        add_filler_records(url, total)
        with psycopg.connect(url, autocommit=True) as connection:
            row = connection.execute("SELECT count(*) FROM records").fetchone()
        log(f"scale: {row[0] if row else '?'} records stored")
        measured = measure("vault-local", v.process, v.base_url, "detokenize", 8, seconds, args.workers,
                           api_key=v.api_key, tokens=v.tokens)  # fmt: skip
        out[str(total)] = {"records": total, "p50_ms": measured.p50_ms, "p99_ms": measured.p99_ms,
                           "requests_per_s": measured.requests_per_s}  # fmt: skip
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


def ratio(numerator: Any, denominator: Any) -> float | None:
    """numerator / denominator, or None when either is missing (a row that did not run)."""
    if not numerator or not denominator:
        return None
    return round(float(numerator) / float(denominator), 3)


def machine_cost(row: Row | None, floor_row: Row | None) -> str:
    """Where a row's throughput goes, against the floor's: on a saturated machine, throughput is
    about the inverse of the CPU every process spends per item."""
    if row is None or floor_row is None:
        return ""
    parts = [f"{r.target} {r.cpu_ms_per_item} + PostgreSQL {r.pg_cpu_ms_per_item}" for r in (row, floor_row)]
    return "CPU ms/item: " + " vs ".join(parts)


def evaluate(report: Report, levels: list[int]) -> list[dict[str, Any]]:
    rows, targets = report.rows, []

    def check(name: str, value: float | None, goal: float, detail: str) -> None:
        targets.append({"target": name, "value": value, "goal": goal, "met": value is not None and value >= goal,
                        "detail": detail})  # fmt: skip

    for level in levels:
        tok_local = find(rows, "vault-local", "tokenize", level)
        # The floor of record runs the vault's own concurrency model (async); the sync floor's
        # ratio is shown beside it.
        floor_row = find(rows, "floor-async", "tokenize", level)
        check(f"tokenize(local) / floor-async, c={level}", ratio(tok_local and tok_local.items_per_s,
              floor_row and floor_row.items_per_s), 0.6, "items/s; " + machine_cost(tok_local, floor_row))  # fmt: skip
        sync_floor = find(rows, "floor", "tokenize", level)
        targets.append({"target": f"tokenize(local) / floor (sync), c={level}", "goal": None, "met": None,
                        "value": ratio(tok_local and tok_local.items_per_s, sync_floor and sync_floor.items_per_s),
                        "detail": "for reference: a floor in the thread-pool model"})  # fmt: skip
        tok_kms = find(rows, "vault-kms", "tokenize", level)
        esdk_default = next(
            (e for e in report.esdk if e["suite"] == "default" and e["concurrency"] == level), None
        )
        check(f"tokenize(kms) / ESDK default, c={level}", ratio(tok_kms and tok_kms.items_per_s,
              esdk_default and esdk_default["ops_per_s"]), 1.5, "ops/s")  # fmt: skip
        for provider in ("vault-local", "vault-kms"):
            tok, det = find(rows, provider, "tokenize", level), find(rows, provider, "detokenize", level)
            check(f"detokenize / tokenize ({provider}), c={level}",
                  ratio(det and det.items_per_s, tok and tok.items_per_s), 1.0, "items/s")  # fmt: skip
    for provider in ("vault-local", "vault-kms"):
        for level in (8, 32):
            batch, single = (
                find(rows, provider, "batch_tokenize", level),
                find(rows, provider, "tokenize", level),
            )
            if batch and single:
                check(f"batch tokenize items/s / tokenize req/s ({provider}), c={level}",
                      ratio(batch.items_per_s, single.requests_per_s), 5.0, "")  # fmt: skip
    for level in (8, 32):
        audited = find(rows, "vault-local", "tokenize", level)
        quiet = find(rows, "vault-local-noaudit", "tokenize", level)
        if audited and quiet:
            check(f"tokenize with audit / without (local), c={level}",
                  ratio(audited.items_per_s, quiet.items_per_s), 0.85, "issue 3: at most 15% cost")  # fmt: skip
    top = max(levels)
    for operation in ("tokenize", "detokenize"):
        slow, fast = find(rows, "vault-kms", operation, top, 10), find(rows, "vault-kms", operation, top)
        check(f"{operation} with 10 ms KMS latency / without, c={top}",
              ratio(slow and slow.items_per_s, fast and fast.items_per_s), 0.8, "")  # fmt: skip
    calls = [row.kms_calls_per_item for row in rows if row.target == "vault-kms" and row.operation in
             ("tokenize", "detokenize") and row.kms_calls_per_item is not None]  # fmt: skip
    targets.append({"target": "KMS calls per single tokenize/detokenize", "value": max(calls) if calls else None,
                    "goal": 1.0, "met": bool(calls) and all(abs(c - 1.0) < 0.02 for c in calls),
                    "detail": "every vault-kms single row"})  # fmt: skip
    if report.scale:
        small, large = report.scale.get("10000"), report.scale.get(str(max(int(k) for k in report.scale)))
        if small and large:
            growth = round(large["p50_ms"] / small["p50_ms"] - 1, 3)
            targets.append({"target": "detokenize p50 growth, 10k -> 1M records", "value": growth, "goal": 0.15,
                            "met": growth <= 0.15, "detail": "fraction; at most 0.15"})  # fmt: skip
    if report.leak.get("half") and report.leak.get("full"):
        half, full = max(report.leak["half"]["rss_mb"]), max(report.leak["full"]["rss_mb"])
        growth = round(full / half - 1, 3)
        targets.append({"target": "worker RSS growth, 50k -> 100k requests", "value": growth, "goal": 0.10,
                        "met": growth <= 0.10, "detail": "fraction; at most 0.10"})  # fmt: skip
    return targets


def write(report: Report) -> None:
    RESULTS.mkdir(exist_ok=True)
    data = asdict(report)
    (RESULTS / "latest.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        "# pii-vault benchmark",
        "",
        f"Run {report.started} on commit `{report.commit}`; nproc {report.nproc}, {report.machine}, "
        f"Python {report.python}; vault and floor with {report.workers} workers; {report.seconds_per_row} s per row; "
        f"KMS stand-in CPU {report.kms_standin_cpu_ms_per_call} ms per call.",
        "",
        "| target | operation | conc. | KMS latency | items/s | req/s | p50 ms | p99 ms | CPU ms/item"
        " | PostgreSQL CPU ms/item | KMS calls/item | peak RSS MB/worker | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report.rows:
        lines.append(
            f"| {row.target} | {row.operation} | {row.concurrency} | {row.kms_latency_ms} ms | {row.items_per_s} | "
            f"{row.requests_per_s} | {row.p50_ms} | {row.p99_ms} | {row.cpu_ms_per_item} | {row.pg_cpu_ms_per_item} | "
            f"{row.kms_calls_per_item} | "
            f"{row.peak_rss_mb_per_worker} | {row.errors} |"
        )
    lines += ["", "## AWS Encryption SDK (in-process encrypt, KMS stand-in, no cache)", "",
              "| suite | processes | conc. | ops/s | p50 ms | p99 ms | CPU ms/op | KMS calls/op | peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for e in report.esdk:
        lines.append(
            f"| {e['suite']} | {e['processes']} | {e['concurrency']} | {e['ops_per_s']} | {e['p50_ms']} | "
            f"{e['p99_ms']} | {e.get('cpu_ms_per_op')} | {e.get('kms_calls_per_op')} | {e.get('peak_rss_mb')} |"
        )
    if report.scale:
        lines += ["", "## Detokenize latency against table size (concurrency 8)", "",
                  "| records | p50 ms | p99 ms | req/s |", "|---|---|---|---|"]  # fmt: skip
        for s in report.scale.values():
            lines.append(f"| {s['records']} | {s['p50_ms']} | {s['p99_ms']} | {s['requests_per_s']} |")
    if report.leak:
        lines += ["", "## Worker RSS under sustained tokenize (concurrency 32)", ""]
        for mark, value in report.leak.items():
            lines.append(f"- after {value['requests']} requests ({mark}): {value['rss_mb']} MB")
    lines += ["", "## Targets", "", "| target | value | goal | met | detail |", "|---|---|---|---|---|"]
    for t in report.targets:
        met = "—" if t["met"] is None else ("yes" if t["met"] else "**no**")
        goal = t["goal"] if t["goal"] is not None else "—"
        lines.append(f"| {t['target']} | {t['value']} | {goal} | {met} | {t.get('detail', '')} |")
    (RESULTS / "latest.md").write_text("\n".join(lines) + "\n")
    log(f"wrote {RESULTS / 'latest.md'} and latest.json")


if __name__ == "__main__":
    main()
