"""The sync job's plain parts, and a whole run on the embedded stack (SQLite + filesystem transport).

The embedded run uses a real temporary SQLite database built by the migrations and kombu's real
filesystem transport in a temporary folder: nothing is mocked.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from aios import migrate
from aios.broker.celery_app import create_celery_app
from aios.config import Settings, load_settings
from aios.db import dispose_engines, session_scope
from aios.models import Task, TaskEvent
from aios.recovery.messages import DUPLICATE_NOTE, find_duplicates, record_duplicates
from aios.recovery.sync import run_sync
from aios.tasks.create import create_tasks
from aios.tasks.spec import TaskSpec
from aios.tasks.states import TaskState, transition
from aios.timeutil import utcnow


@pytest.fixture()
def embedded(tmp_path: Path) -> Iterator[Settings]:
    settings = load_settings(
        environ={},
        overrides={
            "database": {"url": f"sqlite:///{tmp_path / 'aios.db'}"},
            "broker": {"url": "filesystem://localhost/", "data_dir": str(tmp_path / "broker")},
            "orchestrator": {"lost_message_grace_s": 1},
            "tasks": {"modules": []},
        },
    )
    migrate.upgrade(settings.database)
    yield settings
    dispose_engines()


def queued_task(settings: Settings, *, queue: str, routing: str, queued_ago_s: float) -> tuple[str, str]:
    """A QUEUED task (no message anywhere) queued ``queued_ago_s`` ago: (its id, its dispatch id)."""
    spec = TaskSpec(type="echo", parameters={}, priority=5, max_retries=0, timeout_s=60, queue=queue, routing=routing)
    dispatch_id = str(uuid.uuid4())
    past = utcnow() - timedelta(seconds=queued_ago_s)
    (task_id,) = create_tasks(None, settings, [spec], actor="test", publish=False).ids
    with session_scope(settings.database) as session:
        session.execute(update(Task).where(Task.id == task_id).values(created_at=past))
        assert transition(
            session,
            task_id,
            TaskState.PENDING,
            TaskState.QUEUED,
            actor="test",
            now=past,
            values={"dispatch_id": dispatch_id},
        )
        return task_id, dispatch_id


def test_find_duplicates_names_tasks_active_on_more_than_one_agent():
    replies = {
        "a@h": [{"id": "t1", "kwargs": {"dispatch_id": "d1"}}, {"id": "t2", "kwargs": {"dispatch_id": "x"}}],
        "b@h": [{"id": "t1", "kwargs": {"dispatch_id": "d2"}}],
        "c@h": None,
        "d@h": [{"id": "t3", "kwargs": "not a dict"}],
    }
    assert find_duplicates(replies) == {"t1": {"a@h": "d1", "b@h": "d2"}}
    assert find_duplicates({}) == {}


def test_a_duplicate_is_recorded_once_and_unknown_task_ids_are_ignored(embedded):
    task_id, _ = queued_task(embedded, queue="default", routing="queue", queued_ago_s=0)
    seen = {task_id: {"a@h": "d1", "b@h": "d2"}, "not-a-task": {"a@h": None, "b@h": None}}

    assert record_duplicates(embedded, seen) == 1
    assert record_duplicates(embedded, seen) == 0

    with session_scope(embedded.database) as session:
        notes = [
            e.detail
            for e in session.scalars(select(TaskEvent).where(TaskEvent.task_id == task_id))
            if e.to_state is None
        ]
    assert notes == [{"note": DUPLICATE_NOTE, "agents": {"a@h": "d1", "b@h": "d2"}}]


def test_on_the_filesystem_transport_the_message_check_is_skipped_but_stranded_tasks_are_rerouted(embedded):
    # Given a task stranded in the queue of an agent nobody knows, and one on a named queue, both old
    stranded, old_dispatch = queued_task(embedded, queue="agent.ghost-host", routing="round_robin", queued_ago_s=30)
    named, named_dispatch = queued_task(embedded, queue="default", routing="queue", queued_ago_s=30)

    # When sync runs on the embedded stack
    run = run_sync(create_celery_app(embedded), embedded, runner="unit")

    # Then it says it skipped the message check, and why
    assert run["errors"] == [], run["errors"]
    assert any(note.startswith("lost_messages: skipped on the filesystem transport") for note in run["found"]["notes"])
    assert run["found"]["lost_messages"] == 0 and run["found"]["stranded"] == 1
    # and the stranded task went back to routing (no healthy agent now: it waits PENDING for one)
    with session_scope(embedded.database) as session:
        rows = {t.id: t for t in session.scalars(select(Task).where(Task.id.in_([stranded, named])))}
        moved = [
            e
            for e in session.scalars(select(TaskEvent).where(TaskEvent.task_id == stranded))
            if (e.from_state, e.to_state) == ("QUEUED", "PENDING")
        ]
    assert rows[stranded].state == "PENDING" and rows[stranded].pending_reason == "no_healthy_agent"
    assert moved[0].actor == "sync" and moved[0].detail["dispatch_id"] == old_dispatch
    # while the task on a named queue, which sync cannot check here, is left as it was
    assert rows[named].state == "QUEUED" and rows[named].dispatch_id == named_dispatch
