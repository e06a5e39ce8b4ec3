"""Structured logs: a request id on every line of a turn, ``LOG_LEVEL``, ``LOG_FORMAT``.

The request id travels in a :mod:`contextvars` variable. The orchestrator binds it when a
turn starts (:func:`bind_request_id`); the turn's harness tasks are created while it is
bound, so asyncio copies it into them, and every line they, the providers and the recorder
log carries it. The HTTP layer scopes it to one request (:func:`request_scope`), so a
keep-alive connection's next request does not inherit the last one's id.

With ``LOG_FORMAT=json`` every line the server prints is one JSON object::

    {"ts": "2026-12-01T13:40:00.123Z", "level": "INFO", "logger": "access",
     "message": "POST /v1/orchestrate 200 354ms", "request_id": "req_…", "method": "POST", …}

Warnings (``warnings.warn``) and uncaught exceptions in threads go through logging too, so
they are JSON lines as well; a traceback is one ``exc`` field, never raw lines.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any, Final, Literal, TextIO, TypeAlias

LogFormat: TypeAlias = Literal["json", "text"]
LogLevel: TypeAlias = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]

#: The request id of the turn (or HTTP request) the current code runs for, if any.
REQUEST_ID: Final[contextvars.ContextVar[str | None]] = contextvars.ContextVar(
    "request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD: Final[frozenset[str]] = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}

#: Loggers that log one line per model call or per request at INFO: quiet unless DEBUG.
NOISY: Final[tuple[str, ...]] = ("httpx", "httpx2", "aiohttp.access")


def bind_request_id(request_id: str | None) -> None:
    """Mark the current context (and the tasks created from it from now on) as this turn's."""
    REQUEST_ID.set(request_id)


@contextlib.contextmanager
def request_scope() -> Iterator[None]:
    """A fresh request-id scope: what is bound inside is forgotten on leaving."""
    token = REQUEST_ID.set(None)
    try:
        yield
    finally:
        REQUEST_ID.reset(token)


class RequestIdFilter(logging.Filter):
    """Stamps ``record.request_id`` from the context unless the call passed one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in record.__dict__.items()
            if key not in _STANDARD and key != "request_id" and not key.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, request_id, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            line["request_id"] = request_id
        line.update(_extras(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``ts LEVEL logger [request_id]: message key=value …`` (a traceback follows, if any)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(rid)s: %(message)s%(kv)s")

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.rid = f" [{request_id}]" if request_id else ""
        extras = _extras(record)
        extras.pop("rid", None)
        extras.pop("kv", None)
        record.kv = "".join(f" {key}={value}" for key, value in extras.items())
        return super().format(record)


def configure(*, level: str = "INFO", fmt: LogFormat = "text", stream: TextIO | None = None) -> None:
    """Send every log line (warnings and thread crashes included) to ``stream`` (stderr)
    in one format, at ``level``; the noisy per-call loggers stay at WARNING unless DEBUG."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING)
    logging.captureWarnings(True)  # warnings.warn → the "py.warnings" logger, same format
    threading.excepthook = _log_thread_crash


def _log_thread_crash(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    exc = args.exc_value if args.exc_value is not None else args.exc_type()
    logging.getLogger("threading").error(
        "thread %s crashed", args.thread.name if args.thread else "?",
        exc_info=(args.exc_type, exc, args.exc_traceback))
