"""The client half of ``aios``: commands that talk to a running AIOS API (click + rich).

``aios api``, ``aios worker``, ``aios beat``, ``aios db`` … run AIOS (:mod:`aios.cli`); the commands
here use it, over HTTP, through :class:`aios_client.client.Client` — from a laptop, a CI job or a script:

    aios login --url https://aios.example.com --username alice
    aios submit echo -p x=1 --priority 9 --wait
    aios tasks ls --state FAILED,DEAD
    aios tasks watch 3f0c…

Credentials, first found wins: ``--api-key`` / ``AIOS_API_KEY``; the token ``aios login`` stored
in ``$XDG_CONFIG_HOME/aios/credentials.json`` (mode 600; refreshed tokens are saved back). The API
is ``--url`` / ``AIOS_URL``, else the one logged in to, else ``http://127.0.0.1:8000``.

Output is a table for people, ``--json`` for scripts (one JSON document on stdout). ``aios``
(:mod:`aios.cli`) puts these commands in its one click group, beside the server's, with the same
global options (:func:`client_options`) and exit codes (:func:`run`); :func:`main` runs them alone, for
an installation of the client only. Exit codes:

====  =====================================================================
0     done (for ``--wait``/``watch``: the task SUCCEEDED)
1     the task ended otherwise (FAILED, DEAD, TIMED_OUT, CANCELLED)
2     usage error (bad option or argument)
3     the API refused the request (4xx: validation, not found, forbidden …)
4     the API or the network failed (5xx, connection refused, timeout)
5     ``--wait``/``watch`` gave up before the task ended
6     not logged in / credentials refused
====  =====================================================================
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from aios_client import client as api
from aios_client import errors

EXIT_OK, EXIT_TASK_FAILED, EXIT_USAGE, EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_WAIT_TIMEOUT, EXIT_AUTH = range(7)
DEFAULT_URL = "http://127.0.0.1:8000"
FINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT", "DEAD"})

out = Console()
err = Console(stderr=True)


# --------------------------------------------------------------------------- stored login


def credentials_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "aios" / "credentials.json"


def load_credentials() -> dict[str, Any] | None:
    path = credentials_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("access_token") else None


def save_credentials(data: dict[str, Any]) -> Path:
    """Write the tokens readable by this user only: the folder 700, the file 600, from the start."""
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    temporary = path.with_suffix(".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
    os.chmod(temporary, stat.S_IRUSR | stat.S_IWUSR)
    os.replace(temporary, path)
    return path


# --------------------------------------------------------------------------- plumbing


class State:
    """What the group's options decided, and the client made from them on first use."""

    def __init__(self, url: str | None, api_key: str | None, as_json: bool, timeout: float) -> None:
        self.url, self.api_key, self.as_json, self.timeout = url, api_key, as_json, timeout
        self._client: api.Client | None = None

    def client(self) -> api.Client:
        if self._client is None:
            self._client = self._connect()
        return self._client

    def _connect(self) -> api.Client:
        if self.api_key:
            return api.Client(self.url or DEFAULT_URL, api_key=self.api_key, timeout=self.timeout)
        stored = load_credentials()
        if stored is None:
            raise click.ClickException("not logged in: run `aios login`, or give --api-key / AIOS_API_KEY")
        url = self.url or stored.get("url") or DEFAULT_URL

        def keep(access_token: str, refresh_token: str) -> None:
            save_credentials({**stored, "access_token": access_token, "refresh_token": refresh_token})

        return api.Client.with_tokens(
            url,
            access_token=stored["access_token"],
            refresh_token=stored.get("refresh_token"),
            on_renew=keep,
            timeout=self.timeout,
        )

    def close(self) -> None:
        if self._client is not None:
            self._client.close(logout=False)


def emit(state: State, data: Any, render: Callable[[Any], None]) -> None:
    """``--json``: the data as one JSON document; otherwise ``render`` it for a person."""
    if state.as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        render(data)


def table(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, str]], *, title: str | None = None) -> None:
    grid = Table(title=title, show_lines=False, header_style="bold")
    for _, header in columns:
        grid.add_column(header)
    count = 0
    for row in rows:
        grid.add_row(*[_cell(row.get(key)) for key, _ in columns])
        count += 1
    out.print(grid if count else "(none)")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


