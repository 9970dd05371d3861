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
import threading
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
    REDIS_OUT_OF_MEMORY = "the broker refuses writes over its maxmemory (noeviction), then is healthy again"
    STOP_POSTGRES = "stop and restart the database"
    CRASH_POSTGRES = "crash the database (pg_ctl stop -m immediate), then restart it"
    SIGKILL_POSTGRES = "SIGKILL the database's postmaster, then restart it"
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
    from aios.broker.inspection import shutdown

    shutdown(celery, settings, name)


def owner(workers: list[WorkerProcess], pid: int) -> WorkerProcess:
    """The worker whose pool runs process ``pid``."""
    for worker in workers:
        if pid in {c.pid for c in psutil.Process(worker.process.pid).children(recursive=True)}:
            return worker
    raise AssertionError(f"no worker runs pid {pid}")


def limit_redis_memory(client: Any, headroom_bytes: int) -> None:
    """:attr:`Fault.REDIS_OUT_OF_MEMORY`: Redis takes about ``headroom_bytes`` more, then answers every
    write with ``OOM`` (``maxmemory-policy noeviction``) while reads, pops and ``CONFIG`` still work.
    Commands are refused one by one, so a pipeline that crosses the limit lands part-way.
    ``headroom_bytes=0`` lifts the limit (healthy again). Use it on a private Redis only."""
    if headroom_bytes == 0:
        client.config_set("maxmemory", 0)
        return
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + headroom_bytes)


# --------------------------------------------------------------------------- effects ledger


@dataclass
class Effects:
    """The effects ledger of ``test.effect`` tasks: ``path`` gets ``<task id> <attempt>`` once per run
    that reached its end; ``path.started`` gets ``<task id> <attempt> <pid>`` when a run starts."""

    path: Path

    def params(self, sleep_s: float = 0.0, **more: Any) -> dict[str, Any]:
        return {"path": str(self.path), "sleep_s": sleep_s, **more}

    def task(
        self, queue: str, sleep_s: float = 0.0, *, params: dict[str, Any] | None = None, **fields: Any
    ) -> dict[str, Any]:
        """A submit body for one ``test.effect`` task on ``queue`` (``params``: more parameters)."""
        return {"type": "test.effect", "parameters": self.params(sleep_s, **(params or {})), "queue": queue, **fields}

    def counts(self) -> Counter[str]:
        """Effects per task id."""
        if not self.path.exists():
            return Counter()
        return Counter(line.split()[0] for line in self.path.read_text().splitlines() if line.strip())

    def notes(self, suffix: str = ".started") -> list[tuple[str, int, int]]:
        """``(task id, attempt, pid)`` of every line of the notes file ``path`` + ``suffix``, in order."""
        notes = Path(f"{self.path}{suffix}")
        if not notes.exists():
            return []
        rows = [line.split() for line in notes.read_text().splitlines() if line.strip()]
        return [(task_id, int(attempt), int(pid)) for task_id, attempt, pid in rows]

    def starts(self) -> list[tuple[str, int, int]]:
        """``(task id, attempt, pid)`` of every run that started, in order."""
        return self.notes(".started")

    def wait_noted(
        self,
        task_id: str,
        attempt: int = 1,
        timeout: float = 60.0,
        *,
        suffix: str = ".started",
        what: str | None = None,
    ) -> int:
        """Wait for the notes file ``path`` + ``suffix`` to name run ``attempt`` of ``task_id``; returns the pid
        it gives."""

        def found() -> int | None:
            return next((pid for t, a, pid in self.notes(suffix) if t == task_id and a == attempt), None)

        what = what or f"{self.path.name}{suffix} to note run {attempt} of {task_id}"
        return int(wait_for(found, timeout=timeout, interval=0.05, what=what))

    def wait_started(self, task_id: str, attempt: int = 1, timeout: float = 60.0) -> int:
        """Wait for run ``attempt`` of ``task_id`` to start; returns the pid of the process running it."""
        return self.wait_noted(task_id, attempt, timeout, what=f"run {attempt} of {task_id} to start")


