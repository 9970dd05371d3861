"""``GET /metrics``: Prometheus metrics of the API processes and of the whole cluster.

Two kinds of metric, served together:

* **process metrics** of the API — HTTP requests and latency by route and status, authentication
  failures, tasks submitted. Under gunicorn every worker process writes its own files into
  ``metrics.multiproc_dir`` (prometheus_client's multiprocess mode, set up by ``aios api`` before
  any worker starts), and a scrape adds them up, so the answer does not depend on which worker
  took the scrape.
* **cluster metrics** (:mod:`aios.ops.cluster_metrics`) read from the database and the broker.

``/metrics`` needs credentials like every other route (a viewer key: Prometheus sends it with
``authorization: {credentials: aios_…}``). ``aios metrics`` serves the cluster metrics alone on
``metrics.host:metrics.port`` (9090), with its own TLS and bearer token or basic auth from ``[metrics]``
(:func:`aios.ops.cluster_metrics.serve`).
"""

from __future__ import annotations

import os
import time
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess

from aios.ops.cluster_metrics import ClusterCollector
from aios.security.roles import OPERATOR, VIEWER
from webapi.security import policy

bp = Blueprint("metrics", __name__)

HTTP_REQUESTS = Counter("aios_http_requests", "HTTP requests answered by the API.", ["method", "route", "status"])
HTTP_LATENCY = Histogram(
    "aios_http_request_duration_seconds",
    "Time the API took to answer, by route.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
AUTH_FAILURES = Counter(
    "aios_auth_failures", "Requests refused for missing or bad credentials (401) or role (403).", ["reason"]
)
TASKS_SUBMITTED = Counter("aios_tasks_submitted", "Tasks accepted by the API, by type.", ["type"])


def count_submitted(task_types: list[str]) -> None:
    for task_type in task_types:
        TASKS_SUBMITTED.labels(type=task_type).inc()


def _start_timer() -> None:
    g.metrics_started = time.perf_counter()


def _observe(response: Response) -> Response:
    started = g.pop("metrics_started", None)
    # The route's rule, never the path: /api/v1/tasks/<task_id>, not a task id; unknown paths share one label.
    route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
    HTTP_REQUESTS.labels(method=request.method, route=route, status=str(response.status_code)).inc()
    if started is not None:
        HTTP_LATENCY.labels(method=request.method, route=route).observe(time.perf_counter() - started)
    if response.status_code in (401, 403):
        AUTH_FAILURES.labels(reason="unauthenticated" if response.status_code == 401 else "forbidden").inc()
    return response


def init_metrics(app: Flask) -> None:
    app.before_request(_start_timer)
    app.after_request(_observe)
    registry = CollectorRegistry(auto_describe=False)
    context = app.extensions["aios"]
    registry.register(ClusterCollector(context.settings, context.celery))
    app.extensions["aios_cluster_registry"] = registry


def process_registry() -> Any:
    """This process's metrics, or (under gunicorn) every API worker's, added up."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        from prometheus_client import REGISTRY

        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return registry


@bp.get("/metrics")
@policy(VIEWER, OPERATOR)
def metrics() -> Any:
    body = generate_latest(process_registry()) + generate_latest(current_app.extensions["aios_cluster_registry"])
    return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"})
