"""The embedded broker on a temp SQLite file: first its plain logic (:class:`aios.broker.sqlite_transport.Store`:
ordering, holding and visibility, acks, purge and put-back, bindings and expiry; two Stores on one file
stand for two processes), then the kombu adapter through real kombu connections (no Celery)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from aios.broker.celery_app import create_celery_app
from aios.broker.priority import to_transport
from aios.broker.sqlite_transport import Store, clamp_priority, install, path_of
from aios.config import Settings

VISIBILITY_S = 30.0


@pytest.fixture()
def store(tmp_path):
    made = Store(tmp_path / "broker.db")
    yield made
    made.close()


def payload(name: str) -> str:
    return json.dumps({"name": name})


def names(taken) -> list[str]:
    return [json.loads(t.payload)["name"] for t in taken]


def take_all(store: Store, queues, *, now: float = 1000.0):
    found = []
    while (taken := store.take(queues, visibility_timeout_s=VISIBILITY_S, now=now)) is not None:
        found.append(taken)
    return found


def test_messages_are_taken_most_urgent_first_then_oldest_first(store):
    # Given messages of mixed AIOS priorities, published in this order
    published = [("a", 5), ("b", 9), ("c", 0), ("d", 9), ("e", 5), ("f", 0), ("g", 7)]
    for name, priority in published:
        store.put("q", to_transport(priority), payload(name))
    # When a consumer takes them all
    taken = take_all(store, ["q"])
    # Then AIOS 9 comes first and FIFO holds within a level
    assert names(taken) == ["b", "d", "g", "a", "e", "c", "f"]


def test_a_consumer_of_several_queues_takes_the_most_urgent_of_all_of_them(store):
    # Given a low priority message in one queue and an urgent one published later in another
    store.put("agent.a", to_transport(1), payload("low"))
    store.put("cap.gpu", to_transport(8), payload("urgent"))
    # When an agent consuming both takes one
    first = store.take(["agent.a", "cap.gpu"], visibility_timeout_s=VISIBILITY_S, now=1000.0)
    # Then it is the urgent one, from its own queue
    assert first is not None and (first.queue, names([first])) == ("cap.gpu", ["urgent"])


def test_a_taken_message_is_held_until_its_visibility_timeout_then_waits_again(store):
    # Given one message taken at t=1000
    store.put("q", 0, payload("m"))
    first = store.take(["q"], visibility_timeout_s=VISIBILITY_S, now=1000.0)
    assert first is not None
    # Then nobody else gets it, and it is not counted as waiting, before the deadline
    assert store.take(["q"], visibility_timeout_s=VISIBILITY_S, now=1000.0 + VISIBILITY_S - 1) is None
    assert store.size("q", now=1000.0 + VISIBILITY_S - 1) == 0
    # When its holder never acks (killed) and the deadline passes
    again = store.take(["q"], visibility_timeout_s=VISIBILITY_S, now=1000.0 + VISIBILITY_S + 1)
    # Then it is delivered again, under a new tag, and the dead holder's late ack deletes nothing
    assert again is not None and again.id == first.id and again.tag != first.tag
    assert store.ack(first.tag) is False
    assert store.ack(again.tag) is True
    assert store.take(["q"], visibility_timeout_s=VISIBILITY_S, now=5000.0) is None


def test_an_acked_message_is_gone_and_a_requeued_one_returns_to_its_place(store):
    # Given three messages of one level, the first two taken
    for name in ("first", "second", "third"):
        store.put("q", 3, payload(name))
    first = store.take(["q"], visibility_timeout_s=VISIBILITY_S, now=1000.0)
    second = store.take(["q"], visibility_timeout_s=VISIBILITY_S, now=1000.0)
    # When the first is acked and the second rejected with requeue
    assert store.ack(first.tag)
    assert store.requeue([second.tag]) == 1
    # Then the second comes back before the third, and the first never again
    assert names(take_all(store, ["q"], now=1001.0)) == ["second", "third"]


def test_a_take_without_ack_deletes_the_message(store):
    # Given a message for a consumer that never acks (Celery's control and event receivers)
    store.put("q.pidbox", 0, payload("ping"))
    # When it is taken without ack / Then it is never delivered again, even after the timeout
    assert store.take(["q.pidbox"], visibility_timeout_s=VISIBILITY_S, ack=False, now=1000.0) is not None
    assert store.take(["q.pidbox"], visibility_timeout_s=VISIBILITY_S, now=1000.0 + 10 * VISIBILITY_S) is None


def test_two_processes_never_take_the_same_message(tmp_path):
    # Given 200 messages and four threads, each with a Store of its own on the same file
    Store(tmp_path / "b.db").put_many(["q"] * 200, 0, payload("m"))
    taken: list[int] = []
    lock = threading.Lock()

    def consume() -> None:
        mine = Store(tmp_path / "b.db")
        while (message := mine.take(["q"], visibility_timeout_s=VISIBILITY_S)) is not None:
            with lock:
                taken.append(message.id)
        mine.close()

    threads = [threading.Thread(target=consume) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Then every message was taken exactly once
    assert len(taken) == 200 and len(set(taken)) == 200


def test_levels_count_waiting_messages_per_priority_and_show_the_oldest(store):
    # Given two waiting at kombu priority 0, one at 4, and one more at 4 that an agent holds
    store.put("q", 0, payload("old0"))
    store.put("q", 0, payload("new0"))
    store.put("q", 4, payload("held"))
    store.put("q", 4, payload("old4"))
    store.take(["q"], visibility_timeout_s=VISIBILITY_S, now=1000.0)  # takes old0
    store.take(["q"], visibility_timeout_s=VISIBILITY_S, now=1000.0)  # takes new0
    store.put("q", 0, payload("later0"))
    # When the levels are read
    levels = store.levels(["q", "empty"], now=1001.0)
    # Then held messages are not counted; each level names its oldest waiting message
    assert {p: (d, json.loads(raw)["name"]) for p, (d, raw) in levels["q"].items()} == {
        0: (1, "later0"),
        4: (2, "held"),
    }
    assert levels["empty"] == {}


def test_purge_takes_only_waiting_messages_of_the_levels_asked_and_put_back_restores_their_place(store):
    # Given waiting messages at two levels and one held by an agent
    store.put("q", 0, payload("held"))
    held = store.take(["q"], visibility_timeout_s=VISIBILITY_S)
    store.put("q", 0, payload("a0"))
    store.put("q", 5, payload("a5"))
    store.put("q", 0, payload("b0"))
    # When level 0 is purged
    rows = store.take_waiting("q", [0])
    # Then only its waiting messages were taken, oldest first, and the held one stays held
    assert [json.loads(r.payload)["name"] for r in rows] == ["a0", "b0"]
    assert store.levels(["q"])["q"].keys() == {5}
    # When they are put back / Then they are taken in their old order, before the level-5 message
    store.put_back(rows)
    assert names(take_all(store, ["q"], now=time.time())) == ["a0", "b0", "a5"]
    assert store.ack(held.tag)


def test_bindings_are_shared_between_stores_on_one_file_and_deleted_with_their_queue(tmp_path):
    # Given a binding made through one Store (one process)
    Store(tmp_path / "b.db").bind("aios.pidbox", "", "", "agent@a.aios.pidbox")
    other = Store(tmp_path / "b.db")
    # Then another Store (another process) sees it
    assert other.table("aios.pidbox") == [("", "", "agent@a.aios.pidbox")]
    assert other.has_queue("agent@a.aios.pidbox")
    # When the queue is deleted / Then its binding is gone
    other.delete_queue("agent@a.aios.pidbox")
    assert other.table("aios.pidbox") == []


def test_expired_copies_are_never_delivered_and_are_swept(store):
    # Given a fanout copy that expires at t=1060 and an ordinary message
    store.put("ev", 0, payload("event"), expires_at=1060.0)
    # Then after its expiry it is not delivered, and a poll sweeps it from the file
    assert store.take(["ev"], visibility_timeout_s=VISIBILITY_S, now=1061.0) is None
    assert store._conn().execute("SELECT count(*) FROM messages").fetchone()[0] == 0


def test_the_file_is_in_wal_mode_so_readers_never_wait_for_writers(store):
    store.put("q", 0, payload("m"))
    assert store._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_odd_priorities_are_clamped_to_kombus_ten_levels():
    assert [clamp_priority(v) for v in (None, "x", -3, 0, 4, 9, 12)] == [0, 0, 0, 0, 4, 9, 9]


def test_a_url_without_a_file_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="sqlite:///var/broker.db"):
        path_of("/")
    assert path_of("var/broker.db") == "var/broker.db"
    assert path_of("/srv/aios/broker.db") == "/srv/aios/broker.db"


def test_a_locked_file_is_a_connection_error_that_kombu_retries():
    from aios.broker.sqlite_transport import Transport

    assert sqlite3.OperationalError in Transport.connection_errors


# ---------------------------------------------------------------------- through kombu (no Celery)


@pytest.fixture()
def broker_url(tmp_path) -> str:
    install()
    return f"sqlite:///{tmp_path}/broker.db"


def connect(url: str) -> Connection:
    return Connection(url, transport_options={"polling_interval": 0.01, "visibility_timeout": VISIBILITY_S})


def test_a_fanout_published_in_one_process_reaches_the_queues_bound_in_another(broker_url):
    # Given two consumers' queues bound to a fanout exchange through one connection
    exchange = Exchange("aios.pidbox", type="fanout")
    queues = [Queue(f"agent-{i}.pidbox", exchange) for i in (1, 2)]
    with connect(broker_url) as consumer_side, connect(broker_url) as publisher_side:
        for queue in queues:
            queue(consumer_side.default_channel).declare()
        # When another connection (another process) publishes a broadcast
        Producer(publisher_side.default_channel).publish({"method": "ping"}, exchange=exchange, declare=[exchange])
        # Then each bound queue gets its own copy
        got = [queue(consumer_side.default_channel).get(no_ack=True) for queue in queues]
        assert [message.payload for message in got] == [{"method": "ping"}] * 2


def test_messages_a_closing_channel_still_holds_wait_again_at_once(broker_url):
    # Given a message taken (not acked) through a channel
    queue = Queue("work", Exchange("work"), routing_key="work")
    with connect(broker_url) as connection:
        Producer(connection.default_channel).publish(
            {"n": 1}, exchange=queue.exchange, routing_key="work", declare=[queue]
        )
        channel = connection.channel()
        assert queue(channel).get(no_ack=False) is not None
        assert Store(broker_url.split(":///", 1)[1]).size("work") == 0
        # When the channel closes (a worker stopping cleanly)
        channel.close()
        # Then the message waits again, without waiting for its visibility timeout
        assert Store(broker_url.split(":///", 1)[1]).size("work") == 1


def test_an_ack_wakes_a_consumer_waiting_for_a_free_slot(broker_url):
    # Given a consumer with prefetch 1 holding one message, and a second one waiting
    queue = Queue("work", Exchange("work"), routing_key="work")
    held: list = []
    with connect(broker_url) as connection:
        connection.transport_options["polling_interval"] = 30.0  # only the ack can end the wait early
        producer = Producer(connection.default_channel)
        for n in (1, 2):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key="work", declare=[queue])
        with Consumer(connection, [queue], callbacks=[lambda body, message: held.append(message)], prefetch_count=1):
            connection.drain_events(timeout=5)
            assert [m.payload for m in held] == [{"n": 1}]
            # When another thread acks it while the consumer waits
            threading.Timer(0.2, held[0].ack).start()
            began = time.monotonic()
            connection.drain_events(timeout=20)
            # Then the consumer takes the next message long before its 30 s poll interval
            assert [m.payload for m in held] == [{"n": 1}, {"n": 2}]
            assert time.monotonic() - began < 15


def test_the_embedded_default_is_the_sqlite_broker_with_depths_and_redelivery():
    settings = Settings()
    assert settings.broker.url == "sqlite:///var/broker.db"
    assert settings.broker.is_embedded and settings.broker.is_sqlite and not settings.broker.is_redis
    assert settings.broker.has_queue_depths and settings.broker.redelivers_after_visibility_timeout
    options = create_celery_app(settings).conf.broker_transport_options
    assert options["visibility_timeout"] == settings.broker.visibility_timeout_s
    assert options["polling_interval"] == settings.broker.polling_interval_s


def test_on_the_sqlite_broker_the_visibility_timeout_must_exceed_the_task_timeout():
    with pytest.raises(ValueError, match="broker.visibility_timeout_s"):
        Settings.model_validate(
            {
                "broker": {"url": "sqlite:///var/broker.db", "visibility_timeout_s": 60},
                "orchestrator": {"task_timeout_s": 60},
            }
        )
