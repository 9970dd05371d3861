"""A small Server-Sent Events reader over ``requests`` (stream=True), for the event-stream tests.

It follows the framing rules of the HTML standard that the API relies on: ``field: value`` lines, a blank
line ends a message, lines starting with ``:`` are comments, ``data`` lines of one message are joined.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import requests


@dataclass
class Message:
    event: str = "message"
    id: str | None = None
    data_lines: list[str] = field(default_factory=list)
    retry: int | None = None

    @property
    def data(self) -> Any:
        return json.loads("\n".join(self.data_lines)) if self.data_lines else None


@dataclass
class Stream:
    """One open stream: its response, the messages read so far and the comments seen."""

    response: requests.Response
    messages: list[Message] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    ended_by_server: bool = False

    def __iter__(self) -> Iterator[Message]:
        """Messages as they arrive; stops when the server closes the stream."""
        current = Message()
        has_fields = False
        for raw in self._lines():
            if raw == "":
                if has_fields and (current.data_lines or current.id is not None):
                    self.messages.append(current)
                    yield current
                current, has_fields = Message(), False
                continue
            if raw.startswith(":"):
                self.comments.append(raw[1:].strip())
                continue
            name, _, value = raw.partition(":")
            value = value[1:] if value.startswith(" ") else value
            has_fields = True
            if name == "event":
                current.event = value
            elif name == "data":
                current.data_lines.append(value)
            elif name == "id":
                current.id = value
            elif name == "retry" and value.isdigit():
                current.retry = int(value)
        self.ended_by_server = True

    def _lines(self) -> Iterator[str]:
        buffer = b""
        for chunk in self.response.iter_content(chunk_size=None):
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                yield line.rstrip(b"\r").decode("utf-8")

    def read_all(self) -> list[Message]:
        """Every message until the server closes the stream (the read timeout bounds a silent wait)."""
        for _ in self:
            pass
        return self.messages

    def close(self) -> None:
        self.response.close()


def open_stream(
    url: str,
    *,
    key: str | None = None,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    read_timeout_s: float = 60.0,
) -> Stream:
    """GET an event stream; the caller checks ``stream.response.status_code`` before reading."""
    sent = dict(headers or {})
    if key:
        sent["X-API-Key"] = key
    response = requests.get(url, headers=sent, params=params, stream=True, timeout=(10, read_timeout_s))
    return Stream(response)
