"""``aios up``: the API, one agent and beat as child processes of one foreground command.

For a laptop or a demo. Ctrl-C or SIGTERM stops the children cleanly (SIGTERM, then SIGKILL after
a grace period); each child also gets SIGTERM from the kernel if this process dies without
cleaning up (``PR_SET_PDEATHSIG``), so no orphans are left either way. If one child exits on its
own, the others are stopped too and ``aios up`` exits non-zero.
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from aios.config import Settings, redact_url
from aios.security.secrets import ensure_secret_file

logger = logging.getLogger(__name__)

#: Seconds children get to finish after SIGTERM before they are killed.
STOP_GRACE_S = 20.0
_PR_SET_PDEATHSIG = 1


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "aios.cli", *args]


def run_all_in_one(settings: Settings, *, migrate_first: bool, agent_name: str) -> int:
    if migrate_first:
        from aios import migrate

        migrate.upgrade(settings.database)
    from aios.db import ensure_migrated

    ensure_migrated(settings.database)
    child_env = dict(os.environ)
    if settings.security.jwt_secret is None and settings.security.jwt_secret_file is None:
        # The embedded default makes its own signing key once, kept beside the database.
        secret_file = ensure_secret_file(Path(settings.broker.data_dir).parent / "jwt_secret")
        child_env["AIOS_SECURITY__JWT_SECRET_FILE"] = str(secret_file.resolve())
    bootstrap_admin(settings)
    children = [
        Child("api", _command("api")),
        Child("agent", _command("worker", "--name", agent_name)),
        Child("beat", _command("beat")),
    ]
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    for child in children:
        child.process = subprocess.Popen(child.argv, preexec_fn=preexec, env=child_env)  # noqa: PLW1509 - only sets PDEATHSIG
        logger.info("started %s (pid %d)", child.name, child.process.pid)
    # The API child reads the same [api] tls_* settings, so HTTPS needs nothing more than the scheme here.
    url = f"{'https' if settings.api.tls_enabled else 'http'}://{settings.api.host}:{settings.api.port}"
    print(
        f"\nAIOS is up: API {url}  (database {redact_url(settings.database.url)}, "
        f"broker {redact_url(settings.broker.url)})\n"
        f"  try: curl -s -X POST {url}/api/v1/tasks -H 'Content-Type: application/json' "
        '-d \'{"type":"echo","parameters":{"x":1}}\'\n'
        "  stop: Ctrl-C\n",
        flush=True,
    )
    exit_code = 0
    while not stopping:
        for child in children:
            assert child.process is not None
            code = child.process.poll()
            if code is not None:
                logger.error("%s exited with status %s; stopping the others", child.name, code)
                exit_code = code or 1
                stopping = True
                break
        time.sleep(0.2)
    _stop(children)
    return exit_code


def bootstrap_admin(settings: Settings) -> None:
    """On first start (no users yet) create the user ``admin``.

    Its password is ``AIOS_ADMIN_PASSWORD`` if set, else a random one printed here once.
    """
    from aios.db import session_scope
    from aios.security.users import count_users, create_user

    with session_scope(settings.database) as session:
        if count_users(session):
            return
        given = os.environ.get("AIOS_ADMIN_PASSWORD")
        password = given or secrets.token_urlsafe(18)
        create_user(session, "admin", password, "admin", bcrypt_cost=settings.security.bcrypt_cost)
    if given:
        print("created the first user 'admin' with the password from AIOS_ADMIN_PASSWORD", flush=True)
    else:
        print(f"\ncreated the first user 'admin'; its password (shown once): {password}\n", flush=True)


def _kill_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a child and its descendants: PDEATHSIG covers only our direct children, so killing an
    API master alone would orphan a gunicorn worker it had not yet reaped."""
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    process.kill()
    for descendant in descendants:
        try:
            descendant.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()
    psutil.wait_procs(descendants, timeout=5)


def _stop(children: list[Child]) -> None:
    for child in children:
        if child.process and child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        if child.process is None:
            continue
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop in %.0fs; killing it and every process under it", child.name, STOP_GRACE_S)
            _kill_tree(child.process)
    logger.info("all processes stopped")
