"""A request id on every API request: in the ``X-Request-ID`` response header and on every log line.

A client (or a proxy in front) may send its own ``X-Request-ID`` to follow one request across
systems; it is kept if it is a short plain token, otherwise a new one is made — a header must never
be able to inject text into the logs.
"""

from __future__ import annotations

import re
import uuid

from flask import Flask, Response, g, request

from aios.ops.log import request_id_var

HEADER = "X-Request-ID"
_ACCEPTABLE = re.compile(r"^[A-Za-z0-9._-]{8,64}$")


def _begin() -> None:
    given = request.headers.get(HEADER, "")
    g.request_id = given if _ACCEPTABLE.match(given) else uuid.uuid4().hex
    g.request_id_token = request_id_var.set(g.request_id)


def _stamp(response: Response) -> Response:
    request_id = g.get("request_id")
    if request_id:
        response.headers[HEADER] = request_id
    return response


def _end(_: BaseException | None) -> None:
    token = g.pop("request_id_token", None)
    if token is not None:
        request_id_var.reset(token)


def init_request_ids(app: Flask) -> None:
    """Register first, so even a request refused by authentication has its id."""
    app.before_request(_begin)
    app.after_request(_stamp)
    app.teardown_request(_end)
