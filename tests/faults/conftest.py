"""The fault-injection suite's vocabulary: named fault operations, an effects ledger, one final check.

Every scenario in ``tests/faults`` does the same three things: submit a known set of tasks whose one
effect (a line in a file, written only at the very end of a run) can be counted; inject one named
:class:`Fault`; then call :func:`assert_nothing_lost` — every accepted task reached a terminal state,
each SUCCEEDED task's effect is recorded exactly once, and no task has more than one SUCCEEDED event.

The shared PostgreSQL and Redis serve every other test and are never stopped: an outage is staged on a
private ``redis-server`` (:mod:`tests.support.private_redis`) or a private PostgreSQL cluster
(:class:`PrivatePostgres`), each started by the test on a free port.
"""

from __future__ import annotations

import enum
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import WorkerProcess, free_port, requirement_missing, wait_for
from tests.support.agent_helpers import TERMINAL, kill_tree
from tests.support.private_redis import PrivateRedis, running_private_redis


class Fault(enum.Enum):
    """The faults this suite injects; each has one function below that does it."""

    SIGKILL_POOL_CHILD = "SIGKILL the pool process running a task"
    SIGKILL_WORKER = "SIGKILL a worker and its pool processes"
    SIGTERM_WORKER = "SIGTERM a worker (warm shutdown)"
    CONTROL_SHUTDOWN = "remote-control shutdown of a worker"
    STOP_REDIS = "stop and restart the broker"
    STOP_POSTGRES = "stop and restart the database"
    CUT_NETWORK = "cut an agent off the network"


# --------------------------------------------------------------------------- process faults


def kill_pool_child(worker: WorkerProcess, pid: int) -> None:
    """:attr:`Fault.SIGKILL_POOL_CHILD`: SIGKILL pool process ``pid`` of ``worker`` (checked to be its child)."""
    children = {child.pid for child in psutil.Process(worker.process.pid).children(recursive=True)}
    assert pid in children, f"pid {pid} is not a pool process of {worker.name} ({sorted(children)})"
    os.kill(pid, signal.SIGKILL)


def kill_worker(worker: WorkerProcess) -> None:
    """:attr:`Fault.SIGKILL_WORKER`: SIGKILL the worker and every pool process under it."""
    kill_tree(worker.process.pid)


def term_worker(worker: WorkerProcess) -> None:
    """:attr:`Fault.SIGTERM_WORKER`: SIGTERM the worker's main process, as an init system does (no wait)."""
    worker.process.send_signal(signal.SIGTERM)


def control_shutdown(celery: Any, settings: Any, name: str) -> None:
    """:attr:`Fault.CONTROL_SHUTDOWN`: the remote-control ``shutdown`` broadcast to one worker."""
    from aios.inspect import shutdown

    shutdown(celery, settings, name)


# --------------------------------------------------------------------------- effects ledger


@dataclass
class Effects:
    """The effects ledger of ``test.effect`` tasks: ``path`` gets ``<task id> <attempt>`` once per run
    that reached its end; ``path.started`` gets ``<task id> <attempt> <pid>`` when a run starts."""

    path: Path

    def params(self, sleep_s: float = 0.0, **more: Any) -> dict[str, Any]:
        return {"path": str(self.path), "sleep_s": sleep_s, **more}

    def task(self, queue: str, sleep_s: float = 0.0, *, params: dict[str, Any] | None = None,
             **fields: Any) -> dict[str, Any]:
        """A submit body for one ``test.effect`` task on ``queue`` (``params``: more parameters)."""
        return {"type": "test.effect", "parameters": self.params(sleep_s, **(params or {})), "queue": queue,
                **fields}

    def counts(self) -> Counter[str]:
        """Effects per task id."""
        if not self.path.exists():
            return Counter()
        return Counter(line.split()[0] for line in self.path.read_text().splitlines() if line.strip())

    def starts(self) -> list[tuple[str, int, int]]:
        """``(task id, attempt, pid)`` of every run that started, in order."""
        started = Path(f"{self.path}.started")
        if not started.exists():
            return []
        rows = [line.split() for line in started.read_text().splitlines() if line.strip()]
        return [(task_id, int(attempt), int(pid)) for task_id, attempt, pid in rows]

    def wait_started(self, task_id: str, attempt: int = 1, timeout: float = 60.0) -> int:
        """Wait for run ``attempt`` of ``task_id`` to start; returns the pid of the process running it."""
        def started() -> int | None:
            return next((pid for t, a, pid in self.starts() if t == task_id and a == attempt), None)

        return int(wait_for(started, timeout=timeout, interval=0.05, what=f"run {attempt} of {task_id} to start"))


@pytest.fixture()
def effects(tmp_path: Path) -> Effects:
    return Effects(tmp_path / "effects.txt")


def read_tasks(database: Any, task_ids: list[str]) -> dict[str, dict[str, Any]]:
    """id → ``{state, attempts, agent, succeeded_events, transitions}`` straight from the database."""
    from sqlalchemy import select

    from aios.db import session_scope
    from aios.models import Task, TaskEvent

    with session_scope(database) as session:
        rows = {row.id: row for row in session.execute(
            select(Task.id, Task.state, Task.attempts, Task.agent).where(Task.id.in_(task_ids)))}
        events = session.execute(select(TaskEvent.task_id, TaskEvent.to_state)
                                 .where(TaskEvent.task_id.in_(task_ids)).order_by(TaskEvent.id)).all()
    tasks: dict[str, dict[str, Any]] = {}
    for task_id, row in rows.items():
        path = [e.to_state for e in events if e.task_id == task_id and e.to_state]
        tasks[task_id] = {"state": row.state, "attempts": row.attempts, "agent": row.agent, "transitions": path}
    return tasks