def details(data: dict[str, Any], *, skip: Sequence[str] = ()) -> None:
    grid = Table(show_header=False, box=None)
    grid.add_column(style="bold")
    grid.add_column()
    for key, value in data.items():
        if key not in skip:
            grid.add_row(key, _cell(value))
    out.print(grid)


def parse_params(pairs: Sequence[str], raw: str | None) -> dict[str, Any]:
    """``-p key=value`` (the value as JSON when it parses, else a string) over ``--params '{…}'``."""
    params: dict[str, Any] = {}
    if raw:
        try:
            loaded = json.loads(raw)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--params") from exc
        if not isinstance(loaded, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--params")
        params.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r}: use key=value", param_hint="-p")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


TASK_COLUMNS = (
    ("id", "ID"),
    ("type", "TYPE"),
    ("state", "STATE"),
    ("priority", "PRI"),
    ("agent", "AGENT"),
    ("attempts", "TRIES"),
    ("created_at", "CREATED"),
)


def show_task(task: dict[str, Any]) -> None:
    details(task, skip=("events",))
    events = task.get("events") or []
    if events:
        table(
            events,
            (("at", "AT"), ("from_state", "FROM"), ("to_state", "TO"), ("actor", "BY"), ("detail", "DETAIL")),
            title="timeline",
        )


def follow(state: State, task_id: str, timeout: float | None) -> int:
    """Wait for a task to end, with a live progress bar (percent when the task reports it)."""
    client = state.client()
    task = client.get(task_id)
    quiet = state.as_json or not sys.stderr.isatty()
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=True, disable=quiet) as bar:
        line = bar.add_task(f"{task_id[:8]} {task['state']}", total=100)

        def update(current: dict[str, Any]) -> None:
            percent = current.get("progress")
            message = current.get("progress_message") or ""
            bar.update(
                line,
                description=f"{task_id[:8]} {current['state']} {message}".rstrip(),
                completed=percent if isinstance(percent, int | float) else 0,
            )

        try:
            task = client.wait(task_id, timeout=timeout, on_change=update)
        except errors.WaitTimeout as exc:
            emit(state, exc.task, show_task)
            err.print(f"[yellow]still {exc.task['state']} after {timeout:g}s[/yellow]")
            return EXIT_WAIT_TIMEOUT
    emit(state, task, show_task)
    return EXIT_OK if task["state"] == "SUCCEEDED" else EXIT_TASK_FAILED


# --------------------------------------------------------------------------- commands


#: ``aios -h`` works as ``aios --help`` does.
CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"]}
#: The parameter names of :func:`client_options`, as the group's callback receives them.
CLIENT_OPTIONS = ("url", "api_key", "as_json", "timeout")


def client_options(callback: Callable[..., Any]) -> Callable[..., Any]:
    """The global options of the client commands (``aios --json --url URL … COMMAND``), for a group's callback."""
    for option in reversed(
        (
            click.option(
                "--url", envvar="AIOS_URL", help="the AIOS API (default: where you logged in, or localhost:8000)"
            ),
            click.option("--api-key", envvar="AIOS_API_KEY", help="an API key (else the token of `aios login`)"),
            click.option("--json", "as_json", is_flag=True, help="print JSON (for scripts) instead of tables"),
            click.option("--timeout", type=float, default=30.0, show_default=True, help="seconds per HTTP request"),
        )
    ):
        callback = option(callback)
    return callback


def open_session(ctx: click.Context, url: str | None, api_key: str | None, as_json: bool, timeout: float) -> None:
    """Give the client commands under ``ctx`` their :class:`State` (``@click.pass_obj``); close it at the end."""
    ctx.obj = State(url, api_key, as_json, timeout)
    ctx.call_on_close(ctx.obj.close)


@click.group(context_settings=CONTEXT_SETTINGS)
@client_options
@click.pass_context
def cli(ctx: click.Context, url: str | None, api_key: str | None, as_json: bool, timeout: float) -> None:
    """Talk to a running AIOS API."""
    open_session(ctx, url, api_key, as_json, timeout)


