"""One rule for tests that need a service, a tool or a kernel feature: fail under CI, skip elsewhere.

A test that skipped itself when ``ip netns``, ``redis-server``, ``openssl`` or ``promtool`` was missing
passed CI without running. Every such test now calls :func:`tests.conftest.requirement_missing` (or
``service_missing``/``require_program``, which call it), and this file checks both the rule and that
no test skips any other way.
"""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO_ROOT, in_ci, require_program, requirement_missing

SKIP_ELSEWHERE = re.compile(r"pytest\.skip\(|\.skipif\(|mark\.skip\b|importorskip\(")


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes", "on", "github-actions"])
def test_a_missing_requirement_fails_under_any_truthy_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    assert in_ci()
    with pytest.raises(pytest.fail.Exception, match="CI requires it"):
        requirement_missing("promtool", "not installed")


@pytest.mark.parametrize("value", [None, "", "0", "false", "no", "off"])
def test_a_missing_requirement_skips_with_its_reason_outside_ci(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match="openssl: not installed"):
        requirement_missing("openssl", "not installed (apt-get install openssl)")


def test_require_program_finds_an_installed_program_and_refuses_a_missing_one(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert require_program("sh", "it is POSIX").endswith("/sh")
    with pytest.raises(pytest.fail.Exception, match="no-such-program-aios: not installed"):
        require_program("no-such-program-aios", "nowhere")


def test_no_test_skips_except_through_the_one_rule():
    helper = REPO_ROOT / "tests" / "conftest.py"
    offenders = []
    for path in sorted((REPO_ROOT / "tests").rglob("*.py")):
        if path in (helper, REPO_ROOT / "tests" / "unit" / "test_requirements_rule.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if SKIP_ELSEWHERE.search(line):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert not offenders, "skip through tests.conftest.requirement_missing (it fails under CI):\n" + "\n".join(
        offenders
    )
