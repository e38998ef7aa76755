"""Client CPU per KMS call: boto3's own call path against the vault's transports (app/crypto/kms_transport.py).

    python bench/kms_client_cpu.py [--calls 3000] [--warmup 300] [--rounds 3] [--json]

Starts bench/kms_standin.py on a free port (ready once GET /_stats answers), then, for
GenerateDataKey and Decrypt, runs `--calls` sequential calls after `--warmup` and divides this
process's CPU time (time.process_time: user + system, all threads) by the calls:

- boto3: `client.generate_data_key(...)` / `client.decrypt(...)` on the boto3 client KmsKeyProvider
  builds (the vault's timeouts, pool and "standard" retries), called directly;
- boto3-transport: `KmsKeyProvider.generate_data_key` / `decrypt_data_key` (awaited) with
  PIIVAULT_KMS_TRANSPORT=boto3 (the client's call in a thread), DataKey included;
- lean: the same provider calls with the lean transport (the default).

Provider calls are awaited one after another on a uvloop event loop, as the vault's data path
makes them.

All sign with SigV4 from the same credentials (fixed bench ones: the stand-in checks no
signature). The stand-in counts every call, and each measured loop must account for exactly
`--calls` of them, so neither path can be skipping the wire. Paths alternate round by round and
the median round is reported; figures move with whatever else the machine is doing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CONTEXT = {"customerID": "bench-customer-1", "dataType": "DriverLicense"}
KEY_ALIAS = "alias/bench"  # the stand-in's key
OPERATIONS = ("GenerateDataKey", "Decrypt")
READY_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def standin_request(base_url: str, path: str, method: str = "GET") -> dict[str, Any]:
    answer: dict[str, Any] = httpx.request(method, f"{base_url}{path}", timeout=5).raise_for_status().json()
    return answer


@contextmanager
def kms_standin() -> Iterator[str]:
    """The stand-in on a free port; yields its base URL once GET /_stats answers."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, str(BENCH / "kms_standin.py"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                standin_request(base_url, "/_stats")
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    errors = process.stderr.read().decode() if process.stderr else ""
                    raise SystemExit(f"the KMS stand-in did not start:\n{errors}") from None
                time.sleep(0.1)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's, as uvicorn serves the vault on it when it is installed (it is a dependency)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def repeated(call: Callable[[], object]) -> Callable[[int], None]:
    def run(times: int) -> None:
        for _ in range(times):
            call()

    return run


def awaited(loop: asyncio.AbstractEventLoop, call: Callable[[], Awaitable[object]]) -> Callable[[int], None]:
    """Sequential calls awaited on an event loop, as the vault's data path makes them."""

    async def many(times: int) -> None:
        for _ in range(times):
            await call()

    return lambda times: loop.run_until_complete(many(times))


def cpu_us_per_call(run: Callable[[int], None], *, calls: int, warmup: int, standin: str) -> float:
    run(warmup)
    standin_request(standin, "/_reset", method="POST")
    started = time.process_time()
    run(calls)
    spent = time.process_time() - started
    served = standin_request(standin, "/_stats")["total_calls"]
    if served != calls:
        raise SystemExit(f"the stand-in served {served} calls for {calls} made: a path skipped the wire")
    return spent / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000, help="measured calls per path and operation")
    parser.add_argument("--warmup", type=int, default=300, help="unmeasured calls first")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()

    # This checkout's app, whatever an installed copy says; the stand-in ignores signatures, so fixed
    # credentials keep any real ones out of the requests.
    sys.path.insert(0, str(ROOT))
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(name, None)
    os.environ.update({"AWS_ACCESS_KEY_ID": "AKIDBENCHCLIENTCPU", "AWS_SECRET_ACCESS_KEY": "bench-secret"})
    from app.crypto.kms import KmsKeyProvider
    from app.crypto.kms_transport import Boto3Transport
    from app.crypto.kms_wire import LeanTransport

    with kms_standin() as standin:
        lean = KmsKeyProvider(KEY_ALIAS, endpoint_url=standin, region="us-east-1", transport="lean")
        by_boto3 = KmsKeyProvider(KEY_ALIAS, endpoint_url=standin, region="us-east-1", transport="boto3")
        if not isinstance(lean.transport, LeanTransport) or not isinstance(
            by_boto3.transport, Boto3Transport
        ):
            raise SystemExit(f"unexpected transports: {lean.transport!r}, {by_boto3.transport!r}")
        client = by_boto3.client
        loop = new_event_loop()
        made = loop.run_until_complete(by_boto3.generate_data_key(CONTEXT))
        wrapped, key_arn = made.wrapped, made.key_id
        paths: dict[str, dict[str, Callable[[int], None]]] = {
            "boto3": {
                "GenerateDataKey": repeated(
                    lambda: client.generate_data_key(
                        KeyId=KEY_ALIAS, KeySpec="AES_256", EncryptionContext=CONTEXT
                    )
                ),
                "Decrypt": repeated(
                    lambda: client.decrypt(CiphertextBlob=wrapped, KeyId=KEY_ALIAS, EncryptionContext=CONTEXT)
                ),
            },
            "boto3-transport": {
                "GenerateDataKey": awaited(loop, lambda: by_boto3.generate_data_key(CONTEXT)),
                "Decrypt": awaited(loop, lambda: by_boto3.decrypt_data_key(wrapped, CONTEXT, key_id=key_arn)),
            },
            "lean": {
                "GenerateDataKey": awaited(loop, lambda: lean.generate_data_key(CONTEXT)),
                "Decrypt": awaited(loop, lambda: lean.decrypt_data_key(wrapped, CONTEXT, key_id=key_arn)),
            },
        }
        rounds: dict[str, dict[str, list[float]]] = {p: {op: [] for op in OPERATIONS} for p in paths}
        for _ in range(args.rounds):
            for operation in OPERATIONS:
                for path, calls in paths.items():
                    rounds[path][operation].append(
                        cpu_us_per_call(
                            calls[operation], calls=args.calls, warmup=args.warmup, standin=standin
                        )
                    )
        lean.close()
        by_boto3.close()
        loop.close()

    median = {p: {op: statistics.median(rounds[p][op]) for op in OPERATIONS} for p in paths}
    if args.json:
        report = {
            "unit": "client CPU microseconds per call (median round)",
            "calls": args.calls,
            "warmup": args.warmup,
            "rounds": rounds,
            "median": median,
            "speedup": {op: median["boto3-transport"][op] / median["lean"][op] for op in OPERATIONS},
        }
        print(json.dumps(report, indent=2))
        return
    print(
        f"client CPU per call, us (median of {args.rounds} rounds of {args.calls} calls after {args.warmup})"
    )
    print(
        f"{'operation':<16} {'boto3':>9} {'boto3-transport':>16} {'lean':>9} {'transports':>11}"
        "   rounds boto3 | boto3-transport | lean"
    )
    for operation in OPERATIONS:
        boto, transport, fast = (median[path][operation] for path in ("boto3", "boto3-transport", "lean"))
        detail = " | ".join(" ".join(f"{v:.0f}" for v in rounds[path][operation]) for path in paths)
        print(
            f"{operation:<16} {boto:>9.0f} {transport:>16.0f} {fast:>9.0f} {transport / fast:>10.1f}x   {detail}"
        )


if __name__ == "__main__":
    main()
