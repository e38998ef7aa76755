"""The bench's harness: databases, server processes, wrk, and measuring one row."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
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
SERVER = os.environ.get("VAULT_BENCH_SERVER_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
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
        # Sampled at the start and once more at the end too: a block shorter than the period counts.
        while True:
            for worker in self._process.workers():
                with suppress(psutil.NoSuchProcess):
                    self.peak_mb = max(self.peak_mb, worker.memory_info().rss / 2**20)
            if self._stop.is_set():
                return
            self._stop.wait(0.25)

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
    # The same route as tokenize: served() counts it right as long as one row runs at a time.
    "tokenize_idempotent": "/v1/tokens",
    "detokenize": "/v1/tokens/{token}",
    "batch_tokenize": "/v1/tokens/batch",
    "batch_detokenize": "/v1/tokens/detokenize",
    "lookup": "/v1/tokens/lookup",
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
    known = (ROOT / "app" / "settings.py").read_text()  # a checkout older than a setting refuses it
    if "rate_limit_rps" in known:
        # One principal drives all the load: its rate limit is checked on every request (its cost
        # is measured) but set far above what the machine can do, so no request is refused.
        env.update({"PIIVAULT_RATE_LIMIT_RPS": "1000000", "PIIVAULT_RATE_LIMIT_BURST": "1000000"})
    if "lookup_rate_per_s" in known:
        env["PIIVAULT_LOOKUP_RATE_PER_S"] = "1000000"  # the same for lookups (10/s by default)
    if "dual_control" in known:
        # The bench measures the data path: its one admin grants Decrypt without a second admin.
        env["PIIVAULT_DUAL_CONTROL"] = "false"
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
    extra_operations: tuple[str, ...] = (),
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
            # Lookup (the lookup rows) only where the checkout has it: bench/ab.py runs older ones.
            lookup = ["Lookup"] if "lookup_rate_per_s" in (ROOT / "app" / "settings.py").read_text() else []
            operations = ["Encrypt", "Decrypt", *lookup, *extra_operations]
            grant = {"grantee": app.json()["id"], "operations": operations}
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
    """Pad the records table to `total` rows with well-formed (unreadable) records, written with
    COPY. Each has a random 32-byte fingerprint, as an HMAC's would be: the lookup index grows as
    it would with real records, and no filler matches a lookup."""
    with psycopg.connect(url, autocommit=True) as connection:
        row = connection.execute("SELECT count(*) FROM records").fetchone()
        have = row[0] if row else 0
        if have >= total:
            return
        creator = connection.execute("SELECT id FROM principals LIMIT 1").fetchone()
        assert creator is not None  # noqa: S101
        columns = "token, customer_id, data_type, format_version, ciphertext, wrapped_key, kms_key_id, created_by, fingerprint"
        with connection.cursor().copy(f"COPY records ({columns}) FROM STDIN") as copy:
            for n in range(have + 1, total + 1):
                copy.write_row((f"tok_filler{n:024d}", f"filler-{n}", "DriverLicense", 1, os.urandom(45),
                                os.urandom(120), "filler", creator[0], os.urandom(32)))  # fmt: skip
        connection.execute("ANALYZE records")


def git_commit(root: Path | None = None) -> str:
    root = root or ROOT
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "app"], cwd=root, capture_output=True, text=True
    )
    return result.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
