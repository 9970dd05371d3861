"""Long-held requests cannot freeze the API (issue 15, items 4 and 12): ``wait_s`` command waits and
event streams share ``api.threads - 1`` threads per process, and each user holds at most
``api.max_waits_per_principal`` waits and ``api.sse_max_streams_per_principal`` streams across every
API process (leases in the shared store that expire by themselves).

The commands waited on never finish here (no agent runs them), so every wait would last its full
``wait_s``; each test cancels its tasks at the end, which ends the waits still held.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
import requests

from aios.security.store import DatabaseStore, RedisStore, create_store
from tests.conftest import make_user, wait_for
from tests.support.sse import open_stream

pytestmark = [pytest.mark.integration]

#: Generous: the machine is shared and sometimes slow; a wait that was skipped answers at once.
ANSWER_S = 30


def post_wait(api_url: str, key: str, wait_s: float = 60) -> requests.Response:
    return requests.post(
        f"{api_url}/api/v1/commands",
        json={"argv": ["sleep", "300"], "wait_s": wait_s},
        headers={"X-API-Key": key, "Idempotency-Key": str(uuid.uuid4())},
        timeout=wait_s + 60,
    )


class Waits:
    """Waits started in threads; their answers as they come back."""

    def __init__(self) -> None:
        self.answers: list[tuple[requests.Response, float]] = []
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self, api_url: str, key: str) -> None:
        def run() -> None:
            started = time.monotonic()
            try:
                response = post_wait(api_url, key)
            except requests.RequestException:
                return  # the API stopped at teardown
            with self._lock:
                self.answers.append((response, time.monotonic() - started))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def count(self) -> int:
        with self._lock:
            return len(self.answers)


def cancel_all(api_url: str, admin_key: str, *owners: str) -> None:
    """Cancel every command of ``owners``: the waits still held end at their next ledger read."""
    for owner in owners:
        listed = requests.get(
            f"{api_url}/api/v1/tasks",
            params={"owner": owner, "type": "command", "limit": 50},
            headers={"X-API-Key": admin_key},
            timeout=30,
        )
        for task in listed.json()["tasks"]:
            requests.delete(f"{api_url}/api/v1/tasks/{task['id']}", headers={"X-API-Key": admin_key}, timeout=30)


def commands_of(api_url: str, admin_key: str, owner: str) -> int:
    listed = requests.get(
        f"{api_url}/api/v1/tasks",
        params={"owner": owner, "type": "command", "limit": 50},
        headers={"X-API-Key": admin_key},
        timeout=30,
    )
    return len(listed.json()["tasks"])


def test_eight_concurrent_waits_of_60_s_leave_healthz_and_reads_answering_and_the_extra_waits_answer_202_at_once(
    stack, start_api, admin
):
    # Given one API process with 4 threads (so 3 may be held by waits), and four operators
    api = start_api(env={"AIOS_API__THREADS": "4", "AIOS_API__MAX_WAITS_PER_PRINCIPAL": "2"})
    operators = [make_user(stack, "operator") for _ in range(4)]

    # When they send 8 waits of 60 s at once (2 each: within their own cap)
    waits = Waits()
    for operator in operators:
        for _ in range(2):
            waits.start(api.url, operator.key)
    try:
        # Then the 5 that found no free thread are accepted and answered at once, 202 with their task
        wait_for(lambda: waits.count() >= 5, timeout=ANSWER_S, interval=0.2, what="5 waits answered at once")
        early = list(waits.answers)
        assert [r.status_code for r, _ in early] == [202] * len(early), [r.text for r, _ in early]
        assert all(r.json()["state"] not in ("SUCCEEDED", "FAILED") for r, _ in early)
        assert all(elapsed < ANSWER_S for _, elapsed in early)
        # And while the other 3 still wait, /healthz and an ordinary read are answered
        assert requests.get(f"{api.url}/healthz", timeout=ANSWER_S).status_code == 200
        assert (
            requests.get(
                f"{api.url}/api/v1/tasks/types", headers={"X-API-Key": operators[0].key}, timeout=ANSWER_S
            ).status_code
            == 200
        )
        assert waits.count() == 5, "3 waits hold their threads (threads - 1)"
        # And all 8 commands were accepted
        assert sum(commands_of(api.url, admin.key, o.user) for o in operators) == 8
    finally:
        cancel_all(api.url, admin.key, *(o.user for o in operators))
    # Finally the held waits end with their cancelled task
    for thread in waits.threads:
        thread.join(timeout=ANSWER_S)
    assert waits.count() == 8


def test_a_user_past_max_waits_per_principal_gets_429_on_any_api_process_and_nothing_is_accepted(
    stack, start_api, admin
):
    # Given two API processes sharing the store, and an operator with one wait under way on each
    env = {"AIOS_API__THREADS": "8", "AIOS_API__MAX_WAITS_PER_PRINCIPAL": "2"}
    first, second = start_api(env=env), start_api(env=env)
    operator, other = make_user(stack, "operator"), make_user(stack, "operator")
    waits = Waits()
    waits.start(first.url, operator.key)
    waits.start(second.url, operator.key)
    try:
        wait_for(
            lambda: commands_of(first.url, admin.key, operator.user) == 2,
            timeout=ANSWER_S,
            interval=0.2,
            what="both waits to be accepted",
        )

        # When the same user asks for a third wait, on either process
        refused = [post_wait(api.url, operator.key) for api in (first, second)]

        # Then it is a JSON 429 with Retry-After naming the setting, and no command was accepted for it
        for response in refused:
            assert response.status_code == 429, response.text
            assert response.json()["error"] == "too_many_requests"
            assert "api.max_waits_per_principal" in response.json()["message"]
            assert 1 <= int(response.headers["Retry-After"]) <= 30
        assert commands_of(first.url, admin.key, operator.user) == 2
        # But a command without wait_s is still accepted, and another user may wait
        quick = requests.post(
            f"{first.url}/api/v1/commands",
            json={"argv": ["sleep", "300"]},
            headers={"X-API-Key": operator.key},
            timeout=ANSWER_S,
        )
        assert quick.status_code == 202, quick.text
        waits.start(first.url, other.key)
        wait_for(
            lambda: commands_of(first.url, admin.key, other.user) == 1,
            timeout=ANSWER_S,
            interval=0.2,
            what="the other user's wait to be accepted",
        )
        assert waits.count() == 0
    finally:
        cancel_all(first.url, admin.key, operator.user, other.user)
    for thread in waits.threads:
        thread.join(timeout=ANSWER_S)
    assert waits.count() == 3


def test_one_viewer_cannot_take_every_stream_slot_and_another_user_can_still_open_a_stream(stack, start_api):
    # Given an API process with room for 7 streams, and at most 2 per user
    api = start_api(env={"AIOS_API__THREADS": "8", "AIOS_API__SSE_MAX_STREAMS_PER_PRINCIPAL": "2"})
    viewer, other = make_user(stack, "viewer"), make_user(stack, "viewer")
    streams = [open_stream(f"{api.url}/api/v1/events", key=viewer.key) for _ in range(2)]
    try:
        assert [s.response.status_code for s in streams] == [200, 200]

        # When the viewer asks for a third stream, it is a JSON 429 naming the setting
        third = open_stream(f"{api.url}/api/v1/events", key=viewer.key)
        streams.append(third)
        assert third.response.status_code == 429, third.response.headers
        refused = third.response
        assert refused.json()["error"] == "too_many_requests"
        assert "api.sse_max_streams_per_principal" in refused.json()["message"]
        assert refused.headers["Retry-After"]

        # But another user opens one
        theirs = open_stream(f"{api.url}/api/v1/events", key=other.key)
        streams.append(theirs)
        assert theirs.response.status_code == 200

        # And once the viewer closes a stream, it may open one again
        streams.pop(0).close()

        def reopened() -> bool:
            stream = open_stream(f"{api.url}/api/v1/events", key=viewer.key)
            if stream.response.status_code == 200:
                streams.append(stream)
                return True
            stream.close()
            return False

        wait_for(reopened, timeout=ANSWER_S, interval=0.5, what="the viewer's closed stream to free its lease")
    finally:
        for stream in streams:
            stream.close()


@pytest.mark.parametrize("kind", ["redis", "database"])
def test_a_lease_left_by_a_killed_process_expires_by_itself(stack, kind):
    # Given a store (Redis, or the counters table) and a scope whose only lease is never released
    store: Any = create_store(stack.settings)
    if kind == "database":
        store = DatabaseStore(stack.settings)
    else:
        assert isinstance(store, RedisStore)
    scope = f"lease:test:user:{uuid.uuid4().hex}"
    assert store.take_lease(scope, "killed", 1, 1) == (True, 0)

    # When another lease is asked for at once, it is refused with a time to wait
    granted, retry_after = store.take_lease(scope, "next", 1, 1)
    assert not granted and 1 <= retry_after <= 2
    # And a renewal of the held lease is no new lease: it is always granted
    assert store.take_lease(scope, "killed", 1, None)[0]

    # Then once the forgotten lease's time to live is over, the next one is granted
    wait_for(
        lambda: store.take_lease(scope, "next", 60, 1)[0],
        timeout=ANSWER_S,
        interval=0.3,
        what="the forgotten lease to expire",
    )
    store.drop_lease(scope, "next")
    assert store.take_lease(scope, "third", 60, 1)[0]
    store.drop_lease(scope, "third")
