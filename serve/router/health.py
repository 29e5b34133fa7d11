"""Per-backend health from live traffic and the circuit breaker, as pure transitions.

States: `closed` (traffic flows), `open` (no traffic until `cooldown_s` has passed), `half_open`
(up to `half_open_max` trial requests; a success closes the circuit, a failure opens it again).
A closed circuit opens after `failure_threshold` consecutive failures, or when the error-rate
EWMA reaches `error_rate_threshold` once `min_requests` requests have been seen.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from config.settings import BreakerSettings

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True)
class BackendHealth:
    state: str = CLOSED
    consecutive_failures: int = 0
    error_ewma: float = 0.0
    latency_ewma: float | None = None
    requests: int = 0
    failures: int = 0
    opened_at: float = 0.0
    trials: int = 0  # trial requests admitted while half-open
    last_error: str | None = None


def available(h: BackendHealth, now: float, cfg: BreakerSettings) -> bool:
    """Whether a request may be sent now (without admitting it)."""
    if h.state == CLOSED:
        return True
    if h.state == OPEN:
        return now - h.opened_at >= cfg.cooldown_s
    return h.trials < cfg.half_open_max


def admit(h: BackendHealth, now: float, cfg: BreakerSettings) -> tuple[bool, BackendHealth]:
    """(admitted, new state) for one request about to be sent."""
    if h.state == CLOSED:
        return True, h
    if h.state == OPEN:
        if now - h.opened_at < cfg.cooldown_s:
            return False, h
        return True, replace(h, state=HALF_OPEN, trials=1)
    if h.trials < cfg.half_open_max:
        return True, replace(h, trials=h.trials + 1)
    return False, h


def release(h: BackendHealth) -> BackendHealth:
    """The state after an admitted request ended with no outcome (its caller went away): a
    half-open circuit gets its trial slot back, so the next request can be the trial."""
    if h.state == HALF_OPEN and h.trials > 0:
        return replace(h, trials=h.trials - 1)
    return h


def record(h: BackendHealth, ok: bool, latency_s: float | None, now: float, cfg: BreakerSettings,
           alpha: float, error: str | None = None) -> BackendHealth:
    """The state after one request's outcome (`ok` False only for failures that count: retryable ones)."""
    err = h.error_ewma + alpha * ((0.0 if ok else 1.0) - h.error_ewma)
    lat = h.latency_ewma
    if ok and latency_s is not None:
        lat = latency_s if lat is None else lat + alpha * (latency_s - lat)
    h = replace(h, requests=h.requests + 1, failures=h.failures + (0 if ok else 1), error_ewma=err, latency_ewma=lat,
                last_error=h.last_error if ok else error)
    if h.state == HALF_OPEN:
        if ok:
            return replace(h, state=CLOSED, consecutive_failures=0, trials=0, error_ewma=0.0)
        return replace(h, state=OPEN, opened_at=now, trials=0, consecutive_failures=h.consecutive_failures + 1)
    if ok:
        return replace(h, consecutive_failures=0)
    cf = h.consecutive_failures + 1
    h = replace(h, consecutive_failures=cf)
    if h.state == CLOSED and (cf >= cfg.failure_threshold
                              or (h.requests >= cfg.min_requests and err >= cfg.error_rate_threshold)):
        return replace(h, state=OPEN, opened_at=now, trials=0)
    return h


def probe(h: BackendHealth, ok: bool, now: float, cfg: BreakerSettings, error: str | None = None) -> BackendHealth:
    """An active probe's outcome: a failing probe opens the circuit; a passing one lets an open
    circuit go half-open (the next live request is the trial) once it has been open for
    `open_probe_interval_s` (or its cooldown, if shorter): a backend that is healthy again takes
    traffic within about a probe interval, not only after the cooldown."""
    if not ok:
        if h.state == OPEN:
            return replace(h, last_error=error)
        return replace(h, state=OPEN, opened_at=now, trials=0, last_error=error)
    if h.state == OPEN and now - h.opened_at >= min(cfg.cooldown_s, cfg.open_probe_interval_s):
        return replace(h, state=HALF_OPEN, trials=0)
    return h
