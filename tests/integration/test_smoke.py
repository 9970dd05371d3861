"""The spine, end to end on PostgreSQL + Redis + a real worker."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_echo_task_submitted_over_http_succeeds_with_its_parameters_as_result(client, start_worker, ledger, queue):
    # Given an agent consuming the queue
    start_worker([queue])
    # When an echo task is submitted
    response = client.post("/api/v1/tasks", json={"type": "echo", "parameters": {"x": 1}, "queue": queue})
    # Then it is accepted and runs to SUCCEEDED with its parameters as result
    assert response.status_code == 202, response.json
    assert response.headers["Location"].endswith(response.json["id"])
    task = ledger.wait_state(response.json["id"], "SUCCEEDED")
    assert task.result == {"x": 1}
    assert client.get(f"/api/v1/tasks/{task.id}").json["state"] == "SUCCEEDED"