@cli.command()
@click.option("--username", prompt=True)
@click.option("--password", prompt=True, hide_input=True, help="prompted when not given (never in shell history)")
@click.pass_obj
def login(state: State, username: str, password: str) -> None:
    """Log in and keep the token in your config folder (mode 600)."""
    url = state.url or DEFAULT_URL
    session = api.Client(url, username=username, password=password, timeout=state.timeout)
    access, refresh = session.tokens
    path = save_credentials({"url": url, "username": username, "access_token": access, "refresh_token": refresh})
    session.close(logout=False)
    emit(
        state,
        {"url": url, "username": username, "stored": str(path)},
        lambda d: out.print(f"logged in to {d['url']} as {d['username']} (token in {d['stored']})"),
    )


@cli.command()
@click.pass_obj
def logout(state: State) -> None:
    """Revoke the stored token and forget it."""
    if load_credentials() is not None:
        try:
            state.client().close(logout=True)
        finally:
            credentials_path().unlink(missing_ok=True)
    emit(state, {"logged_out": True}, lambda d: out.print("logged out"))


@cli.command()
@click.argument("task_type")
@click.option(
    "-p", "--param", "pairs", multiple=True, metavar="KEY=VALUE", help="a parameter (value as JSON if it parses)"
)
@click.option("--params", "raw_params", metavar="JSON", help="all parameters as a JSON object")
@click.option("--priority", type=click.IntRange(0, 9), help="0-9, 9 most urgent")
@click.option("--queue")
@click.option("--agent", help="pin to this agent")
@click.option("--delay", "delay_s", type=float, help="start in this many seconds")
@click.option("--run-at", help="start at this ISO time (with a timezone)")
@click.option("--max-retries", type=int)
@click.option("--task-timeout", "timeout_s", type=int, help="the task's timeout_s")
@click.option("--wait", is_flag=True, help="wait for the end, with a progress bar; exit 0 only on SUCCEEDED")
@click.option("--wait-timeout", type=float, default=None, help="give up waiting after this many seconds")
@click.pass_obj
def submit(
    state: State,
    /,
    task_type: str,
    pairs: tuple[str, ...],
    raw_params: str | None,
    wait: bool,
    wait_timeout: float | None,
    **options: Any,
) -> None:
    """Submit a task of TASK_TYPE."""
    params = parse_params(pairs, raw_params)
    chosen = {key: value for key, value in options.items() if value is not None}
    task = state.client().submit(task_type, params, **chosen)
    if wait:
        raise SystemExit(follow(state, task["id"], wait_timeout))
    emit(state, task, lambda t: out.print(f"{t['id']} {t['state']}"))


@cli.group()
def tasks() -> None:
    """List, show, cancel, retry and watch tasks."""


@tasks.command("ls")
@click.option("--state", "states", help="one or more states, comma-separated")
@click.option("--type", "task_type")
@click.option("--agent")
@click.option("-q", "--search", "q", help="text in type, parameters or result")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.pass_obj
def tasks_ls(state: State, /, limit: int, **filters: Any) -> None:
    """The newest tasks first."""
    renamed = {"task_type": "type", "states": "state"}
    chosen = {renamed.get(key, key): value for key, value in filters.items() if value}
    rows = []
    for row in state.client().list(page_size=min(limit, 500), **chosen):
        rows.append(row)
        if len(rows) >= limit:
            break
    emit(state, rows, lambda r: table(r, TASK_COLUMNS))


@tasks.command("show")
@click.argument("task_id")
@click.pass_obj
def tasks_show(state: State, task_id: str) -> None:
    """One task, with its timeline."""
    emit(state, state.client().get(task_id), show_task)


@tasks.command("cancel")
@click.argument("task_id")
@click.pass_obj
def tasks_cancel(state: State, task_id: str) -> None:
    emit(state, state.client().cancel(task_id), lambda t: out.print(f"{t['id']} {t['state']}"))


@tasks.command("retry")
@click.argument("task_id")
@click.pass_obj
def tasks_retry(state: State, task_id: str) -> None:
    """Run a finished task again, as a new task."""
    emit(state, state.client().retry(task_id), lambda t: out.print(f"{t['id']} {t['state']} (retry of {task_id})"))


