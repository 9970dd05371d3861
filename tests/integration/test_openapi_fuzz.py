"""Schemathesis fuzzes the API from its own OpenAPI document: no 5xx, and every answer matches it.

The app under test is the real one on PostgreSQL and Redis, authenticated as an admin (X-API-Key),
so every route's code runs, not only its 403, in a world of its own (tests/support/private_world.py).

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

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

from tests.support.private_world import private_world
from webapi.openapi import OPERATIONS

pytestmark = pytest.mark.integration

#: Examples per operation: enough to reach each route's validation and main path, within ~60 s in all.
MAX_EXAMPLES = 15
EXCLUDED = ("sync.run_now", "backups.create", "workers.shutdown", "events.cluster_events", "events.task_events")
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance]


@pytest.fixture(scope="module")
def fuzz_world(stack: Any) -> Iterator[tuple[Any, str]]:
    """The app on a schema and Redis prefix of its own, and an admin's API key."""
    with private_world(stack, "fuzz") as (app, admin):
        yield app, admin.key


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
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def fuzz(case: Any) -> None:
        if operation_id == "commands.submit" and isinstance(case.body, dict):
            wait_s = case.body.get("wait_s")
            if isinstance(wait_s, int | float) and not isinstance(wait_s, bool) and wait_s > 0.2:
                case.body["wait_s"] = 0.2
        case.call_and_validate(headers={"X-API-Key": key}, checks=CHECKS)

    fuzz()
