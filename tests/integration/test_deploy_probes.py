"""The healthchecks in docker/compose.yml, run as written against a real agent and the real ledger.

A healthcheck that always passes (or never does) is worse than none: compose starts the stack on it.
These run the exact commands from the compose file, with compose's `$$` unescaped as compose does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from aios.timing import lease
from tests.conftest import REPO_ROOT, wait_for

pytestmark = pytest.mark.integration

COMPOSE = REPO_ROOT / "docker" / "compose.yml"


def healthcheck(service: str) -> list[str]:
    test = yaml.safe_load(COMPOSE.read_text())["services"][service]["healthcheck"]["test"]
    return [part.replace("$$", "$") for part in test]


def run_probe(test: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a compose healthcheck test (CMD or CMD-SHELL) with the venv's programs on PATH."""
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"}
    kind, rest = test[0], test[1:]
    argv = ["sh", "-c", rest[0]] if kind == "CMD-SHELL" else rest
    return subprocess.run(argv, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_the_worker_healthcheck_passes_for_a_live_agent_and_fails_for_another_name(stack, queue, tmp_path):
    # Given an agent started as compose starts it: `aios worker --name NAME` (Celery node NAME@hostname)
    name = f"probe-{uuid.uuid4().hex[:8]}"
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "aios.cli", "worker", "--name", name, "--queues", queue, "--concurrency", "1"],
            env=stack.env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        def ready() -> bool:
            assert process.poll() is None, log_path.read_text()[-3000:]
            return " ready." in log_path.read_text(errors="replace")

        wait_for(ready, timeout=90, what="the agent")
        probe = healthcheck("worker-1")
        # When the compose healthcheck runs with this agent's name
        alive = run_probe(probe, {**stack.env, "AIOS_AGENT_NAME": name})
        # Then it passes
        assert alive.returncode == 0, alive.stdout + alive.stderr
        # And for a name no agent has, it fails (the check is not a constant)
        absent = run_probe(probe, {**stack.env, "AIOS_AGENT_NAME": f"absent-{uuid.uuid4().hex[:6]}"})
        assert absent.returncode != 0, absent.stdout + absent.stderr
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_the_beat_healthcheck_follows_the_leader_lease(stack):
    probe = healthcheck("beat")
    holder = f"probe-{uuid.uuid4().hex[:8]}"
    existing = lease.current(stack.settings, "beat")
    if existing is not None and existing.live:
        pytest.fail(f"a beat ({existing.holder}) still holds the lease in this test schema")
    # Given no live leader: the check fails
    assert run_probe(probe, stack.env).returncode == 1
    try:
        # When a beat takes the lease, the check passes
        assert lease.acquire(stack.settings, "beat", holder, ttl_s=120)
        leading = run_probe(probe, stack.env)
        assert leading.returncode == 0, leading.stderr
    finally:
        lease.release(stack.settings, "beat", holder)
    # And once it lets go, the check fails again
    assert run_probe(probe, stack.env).returncode == 1
