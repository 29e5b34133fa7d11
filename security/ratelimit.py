"""Rate limits: requests per minute, tokens per minute and concurrent requests, per key, team and
model, held across every gateway replica.

Three parts, each one job:

- The bucket math (pure, unit-tested): a per-minute limit is a token bucket whose capacity is
  the limit and which refills at limit/60 per second; a concurrency limit is a count of slots.
- `RateLimitCounters`, the cluster-wide counters: one detached actor (config.actors) that owns
  every bucket and hands out *leases*: a slice of a bucket's units (or some slots) to a replica.
- `Limiter`, each replica's side: it spends from its local leases and asks the actor only when a
  lease runs out, so most requests take no actor hop. A lease is at most `lease_fraction` of a
  limit, so N replicas together admit at most the limit (the actor never grants units a bucket
  does not have), and at least the limit minus N leases (units parked in an idle replica);
  unused units and idle slots go back to the actor after `lease_s`.

Tokens are reserved before a call (the prompt's estimate plus its max_tokens) and corrected
after it (`Admission.settle` gives back what was not used, or takes what was used beyond).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from models.errors import APIError
from observability import metrics


@dataclass(frozen=True)
class RateLimit:
    """Limits of one scope (a key, a team or a model); None: unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent: int | None = None

    def merged(self, override: RateLimit | None) -> RateLimit:
        """This limit with `override`'s set fields in place of ours."""
        if override is None:
            return self
        return RateLimit(*(o if o is not None else d for o, d in
                           zip((override.requests_per_minute, override.tokens_per_minute, override.concurrent),
                               (self.requests_per_minute, self.tokens_per_minute, self.concurrent))))


class RateLimited(APIError):
    """429 in OpenAI's shape, with Retry-After and the x-ratelimit-* headers."""

    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message, param, code)
        self.headers = dict(headers or {})

    def __reduce__(self):
        return (self.__class__, (self.message, self.param, self.code, self.headers))


# ---------------------------------------------------------------- the bucket math (pure)

@dataclass(frozen=True)
class Bucket:
    """A per-minute bucket's level (units available; negative after a correction took more than
    was reserved) when last measured."""

    level: float
    at: float


def full(capacity: float, now: float) -> Bucket:
    return Bucket(float(capacity), now)


def refill(b: Bucket, capacity: float, now: float) -> Bucket:
    """The bucket at `now`: refilled at capacity/60 per second, never over capacity."""
    if now <= b.at:
        return b
    return Bucket(min(float(capacity), b.level + (now - b.at) * capacity / 60.0), now)


def grant(b: Bucket, capacity: float, want: float, need: float, now: float) -> tuple[float, Bucket]:
    """Take up to `want` units, and nothing unless at least `need` are there: (granted, bucket)."""
    b = refill(b, capacity, now)
    if b.level < need:
        return 0.0, b
    n = min(want, b.level)
    return n, Bucket(b.level - n, now)


def wait_for(b: Bucket, capacity: float, need: float) -> float:
    """Seconds until the bucket holds `need` units (inf when it never can)."""
    if need > capacity:
        return math.inf
    return max(0.0, (need - b.level) * 60.0 / capacity)


def reset_s(b: Bucket, capacity: float) -> float:
    """Seconds until the bucket is full again."""
    return max(0.0, (capacity - b.level) * 60.0 / capacity)


def grant_slots(in_use: int, limit: int, want: int, need: int) -> int:
    """Concurrency slots to hand out: up to `want`, none unless `need` are free."""
    free = limit - in_use
    return 0 if free < need else min(want, free)


def lease_size(capacity: float, fraction: float) -> float:
    return max(1.0, math.floor(capacity * fraction))


def duration(seconds: float) -> str:
    """OpenAI's reset format: 120ms, 1s, 6m0s."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s}s"


# ---------------------------------------------------------------- the cluster-wide counters (actor)

@dataclass(frozen=True)
class Ask:
    """A replica's request for one bucket: `kind` is "requests", "tokens" or "concurrent"."""

    bucket: str
    kind: str
    limit: int
    want: float
    need: float


@dataclass(frozen=True)
class Grant:
    bucket: str
    granted: float
    level: float  # what the bucket holds after the grant (slots: free slots)
    retry_after_s: float  # 0 when granted


