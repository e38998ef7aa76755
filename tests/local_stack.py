"""`piivault serve` as real processes on the test database, with the local development key
provider (no KMS process to start): for tests that need real sockets and several processes
(the Idempotency-Key race, the Python client's dropped connections)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.processes import free_port, running, wait_for_http

BIN = Path(sys.executable).parent
PIIVAULT = BIN / "piivault"


def local_env(database_url: str, data_dir: Path) -> dict[str, str]:
    """Development settings on the given database; processes sharing `data_dir` share the local
    master key, as replicas share a KMS key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIIVAULT_", "AWS_"))}
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "PIIVAULT_ENVIRONMENT": "development",
            "PIIVAULT_DATABASE_URL": database_url,
            "PIIVAULT_DATA_DIR": str(data_dir),
        }
    )
    return env


@contextmanager
def served(name: str, env: dict[str, str], log_dir: Path) -> Iterator[str]:
    """One `piivault serve` process; yields its base URL once /readyz answers."""
    port = free_port()
    args = [str(PIIVAULT), "serve", "--host", "127.0.0.1", "--port", str(port)]
    with running(name, args, env=env, log_dir=log_dir, cwd=log_dir) as process:
        base_url = f"http://127.0.0.1:{port}"
        wait_for_http(process, f"{base_url}/readyz", timeout_s=60)
        yield base_url


def create_admin_key(env: dict[str, str], name: str, cwd: Path) -> str:
    created = subprocess.run(
        [str(PIIVAULT), "admin", "create", name], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert created.returncode == 0, created.stdout + created.stderr
    return created.stdout.strip().splitlines()[-1]
