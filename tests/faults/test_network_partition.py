"""``Fault.CUT_NETWORK``: an agent in a network namespace of its own is cut off for 20 s.

The agent reaches PostgreSQL and Redis only through a veth pair and two TCP forwarders run by the
test; setting the host end of the veth down drops its packets (no reset: its connections just
stall, as in a real partition). Its peer's heartbeat sweep marks it OFFLINE and re-routes its run;
when the link returns, the cut-off run finds itself fenced off and records nothing.

Needs root and ``ip netns``; skipped with the reason where the kernel or the container forbids it.
"""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.conftest import PG_URL, REDIS_URL, REPO_ROOT, WorkerProcess, requirement_missing, wait_for
from tests.faults.conftest import assert_nothing_lost, read_tasks
from tests.support.agent_helpers import FAST_BEATS, submit

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CUT_S = 20.0


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class Forwarder:
    """Accepts TCP on ``listen`` and pipes each connection to ``target`` (both ``(host, port)``)."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(listen)
        self.port = self.server.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closed = True
        self.server.close()


class Namespace:
    """A network namespace joined to the host by a veth pair (host end ``host_ip``)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.name, self.host_if, self.ns_if = f"aiosf{tag}", f"vfh{tag}", f"vfn{tag}"
        net = random.randint(0, 255)
        self.host_ip, self.ns_ip = f"10.213.{net}.1", f"10.213.{net}.2"

    def create(self) -> None:
        ip("netns", "add", self.name)
        ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        ip("link", "set", self.ns_if, "netns", self.name)
        ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        ip("link", "set", self.host_if, "up")
        for args in (
            ["addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if],
            ["link", "set", self.ns_if, "up"],
            ["link", "set", "lo", "up"],
        ):
            ip("netns", "exec", self.name, "ip", *args)

    def cut(self) -> None:
        ip("link", "set", self.host_if, "down")

    def restore(self) -> None:
        ip("link", "set", self.host_if, "up")

    def delete(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)


@pytest.fixture()
def namespace() -> Iterator[Namespace]:
    """A namespace with a veth link, or a skip naming why the kernel refused it."""
    space = Namespace()
    try:
        space.create()
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
            space.delete()  # what the failed create made (nothing, when there is no `ip` at all)
        reason = getattr(exc, "stderr", None) or str(exc)
        requirement_missing("a network namespace with a veth pair (ip netns, as root)", reason.strip())
    try:
        yield space
    finally:
        space.delete()


def via(url: str, host: str, port: int) -> str:
    """``url`` with its host and port replaced (credentials and query kept)."""
    parts = urlsplit(url)
    auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{auth}{host}:{port}"))


def test_an_agent_cut_off_for_20s_goes_offline_its_run_moves_and_it_records_no_second_success_when_back(
    namespace, stack, client, start_worker, effects, queue, tmp_path
):
    # Given an agent in its own namespace reaching PostgreSQL and Redis only over the veth link
    pg, redis = urlsplit(PG_URL), urlsplit(REDIS_URL)
    forwarders = [
        Forwarder((namespace.host_ip, 0), (pg.hostname, pg.port or 5432)),
        Forwarder((namespace.host_ip, 0), (redis.hostname, redis.port or 6379)),
    ]
    env = {
        **stack.env,
        **FAST_BEATS,
        "AIOS_DATABASE__URL": via(stack.env["AIOS_DATABASE__URL"], namespace.host_ip, forwarders[0].port),
        "AIOS_BROKER__URL": via(REDIS_URL, namespace.host_ip, forwarders[1].port),
    }
    name = f"net{uuid.uuid4().hex[:6]}"
    log_path = tmp_path / f"{name}.log"
    with log_path.open("wb") as handle:
        process = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                namespace.name,
                sys.executable,
                "-m",
                "aios.cli",
                "worker",
                "--name",
                f"{name}@aios-test",
                "--queues",
                queue,
                "--concurrency",
                "1",
            ],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=str(REPO_ROOT),
        )
    cut_off = WorkerProcess(name=name, hostname=f"{name}@aios-test", process=process, log_path=log_path)
    try:
        wait_for(
            lambda: " ready." in cut_off.log() or process.poll() is not None,
            timeout=90,
            interval=0.2,
            what="the namespaced worker to be ready",
        )
        assert process.poll() is None, cut_off.log()[-3000:]

        # And a task running on it that checks its fence before its effect (as an idempotent task does)
        task_id = submit(client, effects.task(queue, sleep_s=25, params={"retry_sleep_s": 0, "check_fence": True}))
        effects.wait_started(task_id)
        assert read_tasks(stack.settings.database, [task_id])[task_id]["agent"] == cut_off.hostname
        # And a peer on the host, on the same queue
        peer = start_worker([queue], concurrency=1, env=FAST_BEATS)

        # When the agent is cut off the network for 20 s
        namespace.cut()
        cut_at = time.monotonic()
        try:
            # Then its peer marks it OFFLINE, and the run moves to the peer and succeeds there
            agent = wait_for(
                lambda: (a := client.get(f"/api/v1/agents/{cut_off.hostname}").json)["status"] == "OFFLINE" and a,
                timeout=CUT_S - 2,
                interval=0.2,
                what="the agent to go OFFLINE",
            )
            assert "no heartbeat" in agent["status_reason"]
            wait_for(
                lambda: read_tasks(stack.settings.database, [task_id])[task_id]["state"] == "SUCCEEDED",
                timeout=max(1.0, CUT_S - (time.monotonic() - cut_at)),
                what="the moved run to succeed",
            )
            time.sleep(max(0.0, CUT_S - (time.monotonic() - cut_at)))
        finally:
            namespace.restore()

        # When it comes back and its own run ends: it finds itself fenced off and records nothing
        wait_for(
            lambda: any("late report" in str(e["detail"]) for e in events(stack, task_id)),
            timeout=90,
            interval=0.5,
            what="the cut-off run to end and report late",
        )
        tasks = assert_nothing_lost(stack.settings.database, effects, [task_id], timeout=30)
        task = tasks[task_id]
        assert task["state"] == "SUCCEEDED" and task["agent"] == peer.hostname, task
        assert task["attempts"] == 2
        assert effects.counts()[task_id] == 1
        assert [a for t, a, _ in effects.starts() if t == task_id] == [1, 2]
        assert process.poll() is None, "the cut-off agent should survive the partition"
    finally:
        cut_off.stop()
        for forwarder in forwarders:
            forwarder.close()


def events(stack, task_id: str) -> list[dict]:
    from sqlalchemy import select

    from aios.db import session_scope
    from aios.models import TaskEvent

    with session_scope(stack.settings.database) as session:
        rows = session.scalars(select(TaskEvent).where(TaskEvent.task_id == task_id)).all()
        return [{"to": r.to_state, "detail": r.detail} for r in rows]
