"""The agent's Redis transport (workers/redis_transport.py) writes each ack with the next delivery.

Checked on the real Redis: an ack stays in kombu's ``unacked`` hash only until the next delivery's own
write or the idle flush; nothing acked is given back when the channel closes; and a real agent that has
finished its tasks leaves none of their messages behind.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from typing import Any

import pytest
import redis
from kombu import Connection

from aios.broker.celery_app import queue_name
from tests.conftest import REDIS_URL, wait_for

pytestmark = pytest.mark.integration

TRANSPORT = "workers.redis_transport:Transport"


@pytest.fixture()
def prefix(redis_prefix: str) -> str:
    return f"{redis_prefix}acks-{uuid.uuid4().hex[:8]}:"


def unacked_tags(client: redis.Redis, prefix: str) -> tuple[set[str], set[str]]:
    """The delivery tags in the unacked hash and in its index."""
    return (
        {tag.decode() for tag in client.hkeys(f"{prefix}unacked")},
        {tag.decode() for tag in client.zrange(f"{prefix}unacked_index", 0, -1)},
    )


def filled_queue(connection: Connection, count: int) -> Any:
    """A queue named ``work`` holding ``count`` messages ``{"n": 0}``, ``{"n": 1}``, ..."""
    queue = connection.SimpleQueue("work")
    for n in range(count):
        queue.put({"n": n})
    return queue


def test_an_ack_is_written_with_the_next_delivery_and_the_idle_flush_writes_the_last(prefix):
    client = redis.Redis.from_url(REDIS_URL)
    with Connection(REDIS_URL, transport=TRANSPORT, transport_options={"global_keyprefix": prefix}) as connection:
        queue = filled_queue(connection, 3)
        first = queue.get(timeout=5)
        assert unacked_tags(client, prefix) == ({first.delivery_tag},) * 2
        first.ack()
        # Acked: the prefetch slot is free at once, the hash entry goes with the next write.
        assert first.delivery_tag in unacked_tags(client, prefix)[0]
        second = queue.get(timeout=5)
        assert unacked_tags(client, prefix) == ({second.delivery_tag},) * 2
        second.ack()
        queue.channel.qos.flush_acks()  # what the agent's event-loop timer does when idle
        assert unacked_tags(client, prefix) == (set(), set())
        third = queue.get(timeout=5)
        assert third.payload == {"n": 2}
        third.ack()
        queue.close()
    assert unacked_tags(client, prefix) == (set(), set())


def test_closing_the_channel_gives_back_only_what_was_not_acked(prefix):
    client = redis.Redis.from_url(REDIS_URL)
    with Connection(REDIS_URL, transport=TRANSPORT, transport_options={"global_keyprefix": prefix}) as connection:
        queue = filled_queue(connection, 2)
        done = queue.get(timeout=5)
        held = queue.get(timeout=5)
        done.ack()  # kept, not yet written
        assert {done.delivery_tag, held.delivery_tag} <= unacked_tags(client, prefix)[0]
        queue.close()  # the channel restores its unacked messages: the kept ack must be written first
    assert unacked_tags(client, prefix) == (set(), set())
    with Connection(REDIS_URL, transport_options={"global_keyprefix": prefix}) as connection:
        queue = connection.SimpleQueue("work")
        again = queue.get(timeout=5)
        assert again.payload == {"n": 1}  # the one not acked, back in the queue; the acked one is not
        again.ack()
        queue.close()
    assert client.llen(f"{prefix}work") == 0


def test_an_agent_that_finished_its_tasks_leaves_none_of_their_messages_unacked(
    client, stack, queue, start_worker, ledger
):
    start_worker([queue], concurrency=2)
    ids = client.post(
        "/api/v1/tasks/batch",
        json={"tasks": [{"type": "echo", "parameters": {"n": n}, "queue": queue} for n in range(20)]},
    ).get_json()["ids"]
    for task_id in ids:
        ledger.wait_state(task_id, "SUCCEEDED")
    broker = redis.Redis.from_url(REDIS_URL)
    prefix = stack.settings.broker.key_prefix

    def none_left() -> bool:
        held = b"".join(broker.hvals(f"{prefix}unacked"))
        return not any(task_id.encode() in held for task_id in ids)

    # The idle flush runs every ACK_FLUSH_S (0.05 s); a second is plenty on a loaded machine.
    wait_for(none_left, timeout=5, interval=0.1, what="the agent's acks to reach Redis")
    assert not broker.lrange(f"{prefix}{queue_name(stack.settings, queue)}", 0, -1)


def test_an_agent_process_names_its_broker_redis_and_uses_this_transport():
    code = (
        "from workers import redis_transport; redis_transport.install(); from kombu import Connection; "
        f"c = Connection({REDIS_URL!r}); print(type(c.transport).__module__, c.as_uri())"
    )
    module, uri = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert module == "workers.redis_transport"
    assert uri.startswith("redis://")  # what the worker logs ("Connected to redis://...") and reports
