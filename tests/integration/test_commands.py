"""POST /api/v1/commands end to end: real `aios worker` agents, real programs, real resource limits.

One agent has ``command_allowlist = ["echo", "python3", "sleep", "yes", "sh", "cat"]`` (so it announces
the capability ``command``) and runs them as the unprivileged ``aios-cmd-test``; another has none (so it
must never get a command). Every command runs on the first. The sandbox itself (user, cgroup, what a
command cannot reach) is tested in test_command_sandbox.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from aios.db import session_scope
from aios.models import Agent
from tests.conftest import REPO_ROOT, Credentials, Stack, WorkerProcess, authorize, make_user, wait_for
from tests.support.command_user import ensure_command_user

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ALLOWLIST = ["echo", "python3", "sleep", "yes", "sh", "cat"]
AGENT_ENV = {"AIOS_AGENTS__HEARTBEAT_INTERVAL_S": "1.0"}
TERMINAL = ("SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELLED", "DEAD")
#: Generous: the machine is shared and sometimes slow.
FINISH_S = 90


def launch(stack: Stack, directory: Path, name: str, env: dict[str, str]) -> WorkerProcess:
    """One real agent (the start_worker fixture's command), shared by the tests of this module."""
    hostname = f"{name}@aios-test"
    log_path = directory / f"{name}.log"
    with log_path.open("wb") as handle:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "aios.cli",
                "worker",
                "--name",
                hostname,
                "--queues",
                f"q{name}",
                "--concurrency",
                "2",
            ],
            env={**stack.env, **AGENT_ENV, **env},
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=str(REPO_ROOT),
        )
    worker = WorkerProcess(name=name, hostname=hostname, process=process, log_path=log_path)

    def online() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"agent {name} exited:\n{worker.log()[-3000:]}")
        with session_scope(stack.settings.database) as session:
            agent = session.get(Agent, hostname)
            return agent is not None and agent.status == "ONLINE"

    wait_for(online, timeout=90, interval=0.3, what=f"agent {name} to be ONLINE")
    return worker


@pytest.fixture(scope="module")
def agents(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, WorkerProcess]]:
    tag = uuid.uuid4().hex[:6]
    directory = tmp_path_factory.mktemp("commands")
    started: dict[str, WorkerProcess] = {}
    try:
        started["runner"] = launch(
            stack,
            directory,
            f"cmd-{tag}",
            {
                "AIOS_AGENTS__COMMAND_ALLOWLIST": json.dumps(ALLOWLIST),
                "AIOS_AGENTS__COMMAND_USER": ensure_command_user(),
            },
        )
        started["closed"] = launch(stack, directory, f"nocmd-{tag}", {})
        yield started
    finally:
        for worker in started.values():
            worker.stop()


@pytest.fixture(scope="module")
def operator(stack: Stack, pg_url: str) -> Credentials:
    return make_user(stack, "operator")


@pytest.fixture()
def op(api_app: Any, operator: Credentials) -> Any:
    return authorize(api_app.test_client(), operator.key)


def run(api: Any, ledger: Any, body: dict[str, Any], *, expect_status: int = 202) -> dict[str, Any]:
    """Submit a command and return its task once it is finished (as GET /tasks/{id} shows it)."""
    answer = api.post("/api/v1/commands", json=body)
    assert answer.status_code == expect_status, answer.json
    task_id = answer.json["id"]
    ledger.wait_state(task_id, *TERMINAL, timeout=FINISH_S)
    task = api.get(f"/api/v1/tasks/{task_id}").json
    assert task["type"] == "command"
    return task


