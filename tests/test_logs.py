"""Log lines: one JSON object each, with the request id, the principal id and, for access lines, the
route template (never the path: tokens are in paths); a dependency failing for every item of a
batch is one line with a count; no value, API key or token in any line."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app import logs
from app.container import Vault
from tests.conftest import Actors, bearer, tokenize
from tests.test_batch_retryable import TRANSIENT, fail_for_customers, licences, tokenize_batch
from tests.test_failures import LICENCE


class Captured:
    def __init__(self, stream: io.StringIO) -> None:
        self._stream = stream

    def lines(self) -> list[dict[str, Any]]:
        """Every line written, each parsed as JSON (failing the test if one is not)."""
        parsed = []
        for line in self._stream.getvalue().splitlines():
            try:
                parsed.append(json.loads(line))
            except json.JSONDecodeError:
                pytest.fail(f"a log line is not JSON: {line!r}")
        return parsed

    def text(self) -> str:
        return self._stream.getvalue()


@pytest.fixture
def json_log() -> Iterator[Captured]:
    """The vault's JSON handler (formatter and filters as `piivault serve` configures them) on the
    root logger, with access lines on, for this test."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonLines())
    handler.addFilter(logs.RequestFields())
    handler.addFilter(logs.TypeOnlyExceptions())
    root, access = logging.getLogger(), logging.getLogger(logs.ACCESS_LOGGER)
    # The test's own HTTP client logs its URLs: not the vault's lines.
    client_log = logging.getLogger("httpx")
    levels = (root.level, access.level, client_log.level)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    access.setLevel(logging.INFO)
    client_log.setLevel(logging.WARNING)
    try:
        yield Captured(stream)
    finally:
        root.removeHandler(handler)
        root.setLevel(levels[0])
        access.setLevel(levels[1])
        client_log.setLevel(levels[2])


def test_access_lines_name_the_route_template_request_and_principal_and_leak_nothing(
    client: TestClient, actors: Actors, json_log: Captured
) -> None:
    token = tokenize(client, actors.onboarding, LICENCE)
    response = client.get(f"/v1/tokens/{token}", headers=bearer(actors.kyc))
    assert response.status_code == 200
    refused = client.get(f"/v1/tokens/{token}", headers=bearer(actors.onboarding))
    assert refused.status_code == 403

    lines = json_log.lines()
    assert lines
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
    access = [line for line in lines if line["logger"] == logs.ACCESS_LOGGER]
    reads = [line for line in access if line["route"] == "/v1/tokens/{token}"]
    assert [line["status"] for line in reads] == [200, 403]
    ok = reads[0]
    assert ok["method"] == "GET" and ok["request_id"] == response.headers["X-Request-ID"]
    assert ok["principal_id"] == actors.kyc_id
    assert isinstance(ok["latency_ms"], float) and ok["latency_ms"] >= 0
    assert reads[1]["principal_id"] == actors.onboarding_id
    # The refusal's alert line carries the same request id.
    alerts = [line for line in lines if line["logger"] == "piivault.alerts"]
    assert any(line.get("request_id") == refused.headers["X-Request-ID"] for line in alerts), alerts

    text = json_log.text()
    for secret in (LICENCE["value"], actors.kyc, actors.onboarding, actors.admin):
        assert secret not in text
    # Access lines name the route, not the path: the token is not in them. (Alert lines name the
    # token refused, as its audit event does.)
    assert token not in json.dumps(access)


def test_an_unauthenticated_request_has_no_principal_id(client: TestClient, json_log: Captured) -> None:
    response = client.get("/v1/principals", headers=bearer("pv_nobody.nothing"))
    assert response.status_code == 401
    (line,) = [line for line in json_log.lines() if line["logger"] == logs.ACCESS_LOGGER]
    assert line["route"] == "/v1/principals" and line["status"] == 401
    assert "principal_id" not in line
    assert "pv_nobody" not in json_log.text()


