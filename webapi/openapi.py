"""GET /api/v1/openapi.json: the OpenAPI 3.1 document of the API, generated from the running app.

Paths, methods and path parameters come from Flask's url_map; request bodies and list-endpoint query
parameters from the same pydantic models the views validate with; who may call what from each view's
``@policy``. What the code cannot say by itself (the answer's shape and which error statuses a route
gives) is declared once, in :data:`OPERATIONS`, keyed by endpoint. A route under /api/v1 without an
entry is listed by :func:`undocumented` and fails ``tests/unit/test_openapi.py``; schemathesis fuzzes
the document against the app in ``tests/integration/test_openapi_fuzz.py``, so the response schemas
are held to be true, not just plausible.

The document is public: it describes the API's shapes and reveals no data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from aios.ops.limits import LimitsChange
from aios.tasks.spec import TaskRequest
from webapi import agents, audit, backups, commands, keys, queues, schedules, sync, tasks, users, workers
from webapi.security import public

bp = Blueprint("openapi", __name__, url_prefix="/api/v1")

API_PREFIX = "/api/v1"
JSON = "application/json"
Schema = dict[str, Any]


# --------------------------------------------------------------------------- response schemas


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(required: tuple[str, ...] = (), /, **properties: Schema) -> Schema:
    """An object with these known properties (more may appear: the schemas are loose, never false)."""
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


STR, INT, NUM, BOOL = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
ANY: Schema = {}
OBJ = {"type": "object"}
TIME = nullable({"type": "string", "format": "date-time"})
OPT_STR, OPT_INT, OPT_NUM = nullable(STR), nullable(INT), nullable(NUM)

_TASK = obj(
    ("id", "type", "state", "priority", "created_at"),
    id=STR,
    type=STR,
    parameters=ANY,
    state=STR,
    priority=INT,
    queue=OPT_STR,
    result=ANY,
    error=ANY,
    attempts=INT,
    max_retries=INT,
    timeout_s=OPT_INT,
    agent=OPT_STR,
    retry_of=OPT_STR,
    owner=OPT_STR,
    routing=OPT_STR,
    pinned_agent=OPT_STR,
    on_agent_lost=OPT_STR,
    pending_reason=OPT_STR,
    progress=OPT_NUM,
    progress_message=OPT_STR,
    redacted=BOOL,
    created_at=TIME,
    updated_at=TIME,
    queued_at=TIME,
    started_at=TIME,
    finished_at=TIME,
    run_at=TIME,
)
#: A task in a list (GET /tasks, an agent's tasks): each body not asked for with ``fields=`` is left out
#: and shown as ``<body>_preview`` (its JSON text's first 200 characters, null when null) and
#: ``<body>_truncated``; ``redacted``: a command's argv and output withheld from this reader.
_PREVIEWS = {
    f"{body}_{part}": (OPT_STR if part == "preview" else BOOL)
    for body in ("parameters", "result", "error")
    for part in ("preview", "truncated")
}
_TASK_ITEM = {"allOf": [_TASK, obj(redacted=BOOL, **_PREVIEWS)]}
_AGENT = obj(
    ("name", "status"),
    name=STR,
    type=OPT_STR,
    status=STR,
    status_reason=OPT_STR,
    admin_status=OPT_STR,
    capabilities=nullable(array(STR)),
    labels=nullable(OBJ),
    weight=INT,
    max_concurrency=INT,
    last_heartbeat_at=TIME,
    resources=ANY,
    active=OPT_INT,
    processed=OPT_INT,
    registered_at=TIME,
    updated_at=TIME,
)
_KEY = obj(
    ("id", "name", "prefix", "role", "state"),
    id=STR,
    name=STR,
    prefix=STR,
    role=STR,
    owner=OPT_STR,
    state=STR,
    expires_at=TIME,
    rotated_to=OPT_STR,
    created_at=TIME,
    revoked_at=TIME,
    last_used_at=TIME,
    last_used_ip=OPT_STR,
)
_USER = obj(("name", "role", "disabled"), name=STR, role=STR, disabled=BOOL, created_at=TIME, updated_at=TIME)
_SCHEDULE = obj(
    ("id", "name", "task", "enabled"),
    id=STR,
    name=STR,
    cron=OPT_STR,
    interval_s=OPT_INT,
    task=OBJ,
    enabled=BOOL,
    owner=OPT_STR,
    last_run_at=TIME,
    next_run_at=TIME,
    last_task_id=OPT_STR,
    created_at=TIME,
    updated_at=TIME,
)
_QUEUE = obj(
    ("name", "depth", "levels"),
    name=STR,
    broker_queue=STR,
    depth=INT,
    oldest_published_at=TIME,
    oldest_age_s=OPT_NUM,
    levels=array(obj(("priority", "depth"), priority=INT, depth=INT, oldest_published_at=TIME, oldest_age_s=OPT_NUM)),
    consumers=ANY,
    queued_in_ledger=OPT_INT,
)
_LIMITS = obj(("limits", "defaults", "overridden"), limits=OBJ, defaults=OBJ, overridden=array(STR))
_CONTROL = obj(("worker", "command"), worker=STR, command=STR, ok=ANY)

#: Named response schemas (components/schemas), beside the request models pydantic describes.
RESPONSE_SCHEMAS: dict[str, Schema] = {
    "Error": obj(("error", "message"), error=STR, message=STR, field=STR),
    "Task": _TASK,
    "TaskWithEvents": {
        "allOf": [
            ref("Task"),
            obj(
                ("events",),
                events=array(
                    obj(
                        ("id", "to_state"), id=INT, at=TIME, actor=OPT_STR, from_state=OPT_STR, to_state=STR, detail=ANY
                    )
                ),
            ),
        ]
    },
    "TaskListItem": _TASK_ITEM,
    "TaskPage": obj(("tasks", "next_cursor"), tasks=array(ref("TaskListItem")), next_cursor=OPT_STR),
    "BatchAccepted": obj(("ids", "count"), ids=array(STR), count=INT, queued=INT, pending=INT, scheduled=INT),
    "BulkOutcome": obj(
        ("action", "dry_run", "matched"),
        action=STR,
        dry_run=BOOL,
        limit=INT,
        matched=INT,
        sample_ids=array(STR),
        done=INT,
        skipped=OBJ,
    ),
    "TaskTypes": obj(("types",), types=array(obj(("name",), name=STR, description=OPT_STR, parameters=OBJ))),
    "Agent": _AGENT,
    "AgentDetail": {
        "allOf": [
            ref("Agent"),
            obj(
                ("active_tasks", "recent_tasks", "events"),
                active_tasks=array(ref("TaskListItem")),
                recent_tasks=array(ref("TaskListItem")),
                events=array(OBJ),
            ),
        ]
    },
    "Key": _KEY,
    "NewKey": {"allOf": [ref("Key"), obj(("key",), key=STR, old_key_expires_at=TIME)]},
    "User": _USER,
    "Schedule": _SCHEDULE,
    "Queue": _QUEUE,
    "Limits": _LIMITS,
    "WorkerControl": _CONTROL,
    "Deleted": obj(("deleted",), deleted=STR),
}

# --------------------------------------------------------------------------- operations


@dataclass(frozen=True)
class Operation:
    """What the code alone cannot say about one endpoint: its answers, and the errors it may give.

    ``ok`` maps each success status to its schema. ``errors`` adds statuses past the usual ones
    (401/403/429 for every authenticated route, 404 for a route with path parameters, and
    400/413/415/422 for one that reads a body or a query).
    """

    summary: str
    ok: dict[int, Schema]
    request: type[BaseModel] | Schema | None = None
    body_required: bool = True
    query: type[BaseModel] | dict[str, Schema] | None = None
    errors: tuple[int, ...] = ()
    content_type: str = JSON
    tags: tuple[str, ...] = field(default_factory=tuple)


CREDENTIALS_BODY = obj(
    ("username", "password"), username={"type": "string", "minLength": 1}, password={"type": "string", "minLength": 1}
)
AGENT_QUERY = {"status": STR, "capability": STR}
WORKER_QUERY = {"fields": STR}
EVENT_STREAM = "text/event-stream"

OPERATIONS: dict[str, Operation] = {
    # tasks
    "tasks.submit": Operation("Submit one task", {202: ref("Task")}, TaskRequest, errors=(409,)),
    "tasks.submit_batch": Operation(
        "Submit tasks in one transaction", {202: ref("BatchAccepted")}, tasks.BatchRequest, errors=(409,)
    ),
    "tasks.types": Operation("Task types and their parameter schemas", {200: ref("TaskTypes")}),
    "tasks.index": Operation("List and search tasks", {200: ref("TaskPage")}, query=tasks.ListQuery),
    "tasks.read": Operation("One task with its events", {200: ref("TaskWithEvents")}),
    "tasks.cancel": Operation("Cancel a task", {200: ref("Task")}, errors=(409,)),
    "tasks.retry": Operation("Run a finished task again as a new task", {202: ref("Task")}, errors=(409,)),
    "tasks.bulk": Operation(
        "Cancel or retry the tasks a filter selects", {200: ref("BulkOutcome")}, tasks.BulkRequest, errors=(409,)
    ),
    "events.task_events": Operation(
        "Server-sent events of one task", {200: {"type": "string"}}, content_type=EVENT_STREAM, errors=(503,)
    ),
    "events.cluster_events": Operation(
        "Server-sent events of the cluster", {200: {"type": "string"}}, content_type=EVENT_STREAM, errors=(503,)
    ),
    "commands.submit": Operation(
        "Run a program on an agent", {200: ref("Task"), 202: ref("Task")}, commands.CommandRequest, errors=(409,)
    ),
    # schedules
    "schedules.create": Operation("Create a schedule", {201: ref("Schedule")}, schedules.CreateSchedule, errors=(409,)),
    "schedules.index": Operation("Every schedule", {200: obj(("schedules",), schedules=array(ref("Schedule")))}),
    "schedules.read": Operation("One schedule", {200: ref("Schedule")}),
    "schedules.update": Operation("Change a schedule", {200: ref("Schedule")}, schedules.UpdateSchedule, errors=(409,)),
    "schedules.delete": Operation("Delete a schedule", {200: ref("Deleted")}),
    # agents
    "agents.register": Operation(
        "Register an agent (named after its type when no name is sent)",
        {201: ref("Agent")},
        agents.RegisterAgent,
        errors=(409,),
    ),
    "agents.index": Operation("Every agent", {200: obj(("agents",), agents=array(ref("Agent")))}, query=AGENT_QUERY),
    "agents.read": Operation("One agent with its tasks and status changes", {200: ref("AgentDetail")}),
    "agents.update": Operation("Drain, disable, enable or change an agent", {200: ref("Agent")}, agents.UpdateAgent),
    "agents.set_status": Operation(
        "Set an agent's status the original system's way (IDLE, OFFLINE, ERROR)",
        {200: ref("Agent")},
        agents.SetAgentStatus,
        errors=(409,),
    ),
    "agents.delete": Operation("Forget an OFFLINE agent", {200: ref("Deleted")}, errors=(409,)),
    # auth, keys, users, audit
    "auth.token": Operation(
        "Exchange a username and password for tokens",
        {
            200: obj(
                ("access_token", "refresh_token"), access_token=STR, refresh_token=STR, token_type=STR, expires_in=INT
            )
        },
        CREDENTIALS_BODY,
    ),
    "auth.refresh": Operation(
        "A new access token for a refresh token",
        {200: obj(("access_token",), access_token=STR, token_type=STR, expires_in=INT)},
    ),
    "auth.logout": Operation("Revoke this token session", {200: obj(("revoked",), revoked=BOOL)}, errors=(400,)),
    "keys.create": Operation(
        "Create an API key (the plaintext is in this answer only)", {201: ref("NewKey")}, keys.CreateKey, errors=(409,)
    ),
    "keys.index": Operation("API keys (admin: all; others: their own)", {200: obj(("keys",), keys=array(ref("Key")))}),
    "keys.revoke": Operation("Revoke a key", {200: ref("Key")}, errors=(409,)),
    "keys.activate": Operation("Re-activate a revoked key", {200: ref("Key")}, errors=(409,)),
    "keys.rotate": Operation(
        "Replace a key; the old one works for a grace period",
        {201: ref("NewKey")},
        keys.RotateKey,
        body_required=False,
        errors=(409,),
    ),
    "keys.delete": Operation("Delete a key", {200: ref("Deleted")}),
    "users.index": Operation("Every user", {200: obj(("users",), users=array(ref("User")))}),
    "users.me": Operation(
        "Who is calling", {200: obj(("name", "role", "via"), name=STR, role=STR, via=STR, key_prefix=OPT_STR)}
    ),
    "users.create": Operation("Create a user", {201: ref("User")}, users.CreateUser, errors=(409,)),
    "users.update": Operation(
        "Change a user's role, password or disabled flag", {200: ref("User")}, users.UpdateUser, errors=(409,)
    ),
    "audit.index": Operation(
        "The audit log, newest first",
        {
            200: obj(
                ("entries", "next_cursor"),
                entries=array(
                    obj(
                        ("id", "action"),
                        id=INT,
                        at=TIME,
                        principal=OPT_STR,
                        role=OPT_STR,
                        source_ip=OPT_STR,
                        action=STR,
                        target=OPT_STR,
                        outcome=OPT_STR,
                        detail=ANY,
                    )
                ),
                next_cursor=OPT_STR,
            )
        },
        query=audit.AuditQuery,
    ),
    # operations
    "status.status": Operation(
        "How the cluster is doing",
        {
            200: obj(
                ("version", "agents", "tasks_last_hour"),
                version=STR,
                beat_leader=nullable(OBJ),
                agents=OBJ,
                queues=nullable(OBJ),
                queues_error=STR,
                tasks_last_hour=OBJ,
                throughput_per_minute=NUM,
                last_sync_run=nullable(OBJ),
                last_backup=nullable(OBJ),
            )
        },
    ),
    "sync.runs": Operation(
        "The sync job's recent runs",
        {
            200: obj(
                ("runs", "next_before"),
                runs=array(
                    obj(
                        ("id",),
                        id=INT,
                        started_at=TIME,
                        duration_s=OPT_NUM,
                        runner=OPT_STR,
                        found=ANY,
                        changed=ANY,
                        errors=ANY,
                    )
                ),
                next_before=OPT_INT,
            )
        },
        query=sync.RunsQuery,
    ),
    "sync.run_now": Operation(
        "Run the sync job once, now",
        {200: obj(("id",), id=INT, changed=OBJ, errors=ANY)},
        workers.NoFields,
        body_required=False,
    ),
    "backups.create": Operation(
        "Back up the database now",
        {201: obj(("id", "status"), id=INT, status=STR)},
        workers.NoFields,
        body_required=False,
        errors=(500,),
    ),
    "backups.index": Operation(
        "Backup rows, newest first",
        {
            200: obj(
                ("backups",),
                backups=array(
                    obj(
                        ("id", "status"),
                        id=INT,
                        created_at=TIME,
                        path=OPT_STR,
                        file=OPT_STR,
                        kind=OPT_STR,
                        size_bytes=OPT_INT,
                        sha256=OPT_STR,
                        status=STR,
                        error=OPT_STR,
                    )
                ),
            )
        },
        query=backups.BackupQuery,
    ),
    "queues.index": Operation(
        "Every AIOS queue", {200: obj(("queues",), queues=array(ref("Queue")))}, errors=(501, 503)
    ),
    "queues.read": Operation("One queue", {200: ref("Queue")}, errors=(501, 503)),
    "queues.purge": Operation(
        "Drop a queue's waiting messages; their tasks are CANCELLED",
        {
            200: obj(
                ("queue", "purged"), queue=STR, priority=OPT_INT, purged=INT, cancelled=INT, dropped=INT, unreadable=INT
            )
        },
        queues.PurgeRequest,
        body_required=False,
        errors=(501, 503),
    ),
    "system.resources": Operation(
        "Resources of this API host and of every agent", {200: obj(("api", "agents"), api=OBJ, agents=array(OBJ))}
    ),
    "system.read_limits": Operation("The system limits in force", {200: ref("Limits")}),
    "system.change_limits": Operation("Change system limits", {200: ref("Limits")}, LimitsChange),
    # workers
    "workers.index": Operation(
        "Every worker that answers a ping",
        {200: obj(("workers",), workers=array(OBJ))},
        query=WORKER_QUERY,
        errors=(501, 503),
    ),
    "workers.read": Operation("One worker", {200: OBJ}, query=WORKER_QUERY, errors=(501, 503)),
    **{
        f"workers.{name}": Operation(
            summary, {200: ref("WorkerControl")}, model, body_required=False, errors=(409, 501, 503, 504)
        )
        for name, summary, model in (
            ("pool_grow", "Add pool processes", workers.PoolSize),
            ("pool_shrink", "Remove pool processes", workers.PoolSize),
            ("pool_autoscale", "Change the autoscale range", workers.Autoscale),
            ("pool_restart", "Replace every pool process", workers.NoFields),
            ("add_consumer", "Consume one more queue", workers.Consumer),
            ("cancel_consumer", "Stop consuming a queue", workers.Consumer),
            ("rate_limit", "Set a task's rate limit", workers.RateLimit),
            ("time_limit", "Set a task's time limits", workers.TimeLimit),
        )
    },
    "workers.shutdown": Operation(
        "Warm shutdown of a worker",
        {202: ref("WorkerControl")},
        workers.NoFields,
        body_required=False,
        errors=(501, 503),
    ),
    "openapi.document": Operation("This document", {200: OBJ}),
}

#: The statuses every authenticated route may answer with, whatever it does.
AUTH_ERRORS = (401, 403, 429)
BODY_ERRORS = (400, 413, 415, 422)
_CONVERTER = re.compile(r"<(?:[a-z_]+:)?([A-Za-z_][A-Za-z0-9_]*)>")


def undocumented(app: Flask) -> list[str]:
    """Endpoints of routes under /api/v1 that have no entry in :data:`OPERATIONS`."""
    return sorted(
        {
            rule.endpoint
            for rule in app.url_map.iter_rules()
            if rule.rule.startswith(API_PREFIX) and rule.endpoint not in OPERATIONS
        }
    )


def _request_models() -> list[type[BaseModel]]:
    models: dict[str, type[BaseModel]] = {}
    for operation in OPERATIONS.values():
        for candidate in (operation.request, operation.query):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                models[candidate.__name__] = candidate
    return list(models.values())


def _model_schemas() -> tuple[dict[type[BaseModel], Schema], dict[str, Schema]]:
    """JSON schemas of every request model, with nested models among them, as components; and the
    reference to each model's own schema (pydantic names a model by its module if two share a name)."""
    models = _request_models()
    refs, top = models_json_schema(
        [(model, "validation") for model in models], ref_template="#/components/schemas/{model}"
    )
    return {model: refs[(model, "validation")] for model in models}, dict(top.get("$defs", {}))


