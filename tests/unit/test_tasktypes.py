"""The task-type registry: built-in types, unknown types, and parameter validation with field names."""

from __future__ import annotations

import pytest

from aios.errors import UnknownTaskType, ValidationFailed
from aios.tasktypes import TaskContext, load_task_types

CTX = TaskContext(task_id="t-1", attempt=1, agent="unit@test")


@pytest.fixture(scope="module")
def registry():
    return load_task_types()


def test_the_registry_has_the_built_in_echo_and_sleep_types(registry):
    # Given the task types loaded at start / Then echo and sleep are there
    assert "echo" in registry
    assert "sleep" in registry
    assert {"echo", "sleep"} <= set(registry.names())


def test_loading_task_types_twice_is_harmless(registry):
    # Given the types already loaded / When loaded again / Then the same registry comes back, unchanged
    names = registry.names()
    assert load_task_types() is registry
    assert registry.names() == names


def test_an_unknown_type_is_a_422_naming_the_type_field(registry):
    # Given a type nobody registered / When looked up
    with pytest.raises(UnknownTaskType) as caught:
        registry.get("no.such.type")
    # Then it is a 422 validation error naming "type" and listing the known types
    assert caught.value.status == 422
    assert caught.value.code == "unknown_task_type"
    assert isinstance(caught.value, ValidationFailed)
    assert caught.value.extra["field"] == "type"
    assert "echo" in caught.value.message


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"seconds": "-1"}, "parameters.seconds"),
        ({"seconds": -1}, "parameters.seconds"),
        ({"seconds": 86_401}, "parameters.seconds"),
        ({"seconds": "soon"}, "parameters.seconds"),
        ({}, "parameters.seconds"),
        ({"seconds": 1, "speed": "fast"}, "parameters.speed"),
    ],
    ids=["negative-string", "negative", "too-long", "not-a-number", "missing", "unknown-field"],
)
def test_bad_sleep_parameters_are_refused_naming_the_field(registry, parameters, field):
    # Given bad parameters for sleep / When validated
    with pytest.raises(ValidationFailed) as caught:
        registry.get("sleep").validate(parameters)
    # Then the error names the offending field as a dotted path under "parameters"
    assert caught.value.extra["field"] == field
    assert field in caught.value.message


def test_good_sleep_parameters_are_accepted(registry):
    # Given a valid number of seconds, even as a numeric string / Then it validates to a float
    assert registry.get("sleep").validate({"seconds": "0.5"}).seconds == 0.5


@pytest.mark.parametrize("parameters", [[1, 2], "x", None, 3])
def test_parameters_that_are_not_an_object_are_refused(registry, parameters):
    # Given parameters that are not a JSON object / Then ValidationFailed names "parameters"
    with pytest.raises(ValidationFailed) as caught:
        registry.get("echo").validate(parameters)
    assert caught.value.extra["field"] == "parameters"


@pytest.mark.parametrize(
    "parameters",
    [{}, {"x": 1}, {"nested": {"list": [1, "two", None, {"deep": True}]}, "unicode": "ünï"}],
)
def test_echo_accepts_any_object_and_returns_it_unchanged(registry, parameters):
    # Given any JSON object
    echo = registry.get("echo")
    # When validated and run
    result = echo.run(echo.validate(parameters), CTX)
    # Then the result is the object itself
    assert result == parameters


def test_sleep_returns_the_seconds_it_slept(registry):
    sleep = registry.get("sleep")
    assert sleep.run(sleep.validate({"seconds": 0}), CTX) == {"slept_s": 0}
