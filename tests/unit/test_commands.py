"""The plain logic of commands: output capping, argv/env validation, limit resolution, capabilities,
the sandbox's pure parts (cgroup layout and limit files on a fake cgroupfs, the command user checks),
and run_command on harmless programs (no services needed)."""

from __future__ import annotations

import os

import pytest

from aios.config import load_settings
from aios.errors import ValidationFailed
from aios.ops.limits import SystemLimits
from aios.sandbox.run import (
    COMMAND_TYPE,
    CommandParameters,
    Limits,
    OutputCapture,
    base_env,
    effective_limits,
    raised_limits,
    run_command,
    task_timeout_for,
)
from aios.tasktypes import load_task_types

SYSTEM = SystemLimits(
    cpu_degraded_pct=100,
    memory_degraded_pct=90,
    disk_degraded_pct=95,
    command_cpu_s=300,
    command_memory_mb=2048,
    command_wall_s=600,
    command_output_kb=1024,
)
SMALL = Limits(cpu_s=10, memory_mb=512, output_kb=4, wall_s=20)


# --------------------------------------------------------------------------- output capping


def test_output_capture_keeps_the_first_bytes_and_counts_the_rest():
    # Given a capture of 10 bytes
    capture = OutputCapture(10)
    # When 4 + 8 + 5 bytes arrive
    for chunk in (b"abcd", b"efghijkl", b"mnopq"):
        capture.feed(chunk)
    # Then the first 10 are kept, all 17 counted, and it says it was truncated
    assert bytes(capture.kept) == b"abcdefghij"
    assert capture.total_bytes == 17
    assert capture.truncated is True
    assert capture.text() == "abcdefghij"


def test_output_exactly_at_the_limit_is_not_truncated():
    capture = OutputCapture(4)
    capture.feed(b"abcd")
    assert capture.truncated is False and capture.total_bytes == 4


def test_output_text_is_storable_even_with_nul_and_invalid_utf8():
    # Given output with a NUL byte, invalid UTF-8, and a multi-byte character cut by the limit
    capture = OutputCapture(6)
    capture.feed(b"a\x00b\xff" + "é".encode()[:1] + b"zzz")
    # Then the text has neither NUL nor undecodable bytes (PostgreSQL refuses NUL in JSONB)
    text = capture.text()
    assert "\x00" not in text
    assert text.startswith("a\ufffdb\ufffd")
    text.encode("utf-8")


# --------------------------------------------------------------------------- parameters


@pytest.fixture(scope="module")
def command_type():
    return load_task_types().get(COMMAND_TYPE)


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({}, "parameters.argv"),
        ({"argv": []}, "parameters.argv"),
        ({"argv": "echo hi"}, "parameters.argv"),
        ({"argv": ["echo", ""]}, "parameters.argv.1"),
        ({"argv": ["x" * 4097]}, "parameters.argv.0"),
        ({"argv": ["x"] * 257}, "parameters.argv"),
        ({"argv": ["echo", "a\x00b"]}, "parameters.argv"),
        ({"argv": ["echo", 3]}, "parameters.argv.1"),
        ({"argv": ["echo"], "env": {"1BAD": "x"}}, "parameters.env"),
        ({"argv": ["echo"], "env": {"A-B": "x"}}, "parameters.env"),
        ({"argv": ["echo"], "env": {"PATH": "/tmp"}}, "parameters.env"),
        ({"argv": ["echo"], "env": {"LD_PRELOAD": "/tmp/x.so"}}, "parameters.env"),
        ({"argv": ["echo"], "env": {f"V{i}": "x" for i in range(65)}}, "parameters.env"),
        ({"argv": ["echo"], "env": {"A": "a\x00"}}, "parameters.env"),
        ({"argv": ["echo"], "cwd": ""}, "parameters.cwd"),
        ({"argv": ["echo"], "timeout_s": 0}, "parameters.timeout_s"),
        ({"argv": ["echo"], "limits": {"cpu_s": 0}}, "parameters.limits.cpu_s"),
        ({"argv": ["echo"], "limits": {"memory_mb": 8}}, "parameters.limits.memory_mb"),
        ({"argv": ["echo"], "limits": {"output_kb": 0}}, "parameters.limits.output_kb"),
        ({"argv": ["echo"], "limits": {"disk_mb": 1}}, "parameters.limits.disk_mb"),
        ({"argv": ["echo"], "shell": True}, "parameters.shell"),
    ],
)
def test_bad_command_parameters_are_refused_naming_the_field(command_type, parameters, field):
    with pytest.raises(ValidationFailed) as caught:
        command_type.validate(parameters)
    assert caught.value.extra["field"] == field, caught.value.message


