"""Which words of a search text are looked up in the trigram index (aios.tasks.search.index_words), and the
search's literal handling of special characters on SQLite (PostgreSQL: tests/integration/test_search_index.py).
"""

from __future__ import annotations

import itertools

import pytest

from aios.db import session_scope
from aios.models import Task
from aios.tasks.search import TaskFilter, index_words, list_tasks

#: A sample like ANALYZE's of the benchmark ledger: every text holds "customer-N", one in ten "upstream".
SAMPLE = tuple(
    f'echo\x1ftimeout talking to upstream host-{i % 97}\x1f{{"n": {i * 9901}, "customer": "customer-{i * 99}"}}\x1f'
    if i % 10 == 0
    else f'etl.load\x1f\x1f{{"n": {i * 9901}, "customer": "customer-{i * 99}"}}\x1f{{"rows": {i}}}'
    for i in range(101)
)


def test_a_rare_text_with_a_word_found_in_most_rows_looks_up_only_its_other_words():
    assert index_words("customer-4242", SAMPLE) == ("4242",)
    assert index_words("Customer 4242 zürich", SAMPLE) == ("4242", "zürich")


def test_the_whole_text_is_looked_up_when_narrowing_would_not_help():
    assert index_words("upstream", SAMPLE) == ()  # one word
    assert index_words("talking to upstream", SAMPLE) == ()  # found in the sample: common enough
    assert index_words("customer-42", SAMPLE) == ()  # "42" alone has no trigram to look up
    assert index_words("customer etl", SAMPLE) == ()  # every word common
    assert index_words("needle haystack", SAMPLE) == ()  # no word common
    assert index_words("customer-4242", ()) == ()  # no statistics


_ids = itertools.count(1)


def add(db, **columns) -> str:
    task_id = f"00000000-0000-4000-8000-{next(_ids):012d}"
    with session_scope(db) as session:
        session.add(
            Task(
                **{
                    "id": task_id,
                    "type": "echo",
                    "parameters": {},
                    "priority": 5,
                    "queue": "q",
                    "state": "QUEUED",
                    "attempts": 0,
                    "max_retries": 0,
                    "timeout_s": 60,
                    **columns,
                }
            )
        )
    return task_id


def found(db, q: str) -> list[str]:
    with session_scope(db) as session:
        tasks, _ = list_tasks(session, TaskFilter(q=q), limit=100, cursor=None)
        return [task.id for task in tasks]


@pytest.mark.parametrize(
    "text, q",
    [
        ("it's", "it's"),
        ("Zürich", "zürich"),
        ("日本語", "日本"),
        ("line1\nline2", "1\nline"),
        ("tab\there", "b\th"),
        ("C:\\temp", "\\t"),
        ('say "hi"', '"hi"'),
        ("50%off", "%o"),
        ("a_b", "_b"),
    ],
)
def test_quotes_backslashes_non_ascii_and_control_characters_are_found_literally_on_sqlite(db, text, q):
    # (SQLite folds the case of ASCII letters only: "ZÜRICH" would not find "Zürich" there.)
    # Given the text in the parameters of one task and in the error of another, and a task without it
    in_parameters = add(db, parameters={"v": text})
    in_error = add(db, error=f"failed: {text}")
    add(db, parameters={"v": "nothing here"}, error="something else")
    # When searched / Then both are found, nothing else
    assert set(found(db, q)) == {in_parameters, in_error}
