"""One writer of task state: only :mod:`aios.tasks.states` (with its PostgreSQL strategy) writes ``tasks.state``.

The state machine decides which moves are legal; a write anywhere else could skip that decision (a
terminal state left, a fence not checked, a move without its timeline event). So this test reads the
source of every server and client module (its syntax tree, not its text) and fails, naming the file
and line, on any write of a task's state outside the state module:

* ``<x>.state = ...`` (or ``setattr(x, "state", ...)``) where ``x`` may be a ``Task``: an object of
  another model with a ``state`` (an API key, the routing state) is told apart by where it came from;
  an object of unknown origin counts as a task;
* an UPDATE of the tasks table (``update(Task)``, ``update(Task.__table__)``, ``Table.update()``,
  ``query(Task).update(...)``) that sets ``state``, or whose values cannot be read from the code;
* an INSERT of task rows (``insert(Task)``, ``Task(..., state=...)``, ``session.add(Task(...))``): a
  task is born in a state, so a new row is a write of it (:func:`aios.tasks.states.insert_new`);
* raw SQL (a string that is not a docstring) with ``UPDATE tasks SET ... state =`` or ``INSERT INTO tasks``.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from aios.models import Base, Task

REPO_ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("aios", "aios_client", "webapi", "workers")

#: The state machine and its private PostgreSQL strategy: the only modules that may write tasks.state.
WRITERS = frozenset({"aios/tasks/states.py", "aios/tasks/states_postgres.py"})

ASSIGNMENT = "assignment of a task's state"
UPDATE = "UPDATE of tasks.state"
INSERT = "insert of new task rows"
RAW_SQL = "raw SQL writing tasks.state"

TASKS_TABLE = Task.__tablename__
#: Mapped classes other than Task, by name (an object made from one of them is not a task).
OTHER_MODELS = frozenset(mapper.class_.__name__ for mapper in Base.registry.mappers) - {Task.__name__}

_RAW_UPDATE = re.compile(
    rf'\bUPDATE\s+(?:ONLY\s+)?(?:"?\w+"?\.)?"?{TASKS_TABLE}"?\s+(?:AS\s+)?(?:\w+\s+)?SET\b(?P<set>.*?)'
    r"(?:\bWHERE\b|\bFROM\b|\bRETURNING\b|;|$)",
    re.IGNORECASE | re.DOTALL,
)
_RAW_SET_STATE = re.compile(r'(?:^|[\s,(])(?:\w+\.)?"?state"?\s*=(?!=)', re.IGNORECASE)
_RAW_INSERT = re.compile(rf'\bINSERT\s+INTO\s+(?:"?\w+"?\.)?"?{TASKS_TABLE}"?(?=[\s(]|$)', re.IGNORECASE)


@dataclass(frozen=True)
class Write:
    path: str
    line: int
    kind: str
    code: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.kind}: {self.code}"


class _Module:
    """One module's syntax tree, with what it calls the Task model, its table and the other models."""

    def __init__(self, source: str, path: str) -> None:
        self.source, self.path = source, path
        self.tree = ast.parse(source, filename=path)
        self.parent: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                self.parent[child] = node
        self.task_names: set[str] = {Task.__name__}
        self.other_names: set[str] = set(OTHER_MODELS)
        self.model_modules: set[str] = set()
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and node.module == "aios.models":
                for alias in node.names:
                    if alias.name == Task.__name__:
                        self.task_names.add(alias.asname or alias.name)
                    elif alias.name in OTHER_MODELS:
                        self.other_names.add(alias.asname or alias.name)
            elif isinstance(node, ast.ImportFrom) and node.module == "aios":
                self.model_modules.update(a.asname or a.name for a in node.names if a.name == "models")
            elif isinstance(node, ast.Import):
                self.model_modules.update(a.asname for a in node.names if a.name == "aios.models" and a.asname)
        #: What this module's own functions say they return.
        self.returns = {
            node.name: node.returns
            for node in self.tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns is not None
        }
        self.table_names: set[str] = set()
        grown = True
        while grown:  # names bound to the tasks table, through any chain of aliases
            grown = False
            for node in ast.walk(self.tree):
                if (
                    isinstance(node, ast.Assign | ast.AnnAssign)
                    and node.value is not None
                    and self.is_table(node.value)
                ):
                    for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                        if isinstance(target, ast.Name) and target.id not in self.table_names:
                            self.table_names.add(target.id)
                            grown = True

    # ------------------------------------------------------------------ what an expression is

    def is_entity(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Name):
            return node.id in self.task_names
        return (
            isinstance(node, ast.Attribute)
            and node.attr == Task.__name__
            and (
                isinstance(node.value, ast.Name)
                and node.value.id in self.model_modules
                or _dotted(node.value) == "aios.models"
            )
        )

    def is_table(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Name):
            return node.id in self.table_names
        if isinstance(node, ast.Attribute) and node.attr == "__table__":
            return self.is_entity(node.value)
        if isinstance(node, ast.Call) and _name(node.func) in ("Table", "table") and node.args:
            return _constant(node.args[0]) == TASKS_TABLE
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "tables":
            return _constant(node.slice) == TASKS_TABLE
        return False

    def is_tasks(self, node: ast.AST) -> bool:
        return self.is_entity(node) or self.is_table(node)

    # ------------------------------------------------------------------ the scan

    def writes(self) -> Iterator[Write]:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Call):
                kind = self._call(node)
            elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                kind = ASSIGNMENT if any(self._assigns_task_state(t) for t in targets) else None
            elif isinstance(node, ast.Constant | ast.JoinedStr):
                kind = self._raw_sql(node)
            else:
                kind = None
            if kind is not None:
                yield self._write(node, kind)

    def _write(self, node: ast.AST, kind: str) -> Write:
        code = (ast.get_source_segment(self.source, node) or "").strip().splitlines() or [""]
        return Write(self.path, getattr(node, "lineno", 0), kind, code[0][:120])

    def _call(self, call: ast.Call) -> str | None:
        func, name = call.func, _name(call.func)
        if name == "setattr" and len(call.args) >= 2 and _constant(call.args[1]) == "state":
            return ASSIGNMENT if self._may_be_task(call.args[0]) else None
        if self.is_entity(func):  # Task(...): a new task object, born in the state it is given
            return INSERT if any(k.arg == "state" for k in call.keywords) else None
        if name in ("add", "add_all") and any(self._makes_task(arg) for arg in call.args):
            return INSERT
        if name == "merge" and any(self._makes_task(arg) for arg in call.args):
            return UPDATE
        if name in ("insert", "bulk_insert_mappings", "bulk_save_objects"):
            if (call.args and self.is_tasks(call.args[0])) or (
                not call.args and isinstance(func, ast.Attribute) and self.is_table(func.value)
            ):
                return INSERT
        if name in ("update", "bulk_update_mappings"):
            if call.args and self.is_tasks(call.args[0]):
                return UPDATE if self._statement_sets_state(call) else None
            if not call.args and isinstance(func, ast.Attribute) and self.is_table(func.value):
                return UPDATE if self._statement_sets_state(call) else None
            if isinstance(func, ast.Attribute) and self._queries_tasks(func.value):  # Query.update({...})
                return UPDATE if not call.args or _may_set_state(call.args[0]) else None
        return None

    def _statement_sets_state(self, statement: ast.Call) -> bool:
        """An UPDATE statement sets state if a chained ``.values(...)`` does, or if none is chained
        (its values are then given where it is executed, out of this scan's sight)."""
        valued = False
        node: ast.AST = statement
        while isinstance(attribute := self.parent.get(node), ast.Attribute) and isinstance(
            call := self.parent.get(attribute), ast.Call
        ):
            if attribute.attr in ("values", "ordered_values"):
                valued = True
                if any(k.arg in ("state", None) for k in call.keywords) or any(
                    _may_set_state(arg, ordered=attribute.attr == "ordered_values") for arg in call.args
                ):
                    return True
            node = call
        return not valued

    def _queries_tasks(self, node: ast.AST) -> bool:
        while isinstance(node, ast.Call | ast.Attribute):
            if isinstance(node, ast.Call):
                if _name(node.func) == "query" and any(self.is_tasks(arg) for arg in node.args):
                    return True
                node = node.func
            else:
                node = node.value
        return False

    def _makes_task(self, node: ast.AST) -> bool:
        return any(isinstance(n, ast.Call) and self.is_entity(n.func) for n in ast.walk(node))

    def _assigns_task_state(self, target: ast.AST) -> bool:
        if isinstance(target, ast.Tuple | ast.List | ast.Starred):
            return any(self._assigns_task_state(t) for t in ast.iter_child_nodes(target))
        return isinstance(target, ast.Attribute) and target.attr == "state" and self._may_be_task(target.value)

    def _may_be_task(self, obj: ast.AST) -> bool:
        """False only when ``obj`` is ``self``/``cls`` or comes only from models other than Task."""
        if isinstance(obj, ast.Call) and (returns := self.returns.get(_name(obj.func))) is not None:
            evidence = _names_in(returns)
            return bool(evidence & self.task_names) or not evidence & self.other_names
        root = obj
        while isinstance(root, ast.Attribute | ast.Subscript | ast.Call):
            root = root.func if isinstance(root, ast.Call) else root.value
        if not isinstance(root, ast.Name):
            return True
        if root is obj and root.id in ("self", "cls"):
            return False
        evidence = self._evidence(root)
        if evidence & self.task_names:
            return True
        return not evidence & self.other_names

    def _evidence(self, name: ast.Name) -> set[str]:
        """The names in every expression that binds ``name`` in its function (or, if the function does
        not bind it, in the module)."""
        scope: ast.AST | None = self.parent.get(name)
        while scope is not None and not isinstance(scope, _SCOPES):
            scope = self.parent.get(scope)
        if scope is None or not _binds_in(scope, name.id):
            scope = self.tree
        found: set[str] = set()
        for source in _bindings(scope, name.id):
            found |= _names_in(source)
            for call in ast.walk(source):  # a call of this module's own function: what it says it returns
                if isinstance(call, ast.Call) and (returns := self.returns.get(_name(call.func))) is not None:
                    found |= _names_in(returns)
        return found

    def _raw_sql(self, node: ast.Constant | ast.JoinedStr) -> str | None:
        parent = self.parent.get(node)
        if isinstance(parent, ast.Expr | ast.JoinedStr):  # a docstring, or a piece of an f-string
            return None
        if isinstance(node, ast.JoinedStr):
            text = "".join(str(v.value) if isinstance(v, ast.Constant) else "?" for v in node.values)
        elif isinstance(node.value, str):
            text = node.value
        else:
            return None
        if _RAW_INSERT.search(text) or any(_RAW_SET_STATE.search(m["set"]) for m in _RAW_UPDATE.finditer(text)):
            return RAW_SQL
        return None


