"""The shared routing rotation in Redis (aios.agents.rotation): concurrent submitters never share a turn."""

from __future__ import annotations

import threading
import uuid
from collections import Counter

import pytest

pytestmark = pytest.mark.integration


def test_sixteen_threads_taking_turns_at_once_never_get_the_same_turn_and_share_the_rotation_exactly(stack):
    from aios.agents import routing
    from aios.agents.rotation import with_state

    names = ["a@host", "b@host", "c@host"]
    key = f"rr:test-{uuid.uuid4().hex[:8]}"
    picks: list[str] = []
    lock = threading.Lock()

    def take_turns() -> None:
        for _ in range(30):

            def turn(state: dict) -> tuple[list[str], dict]:
                chosen, last = routing.round_robin(names, state.get("last"), 1)
                return chosen, {"last": last}

            chosen = with_state(stack.settings, key, turn)
            with lock:
                picks.extend(chosen)

    # Given 16 threads (as gunicorn threads in API processes would) taking 30 turns each at once
    threads = [threading.Thread(target=take_turns) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    # Then the 480 turns are one rotation: each agent got exactly a third
    assert len(picks) == 480
    assert Counter(picks) == {name: 160 for name in names}
