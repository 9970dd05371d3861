"""Who a command runs as and where: an unprivileged user of its own, in a private directory.

A command that ran as the agent's user could read everything the agent can: its JWT key, its
backups, ``/proc/<agent pid>/environ`` (the admin password, the database URL), and it could
``kill -9`` the agent. So an agent that runs commands needs ``agents.command_user``, a user that is
neither root nor the agent's own; the first process of a command drops to it (groups, gid, uid)
between fork and exec. With another uid the kernel itself refuses the command the agent's
``/proc/<pid>/environ``, ``mem`` and signals; files are kept from it by their modes (secret files
600, backup directory 700, owned by the agent's user).

An allowlist without a ``command_user`` stops the agent at start (:func:`check_agent_config`): the
safe choice that says what to do, instead of an agent that runs commands as itself, or one that
quietly runs none.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from aios.config import Settings
from aios.errors import ConfigError

#: CAP_SETGID and CAP_SETUID (linux/capability.h): what dropping to another user takes.
_CAP_SETGID, _CAP_SETUID = 6, 7

CREATE_USER = "useradd --system --no-create-home --shell /usr/sbin/nologin aios-cmd"


@dataclass(frozen=True)
class CommandUser:
    name: str
    uid: int
    gid: int

    def drop(self) -> None:
        """Become this user, for good: supplementary groups, then gid, then uid (the order that works).
        Runs between fork and exec."""
        os.setgroups([])
        os.setresgid(self.gid, self.gid, self.gid)
        os.setresuid(self.uid, self.uid, self.uid)


def resolve_command_user(name: str, *, agent_uid: int | None = None) -> CommandUser:
    """The account named by ``agents.command_user``; ConfigError if it is missing, root or the agent's."""
    agent_uid = os.geteuid() if agent_uid is None else agent_uid
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(
            f"agents.command_user: no user {name!r} on this host; create it ({CREATE_USER.replace('aios-cmd', name)})"
        ) from None
    if entry.pw_uid == 0:
        raise ConfigError(
            f"agents.command_user: {name!r} is root; commands must run as an unprivileged "
            f'user of their own ({CREATE_USER}, then agents.command_user = "aios-cmd")'
        )
    if entry.pw_uid == agent_uid:
        raise ConfigError(
            f"agents.command_user: {name!r} is the agent's own user, so a command could read "
            f"the agent's keys and signal it; use a user of its own ({CREATE_USER}, then "
            'agents.command_user = "aios-cmd")'
        )
    return CommandUser(name=name, uid=entry.pw_uid, gid=entry.pw_gid)


def can_switch_user(status: str | None = None) -> bool:
    """Whether this process may drop to another user: root, or CAP_SETUID and CAP_SETGID in effect."""
    if status is None:
        if os.geteuid() == 0:
            return True
        try:
            with open("/proc/self/status", encoding="ascii") as handle:
                status = handle.read()
        except OSError:
            return False
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            effective = int(line.split()[1], 16)
            return all(effective >> bit & 1 for bit in (_CAP_SETUID, _CAP_SETGID))
    return False


def check_agent_config(settings: Settings) -> CommandUser | None:
    """At agent start: the user commands run as, or None when this agent runs no commands.

    Raises ConfigError (the agent does not start) when it would run commands as itself.
    """
    agents = settings.agents
    if not agents.command_allowlist:
        return None
    if not agents.command_user:
        raise ConfigError(
            "agents.command_allowlist is set but agents.command_user is not: commands would run as the agent's "
            f"own user, with its keys and processes in reach. Create an unprivileged user ({CREATE_USER}) and "
            'set agents.command_user = "aios-cmd" (AIOS_AGENTS__COMMAND_USER=aios-cmd), or empty the allowlist'
        )
    user = resolve_command_user(agents.command_user)
    if not can_switch_user():
        raise ConfigError(
            f"agents.command_user: this agent (uid {os.geteuid()}) cannot switch to {user.name!r}: run it as "
            "root, or give it CAP_SETUID, CAP_SETGID and CAP_KILL (systemd: "
            "AmbientCapabilities=CAP_SETUID CAP_SETGID CAP_KILL), or empty agents.command_allowlist"
        )
    return user


@contextlib.contextmanager
def private_dir(user: CommandUser | None) -> Iterator[str]:
    """A fresh directory (mode 700) owned by ``user`` for one command; removed with all it holds after."""
    path = tempfile.mkdtemp(prefix="aios-cmd-")
    try:
        if user is not None:
            os.chown(path, user.uid, user.gid)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
