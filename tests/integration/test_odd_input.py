"""Odd text in any path, query or form answers 4xx with the JSON error shape, never a 500.

Every route of the app's URL map is called with each odd value in each of its path parameters, and
every GET route with each of its query parameters (the API's from its OpenAPI operations, the
dashboard's read from its source), signed in as an admin both ways (API key and dashboard session),
so each route's own code runs past authentication. Schemathesis (test_openapi_fuzz.py) covers the
bodies. The app runs on a database of its own (tests/support/private_world.py): nothing it is sent
may change the session's data.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from tests.conftest import REPO_ROOT
from tests.support.browser import Browser, signed_in
from tests.support.private_world import private_world
from webapi.openapi import OPERATIONS

pytestmark = pytest.mark.integration

#: Values the ledger cannot store: each is refused before any route reads it (404 in a path, 422 in a query).
UNSTORABLE = ("%00", "a%00b", "%00%00%00", "x" * 300 + "%00")
#: Values a route must handle itself: as text, as a number, as a cursor.
ODD = (
    "%C2%B2",  # "²": a digit to str.isdigit(), not to int()
    "%ED%A0%80",  # a UTF-8-encoded surrogate (decoded as replacement characters)
    "%FF%FE",  # not UTF-8 at all
    "9" * 5000,  # past Python's integer-conversion limit, and every bigint
    "-1",
    "1e309",
    "%25",
    "..%2F..%2Fetc%2Fpasswd",
    "%E2%80%AE" + "z" * 2000,  # right-to-left override, then length
    "[]",
    "ZHVtbXk",  # base64 of a non-cursor
    "WyIyMDI2LTAxLTAxVDAwOjAwOjAwWiIsIlx1ZDgwMCJd",  # base64 of ["2026-01-01T00:00:00Z", "\ud800"]
)
#: Endpoints that stream until the client leaves: their path parameters are fuzzed, their queries not.
STREAMS = {"events.cluster_events", "events.task_events"}
#: Endpoints whose every call runs a job or touches a worker (see test_openapi_fuzz.py); with a path
#: parameter they only ever meet a name that does not exist.
NEVER_WITHOUT_PATH = {"sync.run_now", "backups.create"}


def _query_names() -> dict[str, list[str]]:
    """Each GET endpoint's query parameters: the API's from OPERATIONS, the dashboard's from its source."""
    names: dict[str, list[str]] = {}
    for endpoint, operation in OPERATIONS.items():
        query = operation.query
        if isinstance(query, type) and issubclass(query, BaseModel):
            names[endpoint] = [field.alias or name for name, field in query.model_fields.items()]
        elif isinstance(query, dict):
            names[endpoint] = list(query)
    source = (REPO_ROOT / "webapi" / "ui.py").read_text()
    ui_names = sorted(
        {name for line in source.splitlines() if "request.args" in line for name in re.findall(r'"([a-z_]+)"', line)}
    )
    assert {"state", "cursor", "before", "principal"} <= set(ui_names), ui_names
    names["ui.*"] = ui_names
    return names


@pytest.fixture(scope="module")
def odd_world(stack: Any) -> Iterator[tuple[Any, Browser]]:
    with private_world(stack, "odd") as (app, admin):
        browser = signed_in(app, admin)
        browser.client.environ_base["HTTP_X_API_KEY"] = admin.key
        yield app, browser


def _call(browser: Browser, method: str, url: str) -> Any:
    """One request as far into the route as the route lets it: a dashboard form with its CSRF token,
    an API call with an empty JSON object."""
    if method == "GET":
        return browser.client.open(url, method=method)
    if url.startswith("/ui"):
        return browser.client.open(url, method=method, data={"csrf_token": browser.csrf})
    return browser.client.open(url, method=method, json={})


def _check(response: Any, url: str, *, unstorable: int | None) -> None:
    where = f"{response.request.method} {url[:160]}"
    assert response.status_code < 500, f"{where}: {response.status_code} {response.get_data(as_text=True)[:300]}"
    if unstorable:
        assert response.status_code == unstorable, f"{where}: {response.status_code}"
    if response.status_code >= 400 and not url.startswith("/ui"):  # the dashboard shows its errors as pages
        body = response.get_json(silent=True)
        assert isinstance(body, dict) and body.get("error") and body.get("message"), f"{where}: {body}"


def _rules(app: Any) -> list[Any]:
    return sorted(app.url_map.iter_rules(), key=lambda rule: rule.rule)


def test_odd_text_in_any_path_parameter_answers_4xx_with_the_json_error_shape(odd_world):
    app, browser = odd_world
    called = 0
    for rule in _rules(app):
        if not rule.arguments or rule.endpoint == "static":
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            for value in UNSTORABLE + ODD:
                url = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", value, rule.rule)
                _check(_call(browser, method, url), url, unstorable=404 if value in UNSTORABLE else None)
                called += 1
    assert called > 300, called  # every route with a path parameter was reached


def test_odd_text_in_any_query_parameter_answers_4xx_with_the_json_error_shape(odd_world):
    app, browser = odd_world
    names = _query_names()
    called = 0
    for rule in _rules(app):
        if rule.arguments or "GET" not in rule.methods or rule.endpoint in STREAMS:
            continue
        for name in names.get(rule.endpoint) or (names["ui.*"] if rule.endpoint.startswith("ui.") else []):
            for value in UNSTORABLE + ODD:
                url = f"{rule.rule}?{name}={value}"
                _check(_call(browser, "GET", url), url, unstorable=422 if value in UNSTORABLE else None)
                called += 1
    # A query-parameter name itself may be odd too.
    _check(_call(browser, "GET", "/api/v1/tasks?a%00b=1"), "/api/v1/tasks?a%00b=1", unstorable=422)
    assert called > 200, called


@pytest.mark.parametrize("path", ["/api/v1/auth/token", "/ui/login"])
def test_a_nul_in_a_login_forms_username_is_422_before_any_login_is_counted(odd_world, path):
    app, _ = odd_world
    client = app.test_client()
    answer = client.post(path, data={"username": "a\x00b", "password": "x"})
    assert answer.status_code == 422, answer.get_data(as_text=True)
    # The API answers JSON, the dashboard an error page; both name the field.
    message = answer.get_json()["message"] if path.startswith("/api") else answer.get_data(as_text=True)
    assert "username" in message


def test_the_query_names_cover_each_api_list(odd_world):
    """The query fuzz is only as good as its list of names: each list endpoint has its own."""
    names = _query_names()
    for endpoint in ("tasks.index", "audit.index", "agents.index"):
        assert names.get(endpoint), endpoint
