"""Odd input to the sync, backup, event and command routes answers 4xx as JSON (issue 15, item 13):
unknown body fields are 422 ``unknown field`` like everywhere else, and integers too long for
Python's int conversion are refused without Python's own hint (``sys.set_int_max_str_digits``)."""

from __future__ import annotations

import pytest

from tests.conftest import authorize, make_user

pytestmark = [pytest.mark.integration]

#: Past Python's default limit of 4300 digits for int(str).
HUGE = "9" * 5000


@pytest.mark.parametrize("path", ["/api/v1/backups", "/api/v1/sync/run"])
def test_post_backups_and_sync_run_refuse_an_unknown_field_with_422_before_doing_anything(client, path):
    # When an admin sends a field these routes do not take
    answer = client.post(path, json={"keep": 1})
    # Then it is the usual 422 naming the field, and nothing ran
    assert answer.status_code == 422, answer.json
    assert answer.json["error"] == "validation_failed"
    assert answer.json["field"] == "keep" and answer.json["message"] == "keep: unknown field"
    # And a body that is not an object is refused the same way
    assert client.post(path, json=[1]).status_code == 422


@pytest.mark.parametrize(
    "path",
    [
        f"/api/v1/sync/runs?limit={HUGE}",
        f"/api/v1/sync/runs?before={HUGE}",
        f"/api/v1/backups?limit={HUGE}",
        f"/api/v1/backups?limit=-{HUGE}",
        f"/api/v1/events?after={HUGE}:1",
        f"/api/v1/tasks/t/events?after={HUGE}",
    ],
)
def test_a_5000_digit_integer_in_a_query_is_a_4xx_without_python_s_hint(client, path):
    answer = client.get(path)
    assert 400 <= answer.status_code < 500 and answer.is_json, (answer.status_code, answer.data[:200])
    assert "set_int_max_str_digits" not in answer.get_data(as_text=True)
    assert "4300" not in answer.get_data(as_text=True)


def test_a_5000_digit_last_event_id_is_a_422_without_python_s_hint(client):
    for path, header in [("/api/v1/events", f"{HUGE}:1"), ("/api/v1/tasks/t/events", HUGE)]:
        answer = client.get(path, headers={"Last-Event-ID": header})
        assert answer.status_code == 422, answer.json
        assert "set_int_max_str_digits" not in answer.get_data(as_text=True)


def test_a_5000_digit_integer_in_a_body_is_a_400_without_python_s_hint(api_app, stack):
    operator = authorize(api_app.test_client(), make_user(stack, "operator").key)
    answer = operator.post(
        "/api/v1/commands", data=f'{{"argv": ["echo"], "wait_s": {HUGE}}}', content_type="application/json"
    )
    assert answer.status_code == 400, answer.json
    assert "set_int_max_str_digits" not in answer.json["message"]
