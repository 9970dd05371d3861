"""Reading request bodies and query strings into validated values, with errors that name the field."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from flask import request
from pydantic import BaseModel, ValidationError

from aios.errors import BadRequest, UnsupportedMediaType, ValidationFailed

Model = TypeVar("Model", bound=BaseModel)


def json_body() -> Any:
    """The request's JSON body: 415 unless it is application/json, 400 if it does not parse."""
    if not request.is_json:
        raise UnsupportedMediaType(
            f"send the body as application/json (got {request.mimetype or 'no content type'})"
        )
    raw = request.get_data(cache=True)  # raises 413 past MAX_CONTENT_LENGTH
    try:
        return json.loads(raw or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON body: {exc}") from exc


def validate(model: type[Model], data: Any, *, prefix: str = "") -> Model:
    if not isinstance(data, dict):
        raise ValidationFailed("the body must be a JSON object", field=prefix or "body")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        if prefix:
            field = f"{prefix}.{field}" if field else prefix
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = "unknown field"
        raise ValidationFailed(f"{field}: {message}", field=field) from exc
