"""ORFEAS's Serve autoscaling policies: forecast the load a horizon ahead, add quantile headroom.

Ray Serve's default (`replica_queue_length_autoscaling_policy`) sizes a deployment for the load it
saw over the last look-back window, then waits `upscale_delay_s` (30 s) to add replicas and
`downscale_delay_s` (600 s) to remove them. A new replica is then useful only after its cold start,
so a ramp is served short-handed for delay + cold start, and every trough is paid for ten minutes.

`decide` instead keeps, in `policy_state`, a Holt (level + trend) forecast of each load signal —
ongoing requests, which is arrival rate x time in system (Little's law), and token load when the
replicas report one — sampled into short buckets. It sizes the deployment for the forecast at
`horizon = max(horizon_s, measured cold start) + look_back/2` (the metric itself lags by half its
window), plus headroom: the `quantile` of its own past relative forecast errors at that horizon.
The count is staffed with square-root headroom (Halfin-Whitt: `r` replicas' worth of load gets
`r + staffing_beta * sqrt(r)`, so the spare is large at small loads and small at large ones).
Scale-up is immediate; scale-down waits for `downscale_cooldown_s` after any change and only goes
to a count that holds the highest need of the last `downscale_window_s` with `hysteresis` to
spare, so load that returns within the window finds its replicas. Reversals are budgeted
(`max_reversals_per_hour`): a downturn after an upward run only when the hour's budget has room,
and an upturn after a downward run only for the load already there (not the forecast's headroom).
The first look-back period after the policy starts only holds the load seen (Serve's mean is still
filling and its rise would read as a trend).

Everything is a pure function of `AutoscalingContext` (and the params) returning
`(replicas, state)`, like Ray's own policies. `ForecastPolicy` / `AppForecastPolicy` are the
class-callables Serve instantiates from `AutoscalingPolicy(policy_function=..., policy_kwargs=...)`;
they also export the forecast as Ray metrics (`ray.util.metrics`).

Serve pickles this module by value into its controller: it imports only the standard library
(and Ray lazily), never other ORFEAS modules.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

log = logging.getLogger(__name__)

STATE_KEY = "orfeas"
TOKEN_METRIC = "tokens_in_flight"
MIN_ERRORS = 8  # forecast errors seen before the quantile replaces the starting headroom


@dataclass(frozen=True)
class PolicyParams:
    horizon_s: float = 30.0
    quantile: float = 0.5  # of past relative forecast errors (the spread is the staffing's job)
    downscale_cooldown_s: float = 120.0
    hysteresis: float = 0.1
    bucket_s: float = 5.0  # load samples are averaged into buckets this long
    alpha: float = 0.5  # level smoothing per bucket
    beta: float = 0.3  # trend smoothing per bucket
    errors_kept: int = 240
    start_headroom: float = 0.0  # relative headroom until enough errors are seen (staffing covers it)
    max_reversals_per_hour: float = 2.0  # a scale-down that turns an upward run around must fit this
    target_tokens_per_replica: float | None = None  # size by token load too, when replicas report it
    # Square-root staffing: r replicas' worth of load gets r + staffing_beta * sqrt(r) replicas, the
    # spare that random arrivals need for few of them to wait (Halfin-Whitt); 0: off.
    staffing_beta: float = 2.0  # Halfin-Whitt: about 3% of arrivals find every replica busy
    # Reversals a downturn after an upward run must leave in the hour's budget: itself and (2)
    # the upturn that likely follows, or (1) itself only, when the window's peak guards the level.
    reversal_reserve: int = 1
    # A scale-down goes no lower than the highest need of this recent window: load that came back
    # within it would need the replicas again (a reversal); 0: the need now.
    downscale_window_s: float = 600.0

    @classmethod
    def of(cls, kwargs: dict[str, Any]) -> "PolicyParams":
        known = {f.name for f in fields(cls)}
        unknown = set(kwargs) - known
        if unknown:
            raise ValueError(f"unknown autoscaling policy parameter(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**kwargs)


# ------------------------------------------------------------------------- forecasting (pure)


def new_signal() -> dict[str, Any]:
    return {"t0": None, "sum": 0.0, "n": 0, "level": None, "trend": 0.0, "pending": [], "errs": [], "last": 0.0}


def observe(sig: dict[str, Any], t: float, value: float, horizon_s: float, p: PolicyParams) -> dict[str, Any]:
    """The signal state after one sample at time t (a new dict; `sig` is not changed)."""
    s = {**sig, "pending": list(sig["pending"]), "errs": list(sig["errs"]), "last": float(value)}
    if s["t0"] is None:
        s["t0"] = t
    if t - s["t0"] >= p.bucket_s and s["n"]:
        _close_bucket(s, t, horizon_s, p)
    s["sum"] += float(value)
    s["n"] += 1
    return s


def _close_bucket(s: dict[str, Any], t: float, horizon_s: float, p: PolicyParams) -> None:
    mean, dt = s["sum"] / s["n"], max(t - s["t0"], 1e-9)
    if s["level"] is None:
        s["level"], s["trend"] = mean, 0.0
    else:
        prev = s["level"]
        s["level"] = p.alpha * mean + (1 - p.alpha) * (prev + s["trend"] * dt)
        s["trend"] = p.beta * (s["level"] - prev) / dt + (1 - p.beta) * s["trend"]
    # Score the forecasts that were made for now; relative errors, so they carry across load levels.
    due = [f for f in s["pending"] if f[0] <= t]
    s["pending"] = [f for f in s["pending"] if f[0] > t]
    for _, predicted in due:
        # Symmetric: bounded in [-1, 1] however wrong a forecast near zero was.
        s["errs"].append((mean - predicted) / max(predicted, mean, 1.0))
    del s["errs"][:-p.errors_kept]
    s["pending"].append([t + horizon_s, forecast(s, horizon_s)])
    s["t0"], s["sum"], s["n"] = t, 0.0, 0


def forecast(sig: dict[str, Any], horizon_s: float) -> float:
    """Holt's forecast of the signal `horizon_s` ahead (the last sample before any bucket closed)."""
    if sig["level"] is None:
        return max(sig["last"], 0.0)
    return max(sig["level"] + sig["trend"] * horizon_s, 0.0)


