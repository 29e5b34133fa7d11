"""Budgets that hold: the ledger reserves a call's most cost before it runs and settles its real
cost after, against key, team and user budgets, all or none (analytics.ledger.Ledger)."""

import pytest

from analytics.ledger import Ledger
from models.errors import BudgetExceeded

NOW = 1_780_000_000.0


def entry(rid, cost, key="k1", team="red", user="alice"):
    return {"response_id": rid, "key_id": key, "team": team, "user": user, "model": "m", "cost_usd": cost}


def test_reservations_hold_the_budget_and_settle_with_the_real_cost(tmp_path):
    led = Ledger(str(tmp_path / "usage.jsonl"))
    key = [("key", "k1", 1.0, "month")]
    assert led.reserve("a", key, 0.6, now=NOW) == 0.6
    with pytest.raises(BudgetExceeded, match=r"\$0.600000 held by calls in flight"):
        led.reserve("b", key, 0.5, now=NOW)  # 0.6 held + 0.5 > 1.0, though nothing is spent yet
    led.settle("a", entry("r-a", 0.2))  # the call cost less than its most
    assert led.spend_of("key", "k1", "month") == pytest.approx(0.2) and led.held("key", "k1", "month", NOW) == 0
    led.reserve("b", key, 0.5, now=NOW)
    led.release("b")  # a call that never reached a backend gives its hold back
    assert led.held("key", "k1", "month", NOW) == 0


def test_every_budget_of_the_principal_must_cover_it_and_a_refusal_holds_nothing(tmp_path):
    led = Ledger(str(tmp_path / "usage.jsonl"))
    led.record([entry("old", 2.5, key="k2")])  # another key of team red, and alice's
    budgets = [("key", "k1", 10.0, "day"), ("team", "red", 3.0, "month"), ("user", "alice", 100.0, "month")]
    with pytest.raises(BudgetExceeded, match="team red has spent"):
        led.reserve("x", budgets, 1.0)
    assert led.held("key", "k1", "day", NOW) == 0  # all or none
    led.reserve("y", budgets, 0.5)
    with pytest.raises(BudgetExceeded, match="team red"):
        led.reserve("z", budgets, 0.0)  # spent + held reach the budget: even a free call waits


def test_lost_reservations_expire_and_spend_survives_a_restart(tmp_path):
    led = Ledger(str(tmp_path / "usage.jsonl"))
    led.reserve("lost", [("key", "k1", 1.0, "month")], 0.9, ttl_s=10, now=NOW)
    assert led.held("key", "k1", "month", NOW + 11) == 0  # its replica died: the hold goes
    led.settle("s", entry("r1", 0.4))
    assert Ledger(str(tmp_path / "usage.jsonl")).spend_of("user", "alice", "month") == pytest.approx(0.4)
