"""The plain logic of commands: output capping, argv/env validation, limit resolution, capabilities,
and run_command on harmless programs (no services needed)."""

from __future__ import annotations

import pytest

from aios.commands import (
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
from aios.config import load_settings
from aios.errors import ValidationFailed
from aios.limits import SystemLimits
from aios.tasktypes import load_task_types

SYSTEM = SystemLimits(cpu_degraded_pct=100, memory_degraded_pct=90, disk_degraded_pct=95, command_cpu_s=300,
                      command_memory_mb=2048, command_wall_s=600, command_output_kb=1024)
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
    params = command_type.validate({"argv": ["echo", "a; b", "$(id)"], "env": {"GREETING": "hi", "_X1": ""},
                                    "cwd": "sub", "timeout_s": 5, "limits": {"cpu_s": 2, "output_kb": 64}})
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
    assert effective_limits(params, SYSTEM) == Limits(cpu_s=2, memory_mb=2048, output_kb=1024, wall_s=5)


def test_every_limit_above_the_system_limit_is_named():
    params = CommandParameters(argv=["echo"], timeout_s=601, limits={"cpu_s": 301, "memory_mb": 2048,
                                                                     "output_kb": 1025})
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
    outcome = run_command(["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' y; echo oops >&2"],
                          env=base_env({}), cwd=str(tmp_path), limits=SMALL)
    assert outcome.exit_code == 0
    assert outcome.stdout.total_bytes == 100_000 and len(outcome.stdout.kept) == 4096
    assert outcome.stdout.truncated and not outcome.stderr.truncated
    assert outcome.stderr.text() == "oops\n"


def test_the_given_environment_and_cwd_reach_the_program(tmp_path):
    outcome = run_command(["sh", "-c", 'echo "$GREETING $(pwd)"'], env=base_env({"GREETING": "hi"}),
                          cwd=str(tmp_path), limits=SMALL)
    assert outcome.stdout.text() == f"hi {tmp_path}\n"


def test_a_program_that_does_not_exist_is_an_os_error(tmp_path):
    with pytest.raises(OSError):
        run_command(["no-such-program-aios"], env=base_env({}), cwd=str(tmp_path), limits=SMALL)


def test_a_non_zero_exit_status_is_reported_with_cpu_time_and_rss(tmp_path):
    outcome = run_command(["sh", "-c", "exit 3"], env=base_env({}), cwd=str(tmp_path), limits=SMALL)
    result = outcome.to_result(SMALL)
    assert result["exit_code"] == 3 and result["signal"] is None
    assert result["cpu_s"] >= 0 and result["max_rss_kb"] > 0
    assert result["limits"] == {"cpu_s": 10, "memory_mb": 512, "output_kb": 4, "wall_s": 20}
