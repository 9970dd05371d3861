"""What a reader is shown of a task: whole bodies by id, short previews in lists, and a command's argv,
env and output kept to its owner and admins.

Bodies (``parameters``, ``result``, ``error``) can be large (a command's output, a task's result of
megabytes), so a list shows each as a preview: the first :data:`PREVIEW_CHARS` characters of its JSON
text (of the error's text), cut in the database, with the ORM loading no body at all
(:func:`bodies_left_out`). ``GET /tasks/{id}`` shows them whole; ``?fields=`` asks a list for them whole.

A command task (type ``command``) holds what may be secret: its argv (a token on a command line), its
env (credentials handed to the program) and its output. The rule, the same on every read (API lists,
``GET /tasks/{id}``, agent detail, the dashboard):

* env values are masked (``"***"``) for everyone, the owner and admins included: the agent reads
  them from the ledger, no reader needs them back; names stay visible.
* the owner (the user who submitted it) and admins see the whole argv, cwd and output.
* every other reader (viewers, other operators) sees ``argv[0]`` only, no cwd, and the result without
  ``stdout``/``stderr`` (exit status, timings and limits stay); the task is marked ``"redacted": true``.

In a list, a command's ``parameters_preview`` is ``{"argv": [argv[0]]}`` for every reader (the
masked whole is one ``GET`` away), and its ``result_preview`` is withheld from the readers above.
``q=`` searches neither a command's parameters nor its result (:mod:`aios.tasks.search`).
"""

from __future__ import annotations

import json
import typing
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, Text, cast, event, func, select
from sqlalchemy.orm import ORMExecuteState, Session, defer

from aios.models import Task
from aios.sandbox.run import COMMAND_TYPE

#: Characters of a body's JSON text a list shows.
PREVIEW_CHARS = 200
#: The body fields of a task, in the order they are shown.
BODY_FIELDS = ("parameters", "result", "error")
#: What a masked env value reads as.
MASK = "***"
#: The result fields holding a command's output.
OUTPUT_FIELDS = ("stdout", "stderr")


@dataclass(frozen=True)
class Reader:
    """Who reads: a user's name (None: nobody in particular) and whether they are an admin."""

    name: str | None
    is_admin: bool = False

    def sees_command_of(self, owner: str | None) -> bool:
        """Whether this reader sees a command's whole argv and output (its owner and admins do)."""
        return self.is_admin or (self.name is not None and self.name == owner)


def command_parameters(parameters: Any, *, whole: bool) -> Any:
    """A command's parameters as a reader sees them: env values masked; without ``whole``, argv[0] only
    and no cwd."""
    if not isinstance(parameters, dict):
        return parameters
    shown = dict(parameters)
    if isinstance(shown.get("env"), dict):
        shown["env"] = dict.fromkeys(shown["env"], MASK)
    if not whole:
        argv = shown.get("argv")
        shown["argv"] = argv[:1] if isinstance(argv, list) else []
        shown.pop("cwd", None)
    return shown


def command_result(result: Any, *, whole: bool) -> Any:
    """A command's result as a reader sees it: without ``whole``, its output withheld (null)."""
    if whole or not isinstance(result, dict):
        return result
    return {**result, **dict.fromkeys((name for name in OUTPUT_FIELDS if name in result), None)}


def redact(data: dict[str, Any], *, owner: str | None, reader: Reader) -> dict[str, Any]:
    """Apply the command rule (module docstring) to a task as the API shows it (``data``, changed in
    place and returned); other task types are shown as they are."""
    if data.get("type") != COMMAND_TYPE:
        return data
    whole = reader.sees_command_of(owner)
    if "parameters" in data:
        data["parameters"] = command_parameters(data["parameters"], whole=whole)
    if "result" in data:
        data["result"] = command_result(data["result"], whole=whole)
    if not whole:
        data["redacted"] = True
    return data


# --------------------------------------------------------------------------- lists


def _only_task_rows(state: ORMExecuteState) -> bool:
    # is_select: a SELECT of the ORM, a Select statement here (typed as any Executable).
    statement = typing.cast(Select[Any], state.statement)
    return state.is_select and any(
        entry.get("type") is Task and entry.get("expr") is Task for entry in statement.column_descriptions
    )


@contextmanager
def bodies_left_out(session: Session, *, keep: Collection[str] = ()) -> Iterator[None]:
    """Within the block, every ORM query of whole Task rows on ``session`` loads no body columns but those
    in ``keep``: a list page of large results costs its previews, not its results, in memory. A body
    read from such a row is loaded then, one query per row: show a preview instead (:func:`list_items`)."""
    left_out = [getattr(Task, name) for name in BODY_FIELDS if name not in keep]
    if not left_out:
        yield
        return

    def leave_out(state: ORMExecuteState) -> None:
        if _only_task_rows(state):
            state.statement = state.statement.options(*(defer(column) for column in left_out))

    event.listen(session, "do_orm_execute", leave_out)
    try:
        yield
    finally:
        event.remove(session, "do_orm_execute", leave_out)


@dataclass(frozen=True)
class Preview:
    """The start of each body's text (None where the body is null) and argv[0] of a command."""

    parameters: str | None
    result: str | None
    error: str | None
    argv0: str | None


def previews(session: Session, task_ids: Sequence[str]) -> dict[str, Preview]:
    """Each task's previews, cut in the database (one query; no body crosses the wire whole)."""
    if not task_ids:
        return {}

    def start(column: Any) -> Any:
        return func.substr(column, 1, PREVIEW_CHARS + 1)

    rows = session.execute(
        select(
            Task.id,
            start(cast(Task.parameters, Text)),
            start(cast(Task.result, Text)),
            start(Task.error),
            Task.parameters[("argv", 0)].as_string(),
        ).where(Task.id.in_(list(task_ids)))
    )
    return {row[0]: Preview(*row[1:]) for row in rows}


def _preview(text: str | None) -> tuple[str | None, bool]:
    if text is None or text == "null":  # SQL NULL, or a JSON null the ORM stored
        return None, False
    return text[:PREVIEW_CHARS], len(text) > PREVIEW_CHARS


def add_previews(data: dict[str, Any], preview: Preview, *, whole: Collection[str]) -> dict[str, Any]:
    """Give ``data`` (a task shown without the bodies not in ``whole``, already under the command rule:
    :func:`redact` marked it ``redacted`` for a reader who may not see it) a ``<field>_preview`` and
    ``<field>_truncated`` for each of those bodies, under the same rule."""
    command = data.get("type") == COMMAND_TYPE
    sees = not data.get("redacted", False)
    for name in BODY_FIELDS:
        if name in whole:
            continue
        text, cut = _preview(getattr(preview, name))
        if command and name == "parameters":
            text, cut = json.dumps({"argv": [preview.argv0]}), True
        elif command and name == "result" and not sees and text is not None:
            text, cut = None, True
        data[f"{name}_preview"], data[f"{name}_truncated"] = text, cut
    return data
