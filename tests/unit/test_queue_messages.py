"""Reading AIOS task messages as kombu stores them: the purge and the queue ages depend on it.

The message is built by Celery's own publish path (on kombu's in-memory transport, which keeps the
same message dict the Redis transport serializes into its lists).
"""

from __future__ import annotations

import json

from aios.broker.celery_app import RUN_TASK_NAME, create_celery_app
from aios.broker.priority import PRIORITY_STEPS, to_transport
from aios.broker.publish import PUBLISHED_AT_HEADER
from aios.broker.queues import LEVELS, _published_at, _read_message
from aios.config import load_settings


def test_a_published_aios_message_yields_its_task_id_dispatch_id_and_publish_time():
    # Given a message published the way aios.broker.publish.publish does it
    app = create_celery_app(load_settings(environ={"AIOS_BROKER__URL": "memory://"}))
    with app.connection_for_write() as connection:
        producer = connection.Producer()
        app.send_task(
            RUN_TASK_NAME,
            kwargs={"dispatch_id": "dispatch-1"},
            task_id="task-1",
            queue="unit-q",
            priority=to_transport(2),
            headers={PUBLISHED_AT_HEADER: "2025-01-02T03:04:05Z"},
            producer=producer,
        )
        stored = connection.default_channel._get("unit-q")

    # When it is read back from its stored (JSON) form
    raw = json.dumps(stored).encode()

    # Then the task id, the dispatch fence and the publish time come out
    assert _read_message(raw) == ("task-1", "dispatch-1")
    published = _published_at(raw)
    assert published is not None and published.isoformat() == "2025-01-02T03:04:05+00:00"


def test_a_foreign_or_broken_message_is_not_mistaken_for_an_aios_task():
    assert _read_message(b"not json") == (None, None)
    assert _read_message(json.dumps({"headers": {}, "body": ""}).encode()) == (None, None)
    assert _published_at(json.dumps({"headers": {}}).encode()) is None


def test_every_aios_level_has_its_own_kombu_priority_step():
    assert sorted(to_transport(level) for level in LEVELS) == PRIORITY_STEPS
