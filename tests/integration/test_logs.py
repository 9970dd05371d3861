"""Logs: a request id on every API response and log line, the task id on agent log lines, log files."""

from __future__ import annotations

import json
import re
import uuid

import pytest
import requests

from tests.conftest import make_user, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_api_stamps_a_request_id_on_the_response_and_on_its_log_lines_in_both_files(
    stack, start_api, tmp_path, queue
):
    # Given the API under gunicorn, logging JSON to its own folder
    logs = tmp_path / "logs"
    api = start_api(env={"AIOS_LOGGING__DIR": str(logs), "AIOS_LOGGING__FORMAT": "json"})
    headers = {"X-API-Key": make_user(stack, "operator").key}

    # When a task is submitted, once with an id of the client's and once with a header that is not one
    mine = f"client-{uuid.uuid4().hex[:12]}"
    given = requests.post(
        f"{api.url}/api/v1/tasks",
        json={"type": "echo", "queue": queue},
        headers={**headers, "X-Request-ID": mine},
        timeout=10,
    )
    forged = requests.post(
        f"{api.url}/api/v1/tasks",
        json={"type": "echo", "queue": queue},
        headers={**headers, "X-Request-ID": 'x" injected=1'},
        timeout=10,
    )
    missing = requests.get(f"{api.url}/api/v1/nothing-here", headers=headers, timeout=10)

    # Then each response carries a request id: the client's when it is a plain token, else a new one
    assert given.headers["X-Request-ID"] == mine
    assert re.fullmatch(r"[0-9a-f]{32}", forged.headers["X-Request-ID"])
    assert re.fullmatch(r"[0-9a-f]{32}", missing.headers["X-Request-ID"])

    # And the API's log line about each request carries its id, in aios.log, as JSON
    def line_for(request_id: str) -> dict | None:
        for line in (logs / "aios.log").read_text().splitlines():
            record = json.loads(line)
            if record.get("request_id") == request_id:
                return record
        return None

    record = wait_for(lambda: line_for(mine), timeout=10, what="a log line with the client's request id")
    assert "task.submit" in record["message"] and record["level"] == "INFO"
    assert line_for(forged.headers["X-Request-ID"]) is not None
    # And the access log (stdout) shows the id too
    assert f"request={mine}" in api.log()
    # And aios.error.log (made at its first line) holds only errors
    error_path = logs / "aios.error.log"
    error_log = error_path.read_text() if error_path.exists() else ""
    assert all(json.loads(line)["level"] in {"ERROR", "CRITICAL"} for line in error_log.splitlines())


def test_an_agent_log_line_about_a_task_carries_the_task_id(client, start_worker, queue, ledger, tmp_path):
    # Given an agent logging to its own folder
    logs = tmp_path / "agent-logs"
    worker = start_worker([queue], env={"AIOS_LOGGING__DIR": str(logs)})

    # When it runs a task that fails (the runner logs the failure)
    task_id = client.post("/api/v1/tasks", json={"type": "test.always_fail", "queue": queue, "max_retries": 0}).json[
        "id"
    ]
    ledger.wait_state(task_id, "FAILED", "DEAD")

    # Then the agent's log lines about that run name the task
    def lines() -> list[str]:
        path = logs / "aios.log"
        return [line for line in path.read_text().splitlines() if task_id in line] if path.exists() else []

    wait_for(
        lambda: any(f"[task={task_id}]" in line for line in lines()),
        timeout=10,
        what=f"an agent log line tagged with task {task_id}:\n{worker.log()[-2000:]}",
    )
