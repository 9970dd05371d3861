"""The errors of the AIOS client: one class per error code of the API, and the client's own.

Every error answer of the API (``{"error", "message", "field"?}``) is raised as the class its ``error``
code names (:data:`ERRORS_BY_CODE`); a code this client does not know gets the class of its HTTP status
(:data:`ERRORS_BY_STATUS`), then :class:`AiosError`. The client adds three of its own:
:class:`ConnectionFailed`, :class:`WaitTimeout` and :class:`TaskFailed`.

These are the client's classes, not :mod:`aios.errors` (the server's): a script catches them without
installing the server. The module needs nothing but the standard library.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "ERRORS_BY_CODE",
    "ERRORS_BY_STATUS",
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


class AiosError(Exception):
    """Base of every error this client raises: an error answer of the API, or a client-side failure.

    ``code`` is the API's stable ``error`` string, ``status`` the HTTP status (``None`` when no answer
    came), ``field`` the offending part of the request when the API names one, ``body`` the whole
    error answer (extra keys such as ``state`` or ``retry_after_s``).
    """

    default_code = "error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        field: str | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.status = status
        self.field = field
        self.body: dict[str, Any] = dict(body or {})

    def __str__(self) -> str:
        where = f" (field {self.field})" if self.field else ""
        status = f"{self.status} " if self.status is not None else ""
        return f"{status}{self.code}: {self.message}{where}"


class BadRequest(AiosError):
    default_code = "bad_request"


class Unauthorized(AiosError):
    """No credentials, or wrong, expired or revoked ones (after the client's own refresh failed)."""

    default_code = "unauthorized"


class Forbidden(AiosError):
    """Authenticated, but the role (or the object's owner) does not allow it."""

    default_code = "forbidden"


class NotFound(AiosError):
    default_code = "not_found"


class MethodNotAllowed(AiosError):
    default_code = "method_not_allowed"


class Conflict(AiosError):
    """The object's state does not allow it (cancel a finished task), or a reused Idempotency-Key."""

    default_code = "conflict"


class IllegalTransition(Conflict):
    default_code = "illegal_transition"


class PayloadTooLarge(AiosError):
    default_code = "payload_too_large"


class UnsupportedMediaType(AiosError):
    default_code = "unsupported_media_type"


class ValidationFailed(AiosError):
    """Well-formed but wrong input; ``field`` names the part (``priority``, ``tasks.3.priority``)."""

    default_code = "validation_failed"


class UnknownTaskType(ValidationFailed):
    default_code = "unknown_task_type"


class BackupInvalid(ValidationFailed):
    default_code = "backup_invalid"


class RateLimited(AiosError):
    """429 still answered after the client's retries, or with a Retry-After longer than it waits."""

    default_code = "too_many_requests"

    @property
    def retry_after_s(self) -> float | None:
        value = self.body.get("retry_after_s")
        return float(value) if isinstance(value, int | float) else None


class ServiceUnavailable(AiosError):
    """503 still answered after the client's retries: a dependency of the API is down."""

    default_code = "service_unavailable"


class DatabaseNotMigrated(ServiceUnavailable):
    default_code = "database_not_migrated"


class DatabaseUnavailable(ServiceUnavailable):
    """The API's database did not answer (a restart, a failover) through the client's retries."""

    default_code = "database_unavailable"


class RequestTimeout(AiosError):
    """The API did not receive the whole request within its ``api.request_read_timeout_s``."""

    default_code = "request_timeout"


class HeadersTooLarge(AiosError):
    default_code = "request_header_fields_too_large"


class InternalError(AiosError):
    default_code = "internal_error"


class BackupFailed(InternalError):
    default_code = "backup_failed"


class WorkerNotFound(NotFound):
    default_code = "worker_not_found"


class WorkerRefused(Conflict):
    default_code = "worker_refused"


class WorkerTimeout(AiosError):
    default_code = "worker_timeout"


class UnsupportedOnBroker(AiosError):
    default_code = "unsupported_on_broker"


class ConnectionFailed(AiosError):
    """No answer from the API (refused, reset, timed out) after the retries allowed for the request."""

    default_code = "connection_failed"


class WaitTimeout(AiosError):
    """``Client.wait`` gave up before the task finished; the task itself goes on (``task``)."""

    default_code = "wait_timeout"

    def __init__(self, message: str, *, task: dict[str, Any]) -> None:
        super().__init__(message)
        self.task = task


class TaskFailed(AiosError):
    """``Client.result`` found the task finished without success; ``task`` is its final state."""

    default_code = "task_failed"

    def __init__(self, task: dict[str, Any]) -> None:
        error = task.get("error")
        detail = error.get("message", error) if isinstance(error, dict) else error
        super().__init__(f"task {task.get('id')} ended {task.get('state')}" + (f": {detail}" if detail else ""))
        self.task = task
        self.state: str | None = task.get("state")
        self.error = error


ERRORS_BY_CODE: dict[str, type[AiosError]] = {
    cls.default_code: cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        MethodNotAllowed,
        Conflict,
        IllegalTransition,
        PayloadTooLarge,
        UnsupportedMediaType,
        ValidationFailed,
        UnknownTaskType,
        BackupInvalid,
        RateLimited,
        ServiceUnavailable,
        DatabaseNotMigrated,
        DatabaseUnavailable,
        RequestTimeout,
        HeadersTooLarge,
        InternalError,
        BackupFailed,
        WorkerNotFound,
        WorkerRefused,
        WorkerTimeout,
        UnsupportedOnBroker,
    )
}
ERRORS_BY_STATUS: dict[int, type[AiosError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    408: RequestTimeout,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: ValidationFailed,
    429: RateLimited,
    431: HeadersTooLarge,
    500: InternalError,
    501: UnsupportedOnBroker,
    503: ServiceUnavailable,
    504: WorkerTimeout,
}
