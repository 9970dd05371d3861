"""Reading request bodies and query strings into validated values, with errors that name the field."""

from __future__ import annotations

import json
import math
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
        data = json.loads(raw or b"", parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        # ValueError: JSONDecodeError, UnicodeDecodeError, NaN/Infinity, ints past Python's digit limit;
        # RecursionError: nesting deeper than the parser's stack. All are the client's fault, not a 500.
        raise BadRequest(f"malformed JSON body: {exc}") from exc
    check_storable(data)
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


#: Deepest nesting of arrays and objects a body may have (pydantic cannot serialize much past 250).
MAX_JSON_DEPTH = 100


def storable_text(text: str) -> bool:
    """False for text the ledger cannot store: NUL characters (PostgreSQL refuses them in text and
    JSONB) and unpaired surrogates (not encodable as UTF-8)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_storable(data: Any, prefix: str = "") -> None:
    """422 naming the part of ``data`` the ledger could not store: a string (or the object holding a
    key) that :func:`storable_text` refuses, or nesting deeper than :data:`MAX_JSON_DEPTH`.
    Iterative, so a deeply nested body cannot exhaust the stack."""
    stack: list[tuple[str, Any, int]] = [(prefix, data, 0)]
    while stack:
        path, value, depth = stack.pop()
        where = path or "body"
        if isinstance(value, str):
            if not storable_text(value):
                raise ValidationFailed(f"{where}: text must not contain NUL characters or unpaired surrogates",
                                       field=where)
            continue
        if not isinstance(value, dict | list):
            continue
        if depth >= MAX_JSON_DEPTH:
            raise ValidationFailed(f"{where[:200]}: nested deeper than {MAX_JSON_DEPTH} levels", field=where)
        if isinstance(value, dict):
            for key, item in value.items():
                if not storable_text(key):
                    raise ValidationFailed(f"{where}: keys must not contain NUL characters or unpaired surrogates",
                                           field=where)
                stack.append((f"{path}.{key}" if path else key, item, depth + 1))
        else:
            stack.extend((f"{path}.{index}" if path else str(index), item, depth + 1)
                         for index, item in enumerate(value))


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