@pytest.fixture()
def effects(tmp_path: Path) -> Effects:
    return Effects(tmp_path / "effects.txt")


#: The note a run's outcome leaves when the task moved on without it (:func:`workers.runner._not_finished`).
LATE_REPORT = "late report ignored"


def read_tasks(database: Any, task_ids: list[str]) -> dict[str, dict[str, Any]]:
    """id → ``{state, attempts, agent, transitions, late_reports}`` straight from the database
    (``late_reports``: outcomes of runs that no longer held the task, noted and ignored)."""
    from sqlalchemy import select

    from aios.db import session_scope
    from aios.models import Task, TaskEvent

    with session_scope(database) as session:
        rows = {
            row.id: row
            for row in session.execute(
                select(Task.id, Task.state, Task.attempts, Task.agent).where(Task.id.in_(task_ids))
            )
        }
        events = session.execute(
            select(TaskEvent.task_id, TaskEvent.to_state, TaskEvent.detail)
            .where(TaskEvent.task_id.in_(task_ids))
            .order_by(TaskEvent.id)
        ).all()
    tasks: dict[str, dict[str, Any]] = {}
    for task_id, row in rows.items():
        path = [e.to_state for e in events if e.task_id == task_id and e.to_state]
        late = sum(
            1
            for e in events
            if e.task_id == task_id and not e.to_state and str((e.detail or {}).get("note", "")).startswith(LATE_REPORT)
        )
        tasks[task_id] = {
            "state": row.state,
            "attempts": row.attempts,
            "agent": row.agent,
            "transitions": path,
            "late_reports": late,
        }
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


def assert_nothing_lost(
    database: Any,
    effects: Effects,
    task_ids: list[str],
    *,
    timeout: float = 90.0,
    killed_after_effect: Collection[str] = (),
    unguarded: Collection[str] = (),
) -> dict[str, dict[str, Any]]:
    """The suite's common final check. Every accepted task reaches a terminal state; each SUCCEEDED
    task's effect is recorded exactly once; no task has more than one SUCCEEDED event; a task that did
    not succeed recorded no effect. Returns the tasks (:func:`read_tasks`) for scenario-specific checks.

    ``killed_after_effect``: tasks whose run was killed after its effect and before its outcome — the
    one window where at-least-once delivery runs an effect twice (docs/delivery.md): each may record
    its effect once more, never more, and still has exactly one SUCCEEDED event.

    ``unguarded``: tasks that act without checking their fence, in a scenario where a run can be fenced
    off after acting (a claim lost in a database crash): such a task may record one more effect per
    late report on its timeline (at least once), never more, and never a second outcome."""
    assert len(set(task_ids)) == len(task_ids)
    tasks = wait_terminal(database, task_ids, timeout=timeout)
    counts = effects.counts()
    for task_id, task in tasks.items():
        succeeded = task["transitions"].count("SUCCEEDED")
        extra = (task["late_reports"] if task_id in unguarded else 0) + (task_id in killed_after_effect)
        if task["state"] == "SUCCEEDED":
            assert succeeded == 1, f"{task_id} has {succeeded} SUCCEEDED events: {task['transitions']}"
            assert 1 <= counts[task_id] <= 1 + extra, f"{task_id} recorded its effect {counts[task_id]} times"
        else:
            assert succeeded == 0, f"{task_id} ended {task['state']} after a success: {task['transitions']}"
            assert counts[task_id] <= extra, f"{task_id} ended {task['state']} with {counts[task_id]} effect(s)"
    unknown = set(counts) - set(task_ids)
    assert not unknown, f"effects of tasks nobody submitted: {unknown}"
    return tasks


# --------------------------------------------------------------------------- load


