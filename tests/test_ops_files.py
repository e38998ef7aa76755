"""The files an operator deploys with: the Grafana dashboard and the Prometheus alerts name only
metrics the vault exports, the alerts pass promtool, the compose file is valid, and
requirements.lock (what the image installs, with hashes) satisfies pyproject.toml."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from prometheus_client import REGISTRY

import app.metrics  # noqa: F401 (registers the vault's metrics)

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "pii-vault.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
LOCK = ROOT / "requirements.lock"
METRIC_NAME = re.compile(r"\bpiivault_[a-z0-9_]+")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exported_series() -> set[str]:
    """Every series name the vault's metrics can produce (labelled ones included before first use)."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.name.startswith("piivault_"):
            names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


def referenced(expressions: list[str]) -> set[str]:
    return {name for expression in expressions for name in METRIC_NAME.findall(expression)}


def dashboard_expressions() -> list[str]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in document["panels"] for target in panel.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    document: dict[str, Any] = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_the_dashboard_is_valid_json_with_panels_over_existing_metrics() -> None:
    document = json.loads(DASHBOARD.read_text())
    assert document["title"] == "pii-vault" and document["panels"]
    expressions = dashboard_expressions()
    assert len(expressions) >= len(document["panels"])
    used = referenced(expressions)
    assert used, "the dashboard names no metric"
    assert used <= exported_series(), f"not exported: {sorted(used - exported_series())}"
    # Each family the on-call engineer needs has a panel.
    for wanted in (
        "piivault_kms_calls_total",
        "piivault_kms_call_duration_seconds_bucket",
        "piivault_db_pool_in_use",
        "piivault_db_pool_waiting",
        "piivault_audit_seal_lag_seconds",
        "piivault_audit_last_seal_timestamp_seconds",
        "piivault_sweeper_last_run_timestamp_seconds",
        "piivault_batch_items_total",
        "piivault_idempotency_replays_total",
        "piivault_denials_total",
    ):
        assert wanted in used, wanted


def test_the_check_of_metric_names_can_fail() -> None:
    assert not referenced(["rate(piivault_no_such_metric_total[5m])"]) <= exported_series()


