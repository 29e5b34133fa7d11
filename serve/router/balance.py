"""Load balancing across catalog entries that serve one logical model (`serves:`): power of two
choices over least outstanding requests, weighted by each backend's latency EWMA. (Replicas of one
in-cluster deployment are balanced by Ray Serve's own request router, not here.)"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Load:
    id: str
    outstanding: int
    latency_s: float
    limit: int
    available: bool = True

    @property
    def cost(self) -> float:
        return (self.outstanding + 1) * max(self.latency_s, 1e-3)


def order(loads: Sequence[Load], rng: random.Random) -> list[str]:
    """All backends in the order to try: the power-of-two-choices pick first, the rest by expected
    wait; saturated (at their concurrency limit) and unavailable ones last."""
    usable = [x for x in loads if x.available and x.outstanding < x.limit]
    rest = sorted((x for x in loads if x not in usable), key=lambda x: (not x.available, x.cost, x.id))
    if not usable:
        return [x.id for x in rest]
    if len(usable) == 1:
        first = usable[0]
    else:
        a, b = rng.sample(usable, 2)
        first = a if (a.cost, a.id) <= (b.cost, b.id) else b
    others = sorted((x for x in usable if x is not first), key=lambda x: (x.cost, x.id))
    return [first.id] + [x.id for x in others] + [x.id for x in rest]
