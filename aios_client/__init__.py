"""The AIOS client: the Python SDK and the ``aios`` commands that talk to a running API over HTTP.

It imports nothing of the server (``aios``, ``webapi``, ``workers``), so it can ship on its own.

- :mod:`aios_client.client` — :class:`~aios_client.client.Client`, the SDK
- :mod:`aios_client.errors` — its error classes, one per error code of the API (and the client's own)
- :mod:`aios_client.commands` — the client commands (``aios login``, ``aios submit``, ``aios tasks`` …)
"""

from aios_client.client import Client, Event
from aios_client.errors import (
    AiosError,
    BackupFailed,
    BackupInvalid,
    BadRequest,
    Conflict,
    ConnectionFailed,
    DatabaseNotMigrated,
    DatabaseUnavailable,
    Forbidden,
    HeadersTooLarge,
    IllegalTransition,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    ServiceUnavailable,
    TaskFailed,
    Unauthorized,
    UnknownTaskType,
    UnsupportedMediaType,
    UnsupportedOnBroker,
    ValidationFailed,
    WaitTimeout,
    WorkerNotFound,
    WorkerRefused,
    WorkerTimeout,
)

__all__ = [
    "Client",
    "Event",
    "AiosError",
    "BackupFailed",
    "BackupInvalid",
    "BadRequest",
    "Conflict",
    "ConnectionFailed",
    "DatabaseNotMigrated",
    "DatabaseUnavailable",
    "Forbidden",
    "HeadersTooLarge",
    "IllegalTransition",
    "InternalError",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "RequestTimeout",
    "ServiceUnavailable",
    "TaskFailed",
    "Unauthorized",
    "UnknownTaskType",
    "UnsupportedMediaType",
    "UnsupportedOnBroker",
    "ValidationFailed",
    "WaitTimeout",
    "WorkerNotFound",
    "WorkerRefused",
    "WorkerTimeout",
]
