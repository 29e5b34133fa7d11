"""Load profile of a request trace and the autoscaling settings it suggests (`orfeas autoscale analyze`).

Rate over time (per-minute counts), burstiness (coefficient of variation of inter-arrival gaps:
1 is Poisson; index of dispersion of 10-second counts), periodicity (the strongest
autocorrelation of per-minute counts and its lag), the prompt/output token mix, and, from an
engine profile (benchmarks/engine_profile.py) when given, the per-replica capacity behind the
recommended `autoscaling` settings.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from scaling.simulator import Profile
from scaling.traces import Trace


def _pcts(x: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(x)), "p50": float(np.percentile(x, 50)), "p90": float(np.percentile(x, 90)),
            "p99": float(np.percentile(x, 99)), "max": float(np.max(x))}


def periodicity(counts: np.ndarray, min_lag: int = 2) -> tuple[int | None, float]:
    """(lag in buckets, autocorrelation) of the strongest repeat in the counts, or (None, 0)."""
    x = counts - counts.mean()
    denom = float(np.dot(x, x))
    if len(x) < 2 * min_lag + 2 or denom == 0:
        return None, 0.0
    acf = np.correlate(x, x, mode="full")[len(x) - 1:] / denom
    # A period is a peak after the autocorrelation has first fallen (below zero, or to a local
    # minimum): the high correlation of neighbouring minutes is persistence, not a cycle.
    half = len(x) // 2
    start = next((k for k in range(1, half) if acf[k] <= 0 or acf[k] < acf[k - 1] <= acf[k + 1]), None)
    if start is None:
        return None, 0.0
    start = max(start, min_lag)
    if start >= half:
        return None, 0.0
    best = start + int(np.argmax(acf[start:half + 1]))
    if best == start or acf[best] <= 0:
        return None, 0.0
    return best, float(acf[best])


def _daily(trace: Trace) -> float | None:
    """Autocorrelation of hourly counts at a 24-hour lag (None: shorter than a day and a half)."""
    if trace.duration_s < 1.5 * 86400:
        return None
    hours = np.bincount((trace.t // 3600).astype(int)).astype(float)
    x = hours - hours.mean()
    denom = float(np.dot(x, x))
    return float(np.dot(x[:-24], x[24:]) / denom) if denom and len(x) > 24 else None


def profile_trace(trace: Trace) -> dict[str, Any]:
    if len(trace) < 2:
        raise ValueError(f"trace {trace.name} has {len(trace)} request(s): at least 2 are needed")
    minutes = np.bincount((trace.t // 60).astype(int)).astype(float)
    tens = np.bincount((trace.t // 10).astype(int)).astype(float)
    gaps = np.diff(trace.t)
    lag, acf = periodicity(minutes)
    rate_per_min = minutes / 60.0
    return {
        "trace": trace.name, "requests": len(trace), "duration_s": trace.duration_s,
        "rate_rps": {"mean": len(trace) / max(trace.duration_s, 1e-9), **{k: v for k, v in _pcts(rate_per_min).items()
                                                                           if k != "mean"},
                     "min": float(rate_per_min.min()), "peak_to_mean": float(rate_per_min.max() / rate_per_min.mean())},
        "rate_per_minute": [round(float(v), 4) for v in rate_per_min],
        "burstiness": {"interarrival_cv": float(gaps.std() / gaps.mean()) if gaps.mean() > 0 else 0.0,
                       "dispersion_10s": float(tens.var() / tens.mean()) if tens.mean() > 0 else 0.0},
        "periodicity": {"period_s": lag * 60 if lag else None, "autocorrelation": acf,
                        "daily_cycle_visible": trace.duration_s >= 1.5 * 86400,
                        "daily_autocorrelation": _daily(trace)},
        "tokens": {"prompt": _pcts(trace.prompt), "output": _pcts(trace.output),
                   "prompt_share": float(trace.prompt.sum() / (trace.prompt.sum() + trace.output.sum()))},
    }


def recommend(p: dict[str, Any], engine: Profile | None, *, slo_s: float = 1.0) -> dict[str, Any]:
    """The `autoscaling` settings for this load (and, with an engine profile, the replica counts)."""
    bursty = p["burstiness"]["interarrival_cv"] > 1.5 or p["burstiness"]["dispersion_10s"] > 3
    out: dict[str, Any] = {
        "policy": "orfeas",
        "quantile": 0.9 if bursty else 0.5,
        "downscale_cooldown_s": 300.0 if p["rate_rps"]["peak_to_mean"] > 3 else 120.0,
        "why": [],
    }
    out["why"].append("bursty arrivals (inter-arrival CV %.2f, dispersion %.1f): headroom at the 90th percentile "
                      "of forecast errors" % (p["burstiness"]["interarrival_cv"], p["burstiness"]["dispersion_10s"])
                      if bursty else "near-Poisson arrivals: the median forecast error (square-root staffing "
                      "covers the spread)")
    if engine is not None:
        # A serial engine serves one request at a time: a second ongoing one per replica only waits.
        target = 1.0 if engine.serial else engine.max_ongoing_requests / 2
        c = max(int(target), 1)
        service = engine.ttft(c, int(p["tokens"]["prompt"]["mean"])) + p["tokens"]["output"]["mean"] * engine.tpot(c)
        per_replica = target / service  # requests/s one replica holds at the target concurrency
        out.update(
            horizon_s=round(max(engine.cold_start_s, 10.0), 1),
            target_ongoing_requests=target,
            min_replicas=max(1, math.floor(p["rate_rps"]["min"] / per_replica)),
            max_replicas=max(1, math.ceil(p["rate_rps"]["max"] * 1.25 / per_replica)),
            replica_capacity_rps=per_replica,
        )
        out["why"].append(f"one replica holds {per_replica:.2f} req/s at {target:g} ongoing (mean service "
                          f"{service:.2f} s); max covers the peak minute with 25% to spare")
        out["why"].append(f"horizon = the engine's cold start ({engine.cold_start_s:.1f} s, at least 10 s)")
    if p["periodicity"]["period_s"] and p["periodicity"]["autocorrelation"] > 0.3:
        out["why"].append(f"load repeats every {p['periodicity']['period_s'] / 60:.0f} min "
                          f"(autocorrelation {p['periodicity']['autocorrelation']:.2f})")
    daily = p["periodicity"].get("daily_autocorrelation")
    if daily is not None and daily > 0.3:
        out["why"].append(f"a daily cycle (24 h autocorrelation {daily:.2f}): the forecast's trend follows its "
                          "ramps; keep min_replicas for the trough")
    if not p["periodicity"]["daily_cycle_visible"]:
        out["why"].append("shorter than a day and a half: a daily cycle cannot be seen in this trace")
    return out
