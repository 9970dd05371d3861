"""The one error tree of AIOS.

Every exception AIOS raises on purpose descends from :class:`AiosError`; each class carries the HTTP
status and the stable ``error`` code the API answers with, so the web layer maps errors in one place
and a client can switch on ``error`` without parsing ``message``.

What a task type raises to end its run (``TaskFailure``, ``TaskTimedOut``) is not an error of AIOS and
never an HTTP answer: those signals live in :mod:`aios.tasktypes.signals`.
"""

from __future__ import annotations

from typing import Any


class AiosError(Exception):
    """Base of every AIOS error. ``status`` and ``code`` define its HTTP answer."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra
        #: HTTP headers the answer must carry (Retry-After, WWW-Authenticate).
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}


class ConfigError(AiosError):
    """A setting is missing or invalid; the process must not start (exit status 2)."""

    code = "config_error"


class NotMigrated(AiosError):
    """The database schema is older than this code; names the command that fixes it."""

    status = 503
    code = "database_not_migrated"


class BadRequest(AiosError):
    status = 400
    code = "bad_request"


class Unauthorized(AiosError):
    """No credentials, or credentials that are wrong, expired, revoked or disabled."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="aios"'}, **extra)


class Forbidden(AiosError):
    """Authenticated, but the role (or the object's owner) does not allow it."""

    status = 403
    code = "forbidden"


class TooManyRequests(AiosError):
    status = 429
    code = "too_many_requests"

    def __init__(self, message: str, *, retry_after_s: int, **extra: Any) -> None:
        super().__init__(
            message, headers={"Retry-After": str(max(1, retry_after_s))}, retry_after_s=max(1, retry_after_s), **extra
        )


class NotFound(AiosError):
    status = 404
    code = "not_found"


class Conflict(AiosError):
    status = 409
    code = "conflict"


class PayloadTooLarge(AiosError):
    status = 413
    code = "payload_too_large"


class RequestTimeout(AiosError):
    """The client did not send a whole request (headers and body) within ``api.request_read_timeout_s``."""

    status = 408
    code = "request_timeout"


class HeadersTooLarge(AiosError):
    status = 431
    code = "request_header_fields_too_large"


class UnsupportedMediaType(AiosError):
    status = 415
    code = "unsupported_media_type"


class ValidationFailed(AiosError):
    """Input is well-formed but wrong; ``field`` names the offending part (dotted path)."""

    status = 422
    code = "validation_failed"


class UnknownTaskType(ValidationFailed):
    code = "unknown_task_type"


class IllegalTransition(AiosError):
    """A task state change the state machine forbids (e.g. leaving a terminal state)."""

    status = 409
    code = "illegal_transition"


class ServiceUnavailable(AiosError):
    status = 503
    code = "service_unavailable"


class BackupFailed(AiosError):
    """A backup could not be taken or restored; the ``backups`` row and the log say why."""

    code = "backup_failed"


class BackupInvalid(AiosError):
    """A backup file does not match its ``.sha256`` or is not a readable dump: never restore it."""

    status = 422
    code = "backup_invalid"


class WorkerNotFound(NotFound):
    """No live worker of that name answered within ``api.inspect_timeout_s``."""

    code = "worker_not_found"


class WorkerRefused(Conflict):
    """The worker answered a control command with an error (e.g. autoscale on a fixed-size pool)."""

    code = "worker_refused"


class WorkerTimeout(AiosError):
    """The worker answers pings but did not reply to the command in time."""

    status = 504
    code = "worker_timeout"


class UnsupportedOnBroker(AiosError):
    """The configured broker cannot do this (queue inspection and purge need Redis)."""

    status = 501
    code = "unsupported_on_broker"