def _name(func: ast.AST) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _constant(node: ast.AST) -> object:
    return node.value if isinstance(node, ast.Constant) else None


def _may_set_state(values: ast.AST, *, ordered: bool = False) -> bool:
    """Whether a mapping of column → value (or, ``ordered``, one ``(column, value)`` pair) may set ``state``."""
    if ordered:
        keys: list[ast.expr | None] = [values.elts[0]] if isinstance(values, ast.Tuple) and values.elts else [None]
    elif isinstance(values, ast.Dict):
        keys = list(values.keys)
    else:
        return True  # a mapping built elsewhere: it may hold state
    # None: a ``**mapping`` inside the literal, or a pair this scan cannot read
    return any(
        key is None or _constant(key) == "state" or (isinstance(key, ast.Attribute) and key.attr == "state")
        for key in keys
    )


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _walk_scope(scope: ast.AST) -> Iterator[ast.AST]:
    """The nodes of one scope, without those of the functions and classes defined inside it."""
    pending = list(ast.iter_child_nodes(scope))
    while pending:
        node = pending.pop()
        yield node
        if not isinstance(node, (*_SCOPES, ast.ClassDef)):
            pending.extend(ast.iter_child_nodes(node))


def _binds_in(scope: ast.AST, name: str) -> bool:
    """Whether ``name`` is a parameter of ``scope`` or assigned in it (then it is local to it)."""
    params = scope.args if isinstance(scope, _SCOPES) else None
    if params is not None and name in {a.arg for a in (*params.posonlyargs, *params.args, *params.kwonlyargs)}:
        return True
    if params is not None and name in {a.arg for a in (params.vararg, params.kwarg) if a is not None}:
        return True
    return any(True for _ in _bindings(scope, name)) or any(
        isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Store) for n in _walk_scope(scope)
    )


