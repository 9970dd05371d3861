"""Logging set-up shared by every process: plain text for people, JSON lines for collectors.

Every line goes to the console (stdout for the long-running services, stderr for one-shot
commands, whose stdout is their answer) and, unless ``logging.dir`` is empty, to
``<dir>/aios.log`` and — ERROR and worse — ``<dir>/aios.error.log``, rotated by size. Many processes
write the same files (gunicorn workers, Celery pool children), so rotation uses
concurrent-log-handler's lock instead of the stdlib handler, with which each process rotates on its
own and clobbers the others' lines.

Context on every line: the API's request id (``request_id``, also the ``X-Request-ID`` response
header) and, on agents, the id of the task being run (``task_id``), from context variables the API
and the worker set; plus redaction of keys, tokens and passwords.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, TextIO

from aios.config import LoggingSettings

_configured = False

#: Set by the API for the duration of a request.
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("aios_request_id", default=None)
#: Set by an agent while it runs a task.
task_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("aios_task_id", default=None)


class ContextFilter(logging.Filter):
    """Adds ``request_id``, ``task_id`` and ``context`` (a ready-made text suffix) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id, task_id = request_id_var.get(), task_id_var.get()
        record.request_id, record.task_id = request_id, task_id
        record.context = "".join(
            f" [{name}={value}]" for name, value in (("request", request_id), ("task", task_id)) if value
        )
        return True


#: What must never reach a log line, and what it becomes.
_REDACTIONS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\b(aios_[0-9a-z]{4,16}_)[A-Za-z0-9_-]{8,}"), r"\1***"),  # API keys: keep the prefix
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+"), "eyJ***"),  # JWTs
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"), r"\1***"),
    (re.compile(r"(://[^:/@\s]*:)[^@\s/]+@"), r"\1***@"),  # passwords in URLs
    (re.compile(r"(?i)((?:password|passwd|secret|api[_-]?key)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+"), r"\1***"),
]


def redact(text: str) -> str:
    """Mask API keys, tokens and passwords in ``text`` (every AIOS log line goes through this)."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for name in ("request_id", "task_id"):
            if getattr(record, name, None):
                data[name] = getattr(record, name)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(data))


TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s%(context)s: %(message)s"


def _formatter(settings: LoggingSettings) -> logging.Formatter:
    return JsonFormatter() if settings.format == "json" else RedactingFormatter(TEXT_FORMAT)


def configure_logging(settings: LoggingSettings, *, stream: TextIO | None = None) -> None:
    """Configure the root logger once per process (later calls only adjust the level).

    ``stream``: the console (default stdout); one-shot CLI commands pass stderr.
    """
    global _configured
    root = logging.getLogger()
    root.setLevel(settings.level)
    if _configured:
        return
    context = ContextFilter()
    console = logging.StreamHandler(stream or sys.stdout)
    handlers: list[logging.Handler] = [console]
    if settings.dir:
        from concurrent_log_handler import ConcurrentRotatingFileHandler

        folder = Path(settings.dir)
        folder.mkdir(parents=True, exist_ok=True)
        for name, level in (("aios.log", logging.NOTSET), ("aios.error.log", logging.ERROR)):
            file_handler = ConcurrentRotatingFileHandler(
                str(folder / name), maxBytes=settings.max_bytes, backupCount=settings.backup_count, encoding="utf-8"
            )
            file_handler.setLevel(level)
            handlers.append(file_handler)
    for handler in handlers:
        handler.setFormatter(_formatter(settings))
        handler.addFilter(context)
        root.addHandler(handler)
    # Alembic narrates every migration step at INFO; keep its warnings only.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    _configured = True
