"""The unprivileged system user that test agents run commands as (``agents.command_user``).

Tests run as root here and in CI, so they create the user when it is missing (``useradd --system``);
where that cannot be done the tests that need it skip, and fail under CI=true.
"""

from __future__ import annotations

import pwd
import subprocess

from tests.conftest import service_missing

COMMAND_USER = "aios-cmd-test"


def ensure_command_user() -> str:
    """The name of a user that is neither root nor this process's, made if needed."""
    try:
        pwd.getpwnam(COMMAND_USER)
        return COMMAND_USER
    except KeyError:
        pass
    try:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", COMMAND_USER],
            check=True,
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        try:  # another test process may have made it at the same moment
            pwd.getpwnam(COMMAND_USER)
        except KeyError:
            service_missing(f"a system user {COMMAND_USER!r} for commands (useradd as root)", exc)
    return COMMAND_USER
