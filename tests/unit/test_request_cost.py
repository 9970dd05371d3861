"""What a JSON body costs to read and check before anyone is authenticated: linear, whoever sends it.

The worst bodies under ``api.max_body_bytes`` (1 MiB by default) are built here and checked the way
``webapi.requests.json_body`` checks them. The check may not add memory that grows with the body
(tracemalloc counts it exactly) and may not take much longer than parsing the same body (a ratio in
one process, the best of three: the machine's speed cancels out). The path-string-per-element walk
this replaced took a gigabyte and seconds for the first of these bodies.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest

from aios.config import ApiSettings
from aios.errors import BadRequest, ValidationFailed
from webapi.requests import MAX_INT_DIGITS, MAX_JSON_DEPTH, _bounded_int, check_storable

LIMIT = ApiSettings().max_body_bytes


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _amplifier(size: int) -> bytes:
    """One key half the body long over a list a quarter of it long: the probe's body, at full size."""
    return _compact({"k" * (size // 2): [0] * (size // 4 - 8)}).encode()


WORST_BODIES: dict[str, Callable[[int], bytes]] = {
    "long key over a long list": _amplifier,
    "many short strings": lambda size: _compact(["a"] * (size // 4 - 2)).encode(),
    "many small objects": lambda size: _compact([{"k": "v"}] * (size // 12)).encode(),
    "deep nesting at the limit, repeated": lambda size: _compact(
        [json.loads("[" * (MAX_JSON_DEPTH - 2) + "]" * (MAX_JSON_DEPTH - 2))] * (size // (2 * MAX_JSON_DEPTH))
    ).encode(),
    "long keys in one object": lambda size: _compact(
        {f"{i:08d}" + "k" * 1000: i for i in range(size // 1016)}
    ).encode(),
}


def _best_of_three(work: Callable[[], Any]) -> float:
    times = []
    for _ in range(3):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


@pytest.mark.parametrize("name", sorted(WORST_BODIES))
def test_checking_a_worst_case_body_adds_no_memory_that_grows_with_it(name):
    raw = WORST_BODIES[name](LIMIT)
    assert LIMIT // 2 < len(raw) <= LIMIT, len(raw)
    data = json.loads(raw, parse_int=_bounded_int)
    tracemalloc.start()
    try:
        check_storable(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The walk holds one iterator and one path link per open container: the nesting depth, not the size.
    assert peak < 64 * 1024, f"{name}: checking a {len(raw)}-byte body took {peak} bytes"


@pytest.mark.parametrize("name", sorted(WORST_BODIES))
def test_checking_a_worst_case_body_takes_a_small_multiple_of_parsing_it(name):
    raw = WORST_BODIES[name](LIMIT)
    data = json.loads(raw)
    parse_s = _best_of_three(lambda: json.loads(raw, parse_int=_bounded_int))
    check_s = _best_of_three(lambda: check_storable(data))
    assert check_s < 20 * parse_s + 0.05, f"{name}: parse {parse_s:.4f} s, check {check_s:.4f} s"


def test_the_amplification_body_is_accepted_as_storable():
    """The probe's body is valid JSON the ledger could store: the check passes it, cheaply."""
    check_storable(json.loads(_amplifier(230_000)))


def test_an_error_deep_in_a_body_names_its_path_and_a_long_path_is_cut():
    with pytest.raises(ValidationFailed) as refused:
        check_storable({"items": [{"name": "ok"}, {"name": "a\x00b"}]})
    assert refused.value.extra["field"] == "items.1.name"
    with pytest.raises(ValidationFailed) as refused:
        check_storable({"k" * 10_000: ["\ud800"]})
    assert len(refused.value.message) < 400 and refused.value.message.startswith("kkk")
    with pytest.raises(ValidationFailed) as refused:
        check_storable({"a": {"b\x00": 1}})
    assert refused.value.extra["field"] == "a"
    with pytest.raises(ValidationFailed, match=f"nested deeper than {MAX_JSON_DEPTH}"):
        check_storable(json.loads("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)))
    check_storable(json.loads("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH))


def test_an_integer_past_the_digit_limit_is_refused_in_our_words():
    with pytest.raises(ValueError, match=f"more than {MAX_INT_DIGITS} digits") as refused:
        json.loads("9" * (MAX_INT_DIGITS + 1), parse_int=_bounded_int)
    assert "set_int_max_str_digits" not in str(refused.value)
    assert json.loads("-" + "9" * MAX_INT_DIGITS, parse_int=_bounded_int) < 0
    assert BadRequest.status == 400
