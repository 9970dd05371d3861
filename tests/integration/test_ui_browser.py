"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

A real ``aios api`` process serves the pages over HTTP; tasks are submitted with the command line
client (``aios submit``) and wait QUEUED on a queue no worker consumes. Screenshots of each
step are saved under ``tests/artifacts/ui/`` (the paths are printed). No ``playwright install``:
the browser is the system's, given by ``executable_path`` (``AIOS_TEST_CHROMIUM`` overrides it).
Without Chromium or Playwright these tests skip, and under ``CI=true`` they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import REPO_ROOT, Credentials, make_user, service_missing

pytestmark = pytest.mark.integration

ARTIFACTS = REPO_ROOT / "tests" / "artifacts" / "ui"


def chromium_path() -> str | None:
    return os.environ.get("AIOS_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        service_missing("Playwright for Python (pip install playwright)", exc)
    executable = chromium_path()
    if executable is None:
        service_missing("Chromium (apt-get install chromium)", FileNotFoundError("chromium"))
    with sync_playwright() as playwright:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start.
        launched = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture()
def shots(request: pytest.FixtureRequest) -> Any:
    folder = ARTIFACTS / request.node.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)

    def shot(page: Any, name: str) -> Path:
        path = folder / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    return shot


def cli_submit(stack: Any, url: str, key: str, queue: str) -> str:
    """Submit a task with the ``aios`` command line client (its own process) and return its id."""
    done = subprocess.run(
        [sys.executable, "-m", "aios.cli", "submit", "test.flaky", "-p", "fail_times=0", "--queue", queue],
        env={**stack.env, "AIOS_URL": url, "AIOS_API_KEY": key},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=str(REPO_ROOT),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    task_id, state = done.stdout.split()[:2]  # "<id> <state>"
    assert state == "QUEUED", done.stdout
    return task_id


def sign_in(context: Any, url: str, who: Credentials) -> Any:
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.errors = errors
    page.goto(f"{url}/ui")
    assert "/ui/login" in page.url  # not signed in: sent to the sign-in form
    page.fill("input[name=username]", who.user)
    page.fill("input[name=password]", who.password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/ui")
    assert page.inner_text("#whoami").startswith(who.user)
    return page


def task_state(stack: Any, task_id: str) -> str:
    from aios.db import session_scope
    from aios.models import Task

    with session_scope(stack.settings.database) as session:
        return str(session.get(Task, task_id).state)


def test_an_operator_cancels_a_cli_submitted_task_and_a_viewer_cannot(browser, start_api, stack, queue, shots):
    # Given a real API process, an operator and a viewer, and a task submitted from the command line
    api = start_api()
    operator, viewer = make_user(stack, "operator"), make_user(stack, "viewer")
    task_id = cli_submit(stack, api.url, operator.key, queue)
    assert task_state(stack, task_id) == "QUEUED"

    # When the operator signs in, finds the task in the task list and opens it
    operator_context = browser.new_context()
    page = sign_in(operator_context, api.url, operator)
    shots(page, "1-operator-overview")
    page.click("nav >> text=Tasks")
    page.select_option("select[name=state]", "QUEUED")
    page.fill("input[name=q]", "flaky")
    page.click("form.filters button[type=submit]")
    page.wait_for_selector(f"#tasks a:text('{task_id}')")
    shots(page, "2-operator-task-list")
    page.click(f"#tasks a:text('{task_id}')")
    page.wait_for_url(f"{api.url}/ui/tasks/{task_id}")
    assert page.inner_text("h1 .state") == "QUEUED"
    assert json.loads(page.inner_text("#parameters")) == {"fail_times": 0}
    shots(page, "3-operator-task-queued")

    # And presses cancel (and confirms)
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#cancel")

    # Then the page shows CANCELLED, the timeline has the change, and so does the ledger
    page.wait_for_selector("h1 .state:text('CANCELLED')")
    assert "QUEUED → CANCELLED" in page.inner_text("#timeline")
    assert f"ui:{operator.user}" in page.inner_text("#timeline")
    shots(page, "4-operator-task-cancelled")
    assert task_state(stack, task_id) == "CANCELLED"
    assert page.locator("#cancel").count() == 0
    assert not [e for e in page.errors if "Content Security Policy" in e], page.errors

    # Given another task, and the viewer signed in
    other_id = cli_submit(stack, api.url, operator.key, queue)
    viewer_context = browser.new_context()
    viewer_page = sign_in(viewer_context, api.url, viewer)
    viewer_page.goto(f"{api.url}/ui/tasks/{other_id}")
    assert viewer_page.inner_text("h1 .state") == "QUEUED"
    shots(viewer_page, "5-viewer-task-no-cancel")

    # Then the viewer has no cancel button
    assert viewer_page.locator("#cancel").count() == 0
    # And the API's cancel endpoint answers the viewer's key 403
    refused = requests.delete(f"{api.url}/api/v1/tasks/{other_id}", headers={"X-API-Key": viewer.key}, timeout=30)
    assert refused.status_code == 403, refused.text
    # And so does the dashboard's, posted from the viewer's own session with its valid CSRF token
    token = viewer_page.get_attribute("form.whoami input[name=csrf_token]", "value")
    forged = viewer_context.request.post(
        f"{api.url}/ui/tasks/{other_id}/cancel", form={"csrf_token": token}, max_redirects=0
    )
    assert forged.status == 403
    assert task_state(stack, other_id) == "QUEUED"
    operator_context.close()
    viewer_context.close()


def test_the_overview_refreshes_itself_under_the_content_security_policy(browser, start_api, stack, shots):
    # Given an admin on the overview
    api = start_api()
    admin = make_user(stack, "admin")
    context = browser.new_context()
    page = sign_in(context, api.url, admin)
    before = page.inner_text("#refreshed")
    shots(page, "1-admin-overview")

    # When the page is left open, its script (a file: no inline code is allowed) fetches the figures again
    page.wait_for_function(
        "text => document.querySelector('#refreshed').innerText !== text", arg=before, timeout=30_000
    )

    # Then the figures were replaced without a reload, and the browser saw no CSP violation
    assert page.url == f"{api.url}/ui"
    assert page.locator("#overview .card").count() == 4
    assert not [e for e in page.errors if "Content Security Policy" in e], page.errors
    # And every admin page renders in the browser
    for link in ("Tasks", "Agents", "Queues", "Schedules", "Backups", "API keys", "Audit log"):
        page.click(f"nav >> text={link}")
        page.wait_for_selector("h1")
        assert page.inner_text("h1") == link
    shots(page, "2-admin-audit-log")
    # And signing out ends the session
    page.click("form.whoami button")
    page.wait_for_url(f"{api.url}/ui/login")
    page.goto(f"{api.url}/ui/agents")
    assert "/ui/login" in page.url
    context.close()
