"""The original system's config file, recognised and answered with where each of its settings went.

The system AIOS replaces kept its settings in one file with ``[primary_server]`` and
``[secondary_server]`` sections and top-level ``sync_interval``, ``task_timeout`` and ``max_agents``
(an INI file, often read as TOML). Validated as AIOS settings, such a file only earned "Extra inputs
are not permitted", which tells a migrating operator nothing. This module spots those keys and
raises one :class:`~aios.errors.ConfigError` (exit status 2) that maps every one of them to its AIOS
setting, or says it has none and why, with the TOML to write instead. docs/ha.md has the same table
(``tests/unit/test_original_config.py`` keeps the two in step).

AIOS does not translate the file silently: a pair of servers becomes a multi-host PostgreSQL URL and
a Sentinel broker URL, which name databases and Sentinels the original file never mentions, so
guessing them would start AIOS against the wrong servers.
"""

from __future__ import annotations

import configparser
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class OriginalKey:
    """Where one of the original's settings lives in AIOS (``setting`` empty: nowhere, ``why`` says why)."""

    original: str
    setting: str
    why: str
    #: Seconds-valued settings gained an ``_s`` suffix; the value carries over unchanged.
    carries_value: bool = False


#: Every key of the original's file AIOS knows, in the order the message lists them.
MAPPINGS: tuple[OriginalKey, ...] = (
    OriginalKey(
        "[primary_server]",
        "database.url, broker.url + broker.sentinel_master",
        "AIOS has no primary server process: every site runs the same API, agents and beat. The primary "
        "site's PostgreSQL is the first host of a multi-host database.url "
        "(...?host=PRIMARY:5432&host=SECONDARY:5432&target_session_attrs=read-write) and its Redis is "
        "the master that Sentinel (broker.url = sentinel://...) reports",
    ),
    OriginalKey(
        "[secondary_server]",
        "database.url, broker.url + broker.sentinel_master",
        "the secondary site's PostgreSQL is the second host of the same database.url (a synchronous "
        "standby) and its Redis a replica that Sentinel promotes; failover is PostgreSQL's and Sentinel's, "
        "AIOS follows them (docs/ha.md)",
    ),
    OriginalKey(
        "host / port (of a server section)",
        "api.host, api.port",
        "the address the API listens on; the servers' database and broker addresses go in the URLs above",
    ),
    OriginalKey(
        "sync_interval",
        "orchestrator.sync_interval_s",
        "seconds between runs of the sync job (dispatch, agent health, re-routing, timeouts). Task results "
        "are not copied by it: PostgreSQL replication keeps both sites' ledgers the same",
        carries_value=True,
    ),
    OriginalKey(
        "task_timeout",
        "orchestrator.task_timeout_s",
        "longest any task may run, in seconds",
        carries_value=True,
    ),
    OriginalKey("max_agents", "orchestrator.max_agents", "most agents that may register (0 = no limit)", True),
    OriginalKey(
        "heartbeat_interval",
        "agents.heartbeat_interval_s",
        "seconds between an agent's heartbeats",
        carries_value=True,
    ),
)

_SERVER_SECTIONS = ("primary_server", "secondary_server")
#: Keys of the original found at the top level or in a section where AIOS has no such key.
_LOOSE_KEYS = {m.original: m for m in MAPPINGS if not m.original.startswith(("[", "host"))}


def _found(data: Mapping[str, Any], known_sections: Mapping[str, set[str]]) -> list[tuple[OriginalKey, Any]]:
    by_name = {m.original: m for m in MAPPINGS}
    servers = [name for name in _SERVER_SECTIONS if isinstance(data.get(name), Mapping)]
    loose: list[tuple[OriginalKey, Any, bool]] = []  # (key, value, whether AIOS has it at that place)
    for key, value in data.items():
        if key in _LOOSE_KEYS and not isinstance(value, Mapping):
            loose.append((_LOOSE_KEYS[key], value, False))
        elif isinstance(value, Mapping) and key not in _SERVER_SECTIONS:
            for inner, inner_value in value.items():
                if inner in _LOOSE_KEYS:
                    loose.append((_LOOSE_KEYS[inner], inner_value, inner in known_sections.get(key, set())))
    # The file is the original's when it has a server section or one of its keys where AIOS has none;
    # then its keys are listed wherever they are ([orchestrator] max_agents happens to be AIOS's too).
    if not servers and all(valid for _, _, valid in loose):
        return []
    found: list[tuple[OriginalKey, Any]] = [(by_name[f"[{name}]"], None) for name in servers]
    if any({"host", "port"} & set(data[name]) for name in servers):
        found.append((by_name["host / port (of a server section)"], None))
    seen = {mapping.original for mapping, _ in found}
    for mapping, value, _ in loose:
        if mapping.original not in seen:
            seen.add(mapping.original)
            found.append((mapping, value))
    return sorted(found, key=lambda pair: MAPPINGS.index(pair[0]))


def message_for(data: Mapping[str, Any], source: Path, known_sections: Mapping[str, set[str]]) -> str | None:
    """The mapping message when ``data`` (a parsed config file) has the original's keys, else None.

    ``known_sections`` maps each AIOS section to its keys, so ``[orchestrator] max_agents`` (a real
    AIOS key) is not mistaken for the original's top-level one.
    """
    found = _found(data, known_sections)
    if not found:
        return None
    lines = [
        f"{source}: this is the original system's config file; AIOS names these settings differently:",
    ]
    replacement: dict[str, list[str]] = {}
    for mapping, value in found:
        lines.append(f"  {mapping.original} -> {mapping.setting}: {mapping.why}")
        if mapping.carries_value and value is not None:
            section, _, key = mapping.setting.partition(".")
            replacement.setdefault(section, []).append(f"{key} = {value!r}".replace("'", '"'))
    if replacement:
        lines.append("Write instead (TOML):")
        for section, keys in replacement.items():
            lines.append(f"  [{section}]")
            lines.extend(f"  {key}" for key in keys)
    lines.append("The two-site setup, step by step: docs/ha.md.")
    return "\n".join(lines)


def read_ini(text: str) -> dict[str, Any] | None:
    """The original's file as INI (it was never TOML), or None when it is not INI either.

    Values stay strings except plain integers, which the message shows as numbers.
    """
    parser = configparser.ConfigParser(default_section="\x00none")
    try:
        parser.read_string("[\x00top]\n" + text)
    except configparser.Error:
        return None
    data: dict[str, Any] = {}
    for section in parser.sections():
        values = {key: int(raw) if raw.strip().isdigit() else raw for key, raw in parser[section].items()}
        if section == "\x00top":
            data.update(values)
        else:
            data[section] = values
    return data