def group_members(pgid: int) -> list[int]:
    """Live processes of the group. A zombie is dead: killed, waiting for init (its new parent) to reap it."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


# --------------------------------------------------------------------------- the acceptance bullets


def test_echo_on_an_allowlisted_agent_succeeds_and_with_wait_s_comes_back_in_the_same_call(agents, op, ledger):
    # When an operator posts echo hi and waits up to 60 s
    started = time.monotonic()
    answer = op.post("/api/v1/commands", json={"argv": ["echo", "hi"], "wait_s": 60})
    # Then the same call answers 200 with the finished task and its result
    assert answer.status_code == 200, answer.json
    task = answer.json
    assert task["state"] == "SUCCEEDED", task
    assert task["result"]["exit_code"] == 0 and task["result"]["signal"] is None
    assert task["result"]["stdout"] == "hi\n" and task["result"]["stderr"] == ""
    assert task["result"]["stdout_truncated"] is False and task["result"]["stderr_truncated"] is False
    assert task["result"]["cpu_s"] >= 0 and task["result"]["max_rss_kb"] > 0
    assert task["agent"] == agents["runner"].hostname
    assert answer.headers["Location"].endswith(f"/api/v1/tasks/{task['id']}")
    assert time.monotonic() - started < 60


def test_without_wait_s_the_call_answers_202_and_the_task_finishes_later(agents, op, ledger):
    answer = op.post("/api/v1/commands", json={"argv": ["echo", "later"]})
    assert answer.status_code == 202, answer.json
    assert answer.json["state"] in ("PENDING", "QUEUED", "RUNNING", "SUCCEEDED")
    finished = ledger.wait_state(answer.json["id"], *TERMINAL, timeout=FINISH_S)
    assert finished.state == "SUCCEEDED" and finished.result["stdout"] == "later\n"
    assert finished.owner == answer.json["owner"]


def test_a_wait_too_short_for_the_command_answers_202_with_the_unfinished_task(agents, op, ledger):
    answer = op.post("/api/v1/commands", json={"argv": ["sleep", "3"], "wait_s": 0.5})
    assert answer.status_code == 202, answer.json
    assert answer.json["state"] not in TERMINAL
    assert ledger.wait_state(answer.json["id"], *TERMINAL, timeout=FINISH_S).state == "SUCCEEDED"


def test_a_command_not_on_the_allowlist_fails_not_allowed_and_nothing_runs(agents, op, ledger, tmp_path):
    # Given a program that would leave a marker file if it ran
    marker = tmp_path / "ran"
    # When it is submitted (touch is not on the allowlist)
    task = run(op, ledger, {"argv": ["touch", str(marker)]})
    # Then the task is FAILED with reason not_allowed, no result, and the file does not exist
    assert task["state"] == "FAILED"
    assert task["error"].startswith("not_allowed"), task["error"]
    assert task["result"] is None
    assert task["attempts"] == 1
    assert not marker.exists()


def test_a_path_spelling_of_an_allowed_name_is_not_allowed(agents, op, ledger, tmp_path):
    marker = tmp_path / "ran"
    task = run(op, ledger, {"argv": ["/bin/sh", "-c", f"touch {marker}"]})
    assert task["state"] == "FAILED" and task["error"].startswith("not_allowed")
    assert not marker.exists()


def test_shell_metacharacters_are_literal_arguments(agents, op, ledger, tmp_path):
    # Given arguments a shell would act on
    victim = tmp_path / "x"
    victim.write_text("still here")
    argv = ["echo", f"a; rm -rf {victim}", "$(id)", "|", ">", "`id`", "*"]
    # When echo runs with them
    task = run(op, ledger, {"argv": argv, "wait_s": 60}, expect_status=200)
    # Then they come back exactly, joined by spaces, and nothing was removed
    assert task["state"] == "SUCCEEDED"
    assert task["result"]["stdout"] == " ".join(argv[1:]) + "\n"
    assert victim.read_text() == "still here"


def test_a_cpu_bound_command_is_killed_by_its_cpu_limit(agents, op, ledger):
    # When an endless loop runs with cpu_s 1 (and a wall time far away)
    task = run(op, ledger, {"argv": ["python3", "-c", "while True: pass"], "timeout_s": 120, "limits": {"cpu_s": 1}})
    # Then its cgroup's CPU limit (or, without a cgroup, RLIMIT_CPU's signal) ended it after about one CPU second
    assert task["state"] == "FAILED", task
    result = task["result"]
    assert result["signal"] in ("SIGXCPU", "SIGKILL") and result["exit_code"] is None
    assert 0.8 <= result["cpu_s"] <= 3, result
    assert result["timed_out"] is False
    assert task["error"].startswith(("cpu_limit", "signal")), task["error"]


def test_a_command_allocating_1_gib_with_memory_mb_200_fails_and_a_smaller_one_succeeds(agents, op, ledger):
    # When a program allocates 1 GiB under a 200 MiB address-space limit
    big = run(op, ledger, {"argv": ["python3", "-c", "b = bytearray(1 << 30)"], "limits": {"memory_mb": 200}})
    # Then it fails (MemoryError, exit 1), the result stored on the FAILED task
    assert big["state"] == "FAILED", big
    assert big["result"]["exit_code"] == 1 and "MemoryError" in big["result"]["stderr"]
    assert big["error"].startswith("exit_status")
    # And 50 MiB under the same limit is fine: it is the limit that refused the big one
    small = run(
        op, ledger, {"argv": ["python3", "-c", "b = bytearray(50 << 20); print(len(b))"], "limits": {"memory_mb": 200}}
    )
    assert small["state"] == "SUCCEEDED", small
    assert small["result"]["stdout"] == f"{50 << 20}\n"


def test_sleep_past_its_timeout_ends_timed_out_and_no_process_of_its_group_survives(agents, op, ledger):
    # When sleep 30 runs with timeout_s 2
    started = time.monotonic()
    task = run(op, ledger, {"argv": ["sleep", "30"], "timeout_s": 2})
    # Then it is TIMED_OUT well before 30 s, with its partial result
    assert task["state"] == "TIMED_OUT", task
    assert time.monotonic() - started < 25
    assert task["result"]["timed_out"] is True and task["result"]["signal"] == "SIGTERM"
    assert task["error"].startswith("timed_out")
    # And nothing of its process group is alive
    assert group_members(task["result"]["pid"]) == []


def test_a_group_that_ignores_sigterm_is_killed_at_the_wall_time_too(agents, op, ledger):
    # Given a shell that ignores SIGTERM, with a background child that inherits that
    task = run(op, ledger, {"argv": ["sh", "-c", "trap '' TERM; sleep 60 & sleep 60"], "timeout_s": 2})
    # Then SIGKILL follows the grace period: TIMED_OUT, and no member of the group survives
    assert task["state"] == "TIMED_OUT", task
    assert task["result"]["signal"] == "SIGKILL"
    assert group_members(task["result"]["pid"]) == []


def test_yes_with_output_kb_64_returns_64_kib_and_a_truncation_flag(agents, op, ledger):
    # When yes (endless output) runs with output_kb 64 until its wall time
    task = run(op, ledger, {"argv": ["yes"], "timeout_s": 2, "limits": {"output_kb": 64}})
    # Then exactly 64 KiB of it are kept, the rest counted, and the flag is set
    result = task["result"]
    assert task["state"] == "TIMED_OUT", task
    assert result["stdout"] == "y\n" * 32768
    assert len(result["stdout"].encode()) == 65536
    assert result["stdout_truncated"] is True and result["stdout_bytes"] > 65536
    assert result["stderr_truncated"] is False


def test_output_past_the_limit_of_a_command_that_ends_is_cut_and_counted(agents, op, ledger):
    task = run(
        op,
        ledger,
        {"argv": ["sh", "-c", "yes | head -c 1000000"], "limits": {"output_kb": 64}, "wait_s": 60},
        expect_status=200,
    )
    assert task["state"] == "SUCCEEDED"
    assert len(task["result"]["stdout"]) == 65536 and task["result"]["stdout_truncated"] is True
    assert task["result"]["stdout_bytes"] == 1_000_000


def test_a_non_zero_exit_fails_with_its_output_and_exit_code_stored(agents, op, ledger):
    task = run(op, ledger, {"argv": ["sh", "-c", "echo out; echo err >&2; exit 3"]})
    assert task["state"] == "FAILED" and task["attempts"] == 1
    assert task["result"]["exit_code"] == 3
    assert task["result"]["stdout"] == "out\n" and task["result"]["stderr"] == "err\n"
    assert task["error"].startswith("exit_status")


def test_env_and_cwd_reach_the_command_and_nothing_else_of_the_agent_s_environment(agents, op, ledger, tmp_path):
    task = run(
        op,
        ledger,
        {
            "argv": ["sh", "-c", 'echo "$GREETING|$(pwd)|${AIOS_DATABASE__URL:-unset}"'],
            "env": {"GREETING": "hello"},
            "cwd": str(tmp_path),
        },
    )
    assert task["state"] == "SUCCEEDED", task
    assert task["result"]["stdout"] == f"hello|{tmp_path.resolve()}|unset\n"


def test_a_missing_working_directory_fails_bad_cwd(agents, op, ledger, tmp_path):
    task = run(op, ledger, {"argv": ["echo", "x"], "cwd": str(tmp_path / "missing")})
    assert task["state"] == "FAILED" and task["error"].startswith("bad_cwd")


# --------------------------------------------------------------------------- limits and roles


def test_an_operator_may_lower_limits_but_not_raise_them_and_an_admin_may(agents, op, client, stack, ledger):
    # Given the system limits in force
    limits = client.get("/api/v1/system/limits").json["limits"]
    above = {"cpu_s": limits["command_cpu_s"] + 1}
    # When an operator asks for more CPU than the limit / Then 422 naming the field, and no task
    refused = op.post("/api/v1/commands", json={"argv": ["echo", "x"], "limits": above})
    assert refused.status_code == 422, refused.json
    assert refused.json["field"] == "limits.cpu_s" and "command_cpu_s" in refused.json["message"]
    longer = op.post("/api/v1/commands", json={"argv": ["echo", "x"], "timeout_s": limits["command_wall_s"] + 1})
    assert longer.status_code == 422 and longer.json["field"] == "timeout_s"
    # And an admin may raise it, and the agent honours it
    raised = client.post("/api/v1/commands", json={"argv": ["echo", "x"], "limits": above, "wait_s": 60})
    assert raised.status_code == 200, raised.json
    assert raised.json["state"] == "SUCCEEDED"
    assert raised.json["result"]["limits"]["cpu_s"] == above["cpu_s"]


def test_an_operator_cannot_raise_a_limit_through_post_tasks_either(agents, op, ledger):
    # When an operator submits a command task through the generic endpoint with a raised limit
    answer = op.post(
        "/api/v1/tasks",
        json={"type": "command", "parameters": {"argv": ["echo", "x"], "limits": {"memory_mb": 1_000_000}}},
    )
    assert answer.status_code == 202, answer.json
    # Then the agent refuses to run it
    task = ledger.wait_state(answer.json["id"], *TERMINAL, timeout=FINISH_S)
    assert task.state == "FAILED" and task.error.startswith("limit_exceeded"), task.error
    assert task.result is None


def test_a_viewer_may_not_submit_commands(api_app, stack, agents):
    viewer = authorize(api_app.test_client(), make_user(stack, "viewer").key)
    answer = viewer.post("/api/v1/commands", json={"argv": ["echo", "x"]})
    assert answer.status_code == 403


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "argv"),
        ({"argv": []}, "argv"),
        ({"argv": ["echo", ""]}, "argv.1"),
        ({"argv": ["x"] * 257}, "argv"),
        ({"argv": ["echo"], "env": {"PATH": "/tmp"}}, "env"),
        ({"argv": ["echo"], "env": {"LD_PRELOAD": "x"}}, "env"),
        ({"argv": ["echo"], "env": {"A": 1}}, "env.A"),
        ({"argv": ["echo"], "wait_s": 61}, "wait_s"),
        ({"argv": ["echo"], "wait_s": -1}, "wait_s"),
        ({"argv": ["echo"], "limits": {"cpu_s": "1"}}, "limits.cpu_s"),
        ({"argv": ["echo"], "limits": {"memory_mb": 8}}, "limits.memory_mb"),
        ({"argv": ["echo"], "priority": 10}, "priority"),
        ({"argv": ["echo"], "shell": True}, "shell"),
    ],
)
def test_bad_command_bodies_are_422_naming_the_field(op, body, field):
    answer = op.post("/api/v1/commands", json=body)
    assert answer.status_code == 422, answer.json
    assert answer.json["field"] == field, answer.json


# --------------------------------------------------------------------------- routing


def test_commands_go_only_to_agents_with_the_command_capability(agents, op, ledger, stack):
    # Given an agent with an allowlist and one without
    with session_scope(stack.settings.database) as session:
        runner = session.get(Agent, agents["runner"].hostname)
        closed = session.get(Agent, agents["closed"].hostname)
        assert "command" in runner.capabilities
        assert "command" not in closed.capabilities and "echo" in closed.capabilities
    # When several commands are submitted without a pin
    ids = [op.post("/api/v1/commands", json={"argv": ["echo", str(n)]}).json["id"] for n in range(4)]
    # Then every one ran on the agent with the capability
    for task_id in ids:
        task = ledger.wait_state(task_id, *TERMINAL, timeout=FINISH_S)
        assert task.state == "SUCCEEDED" and task.agent == agents["runner"].hostname
    # And pinning a command to the agent without it is refused
    pinned = op.post("/api/v1/commands", json={"argv": ["echo", "x"], "agent": agents["closed"].hostname})
    assert pinned.status_code == 409, pinned.json


def test_cancelling_a_running_command_kills_its_whole_group(agents, op, ledger, stack):
    # Given a command with a background child, running
    answer = op.post("/api/v1/commands", json={"argv": ["sh", "-c", "sleep 120 & sleep 120"], "timeout_s": 300})
    assert answer.status_code == 202, answer.json
    task_id = answer.json["id"]
    ledger.wait_state(task_id, "RUNNING", timeout=FINISH_S)
    pgid = wait_for(
        lambda: next(
            (
                p.pid
                for p in psutil.process_iter(["cmdline"])
                if p.info["cmdline"] == ["sh", "-c", "sleep 120 & sleep 120"]
            ),
            None,
        ),
        timeout=30,
        what="the command's shell to start",
    )
    assert len(group_members(pgid)) >= 2
    # When its owner cancels it
    cancelled = op.delete(f"/api/v1/tasks/{task_id}")
    assert cancelled.status_code == 200, cancelled.json
    # Then the task is CANCELLED and no process of the command's group is left
    assert ledger.wait_state(task_id, "CANCELLED").state == "CANCELLED"
    wait_for(lambda: group_members(pgid) == [], timeout=30, what="the command's process group to be gone")


def test_a_command_task_s_own_time_limit_also_ends_it_timed_out_with_its_group_killed(agents, op, ledger):
    # Given a command task submitted through POST /tasks with a task timeout of 3 s and no wall time
    answer = op.post(
        "/api/v1/tasks",
        json={"type": "command", "timeout_s": 3, "parameters": {"argv": ["sh", "-c", "sleep 60 & sleep 60"]}},
    )
    assert answer.status_code == 202, answer.json
    # Then the wall time is the task's time limit: TIMED_OUT, and nothing of its group is left
    task = ledger.wait_state(answer.json["id"], *TERMINAL, timeout=FINISH_S)
    assert task.state == "TIMED_OUT", (task.state, task.error)
    if task.result is not None:  # our deadline won the race with Celery's soft time limit (it usually does)
        assert task.result["limits"]["wall_s"] == 3
        wait_for(lambda: group_members(task.result["pid"]) == [], timeout=10, what="the group to be gone")
