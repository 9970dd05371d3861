"""Schemathesis fuzzes the API from its own OpenAPI document: no 5xx, and every answer matches it.

The app under test is the real one on PostgreSQL and Redis, authenticated as an admin (X-API-Key),
so every route's code runs, not only its 403. It gets a private PostgreSQL schema and Redis prefix of
its own: the fuzzer creates users, keys, schedules, agents and tasks with random names, purges queues
and changes the system limits, and none of that may leak into the other tests of the session. Rate
limits are raised (the fuzzer sends far more than 300 writes a minute) and the worker-inspection
timeout lowered (no worker runs here, so every worker call waits out that timeout before its 404).

Operations left out, and why:
- POST /api/v1/sync/run: runs the whole sync job in the API process (seconds per call, and it moves
  tasks of the schema); its own tests are in test_sync.py.
- POST /api/v1/backups: runs pg_dump of the database each call (slow, and writes files).
- POST /api/v1/workers/{name}/shutdown: shuts down a worker; none runs here, but it is never fuzzed
  against a live cluster by accident either.
- GET /api/v1/events and GET /api/v1/tasks/{task_id}/events: server-sent event streams that stay
  open until the client leaves (tested in test_events.py).
Each example's ``wait_s`` of POST /api/v1/commands is capped at 0.2 s: no worker runs the command,
so a larger one only waits.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

from tests.conftest import PG_URL, make_user
from webapi.openapi import OPERATIONS

pytestmark = pytest.mark.integration

#: Examples per operation: enough to reach each route's validation and main path, within ~60 s in all.
MAX_EXAMPLES = 15
EXCLUDED = ("sync.run_now", "backups.create", "workers.shutdown", "events.cluster_events", "events.task_events")
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance]


@pytest.fixture(scope="module")
def fuzz_world(stack: Any) -> Iterator[tuple[Any, str]]:
    """The app on a schema and Redis prefix of its own, and an admin's API key."""
    import redis
    import sqlalchemy as sa

    from aios import migrate
    from aios.celery_app import create_celery_app
    from aios.config import DatabaseSettings
    from aios.db import dispose_engines
    from webapi.app import create_app

    run = uuid.uuid4().hex[:8]
    schema = f"aios_fuzz_{run}"
    engine = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = f"{PG_URL}?options=-csearch_path%3D{schema}"
    prefix = f"aios-fuzz-{run}:"
    try:
        migrate.upgrade(DatabaseSettings(url=url))
        world = stack.override(
            database={"url": url},
            broker={"key_prefix": prefix, "namespace": f"fuzz{run}"},
            security={"rate_limit_read_per_minute": 1_000_000, "rate_limit_write_per_minute": 1_000_000},
            api={"inspect_timeout_s": 0.1},
        )
        app = create_app(world.settings, create_celery_app(world.settings))
        yield app, make_user(world, "admin", name=f"fuzz-admin-{uuid.uuid4().hex}").key
    finally:
        dispose_engines()
        with engine.connect() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()
        client = redis.Redis.from_url(stack.settings.broker.url)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture(scope="module")
def api_schema(fuzz_world: tuple[Any, str]) -> Any:
    app, _ = fuzz_world
    return schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)


def _strategy(operation: Any) -> Any:
    """Valid requests, plus invalid ones (wrong types, missing fields) where the operation takes input."""
    positive = operation.as_strategy(GenerationMode.POSITIVE)
    takes_input = bool(operation.definition.raw.get("parameters")) or "requestBody" in operation.definition.raw
    return st.one_of(positive, operation.as_strategy(GenerationMode.NEGATIVE)) if takes_input else positive


@pytest.mark.parametrize("operation_id", sorted(set(OPERATIONS) - set(EXCLUDED)))
def test_every_operation_answers_as_documented_and_never_with_a_5xx(
    operation_id: str, api_schema: Any, fuzz_world: tuple[Any, str]
) -> None:
    _, key = fuzz_world
    operation = api_schema.find_operation_by_id(operation_id)

    @given(case=_strategy(operation))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    def fuzz(case: Any) -> None:
        if operation_id == "commands.submit" and isinstance(case.body, dict):
            wait_s = case.body.get("wait_s")
            if isinstance(wait_s, int | float) and not isinstance(wait_s, bool) and wait_s > 0.2:
                case.body["wait_s"] = 0.2
        case.call_and_validate(headers={"X-API-Key": key}, checks=CHECKS)

    fuzz()
