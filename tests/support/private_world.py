"""An app on a PostgreSQL schema and Redis prefix of its own, for tests that throw odd or random input.

Fuzzers create users, keys, schedules, agents and tasks with random names, purge queues and change
the system limits: none of that may leak into the other tests of the session, so they get a world of
their own, dropped afterwards. Rate limits are raised (a fuzzer sends far more than 300 writes a
minute) and the worker-inspection timeout lowered (no worker runs here, so every worker call waits
out that timeout before its 404).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.conftest import Credentials, Stack, make_user
from tests.support.schemas import private_schema


@contextmanager
def private_world(stack: Stack, name: str) -> Iterator[tuple[Any, Credentials]]:
    """The app on a schema (:func:`~tests.support.schemas.private_schema`) and Redis prefix of its own,
    and an admin's credentials."""
    import redis

    from aios.broker.celery_app import create_celery_app
    from webapi.app import create_app

    run = uuid.uuid4().hex[:8]
    prefix = f"aios-{name}-{run}:"
    try:
        with private_schema(name) as url:
            world = stack.override(
                database={"url": url},
                broker={"key_prefix": prefix, "namespace": f"{name}{run}"},
                security={
                    "rate_limit_read_per_minute": 1_000_000,
                    "rate_limit_write_per_minute": 1_000_000,
                    "rate_limit_login_per_minute": 1_000_000,
                },
                api={"inspect_timeout_s": 0.1},
            )
            app = create_app(world.settings, create_celery_app(world.settings))
            yield app, make_user(world, "admin", name=f"{name}-admin-{uuid.uuid4().hex}")
    finally:
        client = redis.Redis.from_url(stack.settings.broker.url)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
