"""`make run`'s default (embedded PostgreSQL, local key provider, no settings) serves, and the
README's quickstart works against it exactly as written."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PIIVAULT = Path(sys.executable).parent / "piivault"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def readme_script(name: str = "quickstart", language: str = "sh") -> str:
    readme = (ROOT / "README.md").read_text()
    pattern = rf"<!-- {name}:begin -->\s*```{language}\n(.*?)```\s*<!-- {name}:end -->"
    block = re.search(pattern, readme, re.S)
    assert block, f"README.md has no {name} block"
    return block.group(1)


def quickstart_script() -> str:
    return readme_script("quickstart")


@pytest.fixture(scope="module")
def embedded_vault(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, str]]]:
    """The vault as `make run` starts it, for the module (both quickstarts); an indirect parameter
    adds settings to its environment (a vault of its own)."""
    tmp_path = tmp_path_factory.mktemp("embedded-vault")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PIIVAULT_", "AWS_"))}
    env.update({"PIIVAULT_ENVIRONMENT": "development", "PIIVAULT_DATA_DIR": str(tmp_path / "data")})
    env.update(getattr(request, "param", {}))
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [str(PIIVAULT), "serve", "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=log
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the vault did not start:\n" + (tmp_path / "serve.log").read_text()[-4000:])
            time.sleep(0.3)
        yield base, env
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="the quickstart uses curl")
def test_make_run_default_serves_and_the_readme_quickstart_works(
    embedded_vault: tuple[str, dict[str, str]],
) -> None:
    base, env = embedded_vault
    tmp_path = Path(env["PIIVAULT_DATA_DIR"]).parent
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{base}/readyz").status_code == 200
    serve_log = (tmp_path / "serve.log").read_text()
    assert "LOCAL DEVELOPMENT KEY PROVIDER" in serve_log
    assert "piivault admin create" in serve_log
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", quickstart_script()],
        cwd=ROOT,
        env={**env, "VAULT": base, "PATH": f"{PIIVAULT.parent}:{env.get('PATH', '')}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"value":"D1234-56789-01234"' in result.stdout
    assert result.stdout.rstrip().endswith("403")
    # The erasure example, continuing the quickstart (run afresh: its names are random).
    erased = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", quickstart_script() + readme_script("erasure")],
        cwd=ROOT,
        env={**env, "VAULT": base, "PATH": f"{PIIVAULT.parent}:{env.get('PATH', '')}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert erased.returncode == 0, erased.stdout + erased.stderr
    lines = erased.stdout.rstrip().splitlines()
    assert '"expires_at":"2035-01-01T00:00:00Z"' in erased.stdout
    assert '"erased":' in erased.stdout and "D9999-00000-11111" not in erased.stdout
    assert lines[-4].startswith('{"erased":') and lines[-3:] == ["204", lines[-2], "410"]
    assert lines[-2].endswith("events") and not lines[-2].startswith("0 records")
    key_file = tmp_path / "data" / "dev-master.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    # Everything the server wrote is JSON lines (the default format), and no value or API key.
    api_keys = set(re.findall(r"pv_[A-Za-z0-9_.-]{20,}", result.stdout + result.stderr))
    for line in (tmp_path / "serve.log").read_text().splitlines():
        assert isinstance(json.loads(line), dict), line
        assert "D1234-56789-01234" not in line
        assert not [key for key in api_keys if key in line]


def test_the_readme_python_quickstart_works(
    embedded_vault: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    base, env = embedded_vault
    script = tmp_path / "quickstart.py"
    script.write_text(readme_script("quickstart-python", "python"))
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env={**env, "VAULT": base},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("token: tok_")
    assert lines[1] == "value: D1234-56789-01234"
    assert lines[2] == "refused: 403 grant_required"


@pytest.mark.skipif(shutil.which("curl") is None, reason="the flow uses curl")
@pytest.mark.parametrize("embedded_vault", [{"PIIVAULT_DUAL_CONTROL": "true"}], indirect=True)
def test_the_readme_four_eyes_flow_works_under_dual_control(
    embedded_vault: tuple[str, dict[str, str]],
) -> None:
    base, env = embedded_vault
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", readme_script("four-eyes")],
        cwd=ROOT,
        env={**env, "VAULT": base, "PATH": f"{PIIVAULT.parent}:{env.get('PATH', '')}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Alice approving her own request: 403" in result.stdout
    assert '"status":"active"' in result.stdout and '"approved_by":' in result.stdout
    assert result.stdout.rstrip().endswith('"value":"D1234-56789-01234"}')
