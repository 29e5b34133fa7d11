"""A trace-driven simulator of one Serve deployment under an autoscaling policy.

Replicas serve with times from a profile measured on the real engine here
(`benchmarks/engine_profile.py`: TTFT and per-token time against concurrency, cold start). Each
replica holds up to `max_ongoing_requests` requests; further requests wait in a FIFO queue. A
batching engine shares its time among them (the per-token time grows with concurrency; TTFT is
the wait plus the prefill at the concurrency it joins). A serial engine (`serial`: ORFEAS's
transformers engine generates one request at a time) serves its requests in order: a request's
first token comes after the ones before it finish, then its prefill. A replica that is
added starts serving after the cold start; one that is removed stops taking requests and is paid
for until its last request finishes.

The policy sees what Serve's controller gives it: an `AutoscalingContext` (Ray's own class) whose
`total_num_requests` is the mean of ongoing requests over `look_back_period_s` (and
`total_queued_requests` the mean of the queue over it, as Serve aggregates both), called every
`control_s`, wrapped the way the controller wraps every policy (`_apply_autoscaling_config`:
scaling factors, delays, bounds). Ray's delay logic reads `time.time()`; the run gives that
module the simulated clock.
"""

from __future__ import annotations

import json
import math
import types
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from scaling.traces import Trace


@dataclass(frozen=True)
class Profile:
    """Service times of one replica of the engine, measured (benchmarks/engine_profile.py)."""

    engine: str
    concurrency: list[int]
    ttft_s: list[float]  # time to first token at base_prompt_tokens, per concurrency
    tpot_s: list[float]  # seconds per output token, per concurrency
    prefill_s_per_token: float  # extra TTFT per prompt token beyond base_prompt_tokens
    base_prompt_tokens: int
    cold_start_s: float
    max_ongoing_requests: int = 8
    serial: bool = False  # one request at a time per replica (TTFT grows, per-token time does not)
    # Measured (prompt tokens, TTFT s) at concurrency 1: prefill is interpolated between them
    # (past the last, at the last segment's slope) instead of the one linear slope.
    prefill_points: list | None = None
    max_prompt_tokens: int | None = None  # the model's context: a longer prompt is refused at once

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        data = json.loads(Path(path).read_text())
        data = data.get("profile", data)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def prefill(self, prompt_tokens):
        """Prefill seconds beyond the base prompt's (a number or an array of prompt lengths)."""
        n = np.maximum(np.asarray(prompt_tokens, dtype=float) - self.base_prompt_tokens, 0.0)
        if not self.prefill_points or len(self.prefill_points) < 2:
            return self.prefill_s_per_token * n
        xs = np.asarray([p[0] for p in self.prefill_points], dtype=float) - self.base_prompt_tokens
        ys = np.asarray([p[1] for p in self.prefill_points], dtype=float)
        ys = ys - ys[0]
        slope = (ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1e-9)
        return np.where(n <= xs[-1], np.interp(n, xs, ys), ys[-1] + slope * (n - xs[-1]))

    def ttft(self, c: int, prompt_tokens: int) -> float:
        base = float(np.interp(c, self.concurrency, self.ttft_s))
        return base + float(self.prefill(prompt_tokens))

    def unloaded_ttft(self, prompt_tokens) -> np.ndarray:
        """TTFT of each prompt alone on an idle replica: what no replica count can shorten."""
        return self.ttft_s[0] + self.prefill(prompt_tokens)

    def tpot(self, c: int) -> float:
        return float(np.interp(max(c, 1), self.concurrency, self.tpot_s))


@dataclass
class _Replica:
    ready_at: float
    draining: bool = False
    active: list = field(default_factory=list)  # batching: remaining per-token steps; serial: finish times
    free_at: float = 0.0  # serial: when the last admitted request finishes


@dataclass(frozen=True)
class Result:
    policy: str
    requests: int
    refused: int  # prompts longer than the model's context: answered with an error at once
    slo_s: float
    slo_attainment: float
    ttft_p50_s: float
    ttft_p99_s: float
    replica_seconds: float
    mean_replicas: float
    max_replicas: int
    scale_events: int
    reversals: int
    reversals_per_hour: float
    simulated_s: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@contextmanager
def _sim_clock(clock: list[float]) -> Iterator[None]:
    """Ray's delay logic (`ray.serve.autoscaling_policy`) reads time.time(): give it ours."""
    from ray.serve import autoscaling_policy

    real = autoscaling_policy.time
    autoscaling_policy.time = types.SimpleNamespace(time=lambda: clock[0])
    try:
        yield
    finally:
        autoscaling_policy.time = real