class Submitter(threading.Thread):
    """Submits one ``test.effect`` task every ``interval_s`` until stopped, through :meth:`post`; keeps the
    ids answered 202, their states, and every other answer (a status, or the name of a client error).
    With ``alternate_guard``, every other task is guarded (``check_fence``, waiting for a definite answer)."""

    def __init__(self, effects: Any, queue: str, interval_s: float, *, alternate_guard: bool) -> None:
        super().__init__(daemon=True)
        self.effects, self.queue, self.interval_s, self.alternate_guard = effects, queue, interval_s, alternate_guard
        self.guarded: list[str] = []
        self.unguarded: list[str] = []
        self.states: list[str] = []
        self.refused: list[int | str] = []
        self.done = threading.Event()

    def post(self, body: dict[str, Any]) -> tuple[int | str, Any]:
        """``(status, JSON answer)`` of one submission, or ``(error name, None)``."""
        raise NotImplementedError

    def run(self) -> None:
        n = 0
        while not self.done.is_set():
            guard = self.alternate_guard and n % 2 == 0
            n += 1
            params = {"check_fence": True, "fence_wait_s": 120} if guard else {}
            status, answer = self.post(self.effects.task(self.queue, sleep_s=0.3, params=params))
            if status == 202:
                (self.guarded if guard else self.unguarded).append(answer["id"])
                self.states.append(answer["state"])
            else:
                self.refused.append(status)
            self.done.wait(self.interval_s)

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=60)

    @property
    def accepted(self) -> list[str]:
        return self.guarded + self.unguarded


class HttpSubmitter(Submitter):
    """A :class:`Submitter` to a real API over HTTP, alternating guarded and unguarded tasks (a refused
    answer is 503 while the database is down, or the name of the connection error)."""

    def __init__(self, url: str, key: str, effects: Any, queue: str, interval_s: float = 0.25) -> None:
        import requests

        super().__init__(effects, queue, interval_s, alternate_guard=True)
        self.url = url
        self.session = requests.Session()
        self.session.headers["X-API-Key"] = key

    def post(self, body: dict[str, Any]) -> tuple[int | str, Any]:
        import requests

        try:
            answer = self.session.post(f"{self.url}/api/v1/tasks", timeout=30, json=body)
        except requests.RequestException as exc:
            return type(exc).__name__, None
        return answer.status_code, answer.json() if answer.status_code == 202 else None

    def stop(self) -> None:
        super().stop()
        self.session.close()


def submit_through_redis_outage(
    submitter: Submitter, redis_server: PrivateRedis, outage_s: float, *, first_runs: int
) -> float:
    """Start ``submitter``; once ``first_runs`` tasks have run, stop ``redis_server`` for ``outage_s`` and start
    it again (empty if it keeps nothing); keep submitting 3 s more, then stop the submitter. Returns the
    time (``time.time()``) Redis stopped."""
    submitter.start()
    try:
        wait_for(lambda: len(submitter.effects.counts()) >= first_runs, timeout=60, what="the first tasks to run")
        stopped_at = time.time()
        redis_server.stop()
        settle(outage_s)
        redis_server.start()
        settle(3)
    finally:
        submitter.stop()
    return stopped_at


@dataclass
class System:
    """An API, agents and a beat on one private database: what a scenario that breaks a service runs."""

    database: Any
    admin: Any
    api: Any
    workers: list[WorkerProcess]
    beat: Any

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [self.api.process, *(w.process for w in self.workers), self.beat.process]


#: The beat's sync job every 2 s, treating a PENDING/QUEUED task as forgotten after 2 s.
FAST_SYNC = {"AIOS_ORCHESTRATOR__SYNC_INTERVAL_S": "2", "AIOS_ORCHESTRATOR__LOST_MESSAGE_GRACE_S": "2"}