def wait_terminal(database: Any, task_ids: list[str], timeout: float = 90.0, what: str = "") -> dict[str, Any]:
    """Wait until every task of ``task_ids`` is in a terminal state; returns :func:`read_tasks`."""
    last: dict[str, Any] = {}

    def done() -> bool:
        nonlocal last
        last = read_tasks(database, task_ids)
        return len(last) == len(task_ids) and all(t["state"] in TERMINAL for t in last.values())

    try:
        wait_for(done, timeout=timeout, interval=0.25, what=f"{len(task_ids)} task(s) to finish {what}")
    except AssertionError as exc:
        stuck = {k: v["transitions"] for k, v in last.items() if v["state"] not in TERMINAL}
        raise AssertionError(f"{exc}; not terminal (with their transitions): {stuck}") from None
    return last


def assert_nothing_lost(database: Any, effects: Effects, task_ids: list[str], *,
                        timeout: float = 90.0, killed_after_effect: Collection[str] = ()) -> dict[str, dict[str, Any]]:
    """The suite's common final check. Every accepted task reaches a terminal state; each SUCCEEDED
    task's effect is recorded exactly once; no task has more than one SUCCEEDED event; a task that did
    not succeed recorded no effect. Returns the tasks (:func:`read_tasks`) for scenario-specific checks.

    ``killed_after_effect``: tasks whose run was killed after its effect and before its outcome — the
    one window where at-least-once delivery runs an effect twice (docs/delivery.md): each may record
    its effect once or twice, never more, and still has exactly one SUCCEEDED event."""
    assert len(set(task_ids)) == len(task_ids)
    tasks = wait_terminal(database, task_ids, timeout=timeout)
    counts = effects.counts()
    for task_id, task in tasks.items():
        succeeded = task["transitions"].count("SUCCEEDED")
        if task["state"] == "SUCCEEDED":
            assert succeeded == 1, f"{task_id} has {succeeded} SUCCEEDED events: {task['transitions']}"
            allowed = (1, 2) if task_id in killed_after_effect else (1,)
            assert counts[task_id] in allowed, f"{task_id} recorded its effect {counts[task_id]} times"
        else:
            assert succeeded == 0, f"{task_id} ended {task['state']} after a success: {task['transitions']}"
            assert counts[task_id] == 0 or task_id in killed_after_effect, (
                f"{task_id} ended {task['state']} with {counts[task_id]} effect(s)")
    unknown = set(counts) - set(task_ids)
    assert not unknown, f"effects of tasks nobody submitted: {unknown}"
    return tasks


# --------------------------------------------------------------------------- private services


@pytest.fixture()
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """:attr:`Fault.STOP_REDIS`: a private ``redis-server`` (``.stop()`` / ``.start()``), killed at teardown.

    Request it before ``start_worker`` so the workers are stopped before it is killed."""
    with running_private_redis(tmp_path / "redis-server.log") as server:
        yield server


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


class PrivatePostgres:
    """:attr:`Fault.STOP_POSTGRES`: a throwaway PostgreSQL cluster (``initdb`` in a temp folder, a free port,
    trust auth on 127.0.0.1) that a test may stop and start; the shared server is never touched.

    PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres`` user."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="aios-faults-pg-"))
        self.data = self.dir / "data"
        self.log_path = self.dir / "server.log"
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/aios"
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        self._run([str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                   "--no-sync"], timeout=120)

    def _run(self, argv: list[str], timeout: float = 60.0) -> None:
        result = subprocess.run([*self._as, *argv], capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
            raise AssertionError(f"{argv[0]} failed ({result.returncode}): {result.stdout}{result.stderr}\n{log}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path), "-o", options,
                   "-w", "-t", "60", "start"], timeout=90)

    def stop(self) -> None:
        """Fast shutdown: open connections are cut, as in a real outage."""
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop"],
                  timeout=90)

    def create_database(self) -> None:
        import sqlalchemy as sa

        engine = sa.create_engine(f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres",
                                  isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.execute(sa.text("CREATE DATABASE aios"))
        finally:
            engine.dispose()

    def destroy(self) -> None:
        subprocess.run([*self._as, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture()
def private_postgres() -> Iterator[PrivatePostgres]:
    """A started, migrated private PostgreSQL (database ``aios``); destroyed at teardown."""
    bindir = _postgres_bin()
    if bindir is None:
        requirement_missing("PostgreSQL server binaries (/usr/lib/postgresql/*/bin)", "not installed")
    server = PrivatePostgres(bindir)
    try:
        server.start()
        server.create_database()
        from aios import migrate
        from aios.config import DatabaseSettings

        migrate.upgrade(DatabaseSettings(url=server.url))
        yield server
    finally:
        from aios.db import dispose_engines

        dispose_engines()
        server.destroy()


def settle(seconds: float) -> None:
    """Let a fault last ``seconds`` (a named pause, so a scenario reads as its timeline)."""
    time.sleep(seconds)