class RateLimitCounters:
    """Every bucket of the cluster (run as a detached actor: see `counters`)."""

    def __init__(self, slot_lease_s: float = 30.0):
        self.buckets: dict[str, Bucket] = {}
        self.slots: dict[str, int] = {}
        self.held: dict[tuple[str, str], int] = {}  # (replica, bucket) -> slots that replica holds
        self.seen: dict[str, float] = {}
        self.slot_lease_s = slot_lease_s

    def lease(self, replica: str, asks: list[Ask], returns: dict[str, float], now: float | None = None) -> list[Grant]:
        """Give back `returns` (units or slots), then grant `asks` all or nothing: if any ask
        cannot be met, nothing is granted and each grant says how long to wait."""
        now = time.time() if now is None else now
        self.seen[replica] = now
        self._expire(now)
        for bucket, n in returns.items():
            self._give_back(replica, bucket, n, now)
        taken: list[tuple[Ask, float]] = []
        grants: list[Grant] = []
        ok = True
        for a in asks:
            if a.kind == "concurrent":
                n = float(grant_slots(self.slots.get(a.bucket, 0), a.limit, int(a.want), int(a.need)))
                if n:
                    self.slots[a.bucket] = self.slots.get(a.bucket, 0) + int(n)
                    key = (replica, a.bucket)
                    self.held[key] = self.held.get(key, 0) + int(n)
                free = a.limit - self.slots.get(a.bucket, 0)
                grants.append(Grant(a.bucket, n, free, 0.0 if n else 1.0))
            else:
                b = self.buckets.get(a.bucket) or full(a.limit, now)
                n, b = grant(b, a.limit, a.want, a.need, now)
                self.buckets[a.bucket] = b
                grants.append(Grant(a.bucket, n, b.level, 0.0 if n else wait_for(b, a.limit, a.need)))
            taken.append((a, grants[-1].granted))
            ok = ok and grants[-1].granted >= a.need
        if not ok:  # all or nothing
            for a, n in taken:
                if n:
                    self._give_back(replica, a.bucket, n, now, kind=a.kind)
            grants = [Grant(g.bucket, 0.0, g.level, g.retry_after_s) for g in grants]
        return grants

    def _give_back(self, replica: str, bucket: str, n: float, now: float, kind: str | None = None) -> None:
        if kind == "concurrent" or (kind is None and bucket in self.slots and bucket not in self.buckets):
            key = (replica, bucket)
            n = min(int(n), self.held.get(key, 0))
            self.held[key] = self.held.get(key, 0) - n
            self.slots[bucket] = max(0, self.slots.get(bucket, 0) - n)
        elif bucket in self.buckets:
            b = self.buckets[bucket]
            self.buckets[bucket] = Bucket(b.level + n, b.at)  # refill() caps it at the next grant

    def heartbeat(self, replica: str, now: float | None = None) -> None:
        self.seen[replica] = time.time() if now is None else now

    def _expire(self, now: float) -> None:
        """Slots held by a replica not heard from in `slot_lease_s` go back (a replica that died)."""
        for (replica, bucket), n in list(self.held.items()):
            if n and now - self.seen.get(replica, now) > self.slot_lease_s:
                self.slots[bucket] = max(0, self.slots.get(bucket, 0) - n)
                self.held[(replica, bucket)] = 0

    def replicas(self) -> list[str]:
        """The replicas that have leased from these counters."""
        return sorted(self.seen)

    def state(self, bucket: str) -> dict[str, Any]:
        b = self.buckets.get(bucket)
        return {"level": None if b is None else b.level, "slots": self.slots.get(bucket, 0)}


def counters(data_dir: str | Path):
    """The cluster's rate-limit counters for this platform (its data directory names it)."""
    from config.actors import detached_actor

    path = str(Path(data_dir).expanduser().resolve())
    name = "orfeas-ratelimits-" + hashlib.sha1(path.encode()).hexdigest()[:10]
    return detached_actor(RateLimitCounters, name)


# ---------------------------------------------------------------- a replica's side

@dataclass
class _Local:
    units: float = 0.0  # leased, unspent (may be negative: a correction beyond the lease)
    level: float = 0.0  # the cluster's bucket as the actor last reported it
    reported_at: float = 0.0
    leased_at: float = 0.0
    free_slots: int = 0  # slots held, not in use
    in_use: int = 0
    blocked_until: float = 0.0  # the cluster said no until then: refuse here without asking again
    refusal: RateLimited | None = None


