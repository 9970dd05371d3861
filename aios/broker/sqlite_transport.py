"""The embedded broker: a kombu transport that keeps messages in one SQLite file.

``broker.url = "sqlite:///var/broker.db"`` (the default of ``make run`` / ``aios up``) needs no server,
and keeps the promises AIOS makes on Redis:

* **Priority, then FIFO.** A message carries kombu's priority (0 most urgent, the direction of
  kombu's Redis transport; :mod:`aios.broker.priority` maps AIOS levels onto it). An agent always takes the
  lowest priority number, oldest first, across all the queues it consumes.
* **At least once.** Taking a message does not remove it: the row is marked taken, with a deadline
  (``visibility_timeout``). The ack deletes it; a reject with requeue, or a worker that shuts down
  with messages unacked, makes it waiting again at its old place. If the agent is killed, the
  message waits again once the deadline passes, and the next agent takes it (AIOS's dispatch
  fence makes the second run safe).
* **Shared by processes.** The API, agent and beat processes of ``aios up`` open the same file in
  WAL mode: readers never wait, writers take turns (``busy_timeout``). Every take runs in one
  ``BEGIN IMMEDIATE`` transaction, so two agents never take the same message. Commits do not fsync
  (``synchronous=NORMAL``): a killed process loses nothing, a power cut may lose the last
  transactions.
* **Fanout and topic.** Exchange bindings live in the file too, so Celery's control broadcasts
  (``celery inspect ping``, AIOS's ``/api/v1/workers``), their replies and its events reach
  consumers in other processes. Copies made for such exchanges expire after ``fanout_ttl`` seconds,
  so the queue of a consumer that died does not grow forever; with nobody bound (no Flower, no
  ``celery events``), an event costs one indexed read and is stored nowhere.

:class:`Store` is the plain logic (unit tests use it on a temp file, without Celery); ``Channel``
and ``Transport`` adapt it to kombu's virtual transport. ``aios.broker.queues`` reads depths and purges
through the same :class:`Store`.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.utils.scheduling import FairCycle

from aios.broker.priority import MAX_PRIORITY, MIN_PRIORITY

#: The URL scheme: ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``.
SCHEME = "sqlite"
#: How long a copy delivered through a fanout or topic exchange (control broadcasts, replies,
#: events) waits for its consumer before it is dropped.
DEFAULT_FANOUT_TTL_S = 60.0
DEFAULT_BUSY_TIMEOUT_S = 15.0
#: Expired copies are swept at most this often per process.
_SWEEP_EVERY_S = 5.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- FIFO order within a priority
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL,              -- kombu priority: 0 is taken first
    payload TEXT NOT NULL,                  -- the kombu message as JSON
    taken_by TEXT,                          -- delivery tag while a consumer holds it
    visible_at REAL NOT NULL DEFAULT 0,     -- while taken: when it waits again if not acked
    expires_at REAL                         -- fanout/topic copies only
);
CREATE INDEX IF NOT EXISTS messages_next ON messages (queue, priority, id);
CREATE INDEX IF NOT EXISTS messages_expiry ON messages (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS bindings (
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    pattern TEXT NOT NULL,
    queue TEXT NOT NULL,
    PRIMARY KEY (exchange, routing_key, queue)
);
CREATE INDEX IF NOT EXISTS bindings_queue ON bindings (queue);
"""

#: A message is waiting (can be taken) when nobody holds it or its holder's deadline passed.
_WAITING = "(taken_by IS NULL OR visible_at <= :now) AND (expires_at IS NULL OR expires_at > :now)"


def _set_wal(conn: sqlite3.Connection, busy_timeout_s: float) -> None:
    """WAL mode (kept in the file once set). Switching needs a moment alone with the file, which
    the first processes of ``aios up`` opening it together may not get at once: retry a while."""
    deadline = time.monotonic() + busy_timeout_s
    while conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def clamp_priority(value: Any) -> int:
    """kombu's priority of a message, limited to 0-9 (a missing or odd value counts as 0, as kombu does)."""
    try:
        return max(MIN_PRIORITY, min(MAX_PRIORITY, int(value)))
    except (TypeError, ValueError):
        return MIN_PRIORITY


@dataclass(frozen=True)
class Row:
    """One stored message, as :meth:`Store.take_waiting` hands it out and :meth:`Store.put_back` takes it."""

    id: int
    queue: str
    priority: int
    payload: str
    expires_at: float | None = None