def quantile(values: list[float], q: float) -> float:
    xs = sorted(values)
    if not xs:
        return 0.0
    i = q * (len(xs) - 1)
    lo = math.floor(i)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def need(sig: dict[str, Any], horizon_s: float, p: PolicyParams) -> tuple[float, float]:
    """(forecast, load to provision for): never less than the load now; headroom from the errors."""
    f = forecast(sig, horizon_s)
    base = max(f, sig["last"])
    rel = quantile(sig["errs"], p.quantile) if len(sig["errs"]) >= MIN_ERRORS else p.start_headroom
    return f, base + max(rel, 0.0) * max(base, 1.0)


def staffed(load: float, beta: float) -> float:
    """Replicas for `load` replicas' worth of work with square-root headroom (Halfin-Whitt): the
    spare grows with the square root of the load, not in proportion to it."""
    return load + beta * math.sqrt(max(load, 0.0))


# ------------------------------------------------------------------------- the decision (pure)


@dataclass(frozen=True)
class Plan:
    """What one decision saw and wanted (exported as metrics, read by the app-level policy)."""

    now_requests: float
    forecast_requests: float
    need_requests: float
    horizon_s: float
    desired: int
    decision: int


def _now(ctx) -> float:
    return float(ctx.current_time) if ctx.current_time is not None else time.time()


def _tokens(ctx) -> float | None:
    metrics = ctx.aggregated_metrics or {}
    per_replica = metrics.get(TOKEN_METRIC)
    return float(sum(per_replica.values())) if per_replica else None


def _target_per_replica(ctx) -> float:
    get = getattr(ctx.config, "get_target_ongoing_requests", None)
    return float(get() if get else ctx.config.target_ongoing_requests)


def _cold_start(st: dict[str, Any], ctx, now: float) -> None:
    """Measure the deployment's cold start: from the target rising above the running count to the
    running count reaching it (an average of the last few)."""
    cold = dict(st.get("cold") or {"since": None, "s": None})
    if ctx.target_num_replicas > ctx.current_num_replicas:
        if cold["since"] is None:
            cold["since"] = now
    elif cold["since"] is not None:
        sample = now - cold["since"]
        cold["s"] = sample if cold["s"] is None else 0.5 * cold["s"] + 0.5 * sample
        cold["since"] = None
    st["cold"] = cold


def _window_peaks(peaks: list, now: float, value: float, p: PolicyParams) -> list:
    """The need's maxima per bucket over the last `downscale_window_s` ([start, max] pairs)."""
    out = [list(b) for b in peaks if b[0] > now - p.downscale_window_s]
    if out and now - out[-1][0] < p.bucket_s:
        out[-1][1] = max(out[-1][1], value)
    else:
        out.append([now, value])
    if p.downscale_window_s <= 0:
        out = out[-1:]
        out[0][1] = value
    return out


