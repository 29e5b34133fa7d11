"""The router as one gateway replica runs it: live per-backend state around the pure decisions.

`Router.resolve` turns the requested model name into a `Route` (the models to try, in order, and
why); `Router.open` walks that order with backoff until a backend yields its first event, feeding
every outcome to the circuit breaker; the events after the first are never retried.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from config import ModelSpec, Settings
from config.settings import POLICIES
from models.errors import (
    APIError,
    InvalidRequest,
    ModelNotFound,
    ModelOverloaded,
    ModelUnavailable,
    NoHealthyModel,
    PermissionDenied,
    ReplicaLost,
    UpstreamError,
    UpstreamTimeout,
)
from models.protocol import GenerationEvent, GenerationRequest
from observability import tracing
from serve.router import balance, experiments, features, fallback, health
from serve.router.selection import Candidate, Decision, PolicyParams, SelectionContext, select

log = logging.getLogger("orfeas.router")

AUTO = "auto"
# A finished answer's stream may take this long to end on its own before it is closed (TrackedEvents).
FINISHED_DRAIN_S = 0.5
# Serve's handle refusing a request that this replica's count admitted is its count lagging ours
# (a slot it frees a moment after the replica's generator returns, later under load): tried again
# after each of these waits while our count still has room.
SERVE_LAG_RETRIES_S = (0.01, 0.02, 0.04)


@dataclass
class Route:
    requested: str
    kind: str  # named | group | policy
    plan: list[str]
    reason: str
    policy: str | None = None
    experiment: str | None = None
    arm: str | None = None
    decision: Decision | None = None
    features: features.RequestFeatures | None = None


@dataclass
class Opened:
    model: str
    first: GenerationEvent
    events: AsyncIterator[GenerationEvent]  # the rest, first excluded
    attempts: list[tuple[str, str]] = field(default_factory=list)  # (model, outcome) in order


class Claim:
    """A request counted against one model from the gateway's door (serve.http.admission) until
    its first attempt starts, when `Router.outstanding` counts it instead: the load-shedding
    checks see a burst as it arrives, not only once each request has awaited its budget, route
    and rate limits. `release` is idempotent: `Router.open` hands the claim over, and the door
    releases it however the request ends (answered, refused, failed, cancelled)."""

    def __init__(self, counts: dict[str, int], model: str):
        self.model, self._counts, self.held = model, counts, True
        counts[model] += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self._counts[self.model] -= 1


def ascii_header(value: str, limit: int = 900) -> str:
    return value.encode("ascii", "replace").decode()[:limit].replace("\n", " ").replace("\r", " ")


class Router:
    def __init__(self, settings: Settings, backends, embed: Callable[[list[str]], Awaitable[list[list[float]]]] | None
                 = None):
        self.settings = settings
        self.cfg = settings.router
        self.backends = backends
        self.embed = embed
        self.specs: dict[str, ModelSpec] = {m.id: m for m in settings.models if m.task == "chat"}
        self.groups: dict[str, list[str]] = {}
        for m in self.specs.values():
            if m.serves:
                self.groups.setdefault(m.serves, []).append(m.id)
        self.experiments = {e.entry: e for e in self.cfg.experiments if e.enabled}
        self.health: dict[str, health.BackendHealth] = {m: health.BackendHealth() for m in self.specs}
        self.outstanding: dict[str, int] = {m: 0 for m in self.specs}  # attempts started, not yet ended
        self.claimed: dict[str, int] = {m: 0 for m in self.specs}  # requests past the door, not yet started
        self.rng = random.Random()
        self._centroids: dict[str, list[float]] | None = None
        self._probe_task: asyncio.Task | None = None
        self.listeners: list[Callable[[str, str, str], None]] = []  # (model, old state, new state)
        g = settings.gateway
        self.retry_after_s = (g.overload_retry_after_min_s, g.overload_retry_after_max_s)
        # (this gateway replica's rank, gateway replicas): each counts only its own requests, so
        # the models' shared slots are split between them (see _capacity). The gateway sets it.
        self.gateway_share: tuple[int, int] = (0, 1)

    # ------------------------------------------------------------ names

    def policy(self, name: str) -> PolicyParams | None:
        """The policy a routed name means: auto, auto:<policy>, a built-in or a named policy."""
        if name == AUTO:
            name = self.cfg.default_policy
        elif name.startswith(AUTO + ":"):
            name = name[len(AUTO) + 1:]
        if name in POLICIES:
            return PolicyParams(name, name, self.cfg.lambda_cost, self.cfg.mu_latency, self.cfg.min_quality)
        p = self.cfg.policies.get(name)
        if p is None:
            return None
        return PolicyParams(
            name, p.kind,
            self.cfg.lambda_cost if p.lambda_cost is None else p.lambda_cost,
            self.cfg.mu_latency if p.mu_latency is None else p.mu_latency,
            self.cfg.min_quality if p.min_quality is None else p.min_quality,
            frozenset(p.models) if p.models else None, frozenset(p.tags))

    def routed_names(self) -> list[tuple[str, str]]:
        """(name, what it is) for every name the router answers besides catalog ids."""
        out = [(AUTO, f"policy {self.cfg.default_policy}")]
        out += [(p, f"policy {p}") for p in sorted(self.cfg.policy_names())]
        out += [(g, "load-balanced: " + ",".join(ms)) for g, ms in sorted(self.groups.items())]
        out += [(e, "experiment " + x.name) for e, x in sorted(self.experiments.items()) if e != AUTO]
        return out

    # ------------------------------------------------------------ live state

    def _ensure_probes(self) -> None:
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        last_full = time.monotonic()
        while True:
            # An open circuit is probed every breaker.open_probe_interval_s: a passing probe lets
            # it take traffic again within about that long of the backend's recovery.
            quick = min(self.cfg.breaker.open_probe_interval_s, self.cfg.probe_interval_s)
            await asyncio.sleep(quick)
            try:
                if time.monotonic() - last_full >= self.cfg.probe_interval_s:
                    last_full = time.monotonic()
                    await self.probe_all()
                else:
                    opened = [m for m, h in self.health.items() if h.state == health.OPEN]
                    if opened:
                        await self.probe_all(opened)
            except Exception:  # a probe round must never kill the loop
                log.exception("health probe round failed")

    async def probe_all(self, ids: list[str] | None = None) -> None:
        """Active probes: each backend's own health check (of `ids`, default all); failing ones
        open their circuit, passing ones let an open circuit take a trial request."""
        now = time.monotonic()
        ids = list(self.specs) if ids is None else ids
        results = await asyncio.gather(*(self.backends.probe(m) for m in ids), return_exceptions=True)
        for mid, h in zip(ids, results):
            ok = not isinstance(h, BaseException) and h.status == "ready"
            err = None if ok else (repr(h) if isinstance(h, BaseException) else (h.error or h.status))
            if h is not None and not isinstance(h, BaseException) and h.status == "loading":
                continue
            self._set(mid, health.probe(self.health[mid], ok, now, self.cfg.breaker, err))

    def _set(self, mid: str, new: health.BackendHealth) -> None:
        old = self.health[mid]
        self.health[mid] = new
        if old.state != new.state:
            log.warning("circuit of %s: %s -> %s (%s)", mid, old.state, new.state, new.last_error or "")
            for fn in self.listeners:
                fn(mid, old.state, new.state)

    def _latency(self, spec: ModelSpec) -> float:
        h = self.health[spec.id]
        return h.latency_ewma if h.latency_ewma is not None else spec.latency_prior_s

    async def _healthy(self, ids: list[str]) -> dict[str, tuple[bool, str | None]]:
        now = time.monotonic()
        results = await asyncio.gather(*(self.backends.health(m) for m in ids))
        out = {}
        for mid, h in zip(ids, results):
            if h.status != "ready":
                out[mid] = (False, f"{h.status}" + (f": {h.error}" if h.error else ""))
            elif not health.available(self.health[mid], now, self.cfg.breaker):
                out[mid] = (False, "circuit open")
            else:
                out[mid] = (True, None)
        return out

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        out = {}
        for mid, h in self.health.items():
            out[mid] = {"state": h.state, "requests": h.requests, "failures": h.failures,
                        "consecutive_failures": h.consecutive_failures, "error_rate_ewma": round(h.error_ewma, 4),
                        "latency_ewma_s": h.latency_ewma, "outstanding": self.outstanding[mid],
                        "claimed": self.claimed[mid],
                        "open_for_s": round(max(self.cfg.breaker.cooldown_s - (now - h.opened_at), 0), 3)
                        if h.state == health.OPEN else None, "last_error": h.last_error}
        return out

    # ------------------------------------------------------------ featurising

    async def featurise(self, body: dict[str, Any], max_output: int, headers: Mapping[str, str]
                        ) -> features.RequestFeatures:
        budget = headers.get(self.cfg.latency_header)
        latency_ms = None
        if budget is not None:
            try:
                latency_ms = float(budget)
                if not latency_ms > 0:
                    raise ValueError
            except ValueError:
                raise InvalidRequest(f"header {self.cfg.latency_header} must be a positive number of milliseconds, "
                                     f"not {budget!r}", self.cfg.latency_header) from None
        hint = headers.get("x-orfeas-task")
        if hint is not None and hint not in features.TASK_TYPES:
            raise InvalidRequest(f"header x-orfeas-task must be one of {', '.join(features.TASK_TYPES)}",
                                 "x-orfeas-task")
        f = features.featurise(body, max_output_tokens=max_output, latency_budget_ms=latency_ms, task_hint=hint)
        if self.cfg.classifier == "rules+embedding" and self.embed is not None and features.needs_embedding(f):
            try:
                async with asyncio.timeout(self.cfg.classifier_timeout_s):
                    if self._centroids is None:
                        tasks = list(features.PROTOTYPES)
                        texts = [t for k in tasks for t in features.PROTOTYPES[k]]
                        vecs = await self.embed(texts)
                        by: dict[str, list] = {}
                        for (k, _), v in zip(((k, t) for k in tasks for t in features.PROTOTYPES[k]), vecs):
                            by.setdefault(k, []).append(v)
                        self._centroids = features.centroids(by)
                    [vec] = await self.embed([f.text[:2000]])
                task, sim = features.classify_embedding(vec, self._centroids)
                f = features.with_task(f, task, sim, "embedding")
            except Exception as e:  # the rules' answer stands
                log.debug("embedding classifier unavailable: %r", e)
        return f

    # ------------------------------------------------------------ resolving

    async def resolve(self, name: str, body: dict[str, Any], principal, headers: Mapping[str, str],
                      max_output: int, remaining_budget: float | None) -> Route:
        """The route for `name`, traced as a `router.decision` span (candidates, choice, reason)."""
        if not tracing.enabled():
            return await self._resolve(name, body, principal, headers, max_output, remaining_budget)
        from serve.gateway.tracing import decided

        with tracing.span("router.decision", {"orfeas.router.requested": name}) as s:
            route = await self._resolve(name, body, principal, headers, max_output, remaining_budget)
            decided(s, route)
            return route

    async def _resolve(self, name: str, body: dict[str, Any], principal, headers: Mapping[str, str],
                       max_output: int, remaining_budget: float | None, _in_experiment: bool = False) -> Route:
        self._ensure_probes()
        exp = self.experiments.get(name) if not _in_experiment else None
        if exp is not None:
            sticky = principal.key_id
            if exp.sticky_by == "user" and isinstance(body.get("user"), str) and body["user"]:
                sticky = "user:" + body["user"]
            arm = experiments.assign(exp, sticky)
            route = await self._resolve(arm.model or arm.policy, body, principal, headers, max_output,
                                        remaining_budget, _in_experiment=True)
            route.requested, route.experiment, route.arm = name, exp.name, arm.name
            route.reason = f"experiment {exp.name} arm {arm.name}; " + route.reason
            return route
        if name in self.specs:
            return await self._named(name, principal)
        if name in self.groups:
            return await self._group(name, principal)
        policy = self.policy(name)
        if policy is None:
            if self.settings.model(name) is not None:  # an embedding model on a chat route
                use = "/v1/embeddings"
                raise InvalidRequest(f"model {name!r} is a {self.settings.model(name).task} model: use {use}",
                                     "model")
            raise ModelNotFound(f"model {name!r} does not exist; GET /v1/models lists the models", "model")
        f = await self.featurise(body, max_output, headers)
        ids = list(self.specs)
        healthy = await self._healthy(ids)
        cands = []
        for mid in ids:
            s = self.specs[mid]
            if not s.routable:
                continue
            cands.append(Candidate(
                mid, frozenset(s.capabilities), s.max_context, s.price_input_per_m, s.price_output_per_m,
                self._latency(s), s.quality, s.quality_default, frozenset(s.tags), healthy[mid][0], healthy[mid][1],
                self.outstanding[mid] / s.concurrency_limit()))
        allowed = frozenset(principal.models) if principal.models is not None else None
        decision = select(SelectionContext(f, cands, policy, allowed, remaining_budget))
        log.info("route %s: %s", name, decision.reason)
        return Route(name, "policy", list(decision.ranked), decision.reason, policy.name, decision=decision,
                     features=f)

    async def _named(self, mid: str, principal) -> Route:
        principal.check_model(mid)
        spec = self.specs[mid]
        chain = [mid] + [m for m in spec.fallbacks if m in self.specs and principal.may_use(m)]
        healthy = await self._healthy(chain)
        plan = [m for m in chain if healthy[m][0]]
        if not plan:
            raise ModelUnavailable(f"model {mid!r} is {healthy[mid][1]}", "model")
        reason = f"named {mid}" + (f"; fallbacks {','.join(plan[1:])}" if len(plan) > 1 else "")
        if plan[0] != mid:
            reason = f"named {mid} is {healthy[mid][1]}; fallbacks {','.join(plan)}"
        return Route(mid, "named", plan, reason)

    async def _group(self, name: str, principal) -> Route:
        members = [m for m in self.groups[name] if principal.may_use(m)]
        if not members:
            raise PermissionDenied(f"this API key may not use model {name!r}", "model")
        healthy = await self._healthy(members)
        seen = [self.health[m].latency_ewma for m in members if self.health[m].latency_ewma is not None]
        unseen = sum(seen) / len(seen) if seen else None  # a backend not yet measured: the group's mean

        def latency(m: str) -> float:
            h = self.health[m].latency_ewma
            return h if h is not None else (unseen if unseen is not None else self.specs[m].latency_prior_s)

        loads = [balance.Load(m, self.outstanding[m], latency(m),
                              self.specs[m].concurrency_limit(), healthy[m][0]) for m in members]
        plan = [m for m in balance.order(loads, self.rng) if healthy[m][0]]
        if not plan:
            raise NoHealthyModel(f"every backend of {name!r} is unhealthy: "
                                 + "; ".join(f"{m} ({healthy[m][1]})" for m in members), "model")
        reason = f"balanced {name}: p2c least-outstanding chose {plan[0]} of {len(plan)}"
        return Route(name, "group", plan, reason)

    # ------------------------------------------------------------ calling

    async def open(self, route: Route, request: GenerationRequest, deadline: float,
                   admit: Callable[[str], Awaitable[APIError | None]] | None = None,
                   claim: Claim | None = None) -> Opened:
        """The first event from the first backend in the route's plan that gives one. `admit`, when
        given, is asked before each attempt on a model other than the plan's first (which the
        caller admitted already): an error it returns (the model's own rate limit) skips that model.
        `claim`, the request's count from the door, is handed over to `outstanding` when its first
        attempt starts."""
        cfg = self.cfg.fallback
        plan = fallback.attempt_plan(route.plan, cfg)
        attempts: list[tuple[str, str]] = []
        last: APIError | None = None
        prev = None
        full: set[str] = set()  # models whose queue is full: not tried again in this request
        relost, lagged = False, 0
        for i, mid in enumerate(plan, 1):
            if mid in full:
                attempts.append((mid, "overloaded"))
                continue
            if i > 1 and not isinstance(last, ModelOverloaded):  # capacity: the next candidate at once
                wait = fallback.backoff_s(i, cfg, self.rng.random(), fallback.retry_after(last), same_model=mid == prev)
                if time.monotonic() + wait >= deadline:
                    attempts.append((mid, "deadline"))
                    break
                await asyncio.sleep(wait)
            prev = mid
            ok, h = health.admit(self.health[mid], time.monotonic(), self.cfg.breaker)
            if not ok:
                attempts.append((mid, "circuit_open"))
                continue
            if self._full(mid, claim):  # this replica's own bound: refused without a round trip to Serve
                self._set(mid, health.release(h))
                full.add(mid)
                attempts.append((mid, "overloaded"))
                last = ModelOverloaded(f"model {mid!r} is at capacity (its request queue is full); retry shortly",
                                       "model")
                continue
            refused = await admit(mid) if admit is not None and mid != route.plan[0] else None
            if refused is not None:
                self._set(mid, health.release(h))
                full.add(mid)
                attempts.append((mid, "rate_limited"))
                last = refused
                continue
            self._set(mid, h)
            backend = self.backends.get(mid)
            start = time.monotonic()
            self.outstanding[mid] += 1
            if claim is not None:
                claim.release()  # counted in `outstanding` from here on
            events = _bounded(backend.stream(request), deadline, mid)
            # The attempt's span is current while the first event is awaited: the engine's first
            # step (which sends the trace carrier to the replica) runs in it.
            span = tracing.start("backend.attempt", {"gen_ai.request.model": mid, "orfeas.attempt": i}) \
                if tracing.enabled() else tracing.NO_SPAN
            try:
                with tracing.current(span):
                    first = await anext(events)
            except BaseException as e:
                if not isinstance(e, Exception):  # cancelled (the client went away): no outcome to record
                    self._release(mid)
                    span.end()
                    await events.aclose()
                    raise
                first, err = self._first_failure(mid, e)
            else:
                err = None
            if first is not None:
                attempts.append((mid, "ok"))
                span.set_attribute("orfeas.outcome", "ok")
                return Opened(mid, first, self._tracked(mid, start, events, span), attempts)
            span.set_attribute("orfeas.outcome", err.code or err.type)
            tracing.fail(span, err)
            span.end()
            self.outstanding[mid] -= 1
            await events.aclose()
            if isinstance(err, ModelOverloaded):  # load, not failure: the breaker does not count it
                self._set(mid, health.release(self.health[mid]))
                if lagged < len(SERVE_LAG_RETRIES_S) and self._capacity(mid) is not None and not self._full(mid, claim):
                    wait = SERVE_LAG_RETRIES_S[lagged]  # our count had room: Serve's lags it
                    lagged += 1
                    attempts.append((mid, "lagged"))
                    last = err
                    plan.insert(i, mid)
                    await asyncio.sleep(wait)
                    continue
                full.add(mid)
                attempts.append((mid, "overloaded"))
                last = err
                continue
            if isinstance(err, ReplicaLost) and not relost:
                relost = True
                plan.insert(i, mid)  # before its first token: once more, on another replica of the model
            if not fallback.retryable(err):
                self._set(mid, health.record(self.health[mid], True, None, time.monotonic(), self.cfg.breaker,
                                             self.cfg.ewma_alpha))  # the backend answered; the request was bad
                raise err
            self._set(mid, health.record(self.health[mid], False, None, time.monotonic(), self.cfg.breaker,
                                         self.cfg.ewma_alpha, f"{err.code}: {err.message}"[:300]))
            attempts.append((mid, err.code or err.type))
            log.warning("attempt %d on %s failed (%s); %s", i, mid, err.code, "trying the next" if i < len(plan)
                        else "no attempts left")
            last = err
        if last is None:
            raise NoHealthyModel("no backend could take the request: "
                                 + ", ".join(f"{m} {o}" for m, o in attempts), "model")
        tried = ", ".join(f"{m} ({o})" for m, o in attempts)
        err = type(last)(f"{last.message} [tried: {tried}]", last.param, last.code)
        if getattr(last, "headers", None):  # a rate limit's Retry-After and x-ratelimit-*
            err.headers = last.headers
        raise self._jittered(err) if isinstance(err, ModelOverloaded) else err

    def refusal(self, route: Route, claim: Claim | None = None) -> ModelOverloaded | None:
        """The refusal of a request that no model of its plan has room for (each one's whole queue
        in flight from this replica, or claimed at its door by other requests), or None. Asked
        before the rate limits and budgets, so a shed request costs no Ray call and spends no
        quota (issue 18: refused in < 50 ms)."""
        if not route.plan or not all(mid in self.specs and self._full(mid, claim) for mid in route.plan):
            return None
        return self._overloaded(route.plan)

    def claim(self, name: str, principal) -> Claim | ModelOverloaded | None:
        """A request at the gateway's door, from its model name alone (no await, no Ray call): for
        a named chat model (not an experiment entry) that `principal` may use, a claim on the
        first model of its chain (it, then the fallbacks this key may use) that has room, or the
        refusal when every one is full; None (not counted: the full path decides) for any other
        name, or when the first with room has no bound."""
        spec = self.specs.get(name)
        if spec is None or name in self.experiments or not principal.may_use(name):
            return None
        chain = [name] + [m for m in spec.fallbacks if m in self.specs and principal.may_use(m)]
        for mid in chain:
            if not self._full(mid):
                return Claim(self.claimed, mid) if self._capacity(mid) is not None else None
        return self._overloaded(chain)

    def _overloaded(self, plan: list[str]) -> ModelOverloaded:
        return self._jittered(ModelOverloaded(
            f"model {plan[0]!r} is at capacity (its request queue is full); retry shortly "
            f"[tried: {', '.join(f'{m} (overloaded)' for m in plan)}]", "model"))

    def _jittered(self, err: ModelOverloaded) -> ModelOverloaded:
        """A capacity refusal's Retry-After, drawn from `gateway.overload_retry_after_{min,max}_s`:
        clients refused together come back spread out, not in one burst."""
        lo, hi = self.retry_after_s
        err.retry_after_s = round(lo + (hi - lo) * self.rng.random(), 3)
        return err

    def _capacity(self, mid: str) -> int | None:
        """How many requests for a Serve-hosted model this gateway replica may have in flight:
        its share of the model's running slots (`max_ongoing_requests` x replicas, split over
        the `gateway.num_replicas` gateway replicas by rank, the remainder to the lowest ranks)
        plus its own `max_queued_requests` (Serve bounds that queue per caller). Over all
        gateway replicas that is the bound Serve's handles enforce, so a request past it is
        refused here and not by Serve after the full path. None when unbounded."""
        spec = self.specs[mid]
        if spec.engine == "openai" or spec.max_queued_requests < 0:
            return None
        slots = spec.max_ongoing_requests * spec.num_replicas
        rank, count = self.gateway_share
        share = slots // count + (1 if rank % count < slots % count else 0)
        return max(1, share + spec.max_queued_requests)

    def _full(self, mid: str, claim: Claim | None = None) -> bool:
        """Whether this gateway replica already has `mid`'s whole queue in flight or claimed (the
        request's own `claim` not counted), checked here first so that a refusal costs no Ray call."""
        capacity = self._capacity(mid)
        if capacity is None:
            return False
        mine = 1 if claim is not None and claim.held and claim.model == mid else 0
        return self.outstanding[mid] + self.claimed[mid] - mine >= capacity

    @staticmethod
    def _first_failure(mid: str, e: Exception) -> tuple[None, APIError]:
        """The error of an attempt that gave no first event."""
        if isinstance(e, StopAsyncIteration):
            return None, UpstreamError(f"model {mid!r} ended its answer without any output")
        if isinstance(e, APIError):
            return None, e
        log.exception("backend %s failed before its first token", mid)  # an engine bug or a lost replica: a 5xx
        return None, ModelUnavailable(f"model {mid!r} failed: {type(e).__name__}")

    def _release(self, mid: str) -> None:
        """An admitted attempt ended with no outcome (its caller went away): give back its slot."""
        self.outstanding[mid] -= 1
        self._set(mid, health.release(self.health[mid]))

    def _tracked(self, mid: str, start: float, events: AsyncIterator[GenerationEvent],
                 span: Any = tracing.NO_SPAN) -> "TrackedEvents":
        return TrackedEvents(self, mid, start, events, span)

    def _finish(self, mid: str, start: float, outcome: tuple[bool, str | None] | None) -> None:
        """One attempt's end: its outcome feeds the backend's health; with none (the caller went
        away before the stream finished or failed), its slot is given back."""
        if outcome is None:
            self._release(mid)
            return
        self.outstanding[mid] -= 1
        self._set(mid, health.record(self.health[mid], outcome[0], time.monotonic() - start if outcome[0] else None,
                                     time.monotonic(), self.cfg.breaker, self.cfg.ewma_alpha, outcome[1]))