@dataclass(frozen=True)
class Taken:
    """A message a consumer took: ``tag`` acks or requeues it (and nothing taken after it by another)."""

    id: int
    queue: str
    payload: str
    tag: str


def split_tag(tag: str) -> int:
    return int(tag.split("/", 1)[0])


class Store:
    """The SQLite file: one connection per thread and process, each write in ``BEGIN IMMEDIATE``."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> None:
        self.path = str(path)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._next_sweep = 0.0

    # ------------------------------------------------------------------ connections

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        # A forked child opens its own: a SQLite connection must not cross fork().
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        _set_wal(conn, self.busy_timeout_s)
        conn.execute("PRAGMA synchronous = NORMAL")
        with self._transaction(conn):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    @staticmethod
    @contextmanager
    def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE: take the write lock first, so the reads below see the latest state and the
        # write cannot fail on a stale snapshot (which busy_timeout would not retry).
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        with self._transaction(self._conn()) as conn:
            yield conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    # ------------------------------------------------------------------ messages

    def put(self, queue: str, priority: int, payload: str, *, expires_at: float | None = None) -> None:
        self.put_many([queue], priority, payload, expires_at=expires_at)

    def put_many(self, queues: Iterable[str], priority: int, payload: str, *, expires_at: float | None = None) -> None:
        rows = [(queue, clamp_priority(priority), payload, expires_at) for queue in queues]
        if rows:
            with self.write() as conn:
                conn.executemany(
                    "INSERT INTO messages (queue, priority, payload, expires_at) VALUES (?, ?, ?, ?)", rows
                )

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def _next_sql(count: int) -> str:
        # One index probe per queue (queue, priority, id), then the best of those: a backlog in one
        # queue does not slow a take from another. Built once per number of queues: every poll runs it.
        one = (
            f"SELECT * FROM (SELECT id, queue, payload, priority FROM messages WHERE queue = :q{{i}} "
            f"AND {_WAITING} ORDER BY priority, id LIMIT 1)"
        )
        return " UNION ALL ".join(one.format(i=i) for i in range(count)) + " ORDER BY priority, id LIMIT 1"

    def take(
        self, queues: Sequence[str], *, visibility_timeout_s: float, ack: bool = True, now: float | None = None
    ) -> Taken | None:
        """The most urgent, oldest waiting message of ``queues``, or None.

        With ``ack`` the message stays in the file, held until ``now + visibility_timeout_s``;
        without (consumers that never ack, like Celery's control and event receivers) it is deleted.
        """
        if not queues:
            return None
        now = time.time() if now is None else now
        sql = self._next_sql(len(queues))
        params: dict[str, Any] = {f"q{i}": q for i, q in enumerate(queues)}
        params["now"] = now
        conn = self._conn()
        # A poll that finds nothing costs one read and takes no lock.
        if conn.execute(sql, params).fetchone() is None:
            self._sweep(now)
            return None
        with self.write() as conn:
            row = conn.execute(sql, params).fetchone()
            if row is None:
                return None
            message_id, queue, payload, _priority = row
            tag = f"{message_id}/{uuid.uuid4().hex}"
            if ack:
                conn.execute(
                    "UPDATE messages SET taken_by = ?, visible_at = ? WHERE id = ?",
                    (tag, now + visibility_timeout_s, message_id),
                )
            else:
                conn.execute("DELETE FROM messages WHERE id = ?", (message_id,))
        return Taken(id=message_id, queue=queue, payload=payload, tag=tag)

    def ack(self, tag: str) -> bool:
        """Delete the message taken under ``tag``; False if it is no longer held under it (its
        deadline passed and another consumer took it: that one's ack counts)."""
        with self.write() as conn:
            return (
                conn.execute("DELETE FROM messages WHERE id = ? AND taken_by = ?", (split_tag(tag), tag)).rowcount > 0
            )

    def requeue(self, tags: Iterable[str]) -> int:
        """Make messages taken under ``tags`` wait again, at their old place in their queue."""
        pairs = [(split_tag(tag), tag) for tag in tags]
        if not pairs:
            return 0
        with self.write() as conn:
            return sum(
                conn.execute(
                    "UPDATE messages SET taken_by = NULL, visible_at = 0 WHERE id = ? AND taken_by = ?", pair
                ).rowcount
                for pair in pairs
            )

    def size(self, queue: str, *, now: float | None = None) -> int:
        now = time.time() if now is None else now
        waiting: int = (
            self._conn()
            .execute(f"SELECT count(*) FROM messages WHERE queue = :queue AND {_WAITING}", {"queue": queue, "now": now})
            .fetchone()[0]
        )
        return waiting

    def purge(self, queue: str) -> int:
        """Delete the waiting messages of ``queue`` (kombu's queue_purge); held ones stay."""
        return len(self.take_waiting(queue))

    def delete_queue(self, queue: str) -> None:
        with self.write() as conn:
            conn.execute("DELETE FROM messages WHERE queue = ?", (queue,))
            conn.execute("DELETE FROM bindings WHERE queue = ?", (queue,))

    def has_queue(self, queue: str) -> bool:
        conn = self._conn()
        return (
            conn.execute("SELECT 1 FROM bindings WHERE queue = ? LIMIT 1", (queue,)).fetchone() is not None
            or conn.execute("SELECT 1 FROM messages WHERE queue = ? LIMIT 1", (queue,)).fetchone() is not None
        )

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_EVERY_S
        if self._conn().execute("SELECT 1 FROM messages WHERE expires_at <= ? LIMIT 1", (now,)).fetchone():
            with self.write() as conn:
                conn.execute("DELETE FROM messages WHERE expires_at <= ?", (now,))

    # ------------------------------------------------------------------ what aios.broker.queues reads and purges

    def levels(self, queues: Sequence[str], *, now: float | None = None) -> dict[str, dict[int, tuple[int, str]]]:
        """{queue: {kombu priority: (waiting messages, payload of the oldest)}} for levels that have any."""
        now = time.time() if now is None else now
        found: dict[str, dict[int, tuple[int, str]]] = {queue: {} for queue in queues}
        conn = self._conn()
        for queue in queues:
            rows = conn.execute(
                f"SELECT m.priority, c.depth, m.payload FROM (SELECT priority, count(*) AS depth, min(id) AS oldest "
                f"FROM messages WHERE queue = :queue AND {_WAITING} GROUP BY priority) AS c "
                f"JOIN messages AS m ON m.id = c.oldest",
                {"queue": queue, "now": now},
            )
            found[queue] = {priority: (depth, payload) for priority, depth, payload in rows}
        return found

    def take_waiting(
        self, queue: str, priorities: Iterable[int] | None = None, *, now: float | None = None
    ) -> list[Row]:
        """Delete and return the waiting messages of ``queue`` (of ``priorities`` only, if given), oldest first."""
        now = time.time() if now is None else now
        where = f"queue = :queue AND {_WAITING}"
        params: dict[str, Any] = {"queue": queue, "now": now}
        if priorities is not None:
            levels = sorted({clamp_priority(p) for p in priorities})
            where += f" AND priority IN ({', '.join(str(p) for p in levels)})"
        with self.write() as conn:
            rows = [
                Row(*row)
                for row in conn.execute(
                    f"SELECT id, queue, priority, payload, expires_at FROM messages WHERE {where} ORDER BY id", params
                )
            ]
            conn.execute(f"DELETE FROM messages WHERE {where}", params)
        return rows

    def put_back(self, rows: Iterable[Row]) -> None:
        """Return messages :meth:`take_waiting` took, under their old ids (so at their old place)."""
        values = [(row.id, row.queue, row.priority, row.payload, row.expires_at) for row in rows]
        if values:
            with self.write() as conn:
                conn.executemany(
                    "INSERT OR IGNORE INTO messages (id, queue, priority, payload, expires_at) VALUES (?, ?, ?, ?, ?)",
                    values,
                )

    # ------------------------------------------------------------------ bindings (shared by every process)

    def bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        with self.write() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO bindings VALUES (?, ?, ?, ?)",
                (exchange, routing_key or "", pattern or "", queue),
            )

    def unbind(self, exchange: str, routing_key: str, queue: str) -> None:
        with self.write() as conn:
            conn.execute(
                "DELETE FROM bindings WHERE exchange = ? AND routing_key = ? AND queue = ?",
                (exchange, routing_key or "", queue),
            )

    def table(self, exchange: str) -> list[tuple[str, str, str]]:
        """(routing key, pattern, queue) of every queue bound to ``exchange``, kombu's exchange table."""
        return [
            tuple(row)
            for row in self._conn().execute(
                "SELECT routing_key, pattern, queue FROM bindings WHERE exchange = ?", (exchange,)
            )
        ]


# ---------------------------------------------------------------------- kombu
# kombu's virtual transport is unannotated. pyproject's untyped_calls_exclude lets us call kombu's
# functions by their kombu names, but mypy names a call through super() or self after our class:
# hence the no-untyped-call ignores below. kombu's class attributes are typed from their values (None,
# a tuple of so many items); ours set the values they take (hence the assignment ignores).


class QoS(virtual.QoS):
    """Acks and rejects go to the file; unacked messages of a closing channel wait again at once."""

    def ack(self, delivery_tag: str) -> None:
        self.channel.store.ack(delivery_tag)
        super().ack(delivery_tag)  # type: ignore[no-untyped-call]  # kombu: unannotated
        self._slot_freed()

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            self.channel.store.requeue([delivery_tag])
        else:
            self.channel.store.ack(delivery_tag)
        self._quick_ack(delivery_tag)
        self._slot_freed()

    def _slot_freed(self) -> None:
        # Celery acks from the pool's result thread: wake the consuming thread now rather than after
        # its poll interval, so a pool process that finished gets its next message at once.
        transport = self.channel.connection
        if transport is not None:
            transport.wake.set()

    def restore_unacked(self) -> list[tuple[BaseException, Any]]:
        self._flush()  # type: ignore[no-untyped-call]  # kombu: unannotated
        held = list(self._delivered.items())
        self._delivered.clear()
        try:
            self.channel.store.requeue([tag for tag, _ in held])
        except sqlite3.Error as exc:  # they wait again once their visibility timeout passes anyway
            return [(exc, message) for _, message in held]
        return []


class Channel(virtual.Channel):
    QoS = QoS
    supports_fanout = True
    from_transport_options = (  # type: ignore[assignment]  # kombu types it by its value: a 2-tuple
        *virtual.Channel.from_transport_options,
        "visibility_timeout",
        "fanout_ttl",
        "busy_timeout",
    )
    visibility_timeout: float = 3600.0
    fanout_ttl: float = DEFAULT_FANOUT_TTL_S
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT_S

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)  # type: ignore[no-untyped-call]  # kombu: unannotated
        self._noack_queues: set[str] = set()
        self.store: Store = connection.store_for(self.busy_timeout)

    # --- publishing

    def _expires_at(self, message: dict[str, Any]) -> float | None:
        exchange = message["properties"].get("delivery_info", {}).get("exchange") or ""
        if exchange and (self.typeof(exchange).type != "direct" or exchange.startswith("reply.")):  # type: ignore[no-untyped-call]  # kombu: unannotated
            return time.time() + float(self.fanout_ttl)
        return None

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        self.store.put(
            queue,
            clamp_priority(message["properties"].get("priority")),
            json.dumps(message),
            expires_at=self._expires_at(message),
        )

    def _put_fanout(self, exchange: str, message: dict[str, Any], routing_key: str, **kwargs: Any) -> None:
        queues = sorted({queue for _, _, queue in self.get_table(exchange)})
        self.store.put_many(
            queues,
            clamp_priority(message["properties"].get("priority")),
            json.dumps(message),
            expires_at=time.time() + float(self.fanout_ttl),
        )

    # --- bindings: in the file, so a publisher sees what other processes bound

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        self.store.bind(exchange, routing_key, pattern, queue)

    def queue_unbind(
        self, queue: str, exchange: str | None = None, routing_key: str = "", arguments: Any = None, **kwargs: Any
    ) -> None:
        super().queue_unbind(queue, exchange, routing_key, arguments, **kwargs)  # type: ignore[no-untyped-call]  # kombu: unannotated
        self.store.unbind(exchange or "amq.direct", routing_key, queue)

    def get_table(self, exchange: str) -> list[tuple[str, str, str]]:
        return self.store.table(exchange)

    # --- consuming

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._noack_queues.add(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)  # type: ignore[no-untyped-call]  # kombu: unannotated

    def basic_cancel(self, consumer_tag: str) -> Any:
        queue = self._tag_to_queue.get(consumer_tag)
        if queue is not None:
            self._noack_queues.discard(queue)
        return super().basic_cancel(consumer_tag)  # type: ignore[no-untyped-call]  # kombu: unannotated

    def _take(self, queues: Sequence[str], *, ack: bool | None = None) -> tuple[dict[str, Any], str]:
        acked = [q for q in queues if q not in self._noack_queues] if ack is None else (list(queues) if ack else [])
        unacked = [q for q in queues if q not in acked]
        for group, with_ack in ((unacked, False), (acked, True)):
            taken = self.store.take(group, visibility_timeout_s=float(self.visibility_timeout), ack=with_ack)
            if taken is not None:
                payload = json.loads(taken.payload)
                payload["properties"]["delivery_tag"] = taken.tag
                return payload, taken.queue
        raise Empty()

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        return self._take([queue])[0]

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        try:
            payload, _ = self._take([queue], ack=not no_ack)
        except Empty:
            return None
        message = self.Message(payload, channel=self)  # type: ignore[no-untyped-call]  # kombu: unannotated
        if not no_ack:
            self.qos.append(message, message.delivery_tag)
        return message

    def drain_events(self, timeout: float | None = None, callback: Any = None) -> None:
        """Deliver the most urgent waiting message of all the queues this channel consumes (kombu's
        default asks one queue after the other, which would let a low priority overtake)."""
        callback = callback or self.connection._deliver
        if self._consumers and self.qos.can_consume():
            payload, queue = self._take(list(dict.fromkeys(self._active_queues)))
            callback(payload, queue)
            return
        raise Empty()

    # --- queues

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        """Queues exist as their messages and bindings: nothing to create."""

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return self.store.has_queue(queue)

    def _size(self, queue: str) -> int:
        return self.store.size(queue)

    def _purge(self, queue: str) -> int:
        return self.store.purge(queue)

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self.store.delete_queue(queue)