def test_good_command_parameters_pass(command_type):
    params = command_type.validate(
        {
            "argv": ["echo", "a; b", "$(id)"],
            "env": {"GREETING": "hi", "_X1": ""},
            "cwd": "sub",
            "timeout_s": 5,
            "limits": {"cpu_s": 2, "output_kb": 64},
        }
    )
    assert params.argv == ["echo", "a; b", "$(id)"]
    assert params.limits.cpu_s == 2 and params.limits.memory_mb is None


def test_the_environment_is_the_agents_path_and_the_request_s_variables_only(monkeypatch):
    monkeypatch.setenv("AIOS_SECRET_FOR_TEST", "do-not-leak")
    env = base_env({"GREETING": "hi"})
    assert set(env) == {"PATH", "GREETING"}


# --------------------------------------------------------------------------- limits


def test_a_request_may_lower_limits_and_absent_ones_come_from_the_system_limits():
    params = CommandParameters(argv=["echo"], timeout_s=5, limits={"cpu_s": 2})
    assert raised_limits(params, SYSTEM) == []
    assert effective_limits(params, SYSTEM) == Limits(
        cpu_s=2, memory_mb=2048, output_kb=1024, wall_s=5, pids=256, file_size_mb=1024
    )


def test_every_limit_above_the_system_limit_is_named():
    params = CommandParameters(
        argv=["echo"], timeout_s=601, limits={"cpu_s": 301, "memory_mb": 2048, "output_kb": 1025}
    )
    fields = [field for field, _ in raised_limits(params, SYSTEM)]
    assert fields == ["limits.cpu_s", "limits.output_kb", "timeout_s"]
    assert "command_cpu_s (300)" in raised_limits(params, SYSTEM)[0][1]


def test_the_wall_time_never_exceeds_the_task_s_own_time_limit():
    params = CommandParameters(argv=["echo"])
    assert effective_limits(params, SYSTEM, task_timeout_s=30).wall_s == 30
    assert task_timeout_for(5, 3600) == 15
    assert task_timeout_for(3600, 3600) == 3600


# --------------------------------------------------------------------------- capabilities


def test_an_agent_announces_command_only_with_a_non_empty_allowlist():
    from workers.heartbeat import capabilities_of

    load_task_types()
    closed = load_settings(environ={}, overrides={"agents": {"command_allowlist": [], "capabilities": ["command"]}})
    opened = load_settings(environ={}, overrides={"agents": {"command_allowlist": ["echo"]}})
    assert COMMAND_TYPE not in capabilities_of(closed)
    assert "echo" in capabilities_of(closed)
    assert COMMAND_TYPE in capabilities_of(opened)


# --------------------------------------------------------------------------- running harmless programs


def test_echo_runs_without_a_shell_so_metacharacters_are_literal(tmp_path):
    argv = ["echo", "a; touch " + str(tmp_path / "x"), "$(id)", "|", ">", "*"]
    outcome = run_command(argv, env=base_env({}), cwd=str(tmp_path), limits=SMALL)
    assert outcome.exit_code == 0 and outcome.signal is None and not outcome.timed_out
    assert outcome.stdout.text() == " ".join(argv[1:]) + "\n"
    assert not (tmp_path / "x").exists()


def test_output_past_the_limit_is_cut_and_counted(tmp_path):
    outcome = run_command(
        ["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' y; echo oops >&2"],
        env=base_env({}),
        cwd=str(tmp_path),
        limits=SMALL,
    )
    assert outcome.exit_code == 0
    assert outcome.stdout.total_bytes == 100_000 and len(outcome.stdout.kept) == 4096
    assert outcome.stdout.truncated and not outcome.stderr.truncated
    assert outcome.stderr.text() == "oops\n"


