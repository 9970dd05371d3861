"""README's "Start here", tried as a newcomer would: ``make run`` in a copy of the project, then the
``try:`` line it prints, then the README's own blocks (marked ``<!-- quick start: … -->``), on the
embedded default with no PostgreSQL or Redis, until the echo task has SUCCEEDED; then Ctrl-C.

Three things differ from a newcomer's terminal, and only these: the API port is a free one (the
README's ``127.0.0.1:8000`` is replaced by it, and ``AIOS_API__PORT`` is set); ``make run`` is given
this interpreter's virtualenv as ``VENV`` and told not to rebuild it (``make -o STAMP``: installing
AIOS needs the network and minutes); and the README's password placeholder is replaced by the
password ``make run`` printed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, requirement_missing, wait_for
from tests.integration.test_embedded_up import free_port, processes_in

pytestmark = pytest.mark.slow

README = REPO_ROOT / "README.md"
MARKER = "<!-- quick start: tests/integration/test_readme_quickstart.py"
PASSWORD_PLACEHOLDER = "<the printed password>"
README_ADDRESS = "127.0.0.1:8000"


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, re.DOTALL)


def start_here() -> str:
    text = README.read_text(encoding="utf-8")
    return text[text.index("## Start here") : text.index("\n## ", text.index("## Start here") + 1)]


def make_run_command() -> list[str]:
    """The README's first command, ``make run`` (without its comment)."""
    line = next(line for line in sh_blocks(start_here())[0].splitlines() if line.startswith("make run"))
    return shlex.split(line.split("#", 1)[0])


def marked_blocks() -> list[str]:
    """The blocks the README marks as run by this test, in order."""
    section = start_here()
    blocks = []
    for part in section.split(MARKER)[1:]:
        blocks.append(sh_blocks(part)[0])
    return blocks


def json_values(text: str) -> list[dict]:
    """The JSON objects printed one after another (curl prints no newline after a body)."""
    decoder, values, index = json.JSONDecoder(), [], 0
    while (start := text.find("{", index)) != -1:
        value, index = decoder.raw_decode(text, start)
        values.append(value)
    return values


@pytest.fixture()
def copy(tmp_path: Path) -> Iterator[Path]:
    """The project's files (as git sees them: tracked, and untracked but not ignored) in a fresh folder."""
    listed = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    target = tmp_path / "aios"
    for name in filter(None, listed.split("\0")):
        source = REPO_ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    yield target
    for pid in processes_in(target):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_the_readme_quick_start_works_as_written(copy, tmp_path):
    if shutil.which("make") is None or shutil.which("curl") is None:
        requirement_missing("make and curl", "the README's quick start uses them")
    venv = Path(sys.prefix)
    if not (venv / "bin" / "aios").exists():
        requirement_missing("a virtualenv with the aios command", f"{venv}/bin/aios is missing (make install)")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIOS_")}
    env.update(PYTHONPATH=str(copy), PYTHONUNBUFFERED="1", AIOS_API__PORT=str(port))
    address = f"127.0.0.1:{port}"

    # Given the README's first command, `make run`, started in the copy (its own session: Ctrl-C below)
    output = tmp_path / "make-run.log"
    argv = [*make_run_command(), f"VENV={venv}", "-o", str(venv / ".installed-stamp")]
    assert argv[:2] == ["make", "run"], argv
    with output.open("wb") as log:
        make = subprocess.Popen(argv, cwd=copy, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def printed() -> str:
        text = output.read_text(errors="replace")
        assert make.poll() is None, f"make run exited with {make.returncode}:\n{text[-4000:]}"
        return text

    def shell(script: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", script], cwd=copy, env={**env, **extra}, capture_output=True, text=True, timeout=60
        )

    try:
        # When it prints its `try:` line (once the API answers) and that line is run as printed
        hint = wait_for(
            lambda: re.search(r"^\s*try: (.+)$", printed(), re.MULTILINE), timeout=120, what="make run's try: line"
        ).group(1)
        password = re.search(r"its password \(shown once\): (\S+)", printed()).group(1)
        wait_for(lambda: shell(f"curl -sf http://{address}/healthz").returncode == 0, timeout=60, what="the API")
        tried = shell(hint)
        # Then it is accepted (curl --fail-with-body: a 2xx)
        assert tried.returncode == 0, tried.stdout + tried.stderr
        assert json_values(tried.stdout)[0]["type"] == "echo"

        # When the README's blocks run, in one shell, as written (the port and the password filled in)
        blocks = marked_blocks()
        assert len(blocks) == 2, blocks
        script = "set -e\n" + "\n".join(blocks).replace(README_ADDRESS, address)
        script = script.replace(PASSWORD_PLACEHOLDER, password)
        ran = shell(script)
        # Then every command succeeded and both reads show the same task (by API key, then by login)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        by_key, by_login = json_values(ran.stdout)
        assert by_key["id"] == by_login["id"] and by_key["parameters"] == {"x": 1}

        # And the README's read, run again as written, shows it SUCCEEDED with its parameters as result
        read = next(line for line in blocks[0].splitlines() if line.startswith("curl -sS -H"))
        read = read.replace(README_ADDRESS, address)

        def succeeded() -> dict | None:
            task = json_values(shell(read, TASK=by_key["id"]).stdout)[0]
            assert task["state"] not in ("FAILED", "DEAD", "TIMED_OUT", "CANCELLED"), task
            return task if task["state"] == "SUCCEEDED" else None

        task = wait_for(succeeded, timeout=60, interval=0.5, what="the README's task to succeed")
        assert task["result"] == {"x": 1}
    finally:
        # And Ctrl-C (SIGINT to the terminal's process group) stops everything
        os.killpg(make.pid, signal.SIGINT)
        make.wait(timeout=60)
    wait_for(lambda: processes_in(copy) == [], timeout=30, what="every process of make run to exit")
