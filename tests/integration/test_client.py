"""The Python client (aios_client.client) against a real ``aios api`` process and a real worker.

Proves what a user of the client relies on: ``wait``/``result`` return what the worker computed,
``list`` walks every page, the API's errors arrive as typed exceptions, a token session renews an
expired access token by itself and revokes it on close, and a 429 is retried after its Retry-After.
"""

from __future__ import annotations

import time
import uuid

import pytest
import requests

from aios_client.client import (
    Client,
    Conflict,
    Forbidden,
    NotFound,
    RateLimited,
    TaskFailed,
    Unauthorized,
    UnknownTaskType,
    ValidationFailed,
)
from tests.conftest import make_user, wait_for
from tests.support.command_user import ensure_command_user

pytestmark = pytest.mark.integration


def test_submit_then_wait_returns_the_result_the_worker_computed_and_result_raises_for_a_failure(
    stack, start_api, start_worker, queue
):
    # Given a real API, a real worker on its own queue, and an operator's client
    api = start_api()
    start_worker([queue])
    operator = make_user(stack, "operator")
    with Client(api.url, api_key=operator.key) as aios:
        # When it submits an echo task and waits for it
        accepted = aios.submit("echo", {"n": 7}, queue=queue, priority=9)
        assert accepted["state"] in ("QUEUED", "PENDING") and accepted["queue"] == queue
        final = aios.wait(accepted["id"], timeout=60)
        # Then wait returns the finished task with the worker's result, and result returns the result
        assert final["state"] == "SUCCEEDED", final
        assert final["result"] == {"n": 7}
        assert [e["to_state"] for e in final["events"] if e["to_state"]][-1] == "SUCCEEDED"
        assert aios.result(accepted["id"], timeout=5) == {"n": 7}

        # When a task fails for good
        failing = aios.submit("test.always_fail", queue=queue, max_retries=0)
        # Then result raises TaskFailed carrying the task and the worker's error
        with pytest.raises(TaskFailed) as failed:
            aios.result(failing["id"], timeout=60)
        assert failed.value.state == "DEAD"  # out of retries (max_retries=0)
        assert "always fails" in failed.value.task["error"]


def test_list_walks_every_page_of_a_filtered_listing(stack, start_api, queue):
    # Given 5 tasks on a queue nobody consumes
    api = start_api()
    operator = make_user(stack, "operator")
    with Client(api.url, api_key=operator.key) as aios:
        batch = aios.submit_batch([{"type": "echo", "parameters": {"n": n}, "queue": queue} for n in range(5)])
        assert batch["count"] == 5
        # When the client lists them 2 per page (so at least 3 requests, following next_cursor)
        listed = [task["id"] for task in aios.list(queue=queue, page_size=2)]
    # Then every task is listed exactly once
    assert len(listed) == 5 and set(listed) == set(batch["ids"])


def test_api_errors_arrive_as_typed_exceptions_with_their_field(stack, start_api, start_worker, queue):
    api = start_api()
    operator, viewer = make_user(stack, "operator"), make_user(stack, "viewer")
    with Client(api.url, api_key=operator.key) as aios:
        # A priority out of range: 422 validation_failed naming the field
        with pytest.raises(ValidationFailed) as invalid:
            aios.submit("echo", {}, priority=99, queue=queue)
        assert (invalid.value.status, invalid.value.code, invalid.value.field) == (422, "validation_failed", "priority")
        # A type nobody registered: its own subclass of ValidationFailed
        with pytest.raises(UnknownTaskType) as unknown:
            aios.submit(f"no.such.type.{uuid.uuid4().hex[:6]}", queue=queue)
        assert unknown.value.status == 422 and unknown.value.field == "type"
        # An id that does not exist: 404
        with pytest.raises(NotFound) as missing:
            aios.get(str(uuid.uuid4()))
        assert missing.value.status == 404 and missing.value.code == "not_found"
        # Cancelling a finished task: 409
        start_worker([queue])
        done = aios.submit("echo", {"n": 1}, queue=queue)
        assert aios.wait(done["id"], timeout=60)["state"] == "SUCCEEDED"
        with pytest.raises(Conflict):
            aios.cancel(done["id"])
    # A viewer may read but not submit: 403
    with Client(api.url, api_key=viewer.key) as reader:
        assert reader.get(done["id"])["state"] == "SUCCEEDED"
        with pytest.raises(Forbidden) as forbidden:
            reader.submit("echo", queue=queue)
        assert forbidden.value.status == 403 and forbidden.value.code == "forbidden"
    # A wrong key: 401
    with Client(api.url, api_key="aios_wrong_key") as stranger:
        with pytest.raises(Unauthorized):
            stranger.status()


