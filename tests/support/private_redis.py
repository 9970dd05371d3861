"""A throwaway ``redis-server`` for tests that stop and restart their broker.

The shared Redis on 6379 serves every other test, so a test that needs an outage runs its own server
on a free port (no persistence) and stops and starts that one.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import free_port, require_program, wait_for


class PrivateRedis:
    """A throwaway ``redis-server`` (no persistence) that a test may stop and start at will."""

    def __init__(self, port: int, log_path: Path) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        import redis

        assert self.process is None or self.process.poll() is not None, "already running"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)

        def answers() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"redis-server exited with {self.process.returncode}:\n"
                    f"{self.log_path.read_text(errors='replace')[-2000:]}"
                )
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            wait_for(answers, timeout=timeout, interval=0.05, what=f"redis-server on port {self.port}")
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def running_private_redis(log_path: Path) -> Iterator[PrivateRedis]:
    """A started private Redis, always killed on exit (skips the test if redis-server is missing)."""
    require_program("redis-server", "apt-get install redis-server")
    server = PrivateRedis(free_port(), log_path)
    server.start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait()