def _bindings(scope: ast.AST, name: str) -> Iterator[ast.AST]:
    """The expressions ``name`` is bound from in ``scope``: annotations, assigned values, iterables."""
    if isinstance(scope, _SCOPES):
        params = scope.args
        for arg in (*params.posonlyargs, *params.args, *params.kwonlyargs, params.vararg, params.kwarg):
            if arg is not None and arg.arg == name and arg.annotation is not None:
                yield arg.annotation
    for node in _walk_scope(scope):
        if isinstance(node, ast.Assign) and any(_binds(t, name) for t in node.targets):
            yield node.value
        elif isinstance(node, ast.AnnAssign) and _binds(node.target, name):
            yield node.annotation
            if node.value is not None:
                yield node.value
        elif isinstance(node, ast.NamedExpr) and _binds(node.target, name):
            yield node.value
        elif isinstance(node, ast.For | ast.AsyncFor | ast.comprehension) and _binds(node.target, name):
            yield node.iter
        elif isinstance(node, ast.withitem) and node.optional_vars is not None and _binds(node.optional_vars, name):
            yield node.context_expr


def _binds(target: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(target))


def _names_in(node: ast.AST) -> set[str]:
    found: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            found.add(n.id)
        elif isinstance(n, ast.Attribute):
            found.add(n.attr)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):  # a string annotation: "Task | None"
            found.update(re.findall(r"\w+", n.value))
    return found