def test_every_alert_names_existing_metrics_and_the_required_alerts_are_there() -> None:
    rules = alert_rules()
    for rule in rules:
        # The rule schema, as far as promtool would check it when it is absent.
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule
        assert isinstance(rule["alert"], str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"])
        assert isinstance(rule["expr"], str) and rule["expr"].strip()
        assert re.fullmatch(r"\d+[smhd]", rule.get("for", "0s")), rule
        used = referenced([rule["expr"]])
        assert used, f"{rule['alert']} names no vault metric"
        assert used <= exported_series(), f"{rule['alert']}: not exported: {sorted(used - exported_series())}"
    covered = referenced([rule["expr"] for rule in rules])
    for wanted in (
        "piivault_audit_seal_lag_seconds",
        "piivault_kms_calls_total",
        "piivault_denials_total",
        "piivault_ready",
    ):
        assert wanted in covered, wanted


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)")
def test_promtool_accepts_the_alert_rules(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    checked = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout
    # And it would say so if they were wrong.
    broken = tmp_path / "broken.yml"
    broken.write_text(
        ALERTS.read_text().replace("expr: min(piivault_ready) == 0", "expr: min(piivault_ready ==", 1)
    )
    refused = subprocess.run([PROMTOOL, "check", "rules", str(broken)], capture_output=True, text=True)
    assert refused.returncode != 0


DOCKER_COMPOSE = shutil.which("docker-compose")


@pytest.mark.skipif(
    DOCKER_COMPOSE is None, reason="docker-compose not installed (apt-get install docker-compose)"
)
def test_the_compose_file_is_valid_and_serves_under_the_app_role_with_secrets_from_files() -> None:
    assert DOCKER_COMPOSE is not None
    checked = subprocess.run(
        [DOCKER_COMPOSE, "-f", "docker-compose.yml", "config"], cwd=ROOT, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    config: dict[str, Any] = yaml.safe_load(checked.stdout)
    services = config["services"]
    vault, migrate = services["vault"], services["migrate"]
    assert vault["environment"]["PIIVAULT_DATABASE_URL_FILE"] == "/run/secrets/piivault_app_database_url"
    assert migrate["environment"]["PIIVAULT_DATABASE_URL_FILE"].endswith("piivault_migrator_database_url")
    for service in (vault, migrate):
        assert "PIIVAULT_DATABASE_URL" not in service["environment"]  # never the URL itself
    assert "--no-migrate" in vault["command"] and migrate["command"] == ["piivault", "migrate"]
    assert vault["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    mounts = " ".join(str(volume) for volume in services["postgres"]["volumes"])
    assert "docker-entrypoint-initdb.d" in mounts and "roles.sql" in mounts


def locked_versions() -> dict[str, Version]:
    pins = re.findall(r"^([A-Za-z0-9._-]+)==([^\s\\]+)", LOCK.read_text(), re.MULTILINE)
    return {canonicalize_name(name): Version(version) for name, version in pins}


def lock_problems(dependencies: list[str], locked: dict[str, Version]) -> list[str]:
    """What pyproject.toml asks that the lock does not give: a dependency, or a dependency of an
    extra it asks for (uvicorn[standard]), missing or pinned outside its specifier."""
    problems = []
    for line in dependencies:
        wanted = Requirement(line)
        name = canonicalize_name(wanted.name)
        if wanted.marker is not None and not wanted.marker.evaluate():
            continue
        if name not in locked:
            problems.append(f"{wanted.name} is not in requirements.lock")
        elif not wanted.specifier.contains(locked[name], prereleases=True):
            problems.append(f"{wanted.name}=={locked[name]} does not satisfy {wanted.specifier}")
        for extra in sorted(wanted.extras):
            try:
                declared = requires(wanted.name) or []
            except PackageNotFoundError:
                problems.append(f"{wanted.name} is not installed here: cannot check its [{extra}] extra")
                continue
            for dependency in map(Requirement, declared):
                if dependency.marker is None or "extra" not in str(dependency.marker):
                    continue
                if not Marker(str(dependency.marker)).evaluate({"extra": extra}):
                    continue
                if canonicalize_name(dependency.name) not in locked:
                    problems.append(
                        f"{dependency.name} (from {wanted.name}[{extra}]) is not in requirements.lock"
                    )
    return problems


def test_the_lock_pins_every_dependency_of_pyproject_with_hashes() -> None:
    dependencies: list[str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    locked = locked_versions()
    assert lock_problems(dependencies, locked) == [], "run `make lock` (see the Makefile)"
    # Every pin carries hashes (the image installs with --require-hashes).
    blocks = re.split(r"\n(?=[A-Za-z0-9._-]+==)", LOCK.read_text().split("\n", 6)[-1])
    for block in blocks:
        if "==" in block.split("\n", 1)[0]:
            assert "--hash=sha256:" in block, block.split("\n", 1)[0]
    # botocore stays in the range the lean KMS path is tested against.
    assert Version("1.44") <= locked["botocore"] < Version("1.45")
    assert "--require-hashes" in (ROOT / "Dockerfile").read_text()


def test_the_lock_check_finds_a_missing_or_stale_pin() -> None:
    locked = locked_versions()
    assert lock_problems(["no-such-package-here>=1"], locked) == [
        "no-such-package-here is not in requirements.lock"
    ]
    stale = lock_problems([f"botocore>{locked['botocore']}"], locked)
    assert stale and "does not satisfy" in stale[0]
    without_extra = {name: version for name, version in locked.items() if name != "uvloop"}
    assert any(
        "uvicorn[standard]" in problem
        for problem in lock_problems(["uvicorn[standard]>=0.30"], without_extra)
    )
