"""Anomaly detection, pure (observability.anomaly): a seasonal baseline expects the daily peak and
catches a night-time spike a static threshold misses; EWMA catches a jump in a flat series."""

from __future__ import annotations

import math
import random

import pytest

from observability import anomaly
from observability.alerts import from_anomaly

PERIOD = 48


def daily(days: int = 6, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [1.0 + 0.8 * math.sin(2 * math.pi * t / PERIOD) + rng.gauss(0, 0.03) for t in range(PERIOD * days)]


def test_seasonal_baseline_expects_the_peak_and_flags_an_off_peak_spike():
    series = daily()
    night = PERIOD * 5 + 36  # the daily low (about 0.2)
    series[night] = 1.5       # below every daily peak (1.8): a static threshold cannot see it
    found = anomaly.detect_seasonal(series, PERIOD, seasons=4)
    assert [a.index for a in found] == [night]
    assert found[0].expected == pytest.approx(0.2, abs=0.1) and found[0].score > 4
    assert max(series[: PERIOD * 5]) > 1.5  # the peaks are higher than the anomaly
    words = anomaly.describe(found[0], "ttft_p95", "s")
    assert words.startswith("ttft_p95 is 1.5s, expected 0.2") and "spreads above" in words
    alert = from_anomaly("ttft_p95{model=m}", words, anomaly.severity(found[0]))
    assert alert.severity == "critical" and alert.summary == words


def test_direction_decides_which_side_counts():
    series = daily()
    series[PERIOD * 5 + 12] -= 1.0  # a traffic drop at the daily high
    assert anomaly.detect_seasonal(series, PERIOD, seasons=4, direction="up") == []
    assert [a.index for a in anomaly.detect_seasonal(series, PERIOD, seasons=4, direction="down")] == [PERIOD * 5 + 12]


def test_ewma_flags_a_jump_and_is_not_dragged_along_by_it():
    rng = random.Random(3)
    series = [0.01 + rng.gauss(0, 0.001) for _ in range(200)]
    for i in (120, 121, 160):
        series[i] = 0.05
    assert [a.index for a in anomaly.detect_ewma(series, alpha=0.1, warmup=20)] == [120, 121, 160]


def test_bad_parameters_and_series_are_refused_with_the_reason():
    with pytest.raises(anomaly.AnomalyInputError, match="period"):
        anomaly.seasonal_scores([1.0] * 10, 1)
    with pytest.raises(anomaly.AnomalyInputError, match="NaN"):
        anomaly.ewma_scores([1.0, float("nan")])
    with pytest.raises(anomaly.AnomalyInputError, match="alpha"):
        anomaly.ewma_scores([1.0], alpha=1.5)
    with pytest.raises(anomaly.AnomalyInputError, match="scores for"):
        anomaly.detect([None], [1.0, 2.0])
    assert anomaly.seasonal_scores([1.0] * 10, 5) == [None] * 10  # not enough history: nothing scored