@tasks.command("watch")
@click.argument("task_id")
@click.option("--timeout", "wait_timeout", type=float, default=None, help="give up after this many seconds")
@click.pass_obj
def tasks_watch(state: State, task_id: str, wait_timeout: float | None) -> None:
    """Follow a task to its end (progress bar); exit 0 only if it SUCCEEDED."""
    raise SystemExit(follow(state, task_id, wait_timeout))


@cli.group()
def agents() -> None:
    """List, show, drain, disable and enable agents."""


AGENT_COLUMNS = (
    ("name", "NAME"),
    ("status", "STATUS"),
    ("status_reason", "WHY"),
    ("weight", "WEIGHT"),
    ("active", "ACTIVE"),
    ("last_heartbeat_at", "LAST HEARTBEAT"),
)


@agents.command("ls")
@click.option("--status")
@click.option("--capability")
@click.pass_obj
def agents_ls(state: State, status: str | None, capability: str | None) -> None:
    emit(state, state.client().agents(status=status, capability=capability), lambda r: table(r, AGENT_COLUMNS))


@agents.command("show")
@click.argument("name")
@click.pass_obj
def agents_show(state: State, name: str) -> None:
    emit(state, state.client().agent(name), details)


def _agent_action(action: str, doc: str) -> None:
    @agents.command(action, help=doc)
    @click.argument("name")
    @click.pass_obj
    def run(state: State, name: str) -> None:
        answer = getattr(state.client(), f"{action}_agent")(name)
        emit(state, answer, lambda a: out.print(f"{a['name']} {a['status']}"))


_agent_action("drain", "Finish current work, take no new.")
_agent_action("disable", "Take no work at all.")
_agent_action("enable", "Back to normal.")


@cli.command()
@click.pass_obj
def queues(state: State) -> None:
    """Depth of every queue, per priority level."""
    answer = state.client().queues()

    def render(rows: list[dict[str, Any]]) -> None:
        table(
            [
                {
                    **row,
                    "by_priority": {
                        str(level["priority"]): level["depth"] for level in row.get("levels", []) if level["depth"]
                    },
                    "consumers": ", ".join(row.get("consumers", [])),
                }
                for row in rows
            ],
            (
                ("name", "QUEUE"),
                ("depth", "DEPTH"),
                ("by_priority", "BY PRIORITY"),
                ("oldest_age_s", "OLDEST (s)"),
                ("consumers", "CONSUMERS"),
            ),
        )

    emit(state, answer, render)


@cli.group()
def keys() -> None:
    """Your API keys: create, list, rotate, revoke."""


KEY_COLUMNS = (
    ("id", "ID"),
    ("name", "NAME"),
    ("prefix", "PREFIX"),
    ("role", "ROLE"),
    ("state", "STATE"),
    ("expires_at", "EXPIRES"),
    ("last_used_at", "LAST USED"),
)


@keys.command("ls")
@click.pass_obj
def keys_ls(state: State) -> None:
    emit(state, state.client().keys(), lambda r: table(r, KEY_COLUMNS))


@keys.command("create")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(["admin", "operator", "viewer", "agent"]))
@click.option("--expires-in-days", type=int)
@click.pass_obj
def keys_create(state: State, name: str, role: str, expires_in_days: int | None) -> None:
    """Create a key; it is shown once."""
    answer = state.client().create_key(name, role, expires_in_days=expires_in_days)
    emit(state, answer, lambda a: out.print(f"{a['key']}\n(shown once: store it now; id {a['id']})"))


@keys.command("rotate")
@click.argument("key_id")
@click.option("--grace", "grace_s", type=int, help="seconds the old key keeps working")
@click.pass_obj
def keys_rotate(state: State, key_id: str, grace_s: int | None) -> None:
    answer = state.client().rotate_key(key_id, grace_s=grace_s)
    emit(state, answer, lambda a: out.print(f"{a['key']}\n(shown once; the old key works until its grace ends)"))


@keys.command("revoke")
@click.argument("key_id")
@click.pass_obj
def keys_revoke(state: State, key_id: str) -> None:
    emit(state, state.client().revoke_key(key_id), lambda a: out.print(f"{a['id']} {a['state']}"))


@cli.group()
def schedules() -> None:
    """Periodic tasks: list, show, create, enable, disable, delete."""