def _context(config, target: int, running: int, ongoing: float, queued: float, state: dict, now: float):
    from ray.serve._private.common import DeploymentID
    from ray.serve.config import AutoscalingContext

    return AutoscalingContext(
        deployment_id=DeploymentID(name="Model", app_name="sim"), deployment_name="Model", app_name="sim",
        current_num_replicas=running, target_num_replicas=target, running_replicas=[],
        total_num_requests=ongoing, total_queued_requests=queued, aggregated_metrics={}, raw_metrics={},
        capacity_adjusted_min_replicas=config.min_replicas, capacity_adjusted_max_replicas=config.max_replicas,
        policy_state=state, last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=config)


def simulate(trace: Trace, profile: Profile, policy: Callable, config, *, name: str, slo_s: float,
             dt: float = 0.25, control_s: float = 1.0) -> Result:
    """Run `trace` through one deployment scaled by `policy` (a raw policy function or callable
    object, wrapped here as Serve's controller wraps it) under Ray's `AutoscalingConfig`.

    The SLO is on the wait scaling controls: a request attains it when its TTFT is at most its
    unloaded TTFT (its own prefill on an idle replica) plus `slo_s`."""
    from ray.serve.autoscaling_policy import _apply_autoscaling_config

    wrapped = _apply_autoscaling_config(policy)
    clock = [0.0]
    slots = profile.max_ongoing_requests
    target = max(config.initial_replicas or config.min_replicas, 1)
    replicas = [_Replica(ready_at=0.0) for _ in range(target)]
    queue: deque = deque()  # (arrival, prompt, output)
    window: deque = deque()  # (t, ongoing, queued) samples for the look-back means
    window_sum = queued_sum = 0.0
    ttft = np.full(len(trace), np.nan)
    arrivals, prompts, outputs = trace.t, trace.prompt, trace.output
    refused = np.zeros(len(trace), dtype=bool)
    if profile.max_prompt_tokens:
        refused = prompts >= profile.max_prompt_tokens
    i, n = 0, len(trace)
    state: dict = {}
    replica_s = 0.0
    peak = target
    directions: list[int] = []
    next_control = control_s
    end = trace.duration_s

    def admit(rep: _Replica, idx: int, wait: float) -> None:
        if profile.serial:
            now = arrivals[idx] + wait
            start = max(now, rep.free_at, rep.ready_at)
            first = profile.ttft(1, int(prompts[idx]))
            ttft[idx] = start - arrivals[idx] + first
            rep.free_at = start + first + float(outputs[idx]) * profile.tpot(1)
            rep.active.append(rep.free_at)
            return
        c = len(rep.active) + 1
        first = profile.ttft(c, int(prompts[idx]))
        ttft[idx] = wait + first
        rep.active.append(float(outputs[idx]) + first / profile.tpot(c))

    def free_replica(now: float) -> _Replica | None:
        best = None
        for r in replicas:
            if not r.draining and r.ready_at <= now and len(r.active) < slots:
                if best is None or len(r.active) < len(best.active):
                    best = r
        return best

    with _sim_clock(clock):
        t = 0.0
        while t < end or i < n or queue or any(r.active for r in replicas):
            t_next = t + dt
            # Arrivals in [t, t_next): straight to a free slot, else the queue.
            while i < n and arrivals[i] < t_next:
                if refused[i]:
                    i += 1
                    continue
                rep = None if queue else free_replica(arrivals[i])
                if rep is not None:
                    admit(rep, i, 0.0)
                else:
                    queue.append(i)
                i += 1
            # Decode for dt; finished requests free their slots.
            for r in replicas:
                if profile.serial:
                    if r.active and r.active[0] <= t_next:
                        r.active = [x for x in r.active if x > t_next]
                elif r.active and r.ready_at <= t_next:
                    step = dt / profile.tpot(len(r.active))
                    r.active = [x - step for x in r.active if x > step]
            replicas = [r for r in replicas if not (r.draining and not r.active)]
            while queue:
                rep = free_replica(t_next)
                if rep is None:
                    break
                idx = queue.popleft()
                admit(rep, idx, t_next - arrivals[idx])
            replica_s += len(replicas) * dt
            # What Serve's metrics see: ongoing (running + queued) requests, look-back mean.
            ongoing = len(queue) + sum(len(r.active) for r in replicas)
            window.append((t_next, ongoing, len(queue)))
            window_sum += ongoing
            queued_sum += len(queue)
            while window and window[0][0] <= t_next - config.look_back_period_s:
                _, gone, gone_q = window.popleft()
                window_sum -= gone
                queued_sum -= gone_q
            t = t_next
            clock[0] = t
            if t >= next_control:
                next_control += control_s
                running = sum(1 for r in replicas if not r.draining and r.ready_at <= t)
                ctx = _context(config, target, running, window_sum / len(window), queued_sum / len(window), state, t)
                decision, state = wrapped(ctx)
                decision = max(config.min_replicas, min(config.max_replicas, math.ceil(decision)))
                if decision != target:
                    directions.append(1 if decision > target else -1)
                    _resize(replicas, decision, t, profile.cold_start_s)
                    target = decision
                    peak = max(peak, target)

    served = ~np.isnan(ttft)
    done = ttft[served]
    waited = done - profile.unloaded_ttft(prompts[served])
    reversals = sum(1 for a, b in zip(directions, directions[1:]) if a != b)
    hours = max(end, 1.0) / 3600.0
    return Result(
        policy=name, requests=int(len(done)), refused=int(refused.sum()), slo_s=slo_s,
        slo_attainment=float(np.mean(waited <= slo_s + 1e-9)) if len(done) else 1.0,
        ttft_p50_s=float(np.percentile(done, 50)) if len(done) else 0.0,
        ttft_p99_s=float(np.percentile(done, 99)) if len(done) else 0.0,
        replica_seconds=replica_s, mean_replicas=replica_s / max(t, dt), max_replicas=peak,
        scale_events=len(directions), reversals=reversals, reversals_per_hour=reversals / hours,
        simulated_s=t)


