"""Anomaly detection over metric series (latency, error rate, cost, traffic), pure functions.

Two scorers, each a robust z-score per point (how many spreads from what was expected):

- `seasonal_scores`: the expected value is the median of the same phase in earlier seasons
  (e.g. the same five minutes of each of the last 7 days), the spread their median absolute
  deviation. A daily peak is expected; a spike at 3 a.m. is not. Needs `seasons` full periods of
  history before a point is scored.
- `ewma_scores`: the expected value is an exponentially weighted moving average of the past,
  the spread its exponentially weighted deviation, for series without a season (or too little
  history for one).

`detect` turns scores into `Anomaly`s (points past `threshold` in the watched direction: latency,
errors and cost are bad when high, traffic either way), and `describe` says one in words, for
the alert receiver (`observability.alerts.from_anomaly`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import median
from typing import Literal, Sequence

Direction = Literal["up", "down", "both"]
MAD_TO_SIGMA = 1.4826  # the MAD of a normal distribution times this is its standard deviation
WIDTH = 6  # points either side of the same phase that count as the same time of day (30 min at 5 min)


class AnomalyInputError(ValueError):
    """Parameters or a series that cannot be scored; the message says which and why."""


@dataclass(frozen=True)
class Anomaly:
    index: int
    value: float
    expected: float
    score: float  # robust z: spreads from the expected value (signed)


def _check(series: Sequence[float]) -> list[float]:
    values = [float(v) for v in series]
    if any(math.isnan(v) or math.isinf(v) for v in values):
        raise AnomalyInputError("the series holds NaN or infinite values: drop or fill them first")
    return values


def seasonal_scores(series: Sequence[float], period: int, seasons: int = 4, min_spread: float = 1e-9
                    ) -> list[tuple[float, float] | None]:
    """Per point: (expected, robust z) from the same phase of the previous `seasons` periods, or
    None while there is not enough history. `min_spread` keeps a flat history from dividing by 0
    (give it in the series' units: the smallest change that matters)."""
    if period < 2:
        raise AnomalyInputError(f"period must be at least 2 points, not {period}")
    if seasons < 2:
        raise AnomalyInputError(f"seasons must be at least 2, not {seasons}")
    values = _check(series)
    out: list[tuple[float, float] | None] = []
    for t, x in enumerate(values):
        if t < period * seasons:
            out.append(None)
            continue
        # the same phase, and its neighbours, in each earlier season: robust to a little jitter
        same = [values[t - k * period + d] for k in range(1, seasons + 1) for d in range(-WIDTH, WIDTH + 1)
                if 0 <= t - k * period + d < t]
        m = median(same)
        mad = median(abs(v - m) for v in same)
        spread = max(MAD_TO_SIGMA * mad, min_spread)
        out.append((m, (x - m) / spread))
    return out


def ewma_scores(series: Sequence[float], alpha: float = 0.1, warmup: int = 10, min_spread: float = 1e-9
                ) -> list[tuple[float, float] | None]:
    """Per point: (expected, z) against the EWMA mean and deviation of the points before it
    (None during `warmup`). A point scored as anomalous does not move the baseline much: it
    enters with a tenth of the weight, so one spike does not hide the next."""
    if not 0 < alpha < 1:
        raise AnomalyInputError(f"alpha must be between 0 and 1, not {alpha}")
    values = _check(series)
    out: list[tuple[float, float] | None] = []
    mean, var = None, 0.0
    for t, x in enumerate(values):
        if mean is None:
            mean = x
            out.append(None)
            continue
        spread = max(math.sqrt(var), min_spread)
        z = (x - mean) / spread
        out.append((mean, z) if t >= warmup else None)
        a = alpha * (0.1 if t >= warmup and abs(z) > 4 else 1.0)
        diff = x - mean
        mean += a * diff
        var = (1 - a) * (var + a * diff * diff)
    return out


def detect(scores: Sequence[tuple[float, float] | None], series: Sequence[float], threshold: float = 4.0,
           direction: Direction = "up") -> list[Anomaly]:
    """The points whose score passes `threshold` in `direction`."""
    if threshold <= 0:
        raise AnomalyInputError(f"threshold must be positive, not {threshold}")
    if len(scores) != len(series):
        raise AnomalyInputError(f"{len(scores)} scores for {len(series)} points")
    out = []
    for i, (s, x) in enumerate(zip(scores, series)):
        if s is None:
            continue
        expected, z = s
        if (direction == "up" and z > threshold) or (direction == "down" and z < -threshold) or \
                (direction == "both" and abs(z) > threshold):
            out.append(Anomaly(i, float(x), expected, z))
    return out


def detect_seasonal(series: Sequence[float], period: int, *, seasons: int = 4, threshold: float = 4.0,
                    direction: Direction = "up", min_spread: float = 1e-9) -> list[Anomaly]:
    return detect(seasonal_scores(series, period, seasons, min_spread), series, threshold, direction)


def detect_ewma(series: Sequence[float], *, alpha: float = 0.1, warmup: int = 10, threshold: float = 4.0,
                direction: Direction = "up", min_spread: float = 1e-9) -> list[Anomaly]:
    return detect(ewma_scores(series, alpha, warmup, min_spread), series, threshold, direction)


def describe(a: Anomaly, series_name: str, unit: str = "") -> str:
    """One anomaly in words, e.g. "ttft_p95 is 3.2s, expected 0.4s (7.1 spreads above)"."""
    side = "above" if a.score > 0 else "below"
    return (f"{series_name} is {a.value:.4g}{unit}, expected {a.expected:.4g}{unit} "
            f"({abs(a.score):.1f} spreads {side})")


def severity(a: Anomaly, threshold: float = 4.0) -> str:
    """critical at twice the threshold, else warning."""
    return "critical" if abs(a.score) >= 2 * threshold else "warning"