SCHEDULE_COLUMNS = (
    ("id", "ID"),
    ("name", "NAME"),
    ("cron", "CRON"),
    ("interval_s", "EVERY (s)"),
    ("enabled", "ON"),
    ("last_run_at", "LAST RUN"),
    ("next_run_at", "NEXT RUN"),
)


@schedules.command("ls")
@click.pass_obj
def schedules_ls(state: State) -> None:
    emit(state, state.client().schedules(), lambda r: table(r, SCHEDULE_COLUMNS))


@schedules.command("show")
@click.argument("schedule_id")
@click.pass_obj
def schedules_show(state: State, schedule_id: str) -> None:
    emit(state, state.client().schedule(schedule_id), details)


@schedules.command("create")
@click.argument("name")
@click.argument("task_type")
@click.option("--cron", help="5 fields, UTC")
@click.option("--every", "interval_s", type=int, help="seconds")
@click.option("-p", "--param", "pairs", multiple=True, metavar="KEY=VALUE")
@click.option("--params", "raw_params", metavar="JSON")
@click.option("--priority", type=click.IntRange(0, 9))
@click.option("--queue")
@click.option("--disabled", is_flag=True)
@click.pass_obj
def schedules_create(
    state: State,
    name: str,
    task_type: str,
    cron: str | None,
    interval_s: int | None,
    pairs: tuple[str, ...],
    raw_params: str | None,
    priority: int | None,
    queue: str | None,
    disabled: bool,
) -> None:
    task = {
        "type": task_type,
        "parameters": parse_params(pairs, raw_params),
        **({"priority": priority} if priority is not None else {}),
        **({"queue": queue} if queue else {}),
    }
    answer = state.client().create_schedule(name, task, cron=cron, interval_s=interval_s, enabled=not disabled)
    emit(state, answer, details)


def _schedule_switch(action: str, enabled: bool) -> None:
    @schedules.command(action)
    @click.argument("schedule_id")
    @click.pass_obj
    def run(state: State, schedule_id: str) -> None:
        emit(state, state.client().update_schedule(schedule_id, enabled=enabled), details)


_schedule_switch("enable", True)
_schedule_switch("disable", False)


@schedules.command("delete")
@click.argument("schedule_id")
@click.pass_obj
def schedules_delete(state: State, schedule_id: str) -> None:
    state.client().delete_schedule(schedule_id)
    emit(state, {"deleted": schedule_id}, lambda d: out.print(f"deleted {d['deleted']}"))


@cli.command()
@click.pass_obj
def status(state: State) -> None:
    """How the cluster is doing."""
    emit(state, state.client().status(), details)


#: The commands this module adds to ``aios`` (the rest are :mod:`aios.cli`'s).
COMMANDS = frozenset(cli.commands)


def run(group: click.Group, argv: Sequence[str]) -> int:
    """Run ``aios ARGV`` with ``group``; map click's and the client's errors to the documented exit codes.

    A command's own exit status (an ``int`` it returns, or ``SystemExit``) passes through unchanged.
    """
    try:
        result = group.main(args=list(argv), prog_name="aios", standalone_mode=False)
    except SystemExit as exc:
        if exc.code is not None and not isinstance(exc.code, int):
            raise  # sys.exit("message"): Python prints it and exits 1
        return exc.code or 0
    except click.exceptions.Abort:
        err.print("aborted")
        return EXIT_USAGE
    except click.UsageError as exc:
        exc.show()
        return EXIT_USAGE
    except click.ClickException as exc:
        exc.show()
        return EXIT_AUTH if "not logged in" in exc.message else EXIT_USAGE
    except errors.Unauthorized as exc:
        err.print(f"aios: {exc} (run `aios login` again, or check the API key)")
        return EXIT_AUTH
    except (errors.ServiceUnavailable, errors.InternalError, errors.ConnectionFailed, errors.WorkerTimeout) as exc:
        err.print(f"aios: {exc}")
        return EXIT_UNAVAILABLE
    except errors.AiosError as exc:
        err.print(f"aios: {exc}")
        return EXIT_REFUSED
    return result if isinstance(result, int) else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """The client commands alone (no server commands): for an installation of the client only."""
    return run(cli, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
