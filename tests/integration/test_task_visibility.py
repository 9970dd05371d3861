"""What a reader is shown of a task (aios.tasks.view), on PostgreSQL through the real app:

* a command's argv, env and output (a command schedule's too) are shown to its owner and admins only,
  env values to nobody, and ``q=`` finds none of them;
* a list shows previews of the bodies, never whole results: a page of 500 big-result tasks stays small,
  ``fields=`` asks for whole bodies under a page cap and a response size cap, and nothing is skipped.

Tasks are written to queues of their own (no worker consumes them); results are written to the ledger
as a finished run would.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import update

from aios.db import session_scope
from aios.models import Task
from aios.tasks.create import create_tasks
from aios.tasks.spec import TaskSpec
from aios.tasks.view import MASK, PREVIEW_CHARS
from tests.conftest import Credentials, authorize, make_user
from tests.integration.test_ui import signed_in

pytestmark = pytest.mark.integration

TASKS = "/api/v1/tasks"


def finish(stack: Any, task_ids: list[str], result: Any) -> None:
    """Give tasks the result a successful run would leave."""
    with session_scope(stack.settings.database) as session:
        session.execute(update(Task).where(Task.id.in_(task_ids)).values(state="SUCCEEDED", result=result))


@pytest.fixture()
def readers(api_app: Any, stack: Any, admin: Credentials) -> dict[str, Any]:
    """API clients of a command's owner, another operator, a viewer and an admin."""
    people = {
        "owner": make_user(stack, "operator"),
        "operator": make_user(stack, "operator"),
        "viewer": make_user(stack, "viewer"),
        "admin": admin,
    }
    return {role: (who, authorize(api_app.test_client(), who.key)) for role, who in people.items()}


def test_a_command_s_argv_and_output_are_shown_only_to_its_owner_and_admins_and_env_values_to_nobody(
    api_app, stack, readers, queue
):
    # Given a command an operator ran, with a secret in its argv, its env and its output
    mark = uuid.uuid4().hex[:12]
    secrets = {"argv": f"arg-{mark}", "env": f"env-{mark}", "out": f"out-{mark}"}
    owner, owner_api = readers["owner"]
    submitted = owner_api.post(
        TASKS,
        json={
            "type": "command",
            "queue": queue,
            "parameters": {"argv": ["cat", secrets["argv"]], "env": {"API_TOKEN": secrets["env"]}},
        },
    )
    assert submitted.status_code == 202, submitted.json
    task_id = submitted.json["id"]
    finish(stack, [task_id], {"exit_code": 0, "signal": None, "stdout": secrets["out"], "stderr": "", "wall_s": 0.1})
    # and a disabled schedule of the same command
    schedule = owner_api.post(
        "/api/v1/schedules",
        json={
            "name": f"cmd-{mark}",
            "interval_s": 86_400,
            "enabled": False,
            "task": {
                "type": "command",
                "queue": queue,
                "parameters": {"argv": ["cat", secrets["argv"]], "env": {"API_TOKEN": secrets["env"]}},
            },
        },
    )
    assert schedule.status_code == 201, schedule.json
    # and a task of another type holding the same text, so the search is seen to work
    other = owner_api.post(TASKS, json={"type": "echo", "queue": queue, "parameters": {"m": secrets["argv"]}})
    assert other.status_code == 202, other.json

    for role, (_, api) in readers.items():
        # When each reader reads the command, lists it, and searches for its secrets
        one = api.get(f"{TASKS}/{task_id}")
        page = api.get(TASKS, query_string={"queue": queue, "type": "command"})
        whole_page = api.get(TASKS, query_string={"queue": queue, "type": "command", "fields": "parameters,result"})
        found = {
            name: {t["id"] for t in api.get(TASKS, query_string={"q": text}).json["tasks"]}
            for name, text in secrets.items()
        }
        scheduled = api.get(f"/api/v1/schedules/{schedule.json['id']}")
        answers = [
            one.get_data(as_text=True),
            page.get_data(as_text=True),
            whole_page.get_data(as_text=True),
            scheduled.get_data(as_text=True),
        ]

        # Then nobody is shown the env value (the name stays), and q= finds none of the command's secrets
        assert one.status_code == page.status_code == whole_page.status_code == scheduled.status_code == 200
        assert one.json["parameters"]["env"] == {"API_TOKEN": MASK}
        assert all(secrets["env"] not in answer for answer in answers), role
        assert task_id not in set().union(*found.values()), (role, found)
        assert other.json["id"] in found["argv"]
        listed = page.json["tasks"][0]
        if role in ("owner", "admin"):
            # and the owner and admins see the whole argv and the output
            assert one.json["parameters"]["argv"] == ["cat", secrets["argv"]]
            assert one.json["result"]["stdout"] == secrets["out"]
            assert secrets["out"] in listed["result_preview"]
            assert whole_page.json["tasks"][0]["result"]["stdout"] == secrets["out"]
            assert "redacted" not in one.json
            assert scheduled.json["task"]["parameters"]["argv"] == ["cat", secrets["argv"]]
        else:
            # and everyone else sees argv[0] and the exit status, not the arguments or the output
            assert one.json["parameters"]["argv"] == ["cat"]
            assert one.json["result"]["stdout"] is None and one.json["result"]["exit_code"] == 0
            assert one.json["redacted"] is True and listed["redacted"] is True and scheduled.json["redacted"] is True
            assert all(secrets["argv"] not in answer and secrets["out"] not in answer for answer in answers), role
        assert listed["parameters_preview"] == '{"argv": ["cat"]}' and listed["parameters_truncated"] is True

    # and the dashboard's task page keeps them from a viewer too
    page = signed_in(api_app, readers["viewer"][0]).get(f"/ui/tasks/{task_id}").get_data(as_text=True)
    assert secrets["argv"] not in page and secrets["env"] not in page and secrets["out"] not in page