@dataclass
class Admission:
    """What one admitted call holds: its slots and its token reservation; `settle` once."""

    limiter: Limiter
    slots: list[str]
    tokens: list[str]
    reserved: int
    headers: dict[str, str] = field(default_factory=dict)
    settled: bool = False

    def settle(self, used_tokens: int | None) -> None:
        """Release the slots; correct the token buckets by what the call really used (None: give
        the whole reservation back, the call used nothing)."""
        if self.settled:
            return
        self.settled = True
        delta = self.reserved - (used_tokens or 0)
        for b in self.tokens:
            loc = self.limiter.local[b]
            loc.units += delta
            if delta > 0:
                loc.blocked_until = 0.0  # units came back: the next call may fit
        for b in self.slots:
            loc = self.limiter.local[b]
            loc.in_use -= 1
            loc.free_slots += 1


def of(section) -> RateLimit:
    """The RateLimit of a settings section (rate_limits.key, .team, .models[m], .teams[t])."""
    return RateLimit(section.requests_per_minute, section.tokens_per_minute, section.concurrent)


class Limiter:
    """One replica's rate limiter: local leases over the cluster's counters."""

    def __init__(self, settings, actor: Any = None):
        cfg = settings.rate_limits
        self.enabled = cfg.enabled
        self.fraction = cfg.lease_fraction
        self.lease_s = cfg.lease_s
        self.key_default = of(cfg.key)
        self.team_default = of(cfg.team)
        self.models = {m: of(s) for m, s in cfg.models.items()}
        self.teams = {t: of(s) for t, s in cfg.teams.items()}
        self.data_dir = settings.resolved_data_dir()
        self.replica = uuid.uuid4().hex[:12]
        self.local: dict[str, _Local] = {}
        self._actor = actor
        self._lock = asyncio.Lock()

    @cached_property
    def actor(self):
        return self._actor if self._actor is not None else counters(self.data_dir)

    def scopes(self, principal, model: str | None) -> list[tuple[str, RateLimit]]:
        """The (bucket prefix, limits) that apply to a call of `principal` on `model`."""
        out = [(f"key:{principal.key_id}", self.key_default.merged(principal.rate_limit))]
        if principal.team:
            team = self.team_default.merged(self.teams.get(principal.team)).merged(principal.team_rate_limit)
            out.append((f"team:{principal.team}", team))
        if model and model in self.models:
            out.append((f"model:{model}", self.models[model]))
        return out

    async def admit(self, principal, model: str | None, tokens: int, model_only: bool = False) -> Admission:
        """Count one request and reserve `tokens` for it in every scope, and take a slot where
        concurrency is limited; RateLimited (429) when any scope is out. `model_only`: the model's
        own scope alone (a fallback model, for a call the key and team already counted)."""
        if not self.enabled:
            return Admission(self, [], [], 0)
        now = time.time()
        needs: list[tuple[str, str, int, float]] = []  # bucket, kind, limit, amount
        scopes = self.scopes(principal, model)
        if model_only:
            scopes = [(prefix, lim) for prefix, lim in scopes if prefix.startswith("model:")]
        for prefix, lim in scopes:
            if lim.requests_per_minute:
                needs.append((f"{prefix}:rpm", "requests", lim.requests_per_minute, 1.0))
            if lim.tokens_per_minute:
                needs.append((f"{prefix}:tpm", "tokens", lim.tokens_per_minute, float(tokens)))
            if lim.concurrent:
                needs.append((f"{prefix}:conc", "concurrent", lim.concurrent, 1.0))
        for bucket, kind, limit, amount in needs:
            if kind == "tokens" and amount > limit:
                self._refused(bucket, kind, principal, model)
                raise RateLimited(f"this request may use {int(amount)} tokens, over the limit of {limit} tokens "
                                  f"per minute for {bucket.rsplit(':', 1)[0]}: lower max_tokens", "max_tokens",
                                  headers=self._headers(needs, now))
        short = [n for n in needs if not self._local_has(n)]
        for bucket, kind, _limit, _amount in short:
            loc = self.local.get(bucket)
            if loc is not None and loc.refusal is not None and now < loc.blocked_until and kind != "concurrent":
                retry = max(1, math.ceil(loc.blocked_until - now))
                self._refused(bucket, kind, principal, model)
                raise RateLimited(loc.refusal.message.rsplit("; retry after", 1)[0] + f"; retry after {retry}s",
                                  None, headers={**self._headers(needs, now), "retry-after": str(retry)})
        if short:
            async with self._lock:  # one lease round at a time per replica
                short = [n for n in needs if not self._local_has(n)]
                if short:
                    await self._lease(short, now, principal, model)
        # Everything is local now: spend it.
        for bucket, kind, _limit, amount in needs:
            loc = self.local[bucket]
            if kind == "concurrent":
                loc.free_slots -= 1
                loc.in_use += 1
            else:
                loc.units -= amount
        self._return_idle(now)
        return Admission(self, [b for b, k, _, _ in needs if k == "concurrent"],
                         [b for b, k, _, _ in needs if k == "tokens"], tokens, self._headers(needs, now))

    def _local_has(self, need: tuple[str, str, int, float]) -> bool:
        bucket, kind, _limit, amount = need
        loc = self.local.get(bucket)
        if loc is None:
            return False
        return loc.free_slots >= 1 if kind == "concurrent" else loc.units >= amount

    @staticmethod
    def _refused(bucket: str, kind: str, principal, model: str | None) -> None:
        """Count a 429: which scope (key, team, model) and which limit (requests, tokens,
        concurrent) refused it; the key itself is no label (unbounded), its team is."""
        metrics.rate_limited(bucket.split(":", 1)[0], kind, principal.team, model)

    async def _lease(self, short: list[tuple[str, str, int, float]], now: float, principal,
                     model: str | None) -> None:
        asks = []
        for bucket, kind, limit, amount in short:
            loc = self.local.setdefault(bucket, _Local())
            if kind == "concurrent":
                need = 1 - loc.free_slots
                asks.append(Ask(bucket, kind, limit, max(need, int(lease_size(limit, self.fraction))), need))
            else:
                need = amount - loc.units  # a debt is paid first
                asks.append(Ask(bucket, kind, limit, max(need, lease_size(limit, self.fraction)), need))
        grants = await self.actor.lease.remote(self.replica, asks, {}, now)
        refused = [(a, g) for a, g in zip(asks, grants) if g.granted < a.need]
        for a, g in zip(asks, grants):
            loc = self.local[a.bucket]
            loc.level, loc.reported_at = g.level, now
            if not refused:
                loc.leased_at = now
                if a.kind == "concurrent":
                    loc.free_slots += int(g.granted)
                else:
                    loc.units += g.granted
        if refused:
            a, g = max(refused, key=lambda r: r[1].retry_after_s)
            what = {"requests": "requests per minute", "tokens": "tokens per minute",
                    "concurrent": "concurrent requests"}[a.kind]
            scope = a.bucket.rsplit(":", 1)[0]
            retry = g.retry_after_s if math.isfinite(g.retry_after_s) else 60.0
            headers = self._headers(short, now)
            headers["retry-after"] = str(max(1, math.ceil(retry)))
            error = RateLimited(f"rate limit reached for {scope}: {a.limit} {what}; retry after "
                                f"{max(1, math.ceil(retry))}s", None, headers=headers)
            loc = self.local[a.bucket]
            loc.refusal, loc.blocked_until = error, now + min(retry, 1.0)  # look again within a second
            self._refused(a.bucket, a.kind, principal, model)
            raise error

    def _return_idle(self, now: float) -> None:
        """Units and free slots parked here longer than lease_s go back (fire and forget)."""
        returns = {}
        for bucket, loc in self.local.items():
            if now - loc.leased_at < self.lease_s:
                continue
            if loc.free_slots > 0:
                returns[bucket], loc.free_slots = float(loc.free_slots), 0
            elif loc.units > 0 and not bucket.endswith(":conc"):
                returns[bucket], loc.units = loc.units, 0.0
            loc.leased_at = now
        if returns:
            self.actor.lease.remote(self.replica, [], returns, now)

    def _headers(self, needs: list[tuple[str, str, int, float]], now: float) -> dict[str, str]:
        """x-ratelimit-{limit,remaining,reset}-{requests,tokens} of the tightest scope of each kind."""
        out: dict[str, str] = {}
        for kind, suffix in (("requests", "requests"), ("tokens", "tokens")):
            best = None
            for bucket, k, limit, _ in needs:
                if k != kind:
                    continue
                loc = self.local.get(bucket) or _Local(level=limit, reported_at=now)
                cluster = refill(Bucket(loc.level, loc.reported_at or now), limit, now).level
                remaining = max(0, math.floor(cluster + max(loc.units, 0.0)))
                remaining = min(remaining, limit)
                if best is None or remaining / limit < best[1] / best[0]:
                    best = (limit, remaining)
            if best is not None:
                limit, remaining = best
                out[f"x-ratelimit-limit-{suffix}"] = str(limit)
                out[f"x-ratelimit-remaining-{suffix}"] = str(remaining)
                out[f"x-ratelimit-reset-{suffix}"] = duration(reset_s(Bucket(remaining, now), limit))
        return out
