"""A broker that stops answering on an open connection costs a submit a bounded time, not forever.

Redis can hang, or vanish without closing its connections (a failover, a NAT or firewall timeout): a
publish on the API's pooled connection then waited for a reply that never came, and held its API
thread for good (a fresh connection was bounded by the connect timeout, a pooled one by nothing).
With ``broker.socket_timeout_s`` each attempt fails after that long, the task stays ``PENDING``
(stored, dispatched later) and the request answers ``202`` like any broker outage.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import requests

from tests.conftest import make_user
from tests.support.private_redis import running_private_redis

pytestmark = pytest.mark.integration


def test_a_submit_to_a_broker_that_stopped_answering_is_accepted_pending_within_the_socket_timeout(
    stack, start_api, tmp_path
):
    with running_private_redis(tmp_path / "redis-server.log") as server:
        # Given an API on a private Redis, its connection to it open from a first submit
        operator = make_user(stack, "operator")
        api = start_api(
            env={
                "AIOS_BROKER__URL": server.url,
                "AIOS_BROKER__SOCKET_TIMEOUT_S": "1",
                "AIOS_BROKER__PUBLISH_MAX_RETRIES": "1",
            }
        )
        task = {"type": "echo", "parameters": {"x": 1}, "queue": "hung-broker"}  # no agent: it waits QUEUED
        headers = {"X-API-Key": operator.key}
        first = requests.post(f"{api.url}/api/v1/tasks", json=task, headers=headers, timeout=60)
        assert first.status_code == 202 and first.json()["state"] == "QUEUED", first.text
        # When Redis stops answering without closing anything (SIGSTOP: the sockets stay open)
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            answer = requests.post(f"{api.url}/api/v1/tasks", json=task, headers=headers, timeout=60)
            took = time.monotonic() - started
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        # Then the task is accepted and stored PENDING (dispatched once the broker answers), not left
        # hanging: two attempts of 1 s, with generous room for a loaded machine (it hung forever before)
        assert answer.status_code == 202, answer.text
        assert answer.json()["state"] == "PENDING", answer.json()
        assert took < 30, f"the submit took {took:.1f} s"
        # And the API still answers everyone else
        assert requests.get(f"{api.url}/healthz", timeout=5).status_code == 200