def test_a_list_of_500_tasks_with_200_kb_results_stays_small_and_each_result_is_whole_by_id(client, stack, queue):
    # Given 500 finished tasks, each with a result of about 200 KB (100 MB in all)
    big = {"blob": "x" * 200_000}
    ids = create_tasks(
        None,
        stack.settings,
        [
            TaskSpec(type="echo", parameters={"i": i}, priority=5, max_retries=0, timeout_s=60, queue=queue)
            for i in range(500)
        ],
        actor="test",
        publish=False,
    ).ids
    finish(stack, ids, big)

    # When the whole list is read in one page
    page = client.get(TASKS, query_string={"queue": queue, "limit": 500})

    # Then it holds all 500 with previews of their results, in well under a few MB
    assert page.status_code == 200, page.json
    assert len(page.get_data()) < 1_000_000
    tasks = page.json["tasks"]
    assert len(tasks) == 500 and page.json["next_cursor"] is None
    assert all(
        "result" not in t
        and t["result_truncated"]
        and len(t["result_preview"]) == PREVIEW_CHARS
        and not t["parameters_truncated"]
        and t["error_preview"] is None
        for t in tasks
    )
    assert sorted(t["parameters_preview"] for t in tasks) == sorted(f'{{"i": {i}}}' for i in range(500))
    # and each whole result is there by id
    assert client.get(f"{TASKS}/{tasks[0]['id']}").json["result"] == big
    # and whole results in a list are refused above their page cap, naming it
    refused = client.get(TASKS, query_string={"queue": queue, "limit": 500, "fields": "result"})
    assert refused.status_code == 422 and refused.json["field"] == "limit" and "50" in refused.json["message"]
    # and within it, a page is cut short of the response size cap; its cursor goes on from there
    first = client.get(TASKS, query_string={"queue": queue, "limit": 50, "fields": "result"})
    cut = len(first.json["tasks"])
    assert 1 <= cut < 50 and len(first.get_data()) <= stack.settings.api.max_response_bytes
    assert first.json["tasks"][0]["result"] == big
    second = client.get(
        TASKS, query_string={"queue": queue, "limit": 50, "fields": "result", "cursor": first.json["next_cursor"]}
    )
    shown = [t["id"] for t in first.json["tasks"] + second.json["tasks"]]
    assert shown == [t["id"] for t in tasks[: len(shown)]]
