"""Run servers as real child processes for end-to-end tests: free ports, bounded waits, sure clean-up.

Every process started here writes its stdout and stderr to files (never to a pipe that could fill up
and stall it), and `running()` always stops it, however the test ends: SIGTERM, then SIGKILL after a
grace period, then a bounded wait so that nothing is left behind.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

STOP_GRACE_S = 10.0
LOG_TAIL_CHARS = 6000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return text[-chars:]


@dataclass
class ServerProcess:
    name: str
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    # Values the test handled (plaintext, API keys) that must appear in none of its log lines.
    secrets: set[str] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        """The tail of what the process wrote, for failure messages."""
        return (
            f"--- {self.name} (pid {self.pid}, exit code {self.popen.poll()}) stderr ---\n"
            f"{_tail(self.stderr_path)}\n"
            f"--- {self.name} stdout ---\n{_tail(self.stdout_path)}"
        )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it outlives the grace period; waits (bounded) for it to go."""
        if self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            self.popen.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=STOP_GRACE_S)


def json_log_lines(process: ServerProcess) -> list[dict[str, object]]:
    """Every line the process wrote (stdout and stderr), each parsed as one JSON object; fails the
    test on a line that is not one, or on a line holding any of process.secrets."""
    parsed: list[dict[str, object]] = []
    for path in (process.stdout_path, process.stderr_path):
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                pytest.fail(f"{process.name} {path.name}:{number} is not a JSON object: {line[:300]!r}")
            if not isinstance(record, dict):
                pytest.fail(f"{process.name} {path.name}:{number} is not a JSON object: {line[:300]!r}")
            leaked = [secret for secret in process.secrets if secret and secret in line]
            if leaked:
                pytest.fail(f"{process.name} {path.name}:{number} holds a secret the test used")
            parsed.append(record)
    return parsed


@contextmanager
def running(
    name: str,
    args: Sequence[str],
    *,
    env: Mapping[str, str],
    log_dir: Path,
    cwd: Path | None = None,
    json_logs: bool = False,
) -> Iterator[ServerProcess]:
    """Start `args` as a child process and always stop it when the block ends. json_logs: once
    stopped, every line it wrote must be a JSON object holding none of its secrets."""
    log_dir.mkdir(parents=True, exist_ok=True)
    stdout_path = log_dir / f"{name}.stdout.log"
    stderr_path = log_dir / f"{name}.stderr.log"
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        popen = subprocess.Popen(  # the args are our own, from the test
            list(args),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
    process = ServerProcess(name, popen, stdout_path, stderr_path)
    try:
        yield process
    finally:
        process.stop()
        if json_logs:
            json_log_lines(process)


def wait_for_http(
    process: ServerProcess,
    url: str,
    *,
    timeout_s: float = 30.0,
    ready: Callable[[httpx.Response], bool] = lambda response: response.status_code == 200,
    interval_s: float = 0.1,
) -> httpx.Response:
    """Poll `url` until `ready(response)`; fail with the process's output on timeout or early exit."""
    deadline = time.monotonic() + timeout_s
    last: str = "no answer yet"
    while time.monotonic() < deadline:
        if not process.running():
            pytest.fail(f"{process.name} exited before it was ready ({last})\n{process.output()}")
        try:
            response = httpx.get(url, timeout=2.0)
        except httpx.HTTPError as err:
            last = f"{type(err).__name__}: {err}"
        else:
            if ready(response):
                return response
            last = f"HTTP {response.status_code}: {response.text[:500]}"
        time.sleep(interval_s)
    pytest.fail(f"{process.name} not ready at {url} within {timeout_s:.0f} s ({last})\n{process.output()}")
