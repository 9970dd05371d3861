"""The raw Celery app AIOS is compared with: Celery's defaults, a Redis broker and a Redis result backend.

Configured only from the environment (``BENCH_REDIS_URL``, ``BENCH_PREFIX``, ``BENCH_QUEUE``) so the same
module serves the harness, ``celery -A bench.rawapp worker``, ``celery -A bench.rawapp flower`` and the
Flask ceiling. The key prefix and the queue name only keep a run apart from everything else on the
shared Redis; every other setting is Celery's default.
"""

from __future__ import annotations

import os
import time

from celery import Celery

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("BENCH_PREFIX", "aios-bench-raw:")
QUEUE = os.environ.get("BENCH_QUEUE", "bench-raw")

app = Celery("bench.rawapp", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    broker_transport_options={"global_keyprefix": PREFIX},
    result_backend_transport_options={"global_keyprefix": PREFIX},
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.noop")
def noop(*args: object, **kwargs: object) -> None:
    """Does nothing: the figure is the framework's own cost per task."""
    return None


@app.task(name="bench.stamp")
def stamp(key: str) -> None:
    """Records when it started (Redis key ``key``), for the priority figure."""
    app.backend.client.set(PREFIX + key, repr(time.time()))