def _resize(replicas: list[_Replica], target: int, now: float, cold_start_s: float) -> None:
    serving = [r for r in replicas if not r.draining]
    if target > len(serving):
        replicas.extend(_Replica(ready_at=now + cold_start_s) for _ in range(target - len(serving)))
        return
    # Fewer: cancel replicas still starting (latest first), then drain the least busy.
    surplus = len(serving) - target
    for r in sorted(serving, key=lambda r: (-r.ready_at if r.ready_at > now else 0, len(r.active))):
        if surplus == 0:
            break
        if r.ready_at > now:
            replicas.remove(r)
        else:
            r.draining = True
        surplus -= 1


def ray_default_config(**overrides: Any):
    """Ray's AutoscalingConfig with its shipped defaults, plus overrides."""
    from ray.serve.config import AutoscalingConfig

    return AutoscalingConfig(**overrides)


def orfeas_config(params: dict[str, Any], **overrides: Any):
    """The AutoscalingConfig ORFEAS writes for its policy (scaling/serve_options.py): Ray's delays
    0, the policy keeps its own cooldown and hysteresis."""
    from ray.serve.config import AutoscalingConfig

    return AutoscalingConfig(upscale_delay_s=0.0, downscale_delay_s=0.0,
                             policy={"policy_function": "scaling.policy:ForecastPolicy", "policy_kwargs": params},
                             **overrides)


def initial_replicas(trace: Trace, profile: Profile, target: float, window_s: float = 300.0) -> int:
    """The count the first `window_s` of offered load needs at `target` ongoing requests per
    replica (Little's law: rate x service time)."""
    window = min(window_s, trace.duration_s or window_s)
    first = trace.t < window
    if not first.any():
        return 1
    c = 1 if profile.serial else max(int(target), 1)
    service = np.mean([profile.ttft(c, int(p)) for p in trace.prompt[first]]) + \
        float(np.mean(trace.output[first])) * profile.tpot(c)
    return max(1, math.ceil(first.sum() / window * service / _per_replica(profile, target)))


def _per_replica(profile: Profile, target: float) -> float:
    """Requests in service per replica at `target` ongoing: a batching engine serves them all at
    once; a serial one serves one while the rest wait (M/M/1: L = rho / (1 - rho))."""
    return target / (1 + target) if profile.serial else target


