"""The command sandbox on real agents: commands run as an unprivileged user, in a cgroup of their own.

Defect 1 (operator → admin through an allowlisted program) and defect 9 (limits per process, not per
command) of issue 15: with ``cat`` allowlisted a command read the JWT key, the agent's environ and
backups; five children each used the memory limit, three the CPU limit; a ``setsid`` child outlived
its command; a command could ``kill -9`` its agent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from aios.ops.backup import create_backup
from aios.security.secrets import ensure_secret_file
from tests.conftest import (
    REPO_ROOT,
    TEST_JWT_SECRET,
    Stack,
    WorkerProcess,
    authorize,
    make_user,
    service_missing,
    settings_from_env,
    wait_for,
)
from tests.integration.test_commands import launch, run
from tests.support.command_user import ensure_command_user

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ALLOWLIST = ["sh", "cat", "python3", "sleep"]
#: In the agent's environment, so a leak of its environ shows in a command's output.
MARKER = f"agent-only-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def agent(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    worker = launch(
        stack,
        tmp_path_factory.mktemp("sandbox"),
        f"sbx-{uuid.uuid4().hex[:6]}",
        {
            "AIOS_AGENTS__COMMAND_ALLOWLIST": json.dumps(ALLOWLIST),
            "AIOS_AGENTS__COMMAND_USER": ensure_command_user(),
            "AIOS_TEST_MARKER": MARKER,
        },
    )
    try:
        yield worker
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def op(api_app: Any, stack: Stack) -> Any:
    return authorize(api_app.test_client(), make_user(stack, "operator").key)


@pytest.fixture()
def open_dir() -> Iterator[Path]:
    """A directory every user may enter (755), like a checkout: only the files' own modes protect them."""
    directory = Path(tempfile.mkdtemp(prefix="aios-sandbox-test-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        subprocess.run(["rm", "-rf", str(directory)], check=False)


def with_cgroup(task: dict[str, Any]) -> dict[str, Any]:
    """The task, if its command ran in a cgroup; else skip (fail under CI): the test needs one."""
    if not task["result"]["sandbox"]["cgroup"]:
        service_missing("a cgroup for commands (root and a writable cgroupfs)", RuntimeError(task["result"]["sandbox"]))
    return task


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --------------------------------------------------------------------------- defect 1


def test_a_command_cannot_read_the_jwt_key_the_agent_s_environ_or_a_backup(agent, op, ledger, stack, open_dir):
    # Given the agent's secrets as AIOS makes them: a signing key file, a backup, its own environment
    key = ensure_secret_file(open_dir / "var" / "jwt_secret")
    (open_dir / "var").chmod(0o755)
    backup = create_backup(settings_from_env({**stack.env, "AIOS_BACKUP__DIR": str(open_dir / "backups")}))
    secrets = [key.read_text(), MARKER, TEST_JWT_SECRET]
    # When an operator's allowlisted cat asks for each of them
    for path in (str(key), f"/proc/{agent.process.pid}/environ", backup["path"]):
        task = run(op, ledger, {"argv": ["cat", path]})
        # Then the command fails (permission denied) and its output has none of the secrets
        assert task["state"] == "FAILED", (path, task)
        assert task["error"].startswith("exit_status"), task["error"]
        assert "Permission denied" in task["result"]["stderr"], task["result"]
        output = task["result"]["stdout"] + task["result"]["stderr"]
        assert not any(secret in output for secret in secrets), path
        assert task["result"]["sandbox"]["user"] == ensure_command_user()


def test_a_command_cannot_kill_its_agent(agent, op, ledger):
    # When a command sends SIGKILL to the agent's pool process (its parent) and to the agent itself
    task = run(op, ledger, {"argv": ["sh", "-c", f"kill -9 $PPID {agent.process.pid}"]})
    # Then the kill is refused, and the agent lives and runs the next command
    assert task["state"] == "FAILED" and task["error"].startswith("exit_status"), task
    assert "not permitted" in task["result"]["stderr"].lower(), task["result"]
    assert agent.process.poll() is None
    assert run(op, ledger, {"argv": ["sh", "-c", "echo alive"]})["result"]["stdout"] == "alive\n"


def test_a_command_starts_in_a_private_directory_of_its_user_that_is_removed_after(agent, op, ledger):
    task = run(op, ledger, {"argv": ["sh", "-c", 'pwd; stat -c "%U %a" .; echo "$HOME"; id -un']})
    assert task["state"] == "SUCCEEDED", task
    where, owner_mode, home, user = task["result"]["stdout"].splitlines()
    assert owner_mode == f"{ensure_command_user()} 700" and home == where and user == ensure_command_user()
    assert not Path(where).exists()


@pytest.mark.parametrize("user", ["root", "self", "missing", "none"])
def test_an_agent_with_an_allowlist_refuses_to_start_running_commands_as_root_as_itself_or_unset(stack, user):
    # Given an agent whose command_user is root, its own user (root too where the tests run as root),
    # a user that does not exist, or not set
    env = {**stack.env, "AIOS_AGENTS__COMMAND_ALLOWLIST": '["echo"]'}
    given = {"root": "root", "self": psutil.Process().username(), "missing": "no-such-user-aios"}
    if user in given:
        env["AIOS_AGENTS__COMMAND_USER"] = given[user]
    # When it starts / Then it stops at once with exit status 2 and a message naming the key and the fix
    done = subprocess.run(
        [sys.executable, "-m", "aios.cli", "worker", "--name", f"refuse-{user}@aios-test"],
        env=env,
        cwd=str(REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "agents.command_user" in done.stderr and "useradd --system" in done.stderr, done.stderr[-2000:]


# --------------------------------------------------------------------------- defect 9


def test_five_children_of_70_mb_under_memory_mb_150_are_stopped_together(agent, op, ledger):
    # Given five children that each fit the limit alone (70 MiB of 150), 350 MiB together
    child = "import time; b = bytearray(70 << 20); print('held', flush=True); time.sleep(30)"
    script = f'for i in 1 2 3 4 5; do python3 -c "{child}" & done; wait'
    # When they run as one command
    task = with_cgroup(run(op, ledger, {"argv": ["sh", "-c", script], "timeout_s": 60, "limits": {"memory_mb": 150}}))
    # Then the command's memory limit stopped all of them, well before the wall time
    assert task["state"] == "FAILED", task
    assert task["error"].startswith("memory_limit"), task["error"]
    assert task["result"]["stopped_by"] == "memory_limit" and task["result"]["stdout"].count("held") < 5
    assert task["result"]["wall_s"] < 30
    # And one such child alone runs to its end: it is the sum that was refused
    alone = run(
        op, ledger, {"argv": ["python3", "-c", child.replace("time.sleep(30)", "pass")], "limits": {"memory_mb": 150}}
    )
    assert alone["state"] == "SUCCEEDED", alone


def test_three_busy_children_under_cpu_s_2_are_stopped_near_2_cpu_seconds_of_the_group(agent, op, ledger):
    # Given three busy children: RLIMIT_CPU alone would let each use 2 s (6 s together)
    script = 'for i in 1 2 3; do python3 -c "while True: pass" & done; wait'
    task = with_cgroup(run(op, ledger, {"argv": ["sh", "-c", script], "timeout_s": 120, "limits": {"cpu_s": 2}}))
    # Then the group was stopped at its CPU limit (generous bounds: the machine is shared)
    assert task["state"] == "FAILED", task
    assert task["error"].startswith("cpu_limit"), task["error"]
    assert 1.9 <= task["result"]["cpu_s"] < 5, task["result"]


def test_a_setsid_child_does_not_outlive_its_command_s_wall_time(agent, op, ledger):
    # Given a command whose child leaves its session and process group, then outlives the wall time
    script = (
        "import os, sys, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n    os.setsid(); time.sleep(300); sys.exit()\n"
        "print(pid, flush=True); time.sleep(300)\n"
    )
    started = time.monotonic()
    task = with_cgroup(run(op, ledger, {"argv": ["python3", "-c", script], "timeout_s": 3}))
    # Then the task ended at its wall time and the child is gone with it
    assert task["state"] == "TIMED_OUT", task
    assert time.monotonic() - started < 60
    child = int(task["result"]["stdout"].split()[0])
    wait_for(lambda: not alive(child), timeout=10, what=f"the setsid child {child} to be gone")


def test_nothing_is_left_of_a_command_s_cgroup_after_it_ends(agent, op, ledger):
    # Given a command that shows the cgroups it runs in
    task = with_cgroup(run(op, ledger, {"argv": ["cat", "/proc/self/cgroup"]}))
    names = {Path(line.split(":", 2)[2]).name for line in task["result"]["stdout"].splitlines()}
    names = {name for name in names if name.startswith("aios-cmd-")}
    assert len(names) == 1, task["result"]["stdout"]
    # Then, once it ended, no directory of that group is left in any hierarchy
    leftovers = [
        os.path.join(root, name) for root, dirs, _ in os.walk("/sys/fs/cgroup") for name in dirs if name in names
    ]
    assert leftovers == []


def test_an_operator_may_not_raise_the_pids_or_file_size_limits(op, client):
    limits = client.get("/api/v1/system/limits").json["limits"]
    for field, name in (("pids", "command_pids"), ("file_size_mb", "command_file_size_mb")):
        answer = op.post("/api/v1/commands", json={"argv": ["sh", "-c", "true"], "limits": {field: limits[name] + 1}})
        assert answer.status_code == 422, answer.json
        assert answer.json["field"] == f"limits.{field}" and name in answer.json["message"]
