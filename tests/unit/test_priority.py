"""Priority mapping: the API's 0-9 (9 most urgent) to kombu's Redis priority (0 most urgent)."""

from __future__ import annotations

import pytest

from aios.broker.priority import MAX_PRIORITY, MIN_PRIORITY, PRIORITY_STEPS, from_transport, to_transport


def test_the_most_urgent_api_priority_is_the_transports_first():
    # Given API priority 9 (most urgent) / When mapped / Then kombu's Redis sees 0 (popped first)
    assert to_transport(9) == 0


def test_the_least_urgent_api_priority_is_the_transports_last():
    # Given API priority 0 / When mapped / Then kombu's Redis sees 9
    assert to_transport(0) == 9


def test_the_mapping_reverses_the_order_of_every_level():
    # Given all ten levels / When mapped / Then a more urgent level always gets a smaller transport number
    mapped = [to_transport(p) for p in range(MIN_PRIORITY, MAX_PRIORITY + 1)]
    assert mapped == list(range(9, -1, -1))


@pytest.mark.parametrize("priority", range(10))
def test_mapping_there_and_back_gives_the_same_priority(priority):
    # Given an API priority / When mapped to the transport and back / Then it is unchanged
    assert from_transport(to_transport(priority)) == priority


@pytest.mark.parametrize("priority", [-1, 10, 100])
def test_a_priority_outside_0_to_9_is_refused(priority):
    # Given a priority out of range / When mapped / Then ValueError says the allowed range
    with pytest.raises(ValueError, match="between 0 and 9"):
        to_transport(priority)


def test_there_are_ten_separate_priority_steps():
    # Given the steps configured for Redis / Then there are ten distinct levels, 0 to 9
    assert PRIORITY_STEPS == list(range(10))
    assert len(set(PRIORITY_STEPS)) == 10