def test_keys_schedules_agents_cancel_and_retry_work_through_the_client(stack, start_api, start_worker, queue):
    api = start_api()
    admin = make_user(stack, "admin")
    worker = start_worker([queue])
    with Client(api.url, api_key=admin.key) as aios:
        # Keys: the new key works, is listed, rotates, and is refused once revoked
        created = aios.create_key(f"k-{uuid.uuid4().hex[:6]}", "viewer", expires_in_days=1)
        assert created["key"] and created["id"] in {key["id"] for key in aios.keys()}
        with Client(api.url, api_key=created["key"]) as as_viewer:
            assert "version" in as_viewer.status()
        rotated = aios.rotate_key(created["id"], grace_s=0)
        assert rotated["key"] != created["key"]
        assert aios.revoke_key(rotated["id"])["state"] == "REVOKED"
        with Client(api.url, api_key=rotated["key"], retries=0) as revoked:
            with pytest.raises(Unauthorized):
                revoked.status()

        # Schedules: create, read, change, delete
        schedule = aios.create_schedule(
            f"s-{uuid.uuid4().hex[:6]}", {"type": "echo", "queue": queue}, interval_s=3600, enabled=False
        )
        assert schedule["id"] in {s["id"] for s in aios.schedules()}
        assert aios.update_schedule(schedule["id"], interval_s=7200)["interval_s"] == 7200
        aios.delete_schedule(schedule["id"])
        with pytest.raises(NotFound):
            aios.schedule(schedule["id"])

        # Agents: the worker registered itself; drain it and enable it again
        assert worker.hostname in {agent["name"] for agent in aios.agents()}
        assert aios.drain_agent(worker.hostname)["admin_status"] == "DRAINING"
        assert aios.agent(worker.hostname)["name"] == worker.hostname
        assert aios.enable_agent(worker.hostname)["admin_status"] == "ACTIVE"

        # Cancel a task nobody will run, then retry it as a new task
        waiting = aios.submit("echo", {"n": 2}, queue=f"{queue}-idle")
        assert aios.cancel(waiting["id"])["state"] == "CANCELLED"
        again = aios.retry(waiting["id"])
        assert again["retry_of"] == waiting["id"] and again["id"] != waiting["id"]
        aios.cancel(again["id"])
        assert "echo" in {t["name"] for t in aios.task_types()}


