"""The embedded default's broker (``sqlite:///var/broker.db``, :mod:`aios.broker.sqlite_transport`) with real
processes in an empty folder and no PostgreSQL or Redis: what ``make run`` gives a newcomer.

* 30 tasks of mixed priorities submitted while the only agent is busy start 9 first, FIFO within a
  level, and ``/api/v1/queues`` shows them per level while they wait (the Redis test, mirrored).
* Purge takes one level's waiting messages and cancels their tasks.
* ``celery inspect ping`` and ``/api/v1/workers`` answer (control fanout and replies cross processes).
* A message an agent had taken when it was SIGKILLed is delivered again after the visibility
  timeout and runs once.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from tests.conftest import wait_for
from tests.integration.test_embedded_up import clean_env, free_port, processes_in
from tests.support.agent_helpers import kill_tree

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ADMIN_PASSWORD = "embedded-broker-admin-Pw-2f8c"
VISIBILITY_S = 10
#: Long enough that 30 submits (and a queues read) happen while it runs, on a loaded machine too.
BLOCKER_S = 6
PER_LEVEL = 3
#: visibility_timeout_s must exceed task_timeout_s + timeout_grace_s, and retry_backoff_max_s stay below it.
SMALL_TIMEOUTS = {
    "AIOS_BROKER__VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
    "AIOS_ORCHESTRATOR__TASK_TIMEOUT_S": "8",
    "AIOS_ORCHESTRATOR__TIMEOUT_GRACE_S": "1",
    "AIOS_ORCHESTRATOR__RETRY_BACKOFF_MAX_S": "5",
    "AIOS_AGENTS__CONCURRENCY": "1",
    "AIOS_ADMIN_PASSWORD": ADMIN_PASSWORD,
}


@dataclass
class Embedded:
    """AIOS processes sharing ``cwd/var`` (aios.db, broker.db), and an admin session on their API."""

    cwd: Path
    url: str
    env: dict[str, str]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    http: requests.Session = field(default_factory=requests.Session)

    def start(self, *args: str, log: str) -> subprocess.Popen[bytes]:
        with (self.cwd / log).open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "aios.cli", *args],
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def log(self, name: str) -> str:
        path = self.cwd / name
        return path.read_text(errors="replace") if path.exists() else ""

    def login(self) -> None:
        def answered() -> bool:
            try:
                return requests.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_for(answered, timeout=90, interval=0.25, what="the API to answer /healthz")
        token = requests.post(
            f"{self.url}/api/v1/auth/token", data={"username": "admin", "password": ADMIN_PASSWORD}, timeout=10
        )
        assert token.status_code == 200, token.text
        self.http.headers["Authorization"] = f"Bearer {token.json()['access_token']}"

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.http.request(method, f"{self.url}{path}", timeout=30, **kwargs)

    def submit(self, body: dict[str, Any]) -> str:
        response = self.call("POST", "/api/v1/tasks", json=body)
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def ledger(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(f"file:{self.cwd / 'var' / 'aios.db'}?mode=ro", uri=True, timeout=15) as conn:
            return conn.execute(sql, params).fetchall()

    def states(self, task_ids: list[str]) -> dict[str, str]:
        marks = ",".join("?" * len(task_ids))
        return dict(self.ledger(f"SELECT id, state FROM tasks WHERE id IN ({marks})", *task_ids))

    def wait_states(self, task_ids: list[str], *wanted: str, timeout: float = 60) -> None:
        wait_for(
            lambda: set(self.states(task_ids).values()) <= set(wanted) and len(self.states(task_ids)) == len(task_ids),
            timeout=timeout,
            interval=0.2,
            what=f"{len(task_ids)} task(s) to be {wanted}",
        )

    def transitions(self, task_id: str) -> list[str]:
        return [
            row[0]
            for row in self.ledger(
                "SELECT to_state FROM task_events WHERE task_id = ? AND to_state IS NOT NULL ORDER BY id", task_id
            )
        ]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for pid in processes_in(self.cwd):  # never leave a stray agent or API worker behind
            os.kill(pid, signal.SIGKILL)


def make_embedded(folder: Path, **extra: str) -> Embedded:
    folder.mkdir()
    port = free_port()
    return Embedded(
        cwd=folder, url=f"http://127.0.0.1:{port}", env=clean_env(AIOS_API__PORT=str(port), **SMALL_TIMEOUTS, **extra)
    )


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Embedded]:
    """``aios up --migrate`` (what ``make run`` runs) with one agent of one pool process."""
    stack = make_embedded(tmp_path_factory.mktemp("embedded-broker") / "clean-machine")
    process = stack.start("up", "--migrate", log="up.log")
    try:
        stack.login()
        wait_for(lambda: "ready." in stack.log("up.log"), timeout=60, interval=0.25, what="the agent to be ready")
        yield stack
    finally:
        stack.stop()
        assert process.returncode is not None


def start_blocker(stack: Embedded) -> str:
    """A sleeping task that keeps the only pool process busy; returns once it runs."""
    blocker = stack.submit({"type": "sleep", "parameters": {"seconds": BLOCKER_S}, "queue": "default", "priority": 0})
    stack.wait_states([blocker], "RUNNING", timeout=60)
    return blocker


def levels_of(stack: Embedded, queue: str) -> dict[int, int]:
    response = stack.call("GET", f"/api/v1/queues/{queue}")
    assert response.status_code == 200, response.text
    return {level["priority"]: level["depth"] for level in response.json()["levels"]}


def test_thirty_waiting_tasks_start_nine_first_fifo_within_a_level_and_the_queue_shows_them_per_level(up):
    # Given the only agent (one pool process) busy with a sleeping task
    blocker = start_blocker(up)
    # When 30 echo tasks of priorities 0-9 (three per level) are submitted in shuffled order
    priorities = [level for level in range(10) for _ in range(PER_LEVEL)]
    random.Random(20240611).shuffle(priorities)
    submitted = [
        (up.submit({"type": "echo", "parameters": {"index": i}, "queue": "default", "priority": p}), p)
        for i, p in enumerate(priorities)
    ]
    # Then /api/v1/queues shows them waiting, three at each level, with the age of the oldest
    queue = up.call("GET", "/api/v1/queues/default").json()
    assert up.states([blocker])[blocker] == "RUNNING", "blocker finished before the tasks were all waiting"
    assert queue["depth"] == 30 and queue["oldest_age_s"] is not None, queue
    assert levels_of(up, "default") == {level: PER_LEVEL for level in range(10)}
    # And once the agent is free they all succeed
    ids = [task_id for task_id, _ in submitted]
    up.wait_states(ids, "SUCCEEDED", timeout=120)
    # And they started highest priority first, in submit order within a level
    marks = ",".join("?" * len(ids))
    started = [
        row[0]
        for row in up.ledger(
            f"SELECT task_id FROM task_events WHERE to_state = 'RUNNING' AND task_id IN ({marks}) ORDER BY id", *ids
        )
    ]
    expected = [task_id for task_id, _ in sorted(submitted, key=lambda item: (-item[1], ids.index(item[0])))]
    priority_of = dict(submitted)
    assert [priority_of[t] for t in started] == [priority_of[t] for t in expected], "not in priority order"
    assert started == expected, "not first-in-first-out within a priority"


def test_purging_one_level_cancels_its_waiting_tasks_and_leaves_the_others_to_run(up):
    # Given the only agent busy, four tasks waiting at priority 2 and two at priority 7
    start_blocker(up)
    low = [up.submit({"type": "echo", "parameters": {}, "queue": "default", "priority": 2}) for _ in range(4)]
    high = [up.submit({"type": "echo", "parameters": {}, "queue": "default", "priority": 7}) for _ in range(2)]
    # When level 2 of the queue is purged
    response = up.call("POST", "/api/v1/queues/default/purge", json={"priority": 2})
    # Then its four messages were taken out and their tasks cancelled, and level 7 still waits
    assert response.status_code == 200, response.text
    assert (response.json()["purged"], response.json()["cancelled"]) == (4, 4), response.json()
    assert levels_of(up, "default")[2] == 0
    assert set(up.states(low).values()) == {"CANCELLED"}
    # And the others still run once the agent is free
    up.wait_states(high, "SUCCEEDED", timeout=60)


def test_celery_inspect_ping_and_the_workers_route_answer_on_the_embedded_broker(up):
    # When `celery inspect ping` runs against the embedded default (what Flower and operators use)
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "aios.broker.celery_app", "inspect", "ping", "--timeout", "10"],
        cwd=up.cwd,
        env=up.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Then the agent answers (the broadcast reached it through the file, its reply came back)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pong" in done.stdout and "1 node online" in done.stdout, done.stdout
    # And AIOS's own view of the workers (the same control channel) lists it online
    workers = up.call("GET", "/api/v1/workers?fields=stats").json()["workers"]
    assert [w["online"] for w in workers] == [True], workers


@pytest.fixture()
def separate(tmp_path: Path) -> Iterator[Embedded]:
    """The API, and agents started by the test, as separate processes on one embedded folder (``aios up``
    would stop everything when its agent dies)."""
    stack = make_embedded(tmp_path / "separate", AIOS_SECURITY__JWT_SECRET="x" * 48)
    subprocess.run(
        [sys.executable, "-m", "aios.cli", "db", "upgrade"],
        cwd=stack.cwd,
        env=stack.env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    subprocess.run(
        [sys.executable, "-m", "aios.cli", "users", "create", "admin", "--role", "admin"],
        cwd=stack.cwd,
        env=stack.env,
        input=f"{ADMIN_PASSWORD}\n".encode(),
        check=True,
        capture_output=True,
        timeout=120,
    )
    stack.start("api", log="api.log")
    try:
        stack.login()
        yield stack
    finally:
        stack.stop()


def start_agent(stack: Embedded, name: str) -> subprocess.Popen[bytes]:
    agent = stack.start("worker", "--name", name, log=f"{name}.log")
    wait_for(lambda: "ready." in stack.log(f"{name}.log"), timeout=60, interval=0.25, what=f"agent {name} to start")
    return agent


def taken_messages(stack: Embedded) -> list[tuple[str, float]]:
    """(holder's delivery tag, when it waits again) of each message of the default queue an agent holds."""
    with sqlite3.connect(stack.cwd / "var" / "broker.db", timeout=15) as conn:
        return conn.execute(
            "SELECT taken_by, visible_at FROM messages WHERE taken_by IS NOT NULL AND queue = 'aios.default'"
        ).fetchall()


def test_a_message_taken_by_an_agent_that_is_sigkilled_is_delivered_again_after_the_visibility_timeout_and_runs_once(
    separate,
):
    # Given agent A, whose only pool process is stopped, so a message it takes is never started
    a = start_agent(separate, "a")
    pool = psutil.Process(a.pid).children(recursive=True)
    assert pool, "agent A has no pool process"
    for child in pool:
        child.send_signal(signal.SIGSTOP)
    # And a task whose message A has taken from the broker (held, not acked)
    task_id = separate.submit({"type": "echo", "parameters": {"n": 1}, "queue": "default", "priority": 5})
    ((_tag, visible_at),) = wait_for(
        lambda: taken_messages(separate), timeout=30, interval=0.1, what="agent A to take the message"
    )
    assert separate.states([task_id])[task_id] == "QUEUED"

    # When A is SIGKILLed with its pool, and agent B starts
    kill_tree(a.pid)
    start_agent(separate, "b")

    # Then the message is delivered again once its visibility timeout has passed, and the task runs on B
    separate.wait_states([task_id], "SUCCEEDED", timeout=VISIBILITY_S + 60)
    assert time.time() >= visible_at, "delivered again before the dead holder's deadline"
    # Once, by the broker's redelivery (no re-dispatch): one RUNNING and one SUCCEEDED in the ledger,
    # and nothing left in the broker
    assert separate.transitions(task_id) == ["PENDING", "QUEUED", "RUNNING", "SUCCEEDED"]
    assert separate.ledger("SELECT agent FROM tasks WHERE id = ?", task_id)[0][0].startswith("b@")
    # (B acks after the task returns, so the ledger's SUCCEEDED can be seen a moment before the ack)
    wait_for(lambda: taken_messages(separate) == [], timeout=30, interval=0.1, what="agent B to ack the message")
    with sqlite3.connect(separate.cwd / "var" / "broker.db", timeout=15) as conn:
        assert conn.execute("SELECT count(*) FROM messages WHERE queue = 'aios.default'").fetchone()[0] == 0
