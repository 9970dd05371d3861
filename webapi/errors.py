"""One JSON error shape for every failure: ``{"error": code, "message": text, ...}``.

Werkzeug's HTML error pages never reach a client: every HTTPException (404, 405, 413, ...) and
every AiosError is rendered here; the database being unreachable (PostgreSQL restarting, a failover)
is a 503 ``database_unavailable`` with ``Retry-After``, since a client should simply try again;
anything else is a 500 with no internals in the body.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from sqlalchemy.exc import InterfaceError, OperationalError
from werkzeug.exceptions import HTTPException

from aios.errors import AiosError

logger = logging.getLogger(__name__)

#: Seconds a client is told to wait when the database is unreachable.
DATABASE_RETRY_AFTER_S = 5

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_failed",
    429: "too_many_requests",
}


def error_response(status: int, code: str, message: str, **extra: object) -> tuple[Response, int]:
    response = jsonify({"error": code, "message": message, **extra})
    return response, status


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(AiosError)
    def _aios_error(exc: AiosError) -> tuple[Response, int]:
        if exc.status >= 500:
            logger.error("%s: %s", exc.code, exc.message)
        response, status = error_response(exc.status, exc.code, exc.message, **exc.extra)
        response.headers.update(exc.headers)
        return response, status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        message = exc.description or exc.name
        if status == 413:
            message = f"request body is larger than the limit of {app.config['MAX_CONTENT_LENGTH']} bytes"
        response, status = error_response(status, _HTTP_CODES.get(status, "http_error"), message)
        if status == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            response.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return response, status

    @app.errorhandler(OperationalError)
    @app.errorhandler(InterfaceError)
    def _database_unavailable(exc: Exception) -> tuple[Response, int]:
        logger.error("database unavailable: %s", str(exc).splitlines()[0][:300])
        response, status = error_response(503, "database_unavailable", "the database is unreachable; try again shortly")
        response.headers["Retry-After"] = str(DATABASE_RETRY_AFTER_S)
        return response, status

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        logger.exception("unhandled error")
        return error_response(500, "internal_error", "internal error; the server log has the details")
