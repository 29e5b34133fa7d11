"""The gateway's side of the cost ledger: recording, budget checks (spend cached briefly), budget views."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

from analytics.ledger import ledger, period_start
from config import Settings
from models.errors import BudgetExceeded


class UsageBook:
    def __init__(self, settings: Settings):
        self.enabled = settings.router.ledger
        self.cache_s = settings.router.budget_cache_s
        self.data_dir = settings.resolved_data_dir()
        self.settings = settings
        self._spend: dict[tuple[str, str], tuple[float, float]] = {}
        # A reservation whose call never settles (its replica died) is dropped after this long.
        self.reservation_ttl_s = 2 * settings.gateway.request_timeout_s + 60

    @cached_property
    def actor(self):
        """The ledger actor, got on first use (not at replica start)."""
        return ledger(self.data_dir, self.settings)

    def record(self, entry: dict[str, Any], reservation: str | None = None) -> None:
        """Fire and forget: calls from one replica reach the actor in order, so a later spend,
        usage or feedback call from the same replica sees this entry. With a reservation, the
        entry settles it (the reserved amount is replaced by the real cost in one step)."""
        if not self.enabled:
            return
        if reservation is not None:
            self.actor.settle.remote(reservation, entry)
        else:
            self.actor.record.remote([entry])

    async def reserve(self, principal, amount_usd: float) -> str | None:
        """Hold `amount_usd` (the call's most cost) against every budget of the principal (key,
        team, user) before the call: BudgetExceeded when any of them cannot cover it beside what
        is spent and what calls in flight hold. None when no budget applies."""
        budgets = [(b.scope, b.id, b.usd, b.period) for b in principal.all_budgets()] if self.enabled else []
        if not budgets:
            return None
        reservation = uuid.uuid4().hex
        await self.actor.reserve.remote(reservation, budgets, float(amount_usd), self.reservation_ttl_s)
        return reservation

    def release(self, reservation: str) -> None:
        self.actor.release.remote(reservation)

    async def usage(self, key_id: str | None, since: float | None) -> dict[str, Any]:
        return await self.actor.usage.remote(key_id, since)

    async def add_feedback(self, response_id: str, score: float, key_id: str | None, comment: str) -> dict[str, Any]:
        """KeyError when no such response of this key (None: any key) is in the ledger."""
        return await self.actor.add_feedback.remote(response_id, score, key_id, comment)

    async def spend(self, key_id: str, period: str) -> float:
        hit = self._spend.get((key_id, period))
        if hit is not None and time.monotonic() - hit[0] < self.cache_s:
            return hit[1]
        value = await self.actor.spend.remote(key_id, period)
        self._spend[(key_id, period)] = (time.monotonic(), value)
        return value

    async def remaining(self, principal) -> float | None:
        """USD left in the key's budget period (None: no budget); BudgetExceeded when none is left."""
        if principal.budget_usd is None or not self.enabled:
            return None
        spent = await self.spend(principal.key_id, principal.budget_period)
        left = principal.budget_usd - spent
        if left <= 0:
            start = datetime.fromtimestamp(period_start(principal.budget_period, time.time()), timezone.utc)
            raise BudgetExceeded(
                f"API key {principal.key_id} has spent ${spent:.6f} of its {principal.budget_period}ly budget of "
                f"${principal.budget_usd:g} (period started {start:%Y-%m-%d %H:%M} UTC); ask an admin to raise it "
                "or wait for the next period")
        return left

    async def budget_view(self, principal) -> dict | None:
        """The key's budget, spend and what is left in this period (None: no budget)."""
        if principal.budget_usd is None:
            return None
        spent = await self.spend(principal.key_id, principal.budget_period)
        return {"period": principal.budget_period, "limit_usd": principal.budget_usd, "spent_usd": spent,
                "remaining_usd": max(principal.budget_usd - spent, 0.0)}
