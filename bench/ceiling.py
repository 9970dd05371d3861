"""The ceiling for ``POST /api/v1/tasks``: a bare Flask endpoint doing one INSERT and one ``apply_async``.

No validation, no auth, no audit, no state machine: what submitting a task costs at least on this
stack. Served by gunicorn with the same worker class, processes and threads as ``aios api``.
Environment: ``BENCH_DSN`` (libpq DSN with the run's search_path) plus bench/rawapp.py's variables.
"""

from __future__ import annotations

import json
import os
import uuid

from flask import Flask, request
from psycopg2.pool import ThreadedConnectionPool

from bench.rawapp import noop

app = Flask(__name__)
pool = ThreadedConnectionPool(1, 8, os.environ["BENCH_DSN"])


@app.post("/submit")
def submit() -> tuple[dict[str, str], int]:
    task_id = str(uuid.uuid4())
    body = request.get_json()
    connection = pool.getconn()
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO bench_ceiling (id, type, parameters) VALUES (%s, %s, %s)",
                (task_id, body["type"], json.dumps(body.get("parameters", {}))),
            )
    finally:
        pool.putconn(connection)
    noop.apply_async(args=[task_id], task_id=task_id)
    return {"id": task_id}, 202
