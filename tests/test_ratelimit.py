"""Rate limits: the bucket math (pure), the cluster counters' all-or-nothing leases, and a
replica's local leases over them (two Limiters over one RateLimitCounters stand for two gateway
replicas; tests/test_limits_cluster.py runs the real actor behind two real replicas)."""

import asyncio
import math

import pytest

from config import Settings
from security.auth import Principal
from security.ratelimit import (Ask, Bucket, Limiter, RateLimit, RateLimitCounters, RateLimited, duration, full,
                                grant, grant_slots, refill, reset_s, wait_for)


def test_bucket_refills_linearly_and_caps_at_capacity():
    b = Bucket(0.0, 100.0)
    assert refill(b, 60, 130).level == pytest.approx(30)  # 60 a minute = 1 a second
    assert refill(b, 60, 1000).level == 60
    assert refill(Bucket(-5.0, 0.0), 60, 5).level == pytest.approx(0)  # a debt is paid off first
    assert refill(b, 60, 50) == b  # a clock going back changes nothing


def test_grant_gives_what_is_there_and_nothing_below_need():
    n, b = grant(full(100, 0), 100, want=30, need=1, now=0)
    assert n == 30 and b.level == 70
    n, b2 = grant(b, 100, want=500, need=1, now=0)
    assert n == 70 and b2.level == 0
    n, b3 = grant(b2, 100, want=10, need=5, now=1)  # 1 s later: 1.67 units, under need
    assert n == 0 and b3.level == pytest.approx(100 / 60)
    assert wait_for(b3, 100, 5) == pytest.approx((5 - 100 / 60) * 0.6)
    assert wait_for(b3, 100, 101) == math.inf
    assert reset_s(Bucket(40, 0), 100) == pytest.approx(36)


def test_slots_and_durations():
    assert grant_slots(3, 4, want=5, need=1) == 1 and grant_slots(4, 4, 1, 1) == 0 and grant_slots(0, 4, 2, 3) == 2
    assert (duration(0.12), duration(1), duration(360)) == ("120ms", "1s", "6m0s")


def test_counters_grant_all_or_nothing():
    c = RateLimitCounters()
    asks = [Ask("key:a:rpm", "requests", 10, 5, 1), Ask("key:a:conc", "concurrent", 1, 1, 1)]
    g = c.lease("r1", asks, {}, now=0)
    assert [x.granted for x in g] == [5, 1]
    g = c.lease("r2", asks, {}, now=0)  # the slot is taken: nothing at all is granted, rpm included
    assert [x.granted for x in g] == [0, 0] and c.buckets["key:a:rpm"].level == 5
    c.lease("r1", [], {"key:a:conc": 1}, now=1)  # r1 gives its slot back
    assert [x.granted for x in c.lease("r2", asks, {}, now=1)] == [5, 1]


def test_slots_of_a_silent_replica_expire():
    c = RateLimitCounters(slot_lease_s=10)
    c.lease("dead", [Ask("m:conc", "concurrent", 1, 1, 1)], {}, now=0)
    assert c.lease("live", [Ask("m:conc", "concurrent", 1, 1, 1)], {}, now=5)[0].granted == 0
    assert c.lease("live", [Ask("m:conc", "concurrent", 1, 1, 1)], {}, now=11)[0].granted == 1


class InProcessActor:
    """RateLimitCounters called the way a replica calls the actor (`.lease.remote(...)` awaited),
    in this process: the counters' own code, without a cluster."""

    def __init__(self, counters: RateLimitCounters):
        self.counters = counters
        self.calls = 0
        outer = self

        class _Method:
            def remote(self, *args):
                outer.calls += 1
                fut = asyncio.get_running_loop().create_future()
                fut.set_result(counters.lease(*args))
                return fut

        self.lease = _Method()


def limiter(counters, **limits) -> Limiter:
    settings = Settings(rate_limits={"key": limits, "lease_fraction": 0.1, "lease_s": 1000})
    return Limiter(settings, actor=InProcessActor(counters))


def test_two_replicas_never_admit_more_than_the_limit_and_say_when_to_retry():
    counters = RateLimitCounters()
    a, b = limiter(counters, requests_per_minute=50), limiter(counters, requests_per_minute=50)
    p = Principal("k1", "user", None)

    async def go():
        admitted, refused = 0, []
        for i in range(120):
            try:
                await (a if i % 3 else b).admit(p, "m", 10)
                admitted += 1
            except RateLimited as e:
                refused.append(e)
        return admitted, refused

    admitted, refused = asyncio.run(go())
    assert admitted <= 50 + 1  # the bucket refills a little while the test runs
    assert admitted >= 50 - 2 * 5  # at most one lease (10% of 50) parked in each replica
    e = refused[0]
    assert e.status == 429 and e.type == "rate_limit_error" and int(e.headers["retry-after"]) >= 1
    assert e.headers["x-ratelimit-limit-requests"] == "50" and "key:k1" in e.message
    # Leases: far fewer actor calls than requests, and a refused bucket is not asked again at once.
    assert a.actor.calls + b.actor.calls < admitted / 2 + 4


def test_tokens_are_reserved_then_corrected_and_concurrency_is_released():
    counters = RateLimitCounters()
    lim = limiter(counters, tokens_per_minute=1000, concurrent=2)
    p = Principal("k2", "user", None, team="red")

    async def go():
        first = await lim.admit(p, None, 600)  # reserves 600 of 1000
        assert first.headers["x-ratelimit-limit-tokens"] == "1000"
        with pytest.raises(RateLimited, match="tokens per minute"):
            await lim.admit(p, None, 600)  # 400 left
        first.settle(100)  # used 100: 500 come back
        second = await lim.admit(p, None, 600)
        third = await lim.admit(p, None, 10)
        with pytest.raises(RateLimited, match="concurrent"):
            await lim.admit(p, None, 10)  # two in flight
        third.settle(10)
        await lim.admit(p, None, 10)
        second.settle(None)
        with pytest.raises(RateLimited, match="over the limit of 1000 tokens"):
            await lim.admit(p, None, 5000)  # can never fit: says so, and names max_tokens

    asyncio.run(go())


def test_key_team_and_model_limits_combine():
    settings = Settings(rate_limits={"key": {"requests_per_minute": 100}, "teams": {"red": {"requests_per_minute": 3}},
                                     "models": {"big": {"concurrent": 1}}})
    lim = Limiter(settings, actor=InProcessActor(RateLimitCounters()))
    p = Principal("k", "user", None, team="red", rate_limit=RateLimit(requests_per_minute=200))
    scopes = dict(lim.scopes(p, "big"))
    assert scopes["key:k"].requests_per_minute == 200 and scopes["team:red"].requests_per_minute == 3
    assert scopes["model:big"].concurrent == 1 and "model:small" not in dict(lim.scopes(p, "small"))
    disabled = Limiter(Settings(rate_limits={"enabled": False}), actor=InProcessActor(RateLimitCounters()))
    assert asyncio.run(disabled.admit(p, "big", 10)).headers == {}
