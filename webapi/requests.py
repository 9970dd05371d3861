"""Reading request bodies and query strings into validated values, with errors that name the field."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any, TypeAlias, TypeVar

from flask import request
from pydantic import BaseModel, ValidationError

from aios.errors import BadRequest, NotFound, UnsupportedMediaType, ValidationFailed
from aios.text import storable_text

Model = TypeVar("Model", bound=BaseModel)


def json_body() -> Any:
    """The request's JSON body: 415 unless it is application/json, 400 if it does not parse."""
    if not request.is_json:
        raise UnsupportedMediaType(f"send the body as application/json (got {request.mimetype or 'no content type'})")
    raw = request.get_data(cache=True)  # raises 413 past MAX_CONTENT_LENGTH
    try:
        data = json.loads(raw or b"", parse_constant=_no_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except (ValueError, RecursionError) as exc:
        # ValueError: JSONDecodeError, UnicodeDecodeError, NaN/Infinity, ints past Python's digit limit;
        # RecursionError: nesting deeper than the parser's stack. All are the client's fault, not a 500.
        raise BadRequest(f"malformed JSON body: {exc}") from exc
    check_storable(data)
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


#: Most digits an integer in a body may have: Python's own conversion limit, said in our words
#: (its error names ``sys.set_int_max_str_digits()``, a hint for the server's operator, not a client).
MAX_INT_DIGITS = 4300


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


#: Deepest nesting of arrays and objects a body may have (pydantic cannot serialize much past 250).
MAX_JSON_DEPTH = 100


#: Where a value sits in a body: ``None`` for the body itself, else (the parent's place, key or index).
#: A linked chain shared by every child of one container, so walking a body costs O(1) memory per
#: element; the dotted path is spelled out only for the one value an error names.
Place: TypeAlias = "tuple[Place, str | int] | None"


def place_path(place: Place, prefix: str = "") -> str:
    """The dotted path of ``place`` (``items.3.name``), ``prefix`` first, ``body`` for the body itself."""
    parts: list[str] = []
    while place is not None:
        place, key = place
        parts.append(str(key))
    parts.reverse()
    path = ".".join(([prefix] if prefix else []) + parts)
    return path or "body"


#: Longest path an error message quotes: a key may be as long as the body.
MAX_PATH_CHARS = 200


def check_storable(data: Any, prefix: str = "") -> None:
    """422 naming the part of ``data`` the ledger could not store: a string (or the object holding a
    key) that :func:`storable_text` refuses, or nesting deeper than :data:`MAX_JSON_DEPTH`.

    Runs before authentication on every JSON body, so what it costs must not depend on who sends it:
    time linear in the body's size and memory bounded by the nesting depth. It walks the body depth
    first with one iterator per open container (never a list of every element), and a value's path is
    a chain of (parent, key) links spelled out only for the one value an error names (a path string
    per element made ``{"k" * 100000: [0] * 10000}`` cost a gigabyte).
    """
    if isinstance(data, str):
        if not storable_text(data):
            _refuse(None, prefix, TEXT_PROBLEM)
        return
    if not isinstance(data, dict | list):
        return
    stack: list[tuple[Place, Iterator[tuple[str | int, Any]], int]] = [(None, _children(None, data, prefix), 1)]
    while stack:
        place, children, depth = stack[-1]
        for key, value in children:
            if isinstance(value, str):
                if not storable_text(value):
                    _refuse((place, key), prefix, TEXT_PROBLEM)
            elif isinstance(value, dict | list):
                if depth >= MAX_JSON_DEPTH:
                    _refuse((place, key), prefix, f"nested deeper than {MAX_JSON_DEPTH} levels")
                stack.append(((place, key), _children((place, key), value, prefix), depth + 1))
                break
        else:
            stack.pop()


TEXT_PROBLEM = "text must not contain NUL characters or unpaired surrogates"


def _children(place: Place, container: dict[str, Any] | list[Any], prefix: str) -> Iterator[tuple[str | int, Any]]:
    """(key, value) of a dict, checking each key as it goes, or (index, value) of a list."""
    if isinstance(container, list):
        yield from enumerate(container)
        return
    for key, value in container.items():
        if not storable_text(key):
            _refuse(place, prefix, "keys must not contain NUL characters or unpaired surrogates")
        yield key, value


def _refuse(place: Place, prefix: str, problem: str) -> None:
    where = place_path(place, prefix)
    if len(where) > MAX_PATH_CHARS:
        where = where[:MAX_PATH_CHARS] + "…"
    raise ValidationFailed(f"{where}: {problem}", field=where)


#: Bodies whose fields a form parser reads (the dashboard's login, OAuth-style token requests).
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def refuse_unstorable_request_text() -> None:
    """``before_request``, ahead of authentication: a NUL character or an unpaired surrogate in a path
    parameter is a 404 (no resource can have that name), in a query parameter or a form field a 422
    naming it.

    No route can find, store or compare such text (PostgreSQL refuses NUL, UTF-8 cannot carry a lone
    surrogate), so each handler would otherwise meet it as a database error: a 500 that anyone, logged
    in or not, could provoke. One check here covers every route, present and future.
    """
    problem = "must not contain NUL characters or unpaired surrogates"
    for name, value in (request.view_args or {}).items():
        if isinstance(value, str) and not storable_text(value):
            raise NotFound(f"no {name} can contain NUL characters or unpaired surrogates", field=name)
    fields = [("query parameter", request.args)]
    if request.mimetype in FORM_TYPES:
        fields.append(("form field", request.form))
    for kind, values in fields:
        for name, value in values.items(multi=True):
            if not storable_text(name):
                raise ValidationFailed(f"a {kind} name {problem}", field=kind.replace(" ", "_"))
            if not storable_text(value):
                raise ValidationFailed(f"{name[:100]}: {kind} {problem}", field=name[:100])


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