def _without_null(schema: Schema) -> Schema:
    """A query parameter is absent or a string: drop the ``null`` branch pydantic adds for ``X | None``."""
    branches = [s for s in schema.get("anyOf", []) if s.get("type") != "null"]
    if len(branches) == 1:
        rest = {key: value for key, value in schema.items() if key not in ("anyOf", "default")}
        return {**rest, **branches[0]}
    return {key: value for key, value in schema.items() if key != "default"}


def _query_parameters(query: type[BaseModel] | dict[str, Schema]) -> list[Schema]:
    if isinstance(query, dict):
        return [{"name": name, "in": "query", "required": False, "schema": schema} for name, schema in query.items()]
    model_schema = query.model_json_schema(mode="validation")
    required = set(model_schema.get("required", ()))
    return [
        {"name": name, "in": "query", "required": name in required, "schema": _without_null(schema)}
        for name, schema in model_schema.get("properties", {}).items()
    ]


def _error_responses(statuses: set[int]) -> dict[str, Schema]:
    return {
        str(status): {"description": "error", "content": {JSON: {"schema": ref("Error")}}}
        for status in sorted(statuses)
    }


def _operation(
    app: Flask, endpoint: str, path_params: list[str], method: str, model_refs: dict[type[BaseModel], Schema]
) -> Schema:
    spec = OPERATIONS[endpoint]
    view = app.view_functions[endpoint]
    is_public = getattr(view, "aios_public", False)
    statuses: set[int] = set(spec.errors)
    if not is_public:
        statuses.update(AUTH_ERRORS)
    if path_params:
        statuses.add(404)
    operation: Schema = {
        "operationId": endpoint,
        "summary": spec.summary,
        "tags": [endpoint.split(".")[0]],
        "parameters": [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
            for name in path_params
        ],
    }
    if (view.__doc__ or "").strip():
        operation["description"] = " ".join((view.__doc__ or "").split())
    roles = sorted(getattr(view, "aios_roles", ()))
    operation["x-aios-roles"] = ["public"] if is_public else roles
    if spec.query is not None:
        operation["parameters"].extend(_query_parameters(spec.query))
        statuses.update((400, 422))
    if spec.request is not None:
        body = model_refs[spec.request] if isinstance(spec.request, type) else spec.request
        operation["requestBody"] = {"required": spec.body_required, "content": {JSON: {"schema": body}}}
        statuses.update(BODY_ERRORS)
    elif method in ("POST", "PUT", "PATCH"):
        statuses.update((400, 413))
    if is_public and endpoint == "auth.token":
        statuses.update((401, 429))
    elif is_public and endpoint == "auth.refresh":
        statuses.add(401)
        operation["security"] = [{"bearer": []}]
    elif is_public:
        operation["security"] = []
    responses: dict[str, Schema] = {
        str(status): {"description": "success", "content": {spec.content_type: {"schema": schema}}}
        for status, schema in spec.ok.items()
    }
    responses.update(_error_responses(statuses))
    operation["responses"] = responses
    return operation