def peak_replicas(trace: Trace, profile: Profile, target: float) -> int:
    """Twice what the busiest minute's offered load needs at `target` per replica: the max_replicas
    every policy gets (an operator sets a max near the peak, not an unbounded one)."""
    minutes = np.bincount((trace.t // 60).astype(int))
    c = 1 if profile.serial else max(int(target), 1)
    service = float(np.mean(profile.ttft(c, int(np.mean(trace.prompt))) + trace.output * profile.tpot(c)))
    return max(2, math.ceil(2 * minutes.max() / 60.0 * service / _per_replica(profile, target)))


def compare(trace: Trace, profile: Profile, *, slo_s: float, min_replicas: int = 1, max_replicas: int | None = None,
            target_ongoing_requests: float | None = None, params: dict[str, Any] | None = None,
            dt: float = 0.25) -> dict[str, Result]:
    """Ray's default policy (its shipped settings: 30 s up / 600 s down delays) and ORFEAS's on the
    same trace, at the same per-replica target (unless given: Ray's default, 2 ongoing requests;
    1 for a serial engine),
    the same bounds and the same warm start."""
    from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

    from scaling.policy import ForecastPolicy

    # A serial engine serves one request at a time: a second ongoing request per replica only waits.
    target = target_ongoing_requests or (1.0 if profile.serial else 2.0)
    params = {"horizon_s": max(profile.cold_start_s, 10.0), **(params or {})}
    max_replicas = max_replicas or peak_replicas(trace, profile, target)
    # Both start warm: sized for the first minute's offered load (Little's law), not at the
    # minimum, or the first minutes are a start-up transient of the simulation.
    bounds = {"min_replicas": min_replicas, "max_replicas": max_replicas,
              "initial_replicas": min(max(initial_replicas(trace, profile, target), min_replicas), max_replicas)}
    return {
        "ray_default": simulate(trace, profile, replica_queue_length_autoscaling_policy,
                                ray_default_config(target_ongoing_requests=target, **bounds),
                                name="ray default", slo_s=slo_s, dt=dt),
        "orfeas": simulate(trace, profile, ForecastPolicy(**params),
                           orfeas_config(params, target_ongoing_requests=target, **bounds),
                           name="orfeas forecast", slo_s=slo_s, dt=dt),
    }


def busy_replicas(trace: Trace, profile: Profile, step_s: float = 10.0) -> np.ndarray:
    """Per step, the most requests in service at once if every request started on arrival (no
    wait): the count a serial engine needs for nobody to wait (max_ongoing per replica otherwise)."""
    ok = trace.prompt < profile.max_prompt_tokens if profile.max_prompt_tokens else np.ones(len(trace), bool)
    start = trace.t[ok]
    end = start + profile.unloaded_ttft(trace.prompt[ok]) + trace.output[ok] * profile.tpot(1)
    # In service at time x: started at or before x, not yet ended; sampled every second.
    grid = np.arange(0.0, float(end.max()) + 1.0, 1.0)
    busy = np.searchsorted(np.sort(start), grid, side="right") - np.searchsorted(np.sort(end), grid, side="right")
    per = 1 if profile.serial else profile.max_ongoing_requests
    per_step = int(round(step_s))
    busy = np.ceil(busy / per)
    pad = (-len(busy)) % per_step
    return np.concatenate([busy, np.zeros(pad)]).reshape(-1, per_step).max(axis=1)


def fewest_replica_seconds(need: np.ndarray, start: int, max_reversals: int, step_s: float = 10.0) -> float:
    """The fewest replica-seconds of any count that is at least `need` at every step (known in
    advance: a clairvoyant policy, no cold start) and turns around at most `max_reversals` times,
    starting at `start`. A lower bound for every real policy under the same reversal budget that
    lets no request wait. Dynamic programme over (reversals used, last direction, level)."""
    top = int(max(need.max(), start)) + 1
    levels = np.arange(top + 1, dtype=float)
    inf = np.inf
    # v[r, d, L]: cost so far at level L after r reversals, last direction d (0: none, 1: up, 2: down).
    v = np.full((max_reversals + 1, 3, top + 1), inf)
    v[0, 0, start] = 0.0
    for n in need:
        nv = v.copy()  # stay at the level
        for r in range(max_reversals + 1):
            for d in range(3):
                row = v[r, d]
                if not np.isfinite(row).any():
                    continue
                up = np.concatenate([[inf], np.minimum.accumulate(row)[:-1]])  # from any lower level
                down = np.concatenate([np.minimum.accumulate(row[::-1])[::-1][1:], [inf]])  # from any higher
                ru = r + (d == 2)
                rd = r + (d == 1)
                if ru <= max_reversals:
                    nv[ru, 1] = np.minimum(nv[ru, 1], up)
                if rd <= max_reversals:
                    nv[rd, 2] = np.minimum(nv[rd, 2], down)
        nv[:, :, levels < n] = inf
        v = nv + levels * step_s
    return float(v.min())
