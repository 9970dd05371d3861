"""`make test` sets itself up: one bootstrap script (.ci/bootstrap), run by `make test` and by CI.

The script's runs here use a PATH of stub programs, each of which only records that it ran, so the
tests control what "installed" and "running" mean and see every install or start the script tries,
without touching this machine's packages or services.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import REPO_ROOT, requirement_missing
from tests.unit.test_tooling import makefile_recipes

BOOTSTRAP = REPO_ROOT / ".ci" / "bootstrap"
#: Every program the bootstrap looks for, when nothing is missing.
TOOLS = (
    "pg_dump",
    "pg_restore",
    "pg_isready",
    "promtool",
    "docker-compose",
    "systemd-analyze",
    "systemd-sysusers",
    "systemd-tmpfiles",
    "chromium",
    "openssl",
    "redis-cli",
    "redis-server",
    "ip",
)


def stub(directory: Path, name: str, log: Path, body: str = "exit 0") -> None:
    """``directory/name``: appends its name and arguments to ``log``, then runs ``body``."""
    path = directory / name
    path.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n{body}\n')
    path.chmod(0o755)


def stubs(tmp_path: Path, *, without: tuple[str, ...] = (), apt: bool = True) -> tuple[Path, Path]:
    """A PATH directory where every tool is installed (but ``without``) and both services answer."""
    directory, log = tmp_path / "bin", tmp_path / "calls.log"
    directory.mkdir()
    log.touch()
    # Probes are not actions: they do not go to the log.
    for name in TOOLS:
        if name not in without:
            (directory / name).write_text("#!/bin/sh\nexit 0\n")
            (directory / name).chmod(0o755)
    for action in ("pg_ctlcluster", "mkdir", "sleep") + (("apt-get",) if apt else ()):
        stub(directory, action, log)
    return directory, log


def bootstrap(path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {"PATH": str(path), "HOME": str(path), **env}
    return subprocess.run(
        ["/bin/bash", str(BOOTSTRAP)], env=environment, capture_output=True, text=True, timeout=60, check=False
    )


def test_make_test_and_make_test_integration_run_the_bootstrap_first():
    recipes = makefile_recipes()
    for target in ("test", "test-integration"):
        assert recipes[target][0] == ".ci/bootstrap", (target, recipes[target])
        assert "pytest" in recipes[target][1], (target, recipes[target])


def test_ci_uses_the_same_bootstrap_and_installs_nothing_on_its_own():
    commands = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    assert ".ci/bootstrap" in commands
    assert commands.index(".ci/bootstrap") < commands.index("make install") < commands.index("make test")
    assert not [line for line in commands if "apt-get" in line or "redis-server" in line or "pg_ctl" in line]
    assert os.access(BOOTSTRAP, os.X_OK)


def test_with_nothing_missing_the_bootstrap_does_nothing_and_exits_0(tmp_path: Path):
    # Given every tool installed and PostgreSQL and Redis answering
    path, log = stubs(tmp_path)
    for ci in ("true", ""):
        # When the bootstrap runs (under CI and not)
        result = bootstrap(path, CI=ci)
        # Then it exits 0, installs nothing (not even an apt-get update) and starts nothing
        assert result.returncode == 0, result.stdout + result.stderr
        assert log.read_text() == ""
        assert "every service and tool the tests need is here" in result.stdout
        assert result.stderr == ""


def test_a_missing_tool_without_apt_is_named_with_the_tests_that_skip_and_fails_under_ci(tmp_path: Path):
    # Given no promtool and no apt-get to install it with
    path, log = stubs(tmp_path, without=("promtool",), apt=False)

    # When the bootstrap runs under CI
    under_ci = bootstrap(path, CI="true")
    # Then it names the tool, its package and the tests that need it, and fails
    assert under_ci.returncode == 1, under_ci.stdout
    assert "promtool (apt package prometheus)" in under_ci.stdout
    assert "tests/integration/test_metrics.py" in under_ci.stdout
    assert "CI=true requires" in under_ci.stdout

    # And outside CI it says the same, and that those tests skip, with exit 0
    laptop = bootstrap(path, CI="no")
    assert laptop.returncode == 0, laptop.stdout
    assert "promtool (apt package prometheus)" in laptop.stdout
    assert "skip" in laptop.stdout
    assert log.read_text() == ""


def test_as_root_a_missing_tool_is_installed_with_one_update_and_one_install(tmp_path: Path):
    if os.geteuid() != 0:
        requirement_missing("root", "the bootstrap installs packages only as root")
    # Given no promtool and no chromium; apt-get "installs" them by adding them to the PATH
    path, log = stubs(tmp_path, without=("promtool", "chromium"))
    installs = (
        'if [ "$1" = install ]; then for p in promtool chromium; do '
        f'printf "#!/bin/sh\\n" > "{path}/$p"; /bin/chmod 755 "{path}/$p"; done; fi'
    )
    stub(path, "apt-get", log, installs)

    # When the bootstrap runs under CI
    result = bootstrap(path, CI="true")

    # Then it ran one apt-get update and one install of exactly the two packages, and is satisfied
    calls = log.read_text().splitlines()
    assert [call for call in calls if call.startswith("apt-get")] == [
        "apt-get update -qq",
        "apt-get install -y -qq --no-install-recommends prometheus chromium",
    ], calls
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_redis_installed_but_down_is_started_and_waited_for(tmp_path: Path):
    # Given Redis installed but not answering until redis-server has run
    path, log = stubs(tmp_path, without=("redis-cli", "redis-server"))
    started = tmp_path / "redis-started"
    stub(path, "redis-server", log, f': > "{started}"')
    (path / "redis-cli").write_text(f'#!/bin/sh\n[ -e "{started}" ]\n')
    (path / "redis-cli").chmod(0o755)

    # When the bootstrap runs
    result = bootstrap(path, CI="true")

    # Then it started redis-server on 127.0.0.1:6379 without persistence, once, and is satisfied
    starts = [call for call in log.read_text().splitlines() if call.startswith("redis-server")]
    assert len(starts) == 1, starts
    assert "--port 6379" in starts[0] and "--bind 127.0.0.1" in starts[0] and "--appendonly no" in starts[0]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "starting Redis" in result.stdout