class Transport(virtual.Transport):
    """``sqlite:///path.db``: see the module docstring."""

    Channel = Channel
    default_port = 0  # type: ignore[assignment]  # kombu types it by its value: None
    driver_type = "sqlite"
    driver_name = "sqlite3"
    #: A locked or unreadable file is retried like a lost connection (publish retry policy, consumer reconnect).
    connection_errors = (*virtual.Transport.connection_errors, sqlite3.OperationalError)  # type: ignore[assignment]
    channel_errors = (*virtual.Transport.channel_errors, sqlite3.DatabaseError)  # type: ignore[assignment]
    implements = virtual.Transport.implements.extend(
        asynchronous=False, exchange_type=frozenset(["direct", "topic", "fanout"])
    )
    #: kombu's Transport.__init__ sets it (None on the class only).
    cycle: FairCycle

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)  # type: ignore[no-untyped-call]  # kombu: unannotated
        self.path = path_of(client.virtual_host)
        self._store: Store | None = None
        #: Set when an ack or reject frees a prefetch slot (see :meth:`drain_events`).
        self.wake = threading.Event()

    # kombu's virtual.Transport.drain_events has this signature (narrower than its base's **kwargs).
    def drain_events(self, connection: Any, timeout: float | None = None) -> None:  # type: ignore[override]
        """kombu's loop, except that between polls it waits for an ack (a free slot) instead of
        sleeping: an agent whose pool process finished takes the next message at once, not up to a
        poll interval later. New messages from other processes are still found by polling."""
        started = time.monotonic()
        interval = self.polling_interval
        if timeout and interval and interval > timeout:
            interval = timeout
        while True:
            self.wake.clear()
            try:
                self.cycle.get(self._deliver, timeout=timeout)
                return
            except Empty:
                if timeout is not None and time.monotonic() - started >= timeout:
                    raise TimeoutError() from None  # socket.timeout, what Celery catches
                if interval is not None:
                    self.wake.wait(interval)

    def store_for(self, busy_timeout_s: float) -> Store:
        if self._store is None:
            self._store = Store(self.path, busy_timeout_s=float(busy_timeout_s))
        return self._store

    def close_connection(self, connection: Any) -> None:
        super().close_connection(connection)  # type: ignore[no-untyped-call]  # kombu: unannotated
        if self._store is not None:
            self._store.close()

    def driver_version(self) -> str:
        return sqlite3.sqlite_version

    @property
    def default_connection_params(self) -> dict[str, Any]:
        # A file, not a host: no "No hostname was supplied" warning on every connection.
        return {"port": None, "hostname": None}


def path_of(virtual_host: str | None) -> str:
    """The file of ``sqlite:///var/broker.db`` (relative) or ``sqlite:////srv/broker.db`` (absolute)."""
    if not virtual_host or virtual_host == "/":
        raise ValueError("broker.url needs a file: sqlite:///var/broker.db (relative) or sqlite:////abs/path.db")
    return virtual_host


def install() -> None:
    """Let kombu (and so Celery, Flower and ``celery -A aios.broker.celery_app``) open ``sqlite://`` URLs."""
    TRANSPORT_ALIASES.setdefault(SCHEME, f"{__name__}:Transport")