def start_system(
    stack: Any,
    database_url: str,
    queue: str,
    *,
    start_api: Any,
    start_worker: Any,
    start_beat: Any,
    env: dict[str, str] | None = None,
    agents: int = 2,
) -> System:
    """A real ``aios api``, ``agents`` agents (two pool processes each) on ``queue`` and a leading ``aios beat``
    (:data:`FAST_SYNC`), all on the database at ``database_url`` (plus ``env``), and an admin's key."""
    from tests.conftest import make_user

    env = {"AIOS_DATABASE__URL": database_url, **FAST_SYNC, **(env or {})}
    private = stack.override(database={"url": database_url})
    admin = make_user(private, "admin")
    api = start_api(env=env)
    workers = [start_worker([queue], concurrency=2, env=env) for _ in range(agents)]
    beat = start_beat(env=env)
    wait_for(lambda: beat.is_leader, timeout=60, interval=0.2, what="the beat to lead")
    return System(private.settings.database, admin, api, workers, beat)


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

    PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres`` user.

    ``fsync`` off by default (nothing here survives a machine crash, and it saves time); on for the crash
    tests (:attr:`Fault.CRASH_POSTGRES`, :attr:`Fault.SIGKILL_POSTGRES`), so the cluster runs as in
    production when its processes die."""

    def __init__(self, bindir: Path, *, fsync: bool = False) -> None:
        self.bindir = bindir
        self.fsync = fsync
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="aios-faults-pg-"))
        self.data = self.dir / "data"
        self.log_path = self.dir / "server.log"
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/aios"
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        self._run(
            [str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"],
            timeout=120,
        )

    def _run(self, argv: list[str], timeout: float = 60.0) -> None:
        result = subprocess.run([*self._as, *argv], capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
            raise AssertionError(f"{argv[0]} failed ({result.returncode}): {result.stdout}{result.stderr}\n{log}")

    def start(self) -> None:
        fsync = "on" if self.fsync else "off"
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync={fsync}"
        self._run(
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log_path),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            ],
            timeout=90,
        )

    def stop(self) -> None:
        """Fast shutdown: open connections are cut, as in a real outage."""
        self._run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop"], timeout=90
        )

    def crash(self) -> None:
        """:attr:`Fault.CRASH_POSTGRES`: immediate shutdown. Every server process quits at once (SIGQUIT),
        nothing is written or checkpointed: the next :meth:`start` runs crash recovery from the WAL, and
        what was still in the WAL buffers (commits that did not wait for their flush) is gone."""
        self._run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "-t", "60", "stop"], timeout=90
        )

    def kill_postmaster(self, timeout: float = 30.0) -> None:
        """:attr:`Fault.SIGKILL_POSTGRES`: SIGKILL the postmaster. Its backends notice its death and exit
        (a new postmaster cannot start while they hold the old shared memory), so this waits for them;
        one still there after ``timeout`` is SIGKILLed too. The next :meth:`start` runs crash recovery."""
        postmaster = psutil.Process(int((self.data / "postmaster.pid").read_text().split()[0]))
        children = postmaster.children(recursive=True)
        postmaster.kill()
        _, alive = psutil.wait_procs([postmaster, *children], timeout=timeout)
        for process in alive:
            process.kill()
        psutil.wait_procs(alive, timeout=10)

    def create_database(self) -> None:
        import sqlalchemy as sa

        engine = sa.create_engine(
            f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres", isolation_level="AUTOCOMMIT"
        )
        try:
            with engine.connect() as connection:
                connection.execute(sa.text("CREATE DATABASE aios"))
        finally:
            engine.dispose()

    def destroy(self) -> None:
        subprocess.run(
            [*self._as, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture()
def private_postgres() -> Iterator[PrivatePostgres]:
    """A started, migrated private PostgreSQL (database ``aios``); destroyed at teardown."""
    yield from _running_postgres(fsync=False)


@pytest.fixture()
def durable_postgres() -> Iterator[PrivatePostgres]:
    """The same with ``fsync`` on: for the tests that crash it."""
    yield from _running_postgres(fsync=True)


def _running_postgres(*, fsync: bool) -> Iterator[PrivatePostgres]:
    bindir = _postgres_bin()
    if bindir is None:
        requirement_missing("PostgreSQL server binaries (/usr/lib/postgresql/*/bin)", "not installed")
    server = PrivatePostgres(bindir, fsync=fsync)
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