def plan(ctx, p: PolicyParams, *, extra_need: float = 0.0) -> tuple[Plan, dict[str, Any]]:
    """The decision for one deployment and its new ORFEAS state (`ctx.policy_state[STATE_KEY]`)."""
    now = _now(ctx)
    old = (ctx.policy_state or {}).get(STATE_KEY) or {}
    # The first call counts as a change: no scale-down within the first cooldown (the count a
    # deployment starts with is its operator's, and the policy has seen nothing yet).
    st: dict[str, Any] = {"last_change": old.get("last_change", now), "cold": old.get("cold"),
                          "dir": old.get("dir", 0), "revs": [r for r in old.get("revs", []) if r > now - 3600]}
    _cold_start(st, ctx, now)
    look_back = float(getattr(ctx.config, "look_back_period_s", 30.0))
    horizon = max(p.horizon_s, (st["cold"] or {}).get("s") or 0.0) + look_back / 2

    requests = float(ctx.total_num_requests or 0.0)
    st["since"] = old.get("since", now)
    if now - st["since"] < look_back:
        # Serve's look-back mean is still filling: its rise is the window's, not the load's (a
        # trend and forecast errors learnt from it would be wrong for long after).
        st["requests"] = new_signal()
        f_req = need_req = requests
    else:
        st["requests"] = observe(old.get("requests") or new_signal(), now, requests, horizon, p)
        f_req, need_req = need(st["requests"], horizon, p)
    need_req = max(need_req, extra_need)
    per = _target_per_replica(ctx)
    desired = math.ceil(staffed(need_req / per, p.staffing_beta) - 1e-9)
    # The count a scale-down may go to: the window's highest need with the hysteresis band to spare.
    st["peaks"] = _window_peaks(old.get("peaks") or [], now, need_req, p)
    recent = max(v for _, v in st["peaks"])
    fit = math.ceil(staffed(recent / (per * (1 - p.hysteresis)), p.staffing_beta) - 1e-9)

    tokens = _tokens(ctx)
    if tokens is not None and p.target_tokens_per_replica:
        st["tokens"] = observe(old.get("tokens") or new_signal(), now, tokens, horizon, p)
        _, need_tok = need(st["tokens"], horizon, p)
        desired = max(desired, math.ceil(need_tok / p.target_tokens_per_replica - 1e-9))
        fit = max(fit, math.ceil(need_tok / (p.target_tokens_per_replica * (1 - p.hysteresis)) - 1e-9))

    lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    current = ctx.target_num_replicas
    decision = current
    pending = ctx.target_num_replicas > ctx.current_num_replicas
    if st["dir"] < 0 and desired > current:
        # Turning a downward run around spends a reversal: only for the load already here (staffed),
        # not for the forecast's headroom, which a noisy signal crosses and recrosses.
        decision = max(current, math.ceil(staffed(requests / per, p.staffing_beta) - 1e-9))
    elif desired > current and not (pending and desired < 2 * current):
        # Never held back (the SLO comes first), except while replicas asked for are still
        # starting: the load they will take is not yet visible, so only a large miss adds more.
        decision = desired
    elif fit < current:
        cooled = now - st["last_change"] >= p.downscale_cooldown_s
        # Turning an upward run around costs a reversal now and, likely, one more when load
        # returns: only when both fit the hour's budget. Downward runs are not limited.
        budget = st["dir"] <= 0 or len(st["revs"]) + p.reversal_reserve <= p.max_reversals_per_hour
        if cooled and budget:
            decision = max(fit, desired)
    decision = max(lo, min(hi, decision))
    if decision != current:
        direction = 1 if decision > current else -1
        if st["dir"] and direction != st["dir"]:
            st["revs"].append(now)
        st["dir"] = direction
        st["last_change"] = now
    return Plan(requests, f_req, need_req, horizon, desired, decision), st


def decide(ctx, params: PolicyParams | None = None) -> tuple[int, dict[str, Any]]:
    """The deployment-level policy: `(replicas, policy_state)`."""
    result, st = plan(ctx, params or PolicyParams())
    return result.decision, {**(ctx.policy_state or {}), STATE_KEY: st}


def forecast_policy(ctx) -> tuple[int, dict[str, Any]]:
    """`decide` with the default parameters (for `policy_function` paths that take no kwargs)."""
    return decide(ctx)