def test_a_kms_outage_during_a_batch_is_one_line_with_a_count_and_the_request_id(
    client: TestClient, vault: Vault, actors: Actors, json_log: Captured
) -> None:
    customers = {f"c-{n}" for n in range(25)}
    fail_for_customers(vault, "GenerateDataKey", TRANSIENT, customers)

    response = tokenize_batch(client, actors.onboarding, licences(*sorted(customers)))
    assert response.status_code == 503

    failures = [line for line in json_log.lines() if line["logger"] == "app.crypto.kms"]
    assert len(failures) == 1, failures
    (failure,) = failures
    assert failure["count"] == len(customers) and failure["level"] == "WARNING"
    assert "kms GenerateDataKey failed: ThrottlingException" in failure["message"]
    assert failure["request_id"] == response.headers["X-Request-ID"]
    assert failure["principal_id"] == actors.onboarding_id


def test_outside_a_request_a_repeated_failure_is_written_at_once() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonLines())
    logger = logging.getLogger("piivault.test.repeated")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logs.repeated_failure(logger, logging.WARNING, "sweep failed: %s", "X")
        logs.repeated_failure(logger, logging.WARNING, "sweep failed: %s", "X")
    finally:
        logger.removeHandler(handler)
    assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == ["sweep failed: X"] * 2


def test_control_characters_are_escaped_in_both_formats() -> None:
    record = logging.LogRecord(
        "piivault.test", logging.WARNING, __file__, 1, "bad %s", ("a\nb\x1b[2J",), None
    )
    rendered = logs.JsonLines().format(record)
    assert "\n" not in rendered and "\x1b" not in rendered
    assert json.loads(rendered)["message"] == "bad a\nb\x1b[2J"  # the value survives, escaped
    console = logs.ConsoleLines().format(logs.EscapedLogRecord(*_args(record)))
    assert "\n" not in console and "\x1b" not in console and "a\\x0ab\\x1b[2J" in console


def _args(record: logging.LogRecord) -> tuple[Any, ...]:
    return (record.name, record.levelno, record.pathname, record.lineno, record.msg, record.args, None)


def test_exceptions_are_logged_by_type_only() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonLines())
    handler.addFilter(logs.TypeOnlyExceptions())
    logger = logging.getLogger("piivault.test.exceptions")
    logger.addHandler(handler)
    try:
        try:
            raise ValueError("row data 078-05-1120")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["message"] == "failed (ValueError)"
    assert "078-05-1120" not in stream.getvalue() and "Traceback" not in stream.getvalue()


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_the_serve_configuration_routes_uvicorn_through_the_one_handler(log_format: str) -> None:
    config = logs.log_config(log_format, access_log=True)
    formatter = config["formatters"]["vault"]["()"]
    assert formatter.endswith("JsonLines" if log_format == "json" else "ConsoleLines")
    assert config["root"]["handlers"] == ["vault"]
    for name in ("uvicorn", "uvicorn.error"):
        assert config["loggers"][name] == {"handlers": [], "level": "INFO", "propagate": True}
    # uvicorn's access log (raw paths) stays silent; ours is on when asked.
    assert config["loggers"]["uvicorn.access"]["propagate"] is False
    assert config["loggers"][logs.ACCESS_LOGGER]["level"] == "INFO"
    assert logs.log_config(log_format)["loggers"][logs.ACCESS_LOGGER]["level"] == "WARNING"


def test_no_opentelemetry_provider_is_asked_for_so_no_span_records_a_path_with_a_token(
    client: TestClient, actors: Actors, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FastAPI's native telemetry would ask for a tracer provider on every request and, once one
    is configured, record url.path: a detokenize's path holds its token. The vault turns it off."""
    from opentelemetry import _logs, metrics, trace

    asked: list[str] = []

    def recording(getter: str, original: Any) -> Any:
        def get() -> Any:
            asked.append(getter)
            return original()

        return get

    for module, getter in ((trace, "get_tracer_provider"), (metrics, "get_meter_provider"),
                           (_logs, "get_logger_provider")):  # fmt: skip
        monkeypatch.setattr(module, getter, recording(getter, getattr(module, getter)))
    token = tokenize(client, actors.onboarding, LICENCE)
    assert client.get(f"/v1/tokens/{token}", headers=bearer(actors.kyc)).status_code == 200
    assert asked == []
