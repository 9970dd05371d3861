"""Plain logic of aios.security.tokens (the token epoch, the subject) and whose budget a request spends."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest

from aios.security.tokens import EPOCH_CLAIM, epoch_matches, subject_user_id, token_epoch
from webapi.security import Principal

SECRET = "s" * 40


@dataclass(frozen=True)
class Row:
    id: int = 7
    role: str = "operator"
    password_hash: str = "$2b$12$" + "a" * 53
    updated_at: datetime = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


@pytest.mark.parametrize(
    "change",
    [
        {"role": "viewer"},
        {"password_hash": "$2b$12$" + "b" * 53},
        {"updated_at": Row.updated_at + timedelta(microseconds=1)},
        {"id": 8},
    ],
)
def test_any_change_of_the_account_gives_a_new_token_epoch(change):
    assert token_epoch(SECRET, replace(Row(), **change)) != token_epoch(SECRET, Row())


def test_the_token_epoch_is_stable_keyed_and_says_nothing_of_the_hash():
    epoch = token_epoch(SECRET, Row())
    assert epoch == token_epoch(SECRET, Row())
    assert epoch != token_epoch("t" * 40, Row())
    assert Row.password_hash not in epoch and len(epoch) == 32
    assert epoch_matches({EPOCH_CLAIM: epoch}, epoch)
    for odd in ({}, {EPOCH_CLAIM: None}, {EPOCH_CLAIM: [epoch]}, {EPOCH_CLAIM: epoch[:-1]}):
        assert not epoch_matches(odd, epoch)


@pytest.mark.parametrize(
    "sub", ["abc", "", "0", "-1", "1.0", " 1", "1\x00", "\u0661", "2147483648", "9" * 30, 1, None, ["1"], {"id": 1}]
)
def test_a_subject_that_is_not_a_32_bit_user_id_names_nobody(sub):
    assert subject_user_id({"sub": sub}) is None


def test_a_subject_of_ascii_digits_names_that_user():
    assert subject_user_id({"sub": "42"}) == 42
    assert subject_user_id({"sub": "2147483647"}) == 2147483647


def test_a_users_keys_and_tokens_share_one_rate_budget_but_each_agent_key_has_its_own():
    by_token = Principal(name="pat", role="operator", user_id=1)
    by_keys = [Principal(name="pat", role="operator", user_id=1, key_id=str(n), key_prefix=f"p{n}") for n in range(3)]
    assert {p.rate_key for p in [by_token, *by_keys]} == {"user:pat"}
    agents = [Principal(name="fleet", role="agent", user_id=2, key_id=str(n), key_prefix=f"a{n}") for n in range(2)]
    assert {p.rate_key for p in agents} == {"key:a0", "key:a1"}