def build_document(app: Flask) -> Schema:
    """The OpenAPI 3.1 document of every /api/v1 route of ``app`` (a route missing from
    :data:`OPERATIONS` is left out here and caught by the unit test)."""
    model_refs, model_schemas = _model_schemas()
    paths: dict[str, dict[str, Schema]] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if not rule.rule.startswith(API_PREFIX) or rule.endpoint not in OPERATIONS:
            continue
        path = _CONVERTER.sub(r"{\1}", rule.rule)
        path_params = _CONVERTER.findall(rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            paths.setdefault(path, {})[method.lower()] = _operation(app, rule.endpoint, path_params, method, model_refs)
    try:
        api_version = version("aios")
    except PackageNotFoundError:  # pragma: no cover - a tree that is not installed
        api_version = "0"
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "AIOS API",
            "version": api_version,
            "description": "Submit and follow tasks, manage agents, schedules, keys and users. "
            "Errors are JSON {error, message, field?}.",
        },
        "servers": [{"url": "/"}],
        "security": [{"apiKey": []}, {"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A JWT access token from POST /api/v1/auth/token (an API key "
                    "sent as a bearer token works too)",
                },
            },
            "schemas": {**model_schemas, **RESPONSE_SCHEMAS},
        },
    }


@bp.get("/openapi.json")
@public()
def document() -> Any:
    """This API's OpenAPI 3.1 document (public: it describes shapes, never data)."""
    cached = current_app.extensions.get("aios_openapi")
    if cached is None:
        cached = current_app.extensions["aios_openapi"] = build_document(current_app)
    return jsonify(cached)