def test_the_given_environment_and_cwd_reach_the_program(tmp_path):
    outcome = run_command(
        ["sh", "-c", 'echo "$GREETING $(pwd)"'], env=base_env({"GREETING": "hi"}), cwd=str(tmp_path), limits=SMALL
    )
    assert outcome.stdout.text() == f"hi {tmp_path}\n"


def test_a_program_that_does_not_exist_is_an_os_error(tmp_path):
    with pytest.raises(OSError):
        run_command(["no-such-program-aios"], env=base_env({}), cwd=str(tmp_path), limits=SMALL)


def test_a_non_zero_exit_status_is_reported_with_cpu_time_and_rss(tmp_path):
    outcome = run_command(["sh", "-c", "exit 3"], env=base_env({}), cwd=str(tmp_path), limits=SMALL)
    result = outcome.to_result(SMALL)
    assert result["exit_code"] == 3 and result["signal"] is None
    assert result["cpu_s"] >= 0 and result["max_rss_kb"] > 0
    assert result["limits"] == {
        "cpu_s": 10,
        "memory_mb": 512,
        "output_kb": 4,
        "wall_s": 20,
        "pids": 256,
        "file_size_mb": 1024,
    }
    assert result["sandbox"] == {"user": None, "cgroup": None, "group_limits": []}


def test_a_file_larger_than_file_size_mb_cannot_be_written(tmp_path):
    limits = Limits(cpu_s=10, memory_mb=512, output_kb=4, wall_s=20, file_size_mb=1)
    outcome = run_command(
        ["sh", "-c", "head -c 3000000 /dev/zero > big"], env=base_env({}), cwd=str(tmp_path), limits=limits
    )
    assert outcome.exit_code != 0 or outcome.signal == "SIGXFSZ"
    assert (tmp_path / "big").stat().st_size <= 1 << 20


# --------------------------------------------------------------------------- the sandbox's pure parts

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / {root}/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / {root}/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / {root}/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / {root}/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / {root}/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_CGROUP = "8:pids:/\n4:memory:/box/1\n2:cpuacct:/\n1:cpu:/\n0::/\n"
V2_MOUNTINFO = "30 23 0:27 / {root} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V2_CGROUP = "0::/system.slice/aios-worker@a.service\n"


def test_the_layout_nests_command_groups_under_the_agent_s_own_groups():
    from aios.sandbox.cgroups import layout

    hybrid = layout(HYBRID_MOUNTINFO.format(root="/cg"), HYBRID_CGROUP)
    assert hybrid.unified == "/cg/unified"
    assert hybrid.v1 == {"memory": "/cg/memory/box/1", "pids": "/cg/pids", "cpuacct": "/cg/cpuacct"}
    pure = layout(V2_MOUNTINFO.format(root="/cg"), V2_CGROUP)
    assert pure.unified == "/cg/system.slice/aios-worker@a.service" and pure.v1 == {}
    assert not layout("", "").usable


