"""Acceptance: on a clean machine, ``aios up --migrate`` (what ``make run`` runs) brings AIOS up on the
embedded default (SQLite ledger + SQLite broker, no servers), runs an echo task submitted over HTTP,
and stops cleanly on Ctrl-C without leaving processes behind.

Needs neither PostgreSQL nor Redis: the environment has no AIOS_* variables except the config file
and a free port, and the working directory is an empty temp folder.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO_ROOT, wait_for

pytestmark = pytest.mark.slow

STOP_WITHIN_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any AIOS_* variable (so no PostgreSQL/Redis URL leaks in)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIOS_")}
    # This checkout's code, not whichever one the virtualenv's editable install points at.
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env.update(AIOS_CONFIG=str(REPO_ROOT / "config" / "aios.toml"), PYTHONUNBUFFERED="1", **extra)
    return env


# --------------------------------------------------------------------------- processes, from /proc


@dataclass(frozen=True)
class Proc:
    """A process identified by pid *and* start time, so a reused pid is not mistaken for it."""

    pid: int
    start: int

    def alive(self) -> bool:
        stat = _stat(self.pid)
        return stat is not None and stat[1] == self.start and stat[2] != "Z"


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, start time, state) of ``pid`` from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may contain spaces and ')'
    return int(fields[1]), int(fields[19]), fields[0]


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def descendants(root: int) -> list[Proc]:
    """Every live descendant of ``root`` (what psutil.Process(root).children(recursive=True) gives)."""
    parents: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for pid in _all_pids():
        stat = _stat(pid)
        if stat is not None:
            parents.setdefault(stat[0], []).append(pid)
            starts[pid] = stat[1]
    found: list[Proc] = []
    todo = list(parents.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(Proc(pid, starts[pid]))
        todo.extend(parents.get(pid, []))
    return found


def still_alive(procs: list[Proc], grace_s: float) -> list[Proc]:
    """The processes of ``procs`` still running after up to ``grace_s`` seconds (grandchildren may lag)."""
    deadline = time.monotonic() + grace_s
    while (alive := [p for p in procs if p.alive()]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def processes_in(folder: Path) -> list[int]:
    """Live processes whose working directory is ``folder`` (or below it), other than zombies."""
    found = []
    for pid in _all_pids():
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        stat = _stat(pid)
        if stat is not None and stat[2] != "Z" and (cwd == str(folder) or cwd.startswith(f"{folder}/")):
            found.append(pid)
    return found


# --------------------------------------------------------------------------- fixtures


@dataclass
class Up:
    process: subprocess.Popen[bytes]
    cwd: Path
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture()
def up(tmp_path: Path) -> Iterator[Up]:
    """``aios up --migrate`` in an empty folder, in a session of its own; killed at teardown if still running."""
    cwd = tmp_path / "clean-machine"
    cwd.mkdir()
    port = free_port()
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "aios.cli", "up", "--migrate"],
            cwd=cwd,
            env=clean_env(AIOS_API__PORT=str(port)),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    handle = Up(process=process, cwd=cwd, url=f"http://127.0.0.1:{port}", log_path=log_path)
    yield handle
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    for pid in processes_in(cwd):  # never leave a stray agent or API worker behind, even on failure
        os.kill(pid, signal.SIGKILL)


def healthy(up: Up) -> bool:
    if up.process.poll() is not None:
        raise AssertionError(f"aios up exited with {up.process.returncode}:\n{up.log()[-4000:]}")
    try:
        return requests.get(f"{up.url}/healthz", timeout=2).status_code == 200
    except requests.RequestException:  # not listening yet, or still booting
        return False


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("target", ["up-process", "process-group"])
def test_aios_up_runs_an_echo_task_on_the_embedded_default_and_stops_cleanly_on_ctrl_c(up, target):
    # Given `aios up --migrate` started on a clean machine (no database or broker configured)
    wait_for(lambda: healthy(up), timeout=60, interval=0.25, what="the API to answer /healthz")
    # Then it created its SQLite database in the working directory
    assert (up.cwd / "var" / "aios.db").is_file()

    # And it created the first admin and printed its one-time password
    match = wait_for(
        lambda: re.search(r"its password \(shown once\): (\S+)", up.log()),
        timeout=10,
        what="the one-time admin password",
    )
    # When the admin logs in (form body, as in the README) and posts an echo task
    login = requests.post(
        f"{up.url}/api/v1/auth/token", data={"username": "admin", "password": match.group(1)}, timeout=10
    )
    assert login.status_code == 200, login.text
    auth = {"Authorization": f"Bearer {login.json()['access_token']}"}
    assert requests.get(f"{up.url}/api/v1/tasks", timeout=5).status_code == 401
    response = requests.post(
        f"{up.url}/api/v1/tasks", json={"type": "echo", "parameters": {"x": 1}}, timeout=10, headers=auth
    )
    # Then it is accepted
    assert response.status_code == 202, response.text
    task_id = response.json()["id"]

    # And it reaches SUCCEEDED with its parameters as result
    def finished() -> dict | None:
        task = requests.get(f"{up.url}/api/v1/tasks/{task_id}", timeout=5, headers=auth).json()
        assert task["state"] not in ("FAILED", "DEAD", "TIMED_OUT", "CANCELLED"), (task, up.log()[-4000:])
        return task if task["state"] == "SUCCEEDED" else None

    task = wait_for(finished, timeout=60, interval=0.25, what=f"task {task_id} to succeed")
    assert task["result"] == {"x": 1}

    # When SIGINT is sent to the `aios up` process alone (kill -INT), or to its whole process group
    # (what Ctrl-C in a terminal does: every child gets it too)
    children = descendants(up.process.pid)
    assert len(children) >= 2, f"expected an API and an agent under aios up, found {children}"
    started = time.monotonic()
    if target == "up-process":
        up.process.send_signal(signal.SIGINT)
    else:
        os.killpg(up.process.pid, signal.SIGINT)
    # Then it exits within the grace period
    try:
        up.process.wait(timeout=STOP_WITHIN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"aios up did not exit within {STOP_WITHIN_S}s of SIGINT:\n{up.log()[-4000:]}")
    took = time.monotonic() - started
    # And no process it started is left running
    leftovers = still_alive(children, grace_s=5.0)
    assert not leftovers, f"still running {took:.1f}s after SIGINT: {leftovers}\n{up.log()[-4000:]}"
    assert processes_in(up.cwd) == []
    assert up.process.returncode == 0, up.log()[-4000:]
    print(f"aios up stopped {took:.1f}s after SIGINT to the {target}")


def test_the_api_refuses_to_start_on_an_unmigrated_database(tmp_path):
    # Given an empty folder, so the embedded SQLite database is new and has no schema
    cwd = tmp_path / "unmigrated"
    cwd.mkdir()
    # When `aios api` is started without migrating first
    done = subprocess.run(
        [sys.executable, "-m", "aios.cli", "api", "--port", str(free_port())],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Then it exits with status 3 and tells the operator what to run
    assert done.returncode == 3, (done.returncode, done.stderr[-3000:])
    assert "aios db upgrade" in done.stderr
    assert "Traceback" not in done.stderr
