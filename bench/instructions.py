"""Instructions per request: the vault's own cost on the data path, counted rather than timed.

    python bench/instructions.py [--base ../other-checkout] [--requests 600] [--output FILE]

Timings on a shared two-core machine move by 10-30% from run to run (ab.md's spreads); an
instruction count moves by about 1%. Each checkout's app runs in one process under valgrind's
callgrind, driven in-process through ASGI (no HTTP server: the app, the data path and psycopg),
one request at a time against PostgreSQL. The event loop's thread is counted between two marks
around the measured requests (calls of os.getppid, callgrind's dump points). Background threads
(sweepers, the audit sealer) are left out: they run per second of wall time, and under valgrind a
second holds fifty times fewer requests than it would. Needs valgrind (apt-get install valgrind).
The other checkout needs its own `.venv` (`make install` there). Writes
bench/results/instructions.md (or --output).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import harness
from harness import BENCH, DATABASE, ROOT, fresh_database, git_commit, log

RESULTS = BENCH / "results"
OPERATIONS = ("tokenize", "detokenize")
WARM_UP = 300


def _inner(root: Path, operation: str, requests: int) -> None:
    """Runs under valgrind, with the measured checkout's interpreter: its app, in this process."""
    harness.ROOT = root
    harness.PIIVAULT = root / ".venv" / "bin" / "piivault"
    sys.path.insert(0, str(root))  # its app, whichever checkout its .venv was installed from
    # A database of its own per checkout: both sides run at once.
    side = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    url = fresh_database(f"{DATABASE}_instructions_{operation}_{side}")
    workdir = Path(tempfile.mkdtemp(prefix="piivault-instructions-"))
    env = harness.vault_env(url, None, workdir)
    os.environ.clear()
    os.environ.update(env)
    subprocess.run([str(harness.PIIVAULT), "migrate"], check=True, capture_output=True, cwd=root)
    created = subprocess.run(
        [str(harness.PIIVAULT), "admin", "create", "bench-admin"],
        check=True, capture_output=True, text=True, cwd=root,
    )  # fmt: skip
    admin = {"Authorization": f"Bearer {created.stdout.strip().splitlines()[-1]}"}
    asyncio.run(_drive(admin, operation, requests))
    shutil.rmtree(workdir, ignore_errors=True)


async def _drive(admin: dict[str, str], operation: str, requests: int) -> None:
    import httpx
    from starlette.types import Message

    from app.main import create_app

    app = create_app()

    async def call(method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": headers, "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8000),
        }  # fmt: skip
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the request is whole: nothing more comes
            raise AssertionError

        statuses: list[int] = []

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                statuses.append(int(message["status"]))

        await app(scope, receive, send)
        return statuses[0]

    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://vault") as http:
            service = await http.post(
                "/v1/principals", json={"name": "app", "role": "service"}, headers=admin
            )
            service.raise_for_status()
            grant = {"grantee": service.json()["id"], "operations": ["Encrypt", "Decrypt"]}
            (await http.post("/v1/grants", json=grant, headers=admin)).raise_for_status()
            key = service.json()["api_key"]
            items = [
                {"customer_id": f"seed-{n}", "data_type": "DriverLicense", "value": f"D-{n:05d}"}
                for n in range(500)
            ]
            made = await http.post(
                "/v1/tokens/batch", json={"items": items}, headers={"Authorization": f"Bearer {key}"}
            )
            made.raise_for_status()
            tokens = [result["token"] for result in made.json()["results"]]
        headers = [
            (b"host", b"vault"),
            (b"authorization", f"Bearer {key}".encode()),
            (b"user-agent", b"bench"),
        ]

        async def one(number: int) -> None:
            if operation == "detokenize":
                status = await call("GET", f"/v1/tokens/{tokens[number % len(tokens)]}", headers, b"")
                expected = 200
            else:
                item = {
                    "customer_id": f"c-{number}",
                    "data_type": "DriverLicense",
                    "value": f"D-{number:07d}",
                }
                body = json.dumps(item).encode()
                typed = [
                    *headers,
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ]
                status = await call("POST", "/v1/tokens", typed, body)
                expected = 201
            if status != expected:
                raise RuntimeError(f"{operation} answered {status}")

        for number in range(WARM_UP):
            await one(number)
        os.getppid()  # the first mark: callgrind dumps what came before
        for number in range(WARM_UP, WARM_UP + requests):
            await one(number)
        os.getppid()  # the second mark


def _count(root: Path, operation: str, requests: int, out: Path) -> subprocess.Popen[bytes]:
    python = root / ".venv" / "bin" / "python"
    args = [
        "valgrind", "--tool=callgrind", "--separate-threads=yes", "--dump-before=os_getppid",
        f"--callgrind-out-file={out}", str(python), str(Path(__file__).resolve()),
        "--inner", str(root), operation, str(requests),
    ]  # fmt: skip
    return subprocess.Popen(
        args, cwd=root, stdout=subprocess.DEVNULL, stderr=out.with_suffix(".log").open("wb")
    )


def _measured(out: Path) -> int:
    # Dump 2 of thread 1 (the event loop): from the first mark to the second.
    for line in Path(f"{out}.2-01").read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}.2-01 (see {out.with_suffix('.log')})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=Path, help="another checkout to count beside this one")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--output", default="instructions.md", help="file name under bench/results")
    parser.add_argument("--inner", nargs=3, metavar=("ROOT", "OPERATION", "REQUESTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        root, operation, requests = args.inner
        _inner(Path(root), operation, int(requests))
        return
    if shutil.which("valgrind") is None:
        sys.exit("bench/instructions.py needs valgrind (apt-get install valgrind)")
    sides = {"new": ROOT} | ({"base": args.base.resolve()} if args.base else {})
    workdir = Path(tempfile.mkdtemp(prefix="piivault-callgrind-"))
    counts: dict[tuple[str, str], float] = {}
    for operation in OPERATIONS:
        log(f"counting {operation}: {args.requests} requests on each side, under valgrind (minutes)")
        runs = {
            side: _count(root, operation, args.requests, workdir / f"{side}-{operation}.out")
            for side, root in sides.items()
        }
        for side, run in runs.items():
            if run.wait() != 0:
                sys.exit(f"the {side} side failed: see {workdir / f'{side}-{operation}.log'}")
            counts[side, operation] = _measured(workdir / f"{side}-{operation}.out") / args.requests
    shutil.rmtree(workdir, ignore_errors=True)
    commits = {side: git_commit(root) for side, root in sides.items()}
    lines = [
        "# Instructions per request",
        "",
        f"Run {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}: "
        + ", ".join(f"{side} = `{commit}`" for side, commit in commits.items())
        + f". The event loop's instructions per request (callgrind), the app driven in-process "
        f"through ASGI, one request at a time, {args.requests} requests after {WARM_UP} to warm up; "
        "local key provider. Run to run, a count moves by about 1%.",
        "",
        "| operation | "
        + " | ".join(f"{side} instructions" for side in sides)
        + (" | new / base |" if args.base else " |"),
        "|---|" + "---|" * (len(sides) + (1 if args.base else 0)),
    ]
    for operation in OPERATIONS:
        cells = [f"{counts[side, operation]:,.0f}" for side in sides]
        ratio = [f"{counts['new', operation] / counts['base', operation]:.3f}"] if args.base else []
        lines.append(f"| {operation} | " + " | ".join(cells + ratio) + " |")
    text = "\n".join(lines) + "\n"
    (RESULTS / args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