def find_writes(source: str, path: str) -> list[Write]:
    """Every write of a task's state in one module's source."""
    return sorted(_Module(source, path).writes(), key=lambda w: (w.line, w.kind))


def scanned_files() -> list[Path]:
    return sorted(path for root in SCANNED for path in (REPO_ROOT / root).rglob("*.py"))


def tree_writes() -> list[Write]:
    writes: list[Write] = []
    for path in scanned_files():
        writes += find_writes(path.read_text(encoding="utf-8"), path.relative_to(REPO_ROOT).as_posix())
    return writes


# --------------------------------------------------------------------------- the rule, on the real tree


def test_only_the_state_module_writes_task_state():
    # Given every module of the server and the client
    # When their syntax trees are searched for writes of a task's state
    outside = [write for write in tree_writes() if write.path not in WRITERS]
    # Then every write is in aios/tasks/states.py (or its PostgreSQL strategy)
    assert not outside, (
        "tasks.state is written outside aios/tasks/states.py; change it through aios.tasks.states "
        "(transition, transition_many, claim, record_outcome, insert_new) instead:\n"
        + "\n".join(f"  {write}" for write in outside)
    )


def test_the_scan_sees_the_state_modules_own_writes():
    # Given the state module and its strategy, which do write tasks.state
    # When they are scanned / Then their writes are found: the scan is not blind to the forms they use
    found = {(write.path, write.kind) for write in tree_writes() if write.path in WRITERS}
    assert {
        ("aios/tasks/states.py", UPDATE),
        ("aios/tasks/states.py", INSERT),
        ("aios/tasks/states_postgres.py", UPDATE),
    } <= found


# --------------------------------------------------------------------------- the scan, on examples

HEADER = "from sqlalchemy import insert, text, update\nfrom aios.models import ApiKey, Agent, RoutingState, Task\n"

