"""The dashboard driven like a browser through Flask's test client (sessions, CSRF tokens)."""

from __future__ import annotations

import itertools
import re
import uuid
from typing import Any

from tests.conftest import Credentials

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_addresses = itertools.count(1)


class Browser:
    """A Flask test client used like a browser: it keeps the session cookie and reads CSRF tokens
    from the pages it gets; each one comes from an address of its own (the login limit is per address)."""

    def __init__(self, app: Any) -> None:
        self.client = app.test_client()
        self.client.environ_base["REMOTE_ADDR"] = f"10.{uuid.uuid4().int % 200}.{next(_addresses) % 250}.7"
        self.csrf = ""

    def get(self, path: str, **kwargs: Any) -> Any:
        response = self.client.get(path, **kwargs)
        found = CSRF.search(response.get_data(as_text=True))
        if found:
            self.csrf = found.group(1)
        return response

    def post(self, path: str, data: dict[str, str] | None = None, *, csrf: str | None = None) -> Any:
        form = dict(data or {})
        token = self.csrf if csrf is None else csrf
        if token:
            form["csrf_token"] = token
        return self.client.post(path, data=form)

    def sign_in(self, user: str, password: str, *, next: str = "") -> Any:
        self.get("/ui/login")
        return self.post("/ui/login", {"username": user, "password": password, "next": next})


def signed_in(app: Any, who: Credentials) -> Browser:
    browser = Browser(app)
    answer = browser.sign_in(who.user, who.password)
    assert answer.status_code == 303, answer.get_data(as_text=True)
    assert answer.headers["Location"].endswith("/ui")
    browser.get("/ui")  # sign-in made a new CSRF token: read it as a browser would
    return browser
