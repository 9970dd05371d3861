"""The ``lost_messages`` judgement of sync (aios.recovery.messages): which QUEUED tasks' messages are lost,
given what Redis holds (:class:`BrokerView`), what the live agents list (``inspect scheduled``,
``reserved``, ``active``) and the ledger's agent statuses. Pure functions, no services."""

from __future__ import annotations

from types import SimpleNamespace

from aios.recovery.messages import HELD_BY_LOST_AGENT, LOST_MESSAGE, BrokerView, held_reports, judge_messages

A, B = "agent-a@site-a", "agent-b@site-b"


def row(task_id: str, dispatch_id: str = "d1") -> SimpleNamespace:
    return SimpleNamespace(id=task_id, dispatch_id=dispatch_id, queue="shared")


def request(task_id: str, dispatch_id: str | None = "d1") -> dict:
    return {"id": task_id, "name": "aios.run", "kwargs": {"dispatch_id": dispatch_id} if dispatch_id else {}}


def replies(**by_command: dict) -> dict:
    """Every holding command answered by A and B with nothing, unless given."""
    empty = {A: [], B: []}
    return {command: by_command.get(command, empty) for command in ("scheduled", "reserved", "active")}


ALIVE = {A: "ONLINE", B: "BUSY"}
A_DEAD = {A: "OFFLINE", B: "ONLINE"}


def lost(views: list[BrokerView], reply: dict, statuses: dict, rows: list | None = None) -> dict[str, str]:
    reported, _why = held_reports(reply, statuses)
    return judge_messages(rows or [row("t1")], views, reported)


def test_a_message_in_a_queue_list_is_not_lost_whatever_the_agents_say():
    view = BrokerView(queued=frozenset({("t1", "d1")}))
    assert lost([view, view], replies(), A_DEAD) == {}


def test_a_message_in_no_list_and_not_held_is_lost_after_both_reads():
    assert lost([BrokerView(), BrokerView()], replies(), ALIVE) == {"t1": LOST_MESSAGE}


def test_a_held_message_no_agent_lists_is_held_by_a_lost_agent_when_every_live_agent_answered():
    held = BrokerView(held=frozenset({("t1", "d1")}))
    # agent A died (OFFLINE): B, the only live agent, answered every command without it
    assert lost([held, held], replies(active={B: [request("other")]}), A_DEAD) == {"t1": HELD_BY_LOST_AGENT}


def test_a_held_message_a_live_agent_lists_in_any_command_is_in_its_hands():
    held = BrokerView(held=frozenset({("t1", "d1")}))
    scheduled = {A: [{"eta": "2026-01-01T00:00:00", "priority": 4, "request": request("t1")}], B: []}
    assert lost([held, held], replies(scheduled=scheduled), ALIVE) == {}
    assert lost([held, held], replies(reserved={A: [request("t1")], B: []}), ALIVE) == {}
    assert lost([held, held], replies(active={A: [], B: [request("t1")]}), ALIVE) == {}


def test_a_live_agent_listing_only_an_older_dispatch_does_not_hold_the_current_one():
    held = BrokerView(held=frozenset({("t1", "d2")}))
    reply = replies(reserved={A: [], B: [request("t1", "d1")]})
    assert lost([held, held], reply, A_DEAD, rows=[row("t1", "d2")]) == {"t1": HELD_BY_LOST_AGENT}


def test_a_reply_that_does_not_say_the_dispatch_id_counts_as_holding_the_task():
    held = BrokerView(held=frozenset({("t1", "d1")}))
    reply = replies(active={A: [], B: [{"id": "t1", "kwargs": "{'dispatch_id': 'd1'}"}]})
    assert lost([held, held], reply, ALIVE) == {}


def test_a_held_message_is_left_alone_when_a_live_agent_did_not_answer_one_command():
    held = BrokerView(held=frozenset({("t1", "d1")}))
    # A is dead but not OFFLINE yet (its heartbeat timeout has not passed): it cannot answer
    reply = replies(reserved={B: []})
    reported, why = held_reports(reply, ALIVE)
    assert reported is None and why == f"{A} did not answer inspect reserved"
    assert judge_messages([row("t1")], [held, held], reported) == {}


def test_a_held_message_is_left_alone_when_a_broadcast_failed():
    held = BrokerView(held=frozenset({("t1", "d1")}))
    reply = {**replies(), "scheduled": None}
    reported, why = held_reports(reply, A_DEAD)
    assert reported is None and why == "inspect scheduled failed"
    assert judge_messages([row("t1")], [held, held], reported) == {}
    # a message missing from Redis altogether is still lost without the agents' word
    assert judge_messages([row("t1")], [BrokerView(), BrokerView()], None) == {"t1": LOST_MESSAGE}


def test_offline_and_disabled_agents_count_as_the_ledger_says():
    # OFFLINE agents need not answer; a DISABLED one is not OFFLINE, so it must
    assert held_reports(replies(), {A: "OFFLINE", B: "ONLINE", "c@x": "OFFLINE"})[0] == set()
    assert held_reports(replies(), {**ALIVE, "c@x": "DISABLED"})[1] == "c@x did not answer inspect scheduled"


def test_an_agent_the_ledger_does_not_know_may_answer_and_its_messages_count():
    held = BrokerView(held=frozenset({("t1", "d1")}))
    reply = replies(active={A: [], B: [], "new@host": [request("t1")]})
    assert lost([held, held], reply, ALIVE) == {}


def test_a_message_seen_again_in_a_queue_list_on_the_second_read_is_not_lost():
    held = BrokerView(held=frozenset({("t1", "d1")}))
    back = BrokerView(queued=frozenset({("t1", "d1")}))  # kombu restored it meanwhile
    assert lost([held, back], replies(), A_DEAD) == {}
    assert lost([BrokerView(), back], replies(), A_DEAD) == {}


def test_held_then_missing_or_missing_then_held_is_lost_when_no_live_agent_lists_it():
    held = BrokerView(held=frozenset({("t1", "d1")}))
    assert lost([held, BrokerView()], replies(), A_DEAD) == {"t1": HELD_BY_LOST_AGENT}
    assert lost([BrokerView(), held], replies(), A_DEAD) == {"t1": HELD_BY_LOST_AGENT}
    # without the agents' word, a message held in either read is in an agent's hands
    assert judge_messages([row("t1")], [BrokerView(), held], None) == {}


def test_each_row_is_judged_on_its_own():
    views = [
        BrokerView(queued=frozenset({("q", "d1")}), held=frozenset({("h", "d1"), ("mine", "d1")})),
    ] * 2
    rows = [row("q"), row("h"), row("mine"), row("gone")]
    reply = replies(active={A: [], B: [request("mine")]})
    assert lost(views, reply, A_DEAD, rows=rows) == {"h": HELD_BY_LOST_AGENT, "gone": LOST_MESSAGE}