def test_a_v2_group_gets_memory_max_pids_max_and_enables_the_controllers(tmp_path):
    from aios.sandbox.cgroups import Layout, create

    # Given a fake cgroup2 parent whose kernel offers memory and pids, not yet enabled for children
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    # When a command group is made
    group = create("aios-cmd-1", memory_bytes=100 << 20, pids=32, where=Layout(unified=str(tmp_path)))
    # Then its limits are written, and it enforces memory, pids and CPU
    directory = tmp_path / "aios-cmd-1"
    assert group is not None and group.version == 2
    assert (directory / "memory.max").read_text() == str(100 << 20)
    assert (directory / "memory.swap.max").read_text() == "0"
    assert (directory / "pids.max").read_text() == "32"
    assert group.enforces == {"memory", "pids", "cpu"}
    assert group.procs_files() == [str(directory / "cgroup.procs")]
    # And its CPU time and OOM kills are read from cpu.stat and memory.events
    (directory / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\n")
    (directory / "memory.events").write_text("low 0\noom 1\noom_kill 1\n")
    assert group.cpu_s() == 2.5 and group.oom_killed()


def test_a_hybrid_group_uses_the_v1_memory_and_pids_controllers_and_cgroup2_to_kill(tmp_path):
    from aios.sandbox.cgroups import Layout, create

    # Given a controller-less cgroup2 and v1 memory, pids and cpuacct hierarchies
    where = Layout(
        unified=str(tmp_path / "unified"), v1={name: str(tmp_path / name) for name in ("memory", "pids", "cpuacct")}
    )
    for directory in ("unified", "memory", "pids", "cpuacct"):
        (tmp_path / directory).mkdir()
    group = create("aios-cmd-2", memory_bytes=64 << 20, pids=8, where=where)
    # Then memory and pids limits are v1 files, the group is in every hierarchy it uses
    assert group is not None and group.version == 1
    assert (tmp_path / "memory" / "aios-cmd-2" / "memory.limit_in_bytes").read_text() == str(64 << 20)
    assert (tmp_path / "pids" / "aios-cmd-2" / "pids.max").read_text() == "8"
    assert group.enforces == {"memory", "pids", "cpu"}
    assert sorted(group.procs_files()) == sorted(
        str(tmp_path / d / "aios-cmd-2" / "cgroup.procs") for d in ("unified", "memory", "pids")
    )
    (tmp_path / "memory" / "aios-cmd-2" / "memory.oom_control").write_text("oom_kill_disable 0\noom_kill 0\n")
    assert not group.oom_killed()


def test_no_group_is_made_where_there_is_no_cgroupfs(tmp_path):
    from aios.sandbox.cgroups import Layout, create

    assert create("x", memory_bytes=1 << 20, pids=1, where=Layout()) is None
    assert create("x", memory_bytes=1 << 20, pids=1, where=Layout(unified=str(tmp_path / "missing"))) is None


def test_the_command_user_may_be_neither_root_nor_the_agent_s_user_nor_missing():
    import pwd

    from aios.errors import ConfigError
    from aios.sandbox.identity import resolve_command_user

    with pytest.raises(ConfigError, match=r"agents\.command_user: 'root' is root.*useradd --system"):
        resolve_command_user("root", agent_uid=12345)
    nobody = pwd.getpwnam("nobody")
    with pytest.raises(ConfigError, match=r"agent's own user.*useradd --system"):
        resolve_command_user("nobody", agent_uid=nobody.pw_uid)
    with pytest.raises(ConfigError, match=r"no user 'no-such-user-aios'.*useradd --system"):
        resolve_command_user("no-such-user-aios")
    assert resolve_command_user("nobody", agent_uid=0).uid == nobody.pw_uid


def test_an_allowlist_without_a_command_user_is_a_config_error_naming_both_keys():
    from aios.errors import ConfigError
    from aios.sandbox.identity import check_agent_config

    assert check_agent_config(load_settings(environ={}, overrides={"agents": {"command_allowlist": []}})) is None
    with pytest.raises(ConfigError, match=r"agents\.command_allowlist is set but agents\.command_user is not"):
        check_agent_config(load_settings(environ={}, overrides={"agents": {"command_allowlist": ["echo"]}}))


def test_switching_users_takes_cap_setuid_and_cap_setgid():
    from aios.sandbox.identity import can_switch_user

    assert can_switch_user("Name:\tx\nCapEff:\t00000000000000c0\n")
    assert not can_switch_user("Name:\tx\nCapEff:\t0000000000000080\n")
    assert not can_switch_user("Name:\tx\n")


def test_a_non_root_agent_s_ambient_capabilities_do_not_reach_its_commands():
    # Given an agent running as nobody with CAP_SETUID, CAP_SETGID and CAP_KILL as ambient capabilities
    # (the systemd drop-in of docs/security.md), which is allowed to switch to the command user
    import os
    import shutil
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT, service_missing
    from tests.support.command_user import ensure_command_user

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        service_missing("root and setpriv (util-linux)", RuntimeError("cannot start an agent as nobody"))
    user = ensure_command_user()
    script = (
        "from aios.sandbox.run import Limits, Sandbox, base_env, run_command\n"
        "from aios.sandbox.identity import resolve_command_user\n"
        f"outcome = run_command(['sh', '-c', 'id -un; grep -E \"^Cap(Eff|Amb|Prm|Inh)\" /proc/self/status'],"
        " env=base_env({}), cwd='/', limits=Limits(cpu_s=5, memory_mb=256, output_kb=16, wall_s=20),"
        f" sandbox=Sandbox(user=resolve_command_user({user!r})))\n"
        "print(outcome.stdout.text(), end='')\n"
    )
    # When it runs a command
    done = subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--inh-caps=+setuid,+setgid,+kill",
            "--ambient-caps=+setuid,+setgid,+kill",
            sys.executable,
            "-c",
            script,
        ],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Then the command runs as the command user with no capability at all
    assert done.returncode == 0, done.stderr
    name, *capabilities = done.stdout.splitlines()
    assert name == user
    assert sorted(line.split()[0] for line in capabilities) == ["CapAmb:", "CapEff:", "CapInh:", "CapPrm:"]
    assert all(line.split()[1] == "0000000000000000" for line in capabilities), capabilities