def test_run_command_waits_for_the_command_and_events_replay_and_follow_a_task_to_its_end(
    stack, start_api, start_worker, queue
):
    # Given a real API whose event streams are closed after 2 s (so a stream must be resumed), and an
    # agent allowed to run echo
    api = start_api(env={"AIOS_API__SSE_MAX_S": "2"})
    worker = start_worker(
        [queue],
        env={
            "AIOS_AGENTS__COMMAND_ALLOWLIST": '["echo"]',
            "AIOS_AGENTS__COMMAND_USER": ensure_command_user(),
            "AIOS_AGENTS__HEARTBEAT_INTERVAL_S": "1.0",
        },
    )
    operator = make_user(stack, "operator")
    with Client(api.url, api_key=operator.key) as aios:
        wait_for(
            lambda: (
                worker.hostname
                in {a["name"] for a in aios.agents(capability="command") if a["status"] in ("ONLINE", "BUSY")}
            ),
            timeout=60,
            what="the command agent to be routable",
        )
        # When it runs echo and lets the API wait for it
        done = aios.run_command(["echo", "hi"], wait_s=60)
        # Then the one call returns the finished task with the command's output
        assert done["state"] == "SUCCEEDED", done
        assert done["result"]["stdout"] == "hi\n" and done["result"]["exit_code"] == 0

        # When it follows the events of a task that runs for 5 s (longer than one stream lives)
        running = aios.submit("sleep", {"seconds": 5}, queue=queue)
        followed_from = time.monotonic()
        events = list(aios.events(running["id"], read_timeout_s=30))
        followed_s = time.monotonic() - followed_from
    # Then it followed the task over several streams (each lives 2 s) to its end
    assert followed_s > 3, followed_s
    # and saw every state change once, in order, and the stream's end
    states = [event.data["to_state"] for event in events if event.event == "state"]
    assert states[-2:] == ["RUNNING", "SUCCEEDED"], states
    assert len(states) == len(set(states))
    ids = [event.id for event in events if event.event != "end"]
    assert len(ids) == len(set(ids))
    assert events[-1].event == "end"


@pytest.mark.slow
def test_a_token_session_renews_an_expired_access_token_and_close_revokes_it(stack, start_api):
    # Given an API whose access tokens live 30 s (the shortest the config allows)
    api = start_api(env={"AIOS_SECURITY__ACCESS_TOKEN_TTL_S": "30"})
    user = make_user(stack, "viewer")
    aios = Client(api.url, username=user.user, password=user.password)
    first_token = aios._access_token
    assert "version" in aios.status()
    # When the access token has expired
    time.sleep(32)
    expired = requests.get(f"{api.url}/api/v1/status", headers={"Authorization": f"Bearer {first_token}"}, timeout=10)
    assert expired.status_code == 401
    # Then the client's next call still works: it refreshed the token and sent the request again
    assert "version" in aios.status()
    renewed_token = aios._access_token
    assert renewed_token and renewed_token != first_token
    # When the client is closed, its session is logged out: the renewed token is refused too
    aios.close()
    after = requests.get(f"{api.url}/api/v1/status", headers={"Authorization": f"Bearer {renewed_token}"}, timeout=10)
    assert after.status_code == 401, after.text


@pytest.mark.slow
def test_a_429_is_retried_after_its_retry_after_and_then_succeeds(stack, start_api, queue):
    # Given an API allowing 2 writes per principal per minute, and a principal that has used them
    api = start_api(env={"AIOS_SECURITY__RATE_LIMIT_WRITE_PER_MINUTE": "2"})
    operator = make_user(stack, "operator")
    with Client(api.url, api_key=operator.key, retries=0) as impatient:
        impatient.submit("echo", queue=queue)
        impatient.submit("echo", queue=queue)
        # (a client that does not retry sees the 429 and when to come back)
        with pytest.raises(RateLimited) as limited:
            impatient.submit("echo", queue=queue)
    retry_after = limited.value.retry_after_s
    assert limited.value.status == 429 and retry_after is not None and 1 <= retry_after <= 60
    refused_at = time.monotonic()

    # When a client with retries submits
    with Client(api.url, api_key=operator.key, retries=2) as aios:
        accepted = aios.submit("echo", {"n": 3}, queue=queue)
    # Then it waited out the window the 429 announced and the task was accepted
    elapsed = time.monotonic() - refused_at
    assert accepted["state"] in ("QUEUED", "PENDING")
    assert elapsed >= retry_after - 1.5, (elapsed, retry_after)
    # and exactly one such task exists (the retry did not create two)
    with Client(api.url, api_key=operator.key) as reader:
        assert [t["parameters"] for t in reader.list(queue=queue, fields="parameters")].count({"n": 3}) == 1
