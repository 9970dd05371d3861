"""Logging set-up shared by every process: plain text for people, JSON lines for collectors."""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

from aios.config import LoggingSettings

_configured = False


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
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(data))


def configure_logging(settings: LoggingSettings) -> None:
    """Configure the root logger once per process (later calls only adjust the level)."""
    global _configured
    root = logging.getLogger()
    root.setLevel(settings.level)
    if _configured:
        return
    handler = logging.StreamHandler(sys.stderr)
    if settings.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"))
    root.addHandler(handler)
    # Alembic narrates every migration step at INFO; keep its warnings only.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    _configured = True
