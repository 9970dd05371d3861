"""The plain logic of :mod:`aios.ops.services`: reading logs from the end, following them, the pid file.

The commands themselves run against real processes in tests/integration/test_services.py.
"""

from __future__ import annotations

import itertools
import os
import subprocess

import pytest

from aios.ops import services


def test_last_lines_reads_the_end_of_a_file_larger_than_its_read_block(tmp_path):
    path = tmp_path / "api.log"
    path.write_text("".join(f"line {number}\n" for number in range(5000)))
    assert services.last_lines(path, 3) == ["line 4997", "line 4998", "line 4999"]
    assert services.last_lines(path, 0) == []
    assert services.last_lines(tmp_path / "missing.log", 5) == []


def test_follow_yields_appended_lines_whole_and_survives_truncation(tmp_path):
    path = tmp_path / "agent.log"
    path.write_text("old\n")
    lines = services.follow({"agent": path}, interval_s=0.01)
    # Given lines appended after following began, the last one in two writes
    with path.open("a") as handle:
        handle.write("first\nsec")
    with path.open("a") as handle:
        handle.write("ond\n")
    # Then each comes out once, whole, and the old line does not
    assert list(itertools.islice(lines, 2)) == [("agent", "first"), ("agent", "second")]
    # When the file is truncated and written again (a restart), the new lines come out
    path.write_text("new\n")
    assert next(lines) == ("agent", "new")


@pytest.mark.parametrize(
    ("seconds", "shown"), [(None, "-"), (5.9, "5s"), (62, "1m02s"), (3 * 3600 + 60, "3h01m"), (90000, "1d01h")]
)
def test_format_duration(seconds, shown):
    assert services.format_duration(seconds) == shown


def test_a_pid_file_is_stopped_when_absent_stale_when_its_holder_is_gone_and_running_while_held(tmp_path):
    pid_file = tmp_path / "var" / "aios-up.pid"
    assert services.find(pid_file).status == "stopped"
    # Given a pid file nobody holds (its process exited)
    exited = subprocess.Popen(["true"])
    exited.wait()
    pid_file.parent.mkdir()
    pid_file.write_text(f"{exited.pid}\n")
    found = services.find(pid_file)
    assert (found.status, found.pid) == ("stale", exited.pid)
    # When this process claims it
    held = services.PidFile(pid_file)
    held.claim()
    try:
        # Then it runs, under this pid, and a second claim is refused, naming the holder
        assert (services.find(pid_file).status, services.find(pid_file).pid) == ("running", os.getpid())
        with pytest.raises(services.AlreadyRunning, match=f"pid {os.getpid()}"):
            services.PidFile(pid_file).claim()
    finally:
        held.release()
    # And once released, the pid file is gone
    assert services.find(pid_file).status == "stopped"