class TrackedEvents:
    """The rest of a backend's events after the first. However it ends (finished, failed, closed
    early, or closed before it was ever read), the attempt is accounted for exactly once."""

    def __init__(self, router: Router, mid: str, start: float, events: AsyncIterator[GenerationEvent],
                 span: Any = tracing.NO_SPAN):
        self.router, self.mid, self.start, self.events = router, mid, start, events
        self.span = span  # the attempt's span: it ends with the stream
        self.outcome: tuple[bool, str | None] | None = None
        self._ended = False

    def __aiter__(self) -> "TrackedEvents":
        return self

    async def __anext__(self) -> GenerationEvent:
        if self._ended:
            raise StopAsyncIteration
        try:
            event = await anext(self.events)
        except StopAsyncIteration:
            await self._end(self.outcome or (False, "stream ended without finishing"))
            raise
        except APIError as e:
            await self._end((not fallback.retryable(e), f"{e.code}: {e.message}"[:300]))
            raise
        except Exception as e:
            await self._end((False, type(e).__name__))
            raise
        except BaseException:  # cancelled: the caller went away
            await self._end(self.outcome)
            raise
        if event.finish_reason:
            self.outcome = (True, None)
        return event

    async def aclose(self) -> None:
        if not self._ended and self.outcome is not None and self.outcome[0]:
            await self._drain()
        await self._end(self.outcome)

    async def _drain(self) -> None:
        """A finished answer's stream read to its end (briefly) before its slot is released: Serve
        frees the replica's slot in its own count only when the replica's generator returns, so a
        slot freed here first would let this count admit a request that Serve's handle then
        refuses after the whole path (issue 18)."""
        try:
            async with asyncio.timeout(FINISHED_DRAIN_S):
                async for _ in self.events:
                    pass
        except Exception:  # noqa: BLE001 - the answer is complete; how its stream ends changes nothing
            pass

    async def _end(self, outcome: tuple[bool, str | None] | None) -> None:
        if self._ended:
            return
        self._ended = True
        self.router._finish(self.mid, self.start, outcome)
        if outcome is not None and not outcome[0]:
            self.span.set_attribute("error.type", (outcome[1] or "failed")[:200])
        self.span.end()
        await self.events.aclose()


async def _bounded(events: AsyncIterator[GenerationEvent], deadline: float, model: str
                   ) -> AsyncIterator[GenerationEvent]:
    try:
        while True:
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                    event = await anext(events)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise UpstreamTimeout(f"model {model!r} did not answer within the request deadline") from None
            yield event
    finally:
        await events.aclose()
