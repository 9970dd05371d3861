"""Logging set-up shared by every process: plain text for people, JSON lines for collectors."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from aios.config import LoggingSettings

_configured = False


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
        return json.dumps(data)


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
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"))
    root.addHandler(handler)
    # Alembic narrates every migration step at INFO; keep its warnings only.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    _configured = True