@pytest.fixture()
def busy_v2_group(tmp_path, monkeypatch):
    """A fake cgroup2 group that, like the kernel, refuses to enable controllers for its children
    while it holds a process itself (cgroup v2's "no internal processes" rule)."""
    from aios.sandbox import cgroups

    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    real_write = cgroups._write

    def kernel_like_write(path, value):
        if path.name == "cgroup.subtree_control" and (tmp_path / "cgroup.procs").read_text().split():
            return False
        if path.name == "cgroup.procs" and path.parent.name == cgroups.AGENT_LEAF:  # moved out of the parent
            (tmp_path / "cgroup.procs").write_text("")
        return real_write(path, value)

    monkeypatch.setattr(cgroups, "_write", kernel_like_write)
    return tmp_path


def test_an_agent_alone_in_its_v2_group_moves_into_a_leaf_so_commands_get_memory_and_pids(busy_v2_group):
    from aios.sandbox.cgroups import AGENT_LEAF, Layout, layout, prepare_agent_group

    # Given an agent (pid 4242) alone in a v2 group whose controllers cannot be enabled yet
    (busy_v2_group / "cgroup.procs").write_text("4242\n")
    # When it prepares its group at start / Then it is in the leaf and the controllers are enabled
    assert prepare_agent_group(Layout(unified=str(busy_v2_group)), pid=4242) is True
    assert (busy_v2_group / AGENT_LEAF / "cgroup.procs").read_text() == "4242"
    assert "+pids" in (busy_v2_group / "cgroup.subtree_control").read_text()
    # And its pool processes, in the leaf, put command groups beside the leaf
    assert layout(V2_MOUNTINFO.format(root="/cg"), f"0::/x.service/{AGENT_LEAF}\n").unified == "/cg/x.service"


def test_an_agent_sharing_its_v2_group_leaves_the_other_processes_where_they_are(busy_v2_group):
    from aios.sandbox.cgroups import AGENT_LEAF, Layout, prepare_agent_group

    (busy_v2_group / "cgroup.procs").write_text("1\n4242\n")
    assert prepare_agent_group(Layout(unified=str(busy_v2_group)), pid=4242) is False
    assert not (busy_v2_group / AGENT_LEAF).exists()


def test_the_groups_of_agent_processes_that_are_gone_are_removed_at_start(tmp_path, monkeypatch):
    from aios.sandbox.cgroups import CommandGroup, Layout, group_name, reap_orphan_groups

    removed = []
    monkeypatch.setattr(CommandGroup, "remove", lambda self: removed.extend(self.dirs))
    # Given a group of a pool process that no longer exists (in two hierarchies), one of a live
    # process, and a group that is not a command's
    orphan, live = group_name(999_999_999), group_name(os.getpid())
    for parent in ("unified", "memory"):
        for name in (orphan, live, "someone-else"):
            (tmp_path / parent / name).mkdir(parents=True)
    # When an agent starts / Then only the orphan is killed and removed, in both hierarchies
    where = Layout(unified=str(tmp_path / "unified"), v1={"memory": str(tmp_path / "memory")})
    assert reap_orphan_groups(where) == 1
    assert sorted(removed) == [tmp_path / "memory" / orphan, tmp_path / "unified" / orphan]
