"""``aios up --detach`` / ``down`` / ``restart`` / ``ps`` / ``logs`` with real processes, on the embedded
default (SQLite ledger + SQLite broker), each test in an empty folder of its own with a free port.

What is promised (docs/cli.md, "aios up in the background"): ``up --detach`` returns once everything is
healthy and prints a ``curl`` that works as printed; ``ps`` shows live pids with their health; ``logs -f``
follows; ``down`` leaves nothing running; a second ``up`` is refused; a SIGKILLed supervisor leaves a
stale pid file that ``ps`` reports and the next ``up --detach`` cleans.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.integration.test_embedded_up import Proc, clean_env, descendants, free_port, processes_in, still_alive

pytestmark = pytest.mark.slow

PID_FILE = Path("var/aios-up.pid")


@dataclass
class Project:
    """An empty project folder, the environment ``aios`` runs with there, and its API port."""

    cwd: Path
    env: dict[str, str]
    port: int

    def aios(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "aios.cli", *args],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def ps(self) -> tuple[int, dict]:
        done = self.aios("ps", "--json", timeout=60)
        return done.returncode, json.loads(done.stdout)

    def shell(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", command], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=60
        )


@pytest.fixture()
def project(tmp_path: Path) -> Iterator[Project]:
    cwd = tmp_path / "project"
    cwd.mkdir()
    port = free_port()
    handle = Project(cwd=cwd, env=clean_env(AIOS_API__PORT=str(port)), port=port)
    yield handle
    if (cwd / PID_FILE).exists():
        handle.aios("down", timeout=120)
    for pid in processes_in(cwd):  # never leave a stray API, agent or beat behind, even on failure
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def up_detached(project: Project, *extra: str) -> subprocess.CompletedProcess[str]:
    done = project.aios("up", "--detach", *extra)
    assert done.returncode == 0, done.stdout + done.stderr + log_tail(project)
    return done


def log_tail(project: Project) -> str:
    logs = project.cwd / "logs"
    if not logs.is_dir():
        return ""
    return "".join(
        f"\n--- {path.name}\n{path.read_text(errors='replace')[-3000:]}" for path in sorted(logs.glob("*.log"))
    )


def printed_hint(output: str) -> str:
    match = re.search(r"^\s*try: (.+)$", output, re.MULTILINE)
    assert match, f"no `try:` line in:\n{output}"
    return match.group(1)


def family(pids: list[int]) -> list[Proc]:
    """The processes ``pids`` and everything under them (gunicorn workers, Celery pool children)."""
    procs: list[Proc] = []
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text()
        procs.append(Proc(pid, int(stat[stat.rindex(")") + 2 :].split()[19])))
        procs.extend(descendants(pid))
    return procs


class Follower:
    """``aios logs -f NAME`` running in the background, its output collected line by line."""

    def __init__(self, project: Project, name: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "aios.cli", "logs", "-f", "-n", "1", name],
            cwd=project.cwd,
            env=project.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=30)
        assert self.process.stdout is not None
        self.process.stdout.close()
        return code


def test_up_detach_serves_the_printed_curl_ps_and_logs_follow_and_down_leaves_nothing_running(project):
    # Given `aios up --migrate --detach` in an empty folder
    done = up_detached(project, "--migrate")
    # Then it returned once all was up, having made its pid file, and printed the admin's password once
    assert (project.cwd / PID_FILE).is_file()
    assert "its password (shown once)" in done.stdout
    # And the command it printed works as printed: 2xx (curl --fail-with-body), a task accepted
    hint = printed_hint(done.stdout)
    submitted = project.shell(hint)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert json.loads(submitted.stdout)["state"] in ("QUEUED", "RUNNING", "SUCCEEDED")

    # When `aios ps --json` runs
    code, status = project.ps()
    # Then the supervisor and its three children run, healthy, under pids that exist
    assert code == 0 and status["status"] == "running" and status["healthy"], status
    rows = {row["name"]: row for row in status["processes"]}
    assert set(rows) == {"up", "api", "agent", "beat"}
    assert rows["up"]["pid"] == int((project.cwd / PID_FILE).read_text())
    for row in rows.values():
        assert row["running"] and row["healthy"] and Path(f"/proc/{row['pid']}").exists(), row
    assert rows["api"]["health"].startswith("ready") and rows["beat"]["health"] == "leader"
    assert rows["agent"]["health"].startswith("ONLINE")

    # When another `aios up --detach` starts from the same folder
    second = project.aios("up", "--detach")
    # Then it is refused, saying which supervisor runs
    assert second.returncode == 1 and f"already runs (pid {rows['up']['pid']}" in second.stderr, second.stderr

    # When `aios logs -f agent` follows the agent's log and a new task is submitted
    follower = Follower(project, "agent")
    try:
        wait_for(follower.text, timeout=30, what="`aios logs -f agent` to print the last line (it is following)")
        task_id = json.loads(project.shell(hint).stdout)["id"]
        # Then the agent's lines about that task appear as they are written
        wait_for(lambda: task_id in follower.text(), timeout=60, what=f"task {task_id} in `aios logs -f agent`")
    finally:
        assert follower.stop() in (0, 130)
    # And `aios logs api` prints the API's last lines (its request log)
    api_log = project.aios("logs", "-n", "200", "api")
    assert api_log.returncode == 0 and "/api/v1/tasks" in api_log.stdout

    # When `aios down` runs
    everything = family([row["pid"] for row in rows.values()])
    stopped = project.aios("down")
    # Then it stopped everything: no process of it is left, and the pid file is gone
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert still_alive(everything, grace_s=5.0) == []
    assert processes_in(project.cwd) == []
    assert not (project.cwd / PID_FILE).exists()
    # And `down` again, or `ps`, says nothing runs
    again = project.aios("down")
    assert again.returncode == 0 and "not running" in again.stdout
    code, status = project.ps()
    assert code == 1 and status["status"] == "stopped" and status["processes"] == []


def test_a_sigkilled_supervisor_is_reported_by_ps_and_up_detach_starts_cleanly_again(project):
    # Given a detached aios up
    up_detached(project, "--migrate")
    _, status = project.ps()
    before = {row["name"]: row["pid"] for row in status["processes"]}
    children = family([pid for name, pid in before.items() if name != "up"])
    supervisor_proc = family([before["up"]])[0]

    # When its supervisor is SIGKILLed (it cannot clean up)
    os.kill(before["up"], signal.SIGKILL)
    assert still_alive([supervisor_proc], grace_s=10.0) == []
    # Then `aios ps` says it is gone and the pid file is stale (exit 1)
    code, status = project.ps()
    assert code == 1 and status["status"] == "stale", status
    supervisor = next(row for row in status["processes"] if row["name"] == "up")
    assert not supervisor["running"] and "stale" in supervisor["health"]

    # When `aios up --detach` runs again
    again = up_detached(project)
    # Then it removed the stale pid file, the old children are gone, and a new supervisor runs, healthy
    assert "removed the stale pid file" in again.stdout
    assert still_alive(children, grace_s=5.0) == []
    code, status = project.ps()
    assert code == 0 and status["healthy"], status
    after = {row["name"]: row["pid"] for row in status["processes"]}
    assert after["up"] != before["up"]
    assert project.shell(printed_hint(again.stdout)).returncode == 0

    # When `aios restart` runs
    restarted = project.aios("restart")
    # Then everything runs again under new pids, healthy
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr + log_tail(project)
    code, status = project.ps()
    assert code == 0 and status["healthy"], status
    restarted_pids = {row["name"]: row["pid"] for row in status["processes"]}
    assert restarted_pids["up"] != after["up"]

    # When the supervisor hangs (SIGSTOP: it cannot act on SIGTERM) and `aios down --grace 2` runs
    everything = family(list(restarted_pids.values()))
    os.kill(restarted_pids["up"], signal.SIGSTOP)
    stopped = project.aios("down", "--grace", "2")
    # Then past the grace it killed the supervisor and every process under it, and removed the pid file
    assert stopped.returncode == 0 and "killed" in stopped.stdout, stopped.stdout + stopped.stderr
    assert still_alive(everything, grace_s=5.0) == []
    assert not (project.cwd / PID_FILE).exists()


def test_a_stale_pid_file_alone_is_reported_and_removed_by_down(project):
    # Given a pid file whose process is gone (and no state file): an exited process's pid
    gone = subprocess.Popen(["true"])
    gone.wait()
    (project.cwd / "var").mkdir()
    (project.cwd / PID_FILE).write_text(f"{gone.pid}\n")
    # When `aios ps` runs / Then it reports the stale pid file, exit 1
    ps = project.aios("ps")
    assert ps.returncode == 1 and "stale pid file" in ps.stdout and str(gone.pid) in ps.stdout, ps.stdout
    # When `aios down` runs / Then it removes it and says so, exit 0
    down = project.aios("down")
    assert down.returncode == 0 and "stale" in down.stdout, down.stdout + down.stderr
    assert not (project.cwd / PID_FILE).exists()


def test_logs_without_logs_says_where_it_looked(project):
    done = project.aios("logs", "api")
    assert done.returncode == 1 and "no logs in logs/" in done.stderr
