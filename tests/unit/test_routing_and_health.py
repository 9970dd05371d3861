"""The pure routing policies (aios.agents.routing) and the pure health decision (aios.agents.health)."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from aios.agents.health import AgentStatus, Thresholds, decide
from aios.agents.routing import Candidate, capable, least_loaded, next_round_robin, round_robin, smooth_weighted

NAMES = [f"{prefix}-{index:02d}@host" for prefix in ("cpu", "gpu", "io") for index in range(1, 4)]


# --------------------------------------------------------------------------- round robin


def test_round_robin_visits_each_agent_in_turn_in_name_order():
    # Given three agents listed in no particular order and no rotation yet
    names = ["b@h", "c@h", "a@h"]
    # When nine tasks are placed
    picks, last = round_robin(names, None, 9)
    # Then each agent is visited in turn, name order, three times, and the cursor is the last pick
    assert picks == ["a@h", "b@h", "c@h"] * 3
    assert last == "c@h"


def test_round_robin_continues_across_calls_as_if_it_were_one_sequence():
    # Given a rotation carried between batches only by the name of the last pick
    names = NAMES[:5]
    whole, _ = round_robin(names, None, 23)
    # When the same 23 picks are made in batches of 1, 4, 7 and 11
    last = None
    chunked: list[str] = []
    for size in (1, 4, 7, 11):
        picks, last = round_robin(names, last, size)
        chunked += picks
    # Then the batches together are exactly the single sequence
    assert chunked == whole


def test_round_robin_continues_after_the_last_agent_even_when_that_agent_has_left():
    # Given the last pick was b, which has left since
    # When the next agent is chosen
    # Then it is the one after b in name order (c), not the first one (a)
    assert next_round_robin(["a", "c", "d"], "b") == "c"
    # And past the end it wraps to the first
    assert next_round_robin(["a", "c"], "d") == "a"


@pytest.mark.parametrize("seed", range(25))
def test_round_robin_never_skips_or_repeats_a_remaining_agent_while_agents_join_and_leave(seed):
    # Given a seeded random sequence of agents joining and leaving between picks
    rng = random.Random(seed)
    universe = list(NAMES)
    present = set(rng.sample(universe, rng.randint(1, len(universe))))
    picks: list[str] = []
    members: list[frozenset[str]] = []
    last: str | None = None
    for _ in range(600):
        if rng.random() < 0.3:
            toggled = rng.choice(universe)
            if toggled in present and len(present) > 1:
                present.discard(toggled)
            elif toggled not in present:
                present.add(toggled)
        # When the next agent is picked from the agents present now
        (pick,), last = round_robin(sorted(present, reverse=True), last, 1)
        picks.append(pick)
        members.append(frozenset(present))

    for index in range(1, len(picks)):
        before, now, present_now = picks[index - 1], picks[index], sorted(members[index])
        # Then each pick is the first present agent after the previous pick in name order (wrapping):
        # nobody present is skipped ...
        after = [name for name in present_now if name > before]
        assert now == (after[0] if after else present_now[0])
        # ... and nobody is picked twice in a row while someone else is present
        assert now != before or len(present_now) == 1

    # And between two turns of an agent, every other agent present the whole time had exactly one turn
    for agent in universe:
        turns = [index for index, pick in enumerate(picks) if pick == agent]
        for start, end in zip(turns, turns[1:], strict=False):
            if not all(agent in members[k] for k in range(start, end + 1)):
                continue
            stayed = frozenset.intersection(*members[start : end + 1]) - {agent}
            between = Counter(picks[start + 1 : end])
            for other in stayed:
                assert between[other] == 1, (agent, other, picks[start : end + 1])


# --------------------------------------------------------------------------- smooth weighted round robin


def test_smooth_weighted_gives_each_agent_exactly_its_weight_over_a_full_cycle_and_returns_to_zero_credit():
    # Given weights 1:2:3 and no credit yet
    weights = {"a": 1, "b": 2, "c": 3}
    # When one full cycle (total weight 6) of picks is made
    picks, credit = smooth_weighted(weights, {}, 6)
    # Then each agent got exactly its weight, and the credit is back where it started
    assert Counter(picks) == {"a": 1, "b": 2, "c": 3}
    assert credit == {"a": 0, "b": 0, "c": 0}


@pytest.mark.parametrize("seed", range(30))
def test_smooth_weighted_gives_exact_shares_in_every_window_of_a_full_cycle_for_any_weights(seed):
    # Given random weights
    rng = random.Random(seed)
    weights = {name: rng.randint(1, 12) for name in rng.sample(NAMES, rng.randint(1, 6))}
    total = sum(weights.values())
    # When three full cycles of picks are made
    picks, _ = smooth_weighted(weights, {}, 3 * total)
    # Then every window as long as a cycle (aligned or not) holds each agent exactly weight times
    for start in range(2 * total + 1):
        assert Counter(picks[start : start + total]) == weights
    # And no agent is ever two picks ahead of or behind its ideal share
    seen: Counter[str] = Counter()
    for count, pick in enumerate(picks, start=1):
        seen[pick] += 1
        for name, weight in weights.items():
            assert abs(seen[name] - count * weight / total) < 2


def test_smooth_weighted_interleaves_the_agents_instead_of_sending_bursts():
    # Given weights 5:1:1 (nginx's own example) and 5:5
    # When one cycle of each is picked
    # Then the light agents are spread among the heavy one's turns, and equal weights alternate
    assert "".join(smooth_weighted({"a": 5, "b": 1, "c": 1}, {}, 7)[0]) == "aabacaa"
    assert "".join(smooth_weighted({"a": 5, "b": 5}, {}, 10)[0]) == "ab" * 5
    # And with 1:2:3 the heaviest agent never runs three times in a row, over many cycles
    picks = "".join(smooth_weighted({"a": 1, "b": 2, "c": 3}, {}, 600)[0])
    assert "ccc" not in picks and "bb" not in picks


def test_smooth_weighted_continues_across_calls_through_the_credit_it_returns():
    # Given weights 1:2:3
    weights = {"a": 1, "b": 2, "c": 3}
    whole, _ = smooth_weighted(weights, {}, 31)
    # When the same picks are made in batches, carrying the credit from one batch to the next
    credit: dict[str, int] = {}
    chunked: list[str] = []
    for size in (1, 5, 2, 23):
        picks, credit = smooth_weighted(weights, credit, size)
        chunked += picks
    # Then the batches together are exactly the single sequence
    assert chunked == whole


def test_smooth_weighted_drops_an_agent_that_left_and_starts_a_new_one_at_zero_credit():
    # Given credit carried for a and b, and b has left while d joined
    picks, credit = smooth_weighted({"a": 1, "d": 1}, {"a": 3, "b": -7}, 100)
    # Then b is forgotten, and the two present agents share the picks equally: a's carried credit is a
    # head start of a turn or two, not a lasting advantage
    assert set(credit) == {"a", "d"}
    assert picks[0] == "a"
    assert abs(Counter(picks)["a"] - 50) <= 2
    assert Counter(picks[10:]) == {"a": 45, "d": 45}


# --------------------------------------------------------------------------- least loaded and capable


def test_least_loaded_fills_the_idle_agents_before_the_busy_one():
    # Given a has five tasks in flight, b and c none, all weight 1
    agents = [
        Candidate("a", frozenset({"echo"}), load=5),
        Candidate("b", frozenset({"echo"})),
        Candidate("c", frozenset({"echo"})),
    ]
    # When eleven tasks are placed
    picks = least_loaded(agents, 11)
    # Then b and c catch up with a first, alternating, then the tie goes by name
    assert picks[:10] == ["b", "c"] * 5
    assert picks[10] == "a"


def test_least_loaded_gives_an_agent_of_weight_three_three_times_the_work_of_weight_one():
    # Given two idle agents of weights 1 and 3
    agents = [Candidate("light", frozenset(), weight=1), Candidate("heavy", frozenset(), weight=3)]
    # When 40 tasks are placed
    # Then the shares follow the weights exactly
    assert Counter(least_loaded(agents, 40)) == {"light": 10, "heavy": 30}


@pytest.mark.parametrize("seed", range(20))
def test_least_loaded_leaves_no_agent_with_less_load_per_weight_than_one_that_just_got_a_task(seed):
    # Given random loads and weights
    rng = random.Random(seed)
    agents = [
        Candidate(name, frozenset(), weight=rng.randint(1, 5), load=rng.randint(0, 20))
        for name in rng.sample(NAMES, rng.randint(1, 6))
    ]
    count = rng.randint(1, 60)
    # When tasks are placed
    picks = least_loaded(agents, count)
    assert len(picks) == count
    final = {a.name: a.load + picks.count(a.name) for a in agents}
    weight = {a.name: a.weight for a in agents}
    # Then every task went to an agent that was, at that moment, among the least loaded per unit of weight:
    # an agent that received work had, before its last task, no more load per weight than any other has now
    for name in set(picks):
        for other in final:
            assert (final[name] - 1) / weight[name] <= final[other] / weight[other]


def test_capable_keeps_only_agents_with_the_capability_in_name_order():
    # Given agents with different capabilities
    agents = [
        Candidate("z", frozenset({"echo", "gpu"})),
        Candidate("m", frozenset({"echo"})),
        Candidate("a", frozenset({"gpu"})),
        Candidate("b", frozenset()),
    ]
    # When they are filtered by capability
    # Then only those that have it remain, sorted by name
    assert [a.name for a in capable(agents, "gpu")] == ["a", "z"]
    assert [a.name for a in capable(agents, "echo")] == ["m", "z"]
    assert capable(agents, "sleep") == []


# --------------------------------------------------------------------------- health


NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
LIMITS = Thresholds(cpu_pct=80, memory_pct=90, disk_pct=95)


def verdict(**changes):
    """decide() for a healthy agent, with some inputs changed."""
    inputs = dict(
        admin_status="ACTIVE",
        last_heartbeat_at=NOW - timedelta(seconds=1),
        now=NOW,
        heartbeat_timeout_s=15,
        resources={"cpu_pct": 10, "memory_pct": 20, "disk_pct": 30},
        active=0,
        max_concurrency=2,
        thresholds=LIMITS,
    )
    inputs.update(changes)
    return decide(**inputs)


STALE = NOW - timedelta(seconds=60)
HOT = {"cpu_pct": 99, "memory_pct": 99, "disk_pct": 99}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        # Every condition at once: the operator's DISABLED wins over everything
        ({"admin_status": "DISABLED", "last_heartbeat_at": STALE, "resources": HOT, "active": 2}, "DISABLED"),
        # No heartbeat beats DRAINING, DEGRADED and BUSY
        ({"admin_status": "DRAINING", "last_heartbeat_at": STALE, "resources": HOT, "active": 2}, "OFFLINE"),
        ({"admin_status": "DRAINING", "last_heartbeat_at": None, "resources": HOT, "active": 2}, "OFFLINE"),
        # DRAINING beats DEGRADED and BUSY
        ({"admin_status": "DRAINING", "resources": HOT, "active": 2}, "DRAINING"),
        # DEGRADED beats BUSY
        ({"resources": HOT, "active": 2}, "DEGRADED"),
        ({"active": 2}, "BUSY"),
        ({"active": 3}, "BUSY"),
        ({}, "ONLINE"),
        # max_concurrency 0 means "unknown": never BUSY
        ({"active": 50, "max_concurrency": 0}, "ONLINE"),
        # No figures yet is not a reason to be DEGRADED
        ({"resources": None}, "ONLINE"),
    ],
)
def test_health_follows_the_precedence_disabled_offline_draining_degraded_busy_online(changes, expected):
    # Given an agent whose inputs meet several conditions at once
    # When its health is decided
    # Then the first condition in the order of precedence wins
    assert verdict(**changes).status == AgentStatus(expected)


def test_an_agent_is_offline_only_once_its_heartbeat_is_older_than_the_timeout():
    # Given a heartbeat timeout of 15 s
    # When the last heartbeat is exactly 15 s old, then 16 s old
    # Then it is still ONLINE at the limit and OFFLINE past it, with the age and timeout in the reason
    assert verdict(last_heartbeat_at=NOW - timedelta(seconds=15)).status is AgentStatus.ONLINE
    late = verdict(last_heartbeat_at=NOW - timedelta(seconds=16))
    assert late.status is AgentStatus.OFFLINE
    assert "16s" in late.reason and "15s" in late.reason


@pytest.mark.parametrize(
    ("resources", "setting", "figure"),
    [
        ({"cpu_pct": 81}, "agents.cpu_degraded_pct = 80%", "cpu 81%"),
        ({"memory_pct": 90.6}, "agents.memory_degraded_pct = 90%", "memory 91%"),
        ({"disk_pct": 99}, "agents.disk_degraded_pct = 95%", "disk 99%"),
    ],
)
def test_a_degraded_reason_names_the_figure_and_the_threshold_setting_it_exceeded(resources, setting, figure):
    # Given one resource figure above its threshold
    # When the health is decided
    result = verdict(resources=resources)
    # Then the agent is DEGRADED and the reason names the figure and the setting with its value
    assert result.status is AgentStatus.DEGRADED
    assert figure in result.reason and setting in result.reason


def test_every_exceeded_threshold_is_named_and_a_figure_at_the_threshold_is_not_exceeded():
    # Given cpu and disk above their thresholds, memory exactly at its threshold
    result = verdict(resources={"cpu_pct": 95, "memory_pct": 90, "disk_pct": 96})
    # Then both exceeded settings are named, memory is not
    assert result.status is AgentStatus.DEGRADED
    assert "agents.cpu_degraded_pct" in result.reason and "agents.disk_degraded_pct" in result.reason
    assert "memory" not in result.reason
    # And a figure that is missing or not a number is ignored
    assert verdict(resources={"cpu_pct": None, "memory_pct": "n/a"}).status is AgentStatus.ONLINE


def test_busy_and_draining_and_disabled_reasons_say_why():
    # Given agents busy, draining and disabled
    # Then each reason tells a person what is going on
    assert verdict(active=2).reason == "running 2 of 2 tasks"
    assert "draining" in verdict(admin_status="DRAINING").reason
    assert "operator" in verdict(admin_status="DISABLED").reason
    assert verdict(last_heartbeat_at=None).reason == "no heartbeat yet"
