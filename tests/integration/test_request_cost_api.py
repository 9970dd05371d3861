"""A real ``aios api`` process keeps its memory when anyone, logged in or not, sends the worst bodies.

The probe's amplification body (one long key over a long list) took a gunicorn worker from 120 MB to
1.08 GB through POST /api/v1/auth/token, and kept it there. The same bodies, and the worst one at
``api.max_body_bytes``, now leave the worker's resident memory within 50 MB of where it started.
"""

from __future__ import annotations

import json

import psutil
import pytest
import requests

from tests.unit.test_request_cost import LIMIT, _amplifier

pytestmark = pytest.mark.integration


def _worker_rss(api) -> int:
    workers = psutil.Process(api.process.pid).children()
    assert len(workers) == 1, workers  # start_api runs one gunicorn worker
    return workers[0].memory_info().rss


def test_amplification_bodies_without_login_leave_worker_memory_within_50_mb(start_api):
    api = start_api()
    url = f"{api.url}/api/v1/auth/token"
    headers = {"Content-Type": "application/json"}
    # Warm up: the first request loads what every request needs.
    requests.post(url, data=b'{"username": "nobody", "password": "x"}', headers=headers, timeout=30)
    before = _worker_rss(api)
    bodies = [
        json.dumps({"k" * 100_000: [0] * 10_000}).encode(),  # the probe's 120 KB body (1 GB before)
        _amplifier(230_000),  # the probe's 230 KB body (3 GB before)
        _amplifier(LIMIT),  # the worst at the body limit (~128 GiB before)
    ]
    for body in bodies * 3:
        answer = requests.post(url, data=body, headers=headers, timeout=60)
        assert answer.status_code == 422, answer.text[:300]
        assert answer.json()["error"] == "validation_failed"
    grown = _worker_rss(api) - before
    assert grown < 50 * 1024 * 1024, f"the worker grew by {grown / 2**20:.0f} MB"
    assert requests.get(f"{api.url}/healthz", timeout=5).status_code == 200