def decide_app(contexts: dict, params: PolicyParams | None = None, leader: str = "Gateway",
               max_boost: float = 4.0) -> tuple[dict, dict]:
    """The application-level policy: each deployment by its own forecast, and the followers grown
    with the leader (the ingress sees a surge first; its models will get it one hop later): a
    follower provisions at least its current load times the leader's forecast growth."""
    p = params or PolicyParams()
    plans: dict = {}
    states: dict = {}
    lead = next((d for d, c in contexts.items() if c.deployment_name == leader), None)
    growth = 1.0
    if lead is not None:
        lp, lst = plan(contexts[lead], p)
        plans[lead], states[lead] = lp, lst
        if lp.now_requests > 0:
            growth = min(max(lp.need_requests / lp.now_requests, 1.0), max_boost)
    for dep, ctx in contexts.items():
        if dep == lead:
            continue
        now_req = float(ctx.total_num_requests or 0.0)
        plans[dep], states[dep] = plan(ctx, p, extra_need=now_req * growth)
    decisions = {d: pl.decision for d, pl in plans.items()}
    return decisions, {d: {**(contexts[d].policy_state or {}), STATE_KEY: states[d]} for d in contexts}


# ------------------------------------------------------------------------- what Serve instantiates


class _Gauges:
    """The policy's view as Ray metrics, so an HPA/KEDA (through Prometheus) can scale non-Ray parts
    on the same forecast. Created lazily in the process that runs the policy (Serve's controller)."""

    NAMES = {
        "ongoing": ("orfeas_autoscaling_ongoing_requests", "Ongoing (running + queued) requests, look-back mean."),
        "queued": ("orfeas_autoscaling_queued_requests", "Requests queued at the handles (queue depth)."),
        "forecast": ("orfeas_autoscaling_forecast_requests", "Forecast ongoing requests one horizon ahead."),
        "need": ("orfeas_autoscaling_need_requests", "Forecast plus quantile headroom: what is provisioned for."),
        "horizon": ("orfeas_autoscaling_horizon_seconds", "Forecast horizon (cold start + half the look-back)."),
        "decision": ("orfeas_autoscaling_decision_replicas", "Replicas the ORFEAS policy decided."),
    }

    def __init__(self) -> None:
        self._gauges: dict[str, Any] | None = None

    def publish(self, ctx, result: Plan) -> None:
        try:
            if self._gauges is None:
                from ray.util.metrics import Gauge

                self._gauges = {k: Gauge(n, description=d, tag_keys=("application", "deployment"))
                                for k, (n, d) in self.NAMES.items()}
            tags = {"application": ctx.app_name or "", "deployment": ctx.deployment_name}
            queued = ctx.total_queued_requests
            values = {"ongoing": result.now_requests, "queued": float(queued or 0.0),
                      "forecast": result.forecast_requests, "need": result.need_requests,
                      "horizon": result.horizon_s, "decision": float(result.decision)}
            for k, v in values.items():
                self._gauges[k].set(v, tags=tags)
        except Exception as e:  # metrics must never stop scaling (e.g. Ray not initialised in a test)
            log.debug("autoscaling metrics not exported: %s", e)


class ForecastPolicy:
    """Deployment-level: `AutoscalingPolicy(policy_function="scaling.policy:ForecastPolicy",
    policy_kwargs={...PolicyParams fields})`."""

    def __init__(self, **kwargs: Any):
        self.params = PolicyParams.of(kwargs)
        self._gauges = _Gauges()

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        try:
            result, st = plan(ctx, self.params)
        except Exception:  # a bug here must not take the controller's loop down: hold the count
            log.exception("ORFEAS autoscaling policy failed for %s; keeping %d replicas",
                          ctx.deployment_name, ctx.target_num_replicas)
            return ctx.target_num_replicas, dict(ctx.policy_state or {})
        self._gauges.publish(ctx, result)
        return result.decision, {**(ctx.policy_state or {}), STATE_KEY: st}

    def describe(self) -> dict[str, Any]:
        return asdict(self.params)


class AppForecastPolicy:
    """Application-level: `applications[].autoscaling_policy = {"policy_function":
    "scaling.policy:AppForecastPolicy", "policy_kwargs": {"leader": "Gateway", ...}}`."""

    def __init__(self, leader: str = "Gateway", max_boost: float = 4.0, **kwargs: Any):
        self.params = PolicyParams.of(kwargs)
        self.leader, self.max_boost = leader, max_boost

    def __call__(self, contexts: dict) -> tuple[dict, dict]:
        try:
            return decide_app(contexts, self.params, self.leader, self.max_boost)
        except Exception:
            log.exception("ORFEAS application autoscaling policy failed; keeping every count")
            return ({d: c.target_num_replicas for d, c in contexts.items()},
                    {d: dict(c.policy_state or {}) for d, c in contexts.items()})
