"""The client commands of ``aios``, run as subprocesses against a live API and a real agent."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aios.cli import CLIENT_COMMANDS
from tests.conftest import REPO_ROOT, make_user

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture()
def live(stack, start_api, start_worker, queue, tmp_path):
    api = start_api()
    start_worker([queue])
    operator = make_user(stack, "operator")
    home = tmp_path / "config-home"

    def aios(*args: str, key: str | None = operator.key, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {key_: value for key_, value in os.environ.items() if not key_.startswith("AIOS_")}
        env.update({"AIOS_URL": api.url, "XDG_CONFIG_HOME": str(home), "PYTHONPATH": str(REPO_ROOT)})
        if key:
            env["AIOS_API_KEY"] = key
        return subprocess.run(
            [sys.executable, "-m", "aios.cli", *args],
            env=env,
            input=stdin,
            text=True,
            capture_output=True,
            timeout=120,
            cwd=REPO_ROOT,
        )

    class Live:
        pass

    live = Live()
    live.aios, live.api, live.operator, live.queue, live.home = aios, api, operator, queue, home
    return live


def test_submit_with_wait_prints_the_result_and_exits_0(live: Any):
    done = live.aios(
        "--json",
        "submit",
        "echo",
        "-p",
        "x=1",
        "-p",
        "name=ada",
        "--queue",
        live.queue,
        "--wait",
        "--wait-timeout",
        "60",
    )
    assert done.returncode == 0, done.stderr
    task = json.loads(done.stdout)
    assert task["state"] == "SUCCEEDED" and task["result"] == {"x": 1, "name": "ada"}


def test_a_failed_task_with_wait_exits_1_and_a_table_is_printed_for_people(live: Any):
    failed = live.aios(
        "submit", "test.always_fail", "--queue", live.queue, "--max-retries", "0", "--wait", "--wait-timeout", "60"
    )
    assert failed.returncode == 1, failed.stderr
    assert "FAILED" in failed.stdout or "DEAD" in failed.stdout


def test_json_output_parses_and_tasks_ls_show_cancel_retry_work(live: Any):
    created = json.loads(
        live.aios("--json", "submit", "echo", "--queue", "nobody-consumes-this", "--priority", "9").stdout
    )
    listed = live.aios("--json", "tasks", "ls", "--limit", "5")
    assert listed.returncode == 0 and any(row["id"] == created["id"] for row in json.loads(listed.stdout))
    shown = json.loads(live.aios("--json", "tasks", "show", created["id"]).stdout)
    assert shown["priority"] == 9 and shown["events"]
    assert json.loads(live.aios("--json", "tasks", "cancel", created["id"]).stdout)["state"] == "CANCELLED"
    again = json.loads(live.aios("--json", "tasks", "retry", created["id"]).stdout)
    assert again["retry_of"] == created["id"]
    assert json.loads(live.aios("--json", "status").stdout)["version"]


def test_exit_codes_for_refusals_bad_usage_and_no_credentials(live: Any, stack):
    viewer = make_user(stack, "viewer")
    refused = live.aios("submit", "echo", key=viewer.key)
    assert refused.returncode == 3, refused.stderr
    assert "may not" in refused.stderr
    invalid = live.aios("submit", "echo", "--priority", "12")
    assert invalid.returncode == 2
    unknown = live.aios("submit", "no-such-type")
    assert unknown.returncode == 3 and "no-such-type" in unknown.stderr
    anonymous = live.aios("tasks", "ls", key=None)
    assert anonymous.returncode == 6 and "aios login" in anonymous.stderr


def test_login_stores_a_token_readable_by_the_user_only_and_later_commands_use_it(live: Any, stack):
    person = make_user(stack, "operator")
    logged = live.aios("login", "--username", person.user, "--password", person.password, key=None)
    assert logged.returncode == 0, logged.stderr
    stored = Path(live.home) / "aios" / "credentials.json"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert stat.S_IMODE(stored.parent.stat().st_mode) == 0o700
    assert person.password not in stored.read_text()
    listed = live.aios("--json", "tasks", "ls", "--limit", "1", key=None)
    assert listed.returncode == 0, listed.stderr
    assert live.aios("logout", key=None).returncode == 0
    assert not stored.exists()
    assert live.aios("tasks", "ls", key=None).returncode == 6


def test_the_client_command_list_in_aios_cli_is_the_click_groups(live: Any):
    from aios_client.commands import COMMANDS

    assert CLIENT_COMMANDS == COMMANDS
    helped = live.aios("--help", key=None)
    assert all(name in helped.stdout for name in CLIENT_COMMANDS)
