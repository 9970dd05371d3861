"""Prometheus metrics: /metrics under gunicorn, task totals from the ledger, promtool, no ids in labels."""

from __future__ import annotations

import json
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from aios.tasks.stats import rollup
from tests.conftest import authorize, make_user, require_program, wait_for

pytestmark = pytest.mark.integration


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def promtool() -> str:
    return require_program("promtool", ".ci/run installs Debian's prometheus package")


def test_metrics_needs_a_viewer_and_answers_in_the_prometheus_text_format(api_app, stack, anonymous):
    viewer = authorize(api_app.test_client(), make_user(stack, "viewer").key)
    agent = authorize(api_app.test_client(), make_user(stack, "agent").key)
    assert anonymous.get("/metrics").status_code == 401
    assert agent.get("/metrics").status_code == 403
    answer = viewer.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=")
    names = {family.name for family in text_string_to_metric_families(answer.get_data(as_text=True))}
    for expected in (
        "aios_http_requests",
        "aios_http_request_duration_seconds",
        "aios_auth_failures",
        "aios_tasks_finished",
        "aios_task_run_seconds",
        "aios_task_queue_wait_seconds",
        "aios_queue_depth",
        "aios_queue_oldest_message_age_seconds",
        "aios_agents",
        "aios_sync_runs",
        "aios_sync_last_success_timestamp_seconds",
        "aios_backups",
        "aios_last_good_backup_timestamp_seconds",
    ):
        assert expected in names, (expected, sorted(names))


def test_finished_tasks_run_time_and_queue_wait_come_from_the_ledger_and_never_label_a_task_or_user(
    client, stack, queue, start_worker, ledger, tmp_path
):
    # Given the totals before, and three tasks that ran on a real agent
    rollup(stack.settings, settle_s=0)
    before = client.get("/metrics").get_data(as_text=True)
    start_worker([queue])
    ids = [client.post("/api/v1/tasks", json={"type": "echo", "queue": queue}).json["id"] for _ in range(3)]
    for task_id in ids:
        ledger.wait_state(task_id, "SUCCEEDED")

    # When the ledger is rolled up and /metrics is scraped
    rollup(stack.settings, settle_s=0)
    text = client.get("/metrics").get_data(as_text=True)

    # Then the totals grew by exactly three, with a run time and a queue wait for each
    grew = {
        name: value(text, name, **labels) - value(before, name, **labels)
        for name, labels in [
            ("aios_tasks_finished_total", {"type": "echo", "state": "SUCCEEDED"}),
            ("aios_task_run_seconds_count", {"type": "echo"}),
            ("aios_task_queue_wait_seconds_count", {"type": "echo"}),
        ]
    }
    assert grew == {
        "aios_tasks_finished_total": 3,
        "aios_task_run_seconds_count": 3,
        "aios_task_queue_wait_seconds_count": 3,
    }
    # And a second roll-up counts nothing twice
    rollup(stack.settings, settle_s=0)
    again = client.get("/metrics").get_data(as_text=True)
    assert value(again, "aios_tasks_finished_total", type="echo", state="SUCCEEDED") == value(
        text, "aios_tasks_finished_total", type="echo", state="SUCCEEDED"
    )
    # And no label value is a task id or a user name
    for task_id in ids:
        assert task_id not in text
    assert not re.search(r'="[^"]*admin[^"]*"', text)

    # And the output passes promtool's linter
    tool = promtool()
    if tool:
        path = tmp_path / "metrics.txt"
        path.write_text(text)
        checked = subprocess.run([tool, "check", "metrics"], input=text.encode(), capture_output=True)
        assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()


@pytest.mark.slow
def test_counters_add_up_over_two_gunicorn_workers(stack, start_api, queue, tmp_path):
    # Given the API under gunicorn with two worker processes
    metrics_dir = tmp_path / "prometheus"
    api = start_api(env={"AIOS_API__WORKERS": "2", "AIOS_METRICS__MULTIPROC_DIR": str(metrics_dir)})
    key = make_user(stack, "operator").key
    headers = {"X-API-Key": key}

    # When 10 tasks are submitted, concurrently so that both workers take some
    def submit(_: int) -> int:
        return requests.post(
            f"{api.url}/api/v1/tasks", json={"type": "echo", "queue": queue}, headers=headers, timeout=10
        ).status_code

    with ThreadPoolExecutor(max_workers=10) as pool:
        assert list(pool.map(submit, range(10))) == [202] * 10

    # Then both workers wrote metrics, and every scrape (whichever worker answers) says 10
    files = {path.name for path in Path(metrics_dir).rglob("counter_*.db")}
    wait_for(
        lambda: len(files | {p.name for p in Path(metrics_dir).rglob("counter_*.db")}) >= 2,
        timeout=5,
        what="two gunicorn workers to write metric files",
    )
    for _ in range(6):
        text = requests.get(f"{api.url}/metrics", headers=headers, timeout=10).text
        assert value(text, "aios_tasks_submitted_total", type="echo") == 10
        assert value(text, "aios_http_requests_total", method="POST", route="/api/v1/tasks", status="202") == 10


def metric_names_in(expression: str) -> set[str]:
    """Metric names a PromQL expression reads (AIOS's all start with aios_)."""
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in re.findall(r"\baios_[a-z_]+", expression)}


def test_the_shipped_alert_rules_and_dashboard_read_only_metrics_aios_exports(client):
    # Given what /metrics exports (counters with their _total, histograms with their base name)
    exported = set()
    for family in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True)):
        exported.add(family.name)
        if family.type == "counter":
            exported.add(f"{family.name}_total")  # present even before its first sample
        exported.update(sample.name for sample in family.samples)
    config = Path(__file__).resolve().parents[2] / "config"

    # Then every expression of the alert rules and of the Grafana dashboard reads exported metrics
    rules = (config / "prometheus" / "aios-alerts.yml").read_text()
    dashboard = json.loads((config / "grafana" / "aios-dashboard.json").read_text())
    expressions = re.findall(r"expr: (.+)", rules) + [
        target["expr"] for panel in dashboard["panels"] for target in panel["targets"]
    ]
    assert len(expressions) > 20
    for expression in expressions:
        missing = {name for name in metric_names_in(expression) if name not in exported}
        assert not missing, (expression, missing)

    # And promtool accepts the rules and their unit tests fire each alert as meant
    tool = promtool()
    if tool:
        for args in (["check", "rules", "aios-alerts.yml"], ["test", "rules", "aios-alerts.test.yml"]):
            done = subprocess.run([tool, *args], cwd=config / "prometheus", capture_output=True)
            assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