WRITES = {
    "a loaded task's state assigned": "def f(s, i):\n    task = s.get(Task, i)\n    task.state = 'RUNNING'\n",
    "a task parameter's state assigned": "def f(task: Task):\n    task.state = 'DEAD'\n",
    "a task parameter's state assigned (string annotation)": "def f(task: 'Task | None'):\n    task.state = 'X'\n",
    "an object of unknown origin's state assigned": "def f(thing):\n    thing.state = 'X'\n",
    "a state assigned through setattr": "def f(s, i):\n    setattr(s.get(Task, i), 'state', 'X')\n",
    "a task's state, by what a function returns": "def get(s) -> Task:\n    ...\ndef f(s):\n    get(s).state = 'X'\n",
    "a state in a tuple assignment": "def f(s, i):\n    t = s.get(Task, i)\n    t.state, t.error = 'FAILED', 'x'\n",
    "update(Task).values(state=)": "update(Task).where(Task.id == 1).values(state='DEAD')\n",
    "update(Task).values({'state': })": "update(Task).values({'state': 'DEAD', 'error': None})\n",
    "update(table).values({Task.state: })": "update(Task.__table__).values({Task.state: 'DEAD'})\n",
    "update of an aliased table, values unseen": "t = Task.__table__\nu = t\nupdate(u).values(**vals)\n",
    "update(Task) with its values at execution": "s.execute(update(Task), [{'id': 1, 'state': 'DEAD'}])\n",
    "update(Task).values(mapping built elsewhere)": "update(Task).values(changes)\n",
    "update(Task).ordered_values((Task.state, ))": "update(Task).ordered_values((Task.state, 'X'))\n",
    "Table.update()": "Task.__table__.update().values(state='X')\n",
    "models.Task through the module": "from aios import models\nupdate(models.Task).values(state='X')\n",
    "query(Task).update({'state': })": "s.query(Task).filter(Task.id == 1).update({'state': 'X'})\n",
    "insert(Task)": "insert(Task).values(id='t')\n",
    "insert(Task.__table__) of rows": "s.execute(insert(Task.__table__), rows)\n",
    "a new Task given its state": "t = Task(id='t', state='QUEUED')\n",
    "a new Task added": "s.add(Task(id='t'))\n",
    "raw UPDATE tasks SET state": "text(\"UPDATE tasks SET pending_reason = NULL, state = 'DEAD' WHERE id = :i\")\n",
    "raw UPDATE in an f-string": 's.exec_driver_sql(f"update public.tasks set \\"state\\" = \'{x}\'")\n',
    "raw INSERT INTO tasks": "s.execute(text('INSERT INTO tasks (id, state) VALUES (:i, :s)'))\n",
}

NOT_WRITES = {
    "the routing state's state": "def f(s):\n    row = s.scalars(select(RoutingState)).one()\n    row.state = {}\n",
    "an API key's state": "def f(key: ApiKey):\n    key.state = 'REVOKED'\n",
    "an API key's state, by what a function returns": (
        "def own(s) -> ApiKey:\n    return s.get(ApiKey, 1)\n"
        "def f(s):\n    row = own(s)\n    row.state, row.x = 'A', 1\n    own(s).state = 'B'\n"
    ),
    "an agent's status": "def f(s, n):\n    agent = s.get(Agent, n)\n    agent.status = 'OFFLINE'\n",
    "an object's own state": "class Machine:\n    def __init__(self):\n        self.state = 0\n",
    "update(Task) of other columns": "update(Task).where(Task.state == 'RUNNING').values(progress=1, note='state')\n",
    "update(ApiKey).values(state=)": "update(ApiKey).values(state='EXPIRED')\n",
    "a dict's state": "row = {'state': 'QUEUED'}\nrow.update(state='PENDING')\nrow['state'] = 'X'\n",
    "a transient Task from a stored row": "t = Task(**row)\n",
    "raw SQL reading the state": "text(\"UPDATE tasks SET progress = 1 WHERE state = 'RUNNING'\")\n",
    "raw SQL on the timeline": "text('INSERT INTO task_events (task_id, to_state) VALUES (:i, :s)')\n",
    "a docstring about it": "def f():\n    '''Runs UPDATE tasks SET state = 'X' for you.'''\n",
}


@pytest.mark.parametrize("source", list(WRITES.values()), ids=list(WRITES))
def test_the_scan_finds_each_form_of_write(source):
    # Given a module that writes a task's state in one of the ways code can
    # When it is scanned / Then the write is found, with its line
    writes = find_writes(HEADER + source, "aios/example.py")
    assert writes, "no write found"
    assert all(write.path == "aios/example.py" and write.line > 2 for write in writes)


@pytest.mark.parametrize("source", list(NOT_WRITES.values()), ids=list(NOT_WRITES))
def test_the_scan_ignores_what_is_not_a_write_of_task_state(source):
    # Given a module that writes another model's state, an agent's status, or only reads a task's state
    # When it is scanned / Then nothing is found
    assert find_writes(HEADER + source, "aios/example.py") == []


def test_a_failure_names_the_file_and_line():
    # Given a write found by the scan / Then what the failure prints names the file, the line and the code
    (write,) = find_writes(HEADER + "def f(t: Task):\n    t.state = 'DEAD'\n", "workers/example.py")
    assert str(write) == "workers/example.py:4: assignment of a task's state: t.state = 'DEAD'"
