"""Task priority: 0-9 in the API, 9 most urgent.

kombu's Redis transport pops the lowest number first (0 is highest), the reverse of RabbitMQ and of
what people expect from "priority 9". This module is the one place that knows it.
"""

from __future__ import annotations

MIN_PRIORITY = 0
MAX_PRIORITY = 9
#: All ten levels as separate Redis lists; the default (0, 3, 6, 9) would merge them into four.
PRIORITY_STEPS: list[int] = list(range(MIN_PRIORITY, MAX_PRIORITY + 1))


def to_transport(priority: int) -> int:
    """Map an API priority (9 most urgent) to kombu's Redis priority (0 most urgent)."""
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority must be between {MIN_PRIORITY} and {MAX_PRIORITY}, got {priority}")
    return MAX_PRIORITY - priority


def from_transport(transport_priority: int) -> int:
    """Inverse of :func:`to_transport` (for reading queue depths per level)."""
    return MAX_PRIORITY - transport_priority
