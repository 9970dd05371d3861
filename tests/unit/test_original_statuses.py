"""The original system's agent statuses, mapped to AIOS's (``PUT /api/v1/agents/{id}``): plain logic."""

from __future__ import annotations

import pytest

from aios.agents.registry import ADMIN_STATUSES, admin_status_for, with_type
from aios.errors import Conflict, ValidationFailed


@pytest.mark.parametrize(
    ("sent", "admin_status"),
    [("IDLE", "ONLINE"), ("OFFLINE", "DISABLED"), ("ERROR", "DISABLED")]
    + [(status, status) for status in ADMIN_STATUSES],
)
def test_each_settable_status_means_one_admin_status(sent: str, admin_status: str) -> None:
    assert admin_status_for(sent) == admin_status


@pytest.mark.parametrize("computed", ["BUSY", "DEGRADED"])
def test_a_computed_status_is_a_conflict_that_says_heartbeats_decide_it(computed: str) -> None:
    with pytest.raises(Conflict) as refused:
        admin_status_for(computed)
    assert refused.value.status == 409
    assert "computes it from the agent's heartbeats" in refused.value.message


@pytest.mark.parametrize("sent", ["SLEEPING", "idle", "", "ACTIVE"])
def test_any_other_status_is_422_listing_every_accepted_one(sent: str) -> None:
    with pytest.raises(ValidationFailed) as refused:
        admin_status_for(sent)
    assert refused.value.status == 422
    assert "IDLE, OFFLINE, ERROR, ONLINE, DRAINING, DISABLED" in refused.value.message


def test_a_type_is_always_among_the_capabilities_once() -> None:
    assert with_type(["b", "a", "b"], "a") == ["a", "b"]
    assert with_type([], "text_processing") == ["text_processing"]
    assert with_type(["x"], None) == ["x"]
